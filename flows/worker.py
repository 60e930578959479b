"""The medvec worker: a Prefect worker (type ``medvec``) that runs only its own site's flow, as the site pinned it.

``medvec hospital join`` and ``medvec coordinator worker`` start it; ``python -m flows.worker SITE_FILE``
is the same thing.  It polls its pool like any Prefect worker, and for each run:

1. reads what the server says of the run (deployment, flow, pull steps, job variables, parameters, the
   pool's job template) and asks :func:`flows.site.refusal` whether to run it;
2. a refused run is marked Failed (named ``Refused``) with the reason, which the worker also logs; nothing
   of it runs: no pull step, no command, no code;
3. otherwise it hands the run to its **standby process**: ``python -m flows.worker SITE_FILE --standby``, started
   in this checkout with this worker's own environment when the worker starts, which has imported the site's
   flow once (torch, Prefect, medvec: 10 s of CPU, 10 to 30 s on 2 busy cores).  For each run handed to it
   (the run's site file and id, on a Unix socket) it forks a child, which runs the flow under the existing
   flow run with the site's pinned parameters (:func:`execute`) and exits: each run is still a process of its
   own, started at once, with no imports of its own.  The standby process tells the worker the child's pid,
   then its exit status.  Nothing runs the deployment's code, so Prefect's pull steps, the deployment's
   command and the pool's job template play no part.  When the checkout's code changes (:func:`code_stamp`),
   the next run gets a new standby process; the old one ends when its children have.  It holds about 750 MB;
   ``MEDVEC_WORKER_STANDBY=0`` starts one per run, when the run comes, instead.

A process worker (``prefect worker start --type process``) would run whatever the server asks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun, State
from prefect.states import Failed
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

from flows.site import RunView, Site, for_run, pool_site_files, refusal

PROJECT_DIR = Path(__file__).resolve().parents[1]
WORKER_TYPE = "medvec"
CODE_DIRS = ("flows", "tasks", "medvec", "pipelines")  # what a standby process imports of this checkout


class MedvecJobConfiguration(BaseJobConfiguration):
    """Prefect's job configuration, resolved as usual and then ignored: the site decides what runs."""


class MedvecVariables(BaseVariables):
    """The pool's variables; a run or deployment that sets any of them is refused."""


class MedvecWorkerResult(BaseWorkerResult):
    """The exit status of one run's process (0 for a refused run: its state is already final)."""


def refused(site: Site, reason: str) -> State:
    """The final state of a refused run: Failed, named ``Refused``, with the reason."""
    return Failed(name="Refused", message=f"refused by {site.pool}'s medvec worker: {reason}")


def standby_enabled(environ: Mapping[str, str]) -> bool:
    """Whether the worker keeps a standby process (``MEDVEC_WORKER_STANDBY``: ``0`` turns it off)."""
    return environ.get("MEDVEC_WORKER_STANDBY", "1").strip().lower() not in {"0", "false", "no", "off"}


def standby_command(site_path: Path, control_fd: int) -> list[str]:
    return [sys.executable, "-m", "flows.worker", str(site_path), "--standby", "--control-fd", str(control_fd)]


def handed_run(site_path: Path, flow_run_id: UUID) -> bytes:
    """What the worker sends a standby process for one run: the run's site file and id, one line."""
    return f"{site_path}\t{flow_run_id}\n".encode()


def code_stamp(root: Path = PROJECT_DIR) -> str:
    """This checkout's code as a standby process would import it: each ``.py`` file's path, size and mtime."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class Forked:
    """One run's process, forked by a standby process: its pid, and the socket its exit status comes on."""

    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def exit_code(self) -> int:
        """The process's exit status, once it has ended (-1 if its standby process died first: then this waits
        until the pid is gone)."""
        line = await self.reader.readline()
        self.writer.close()
        if line.strip():
            return int(line)
        while _alive(self.pid):
            await anyio.sleep(1)
        return -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Standby:
    """The worker's side of a standby process: the process, its control socket, when it started, and the code
    (:func:`code_stamp`) it imported."""

    proc: anyio.abc.Process
    control: socket.socket
    started: float
    stamp: str

    async def fork(self, line: bytes) -> Forked | None:
        """Hand it a run (:func:`handed_run`); the forked process, or None when the standby process has ended."""
        if self.proc.returncode is not None:
            return None
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self.control, [line], [theirs.fileno()])
        except OSError:
            ours.close()
            return None
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        pid = await reader.readline()
        if not pid.strip():
            writer.close()
            return None
        return Forked(int(pid), reader, writer)

    def retire(self) -> None:
        """No more runs: it ends once the runs it forked have (their exit status still reported)."""
        self.control.close()

    async def stop(self) -> None:
        """End it now (the worker stops); the runs it forked go on."""
        self.retire()
        if self.proc.returncode is None:
            self.proc.kill()
            with anyio.move_on_after(5):
                await self.proc.wait()


class MedvecWorker(BaseWorker[MedvecJobConfiguration, MedvecVariables, MedvecWorkerResult]):
    """A worker for one site's pool that runs that site's flow and refuses every other run."""

    type = WORKER_TYPE
    job_configuration = MedvecJobConfiguration
    job_configuration_variables = MedvecVariables
    _description = "Runs only its site's own medvec flow, with the parameters pinned in its site file."
    _display_name = "medvec"

    def __init__(self, site_path: Path, **kwargs: Any):
        self.site_path = Path(site_path).resolve()
        self.site = Site.load(self.site_path)
        self._standby: Standby | None = None  # forks each run's process
        super().__init__(work_pool_name=self.site.pool, create_pool_if_not_found=False, **kwargs)

    async def setup(self) -> None:
        await super().setup()
        if standby_enabled(os.environ):
            self._standby = await self._start_standby(code_stamp())

    async def teardown(self, *exc_info: Any) -> None:
        """Stop the standby process (the runs it forked go on), then Prefect's own clean-up."""
        standby, self._standby = self._standby, None
        if standby is not None:
            await standby.stop()
        await super().teardown(*exc_info)

    async def _start_standby(self, stamp: str) -> Standby:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message a run, its fd with it
        try:
            proc = await anyio.open_process(
                standby_command(self.site_path, theirs.fileno()),
                cwd=PROJECT_DIR,
                env=dict(os.environ),
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        return Standby(proc, ours, time.monotonic(), stamp)

    async def _fork(self, path: Path, flow_run: FlowRun) -> Forked:
        """The run's process, forked by the standby process; a new standby process first when there is none, it
        has ended, or the checkout's code changed since it imported it (the old one is retired)."""
        line, stamp, standby = handed_run(path, flow_run.id), code_stamp(), self._standby
        forked = await standby.fork(line) if standby is not None and standby.stamp == stamp else None
        if standby is None or forked is None:
            if standby is not None:
                standby.retire()
            standby = await self._start_standby(stamp)
            forked = await standby.fork(line)
            if forked is None:
                raise RuntimeError(f"the standby process for flow run {flow_run.id} ended before it forked the run")
            self._standby = standby if standby_enabled(os.environ) else None
            if self._standby is None:
                standby.retire()  # one run, then it ends
        self._logger.info(
            "flow run %s: process %d, forked by standby process %d, started %.0f s before", flow_run.name,
            forked.pid, standby.proc.pid, time.monotonic() - standby.started,
        )  # fmt: skip
        return forked

    def _reload(self) -> list[tuple[Path, Site]]:
        """The pool's site files as they are now (``join --replace`` rewrites them while the worker runs); the
        main one first. The pool stays the one this worker polls."""
        sites = [(path, Site.load(path)) for path in pool_site_files(self.site_path)]
        for path, site in sites:
            if site.pool != self.site.pool:
                raise ValueError(f"{path} names pool {site.pool}, not {self.site.pool}: restart the worker")
        return sites

    async def _refuse(self, flow_run: FlowRun, reason: str) -> None:
        state = refused(self.site, reason)
        self._logger.warning("flow run %s (%s): %s", flow_run.name, flow_run.id, state.message)
        self.get_flow_run_logger(flow_run).error(state.message)
        await self.client.set_flow_run_state(flow_run.id, state, force=True)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: MedvecJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> MedvecWorkerResult:
        """Refuse the run, or run the site's flow for it in a child process of this checkout."""
        status = task_status or anyio.TASK_STATUS_IGNORED
        path, self.site = for_run(self._reload(), str(flow_run.deployment_id) if flow_run.deployment_id else None)
        reason = refusal(self.site, await run_view(self.client, self.site, flow_run))
        if reason is not None:
            await self._refuse(flow_run, reason)
            status.started(0)
            return MedvecWorkerResult(identifier="refused", status_code=0)
        forked = await self._fork(path, flow_run)
        status.started(forked.pid)
        code = await forked.exit_code()
        return MedvecWorkerResult(identifier=str(forked.pid), status_code=code)

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: MedvecJobConfiguration, grace_seconds: int = 30
    ) -> None:
        """Stop a run's process (a cancelled run): SIGTERM, then SIGKILL after ``grace_seconds``."""
        pid = int(infrastructure_pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(grace_seconds * 10):
            await anyio.sleep(0.1)
            if not _alive(pid):
                return
        os.kill(pid, signal.SIGKILL)


async def run_view(client: PrefectClient, site: Site, flow_run: FlowRun) -> RunView:
    """What the server says of ``flow_run``, as :func:`flows.site.refusal` reads it."""
    deployment = await client.read_deployment(flow_run.deployment_id) if flow_run.deployment_id else None
    flow = await client.read_flow(flow_run.flow_id)
    pool = await client.read_work_pool(site.pool)
    job_variables = dict(deployment.job_variables or {}) if deployment else {}
    return RunView(
        deployment_id=str(deployment.id) if deployment else None,
        flow=flow.name,
        entrypoint=deployment.entrypoint if deployment else None,
        pull_steps=list(deployment.pull_steps or []) if deployment else [],
        job_variables={**job_variables, **(flow_run.job_variables or {})},
        parameters=dict(flow_run.parameters or {}),
        pool_template_changed=pool.base_job_template != MedvecWorker.get_default_base_job_template(),
    )


def _load_flow(site: Site):
    """The site's flow, imported from this checkout (``path/to/module.py:function``)."""
    path, _, name = site.entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def execute(site_path: Path, flow_run_id: UUID) -> None:
    """Run the site's flow under the existing flow run ``flow_run_id``, with the site's parameters.

    Re-checks the run first (the server may have changed it since the worker looked).
    """
    from prefect.client.orchestration import get_client
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import flow_run_logger, load_flow_run, run_flow

    site = Site.load(site_path)
    with handle_engine_signals(flow_run_id):
        flow_run = load_flow_run(flow_run_id=flow_run_id)
        view = asyncio.run(_view_now(site, flow_run))
        reason = refusal(site, view)
        if reason is not None:  # changed on the server since the worker looked
            state = refused(site, reason)
            flow_run_logger(flow_run=flow_run).error(state.message)
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.id, state, force=True)
            return
        flow = _load_flow(site)
        run_flow(
            flow,
            flow_run=flow_run,
            parameters=site.run_arguments(flow_run.parameters or {}),
            error_logger=flow_run_logger(flow_run=flow_run),  # type: ignore[arg-type]  # an adapter, as Prefect passes
        )


def standby(site_path: Path, control_fd: int) -> None:
    """The standby process: import the site's flow and Prefect's engine once, then fork a process for each run
    the worker hands it on ``control_fd`` (:func:`forked_run`), which runs it (:func:`execute`). It ends at end
    of input (the worker stopped or retired it) once its children have ended; Ctrl-C ends it too."""
    control = socket.socket(fileno=control_fd)
    try:
        _load_flow(Site.load(site_path))
        importlib.import_module("prefect.flow_engine")
        handed = forked_run(control)
    except KeyboardInterrupt:
        return
    if handed is not None:  # this is the forked child
        execute(*handed)


def forked_run(control: socket.socket, poll: float = 0.2) -> tuple[Path, UUID] | None:
    """Fork a child for each run received on ``control`` (a line :func:`handed_run` wrote, and a socket to answer
    on: the child's pid at once, its exit status when it ends). Returns the run in the child; in the parent, None
    at end of input once every child has ended."""
    running: dict[int, socket.socket] = {}
    listening = True
    while listening or running:
        readable = select.select([control] if listening else [], [], [], poll)[0]
        _reap(running)
        if not readable:
            continue
        message, fds, _, _ = socket.recv_fds(control, 4096, 1)
        if not message or len(fds) != 1:
            listening = bool(message)  # an empty message: the worker closed its end
            for fd in fds:
                os.close(fd)
            continue
        answer = socket.socket(fileno=fds[0])
        path, _, run_id = message.decode().rstrip("\n").partition("\t")
        pid = os.fork()
        if pid == 0:  # the run's process: nothing of the standby process's sockets stays open in it
            for sock in (control, answer, *running.values()):
                sock.close()
            return Path(path), UUID(run_id)
        running[pid] = answer
        _say(answer, f"{pid}\n")
    return None


def _reap(running: dict[int, socket.socket]) -> None:
    """Report the exit status of each child that has ended, and forget it."""
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        answer = running.pop(pid, None)
        if answer is not None:
            _say(answer, f"{os.waitstatus_to_exitcode(status)}\n")
            answer.close()


def _say(answer: socket.socket, text: str) -> None:
    with contextlib.suppress(OSError):  # the worker stopped: nobody to tell
        answer.sendall(text.encode())


async def _view_now(site: Site, flow_run: FlowRun) -> RunView:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await run_view(client, site, flow_run)


def _interrupt(signum: int, frame: object, grace: float = 10.0) -> None:
    """SIGTERM stops the worker as Ctrl-C does. A KeyboardInterrupt that lands in a weakref callback or a
    ``__del__`` is swallowed ("Exception ignored in …", seen once in CI): if the worker still runs ``grace``
    seconds later, it exits without its clean-up (a run in progress is its own process, and goes on)."""
    fallback = threading.Timer(grace, os._exit, args=(0,))
    fallback.daemon = True
    fallback.start()
    raise KeyboardInterrupt


def serve(site_path: Path) -> None:
    """Poll the site's pool until stopped: SIGINT or SIGTERM stop it cleanly (a run in progress goes on)."""
    worker = MedvecWorker(site_path)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(worker.start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the site file that join wrote (.medvec/sites/<pool>.json)")
    parser.add_argument("--standby", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.standby:
        if args.control_fd is None:
            parser.error("--standby needs --control-fd (the worker starts it)")
        standby(args.site, args.control_fd)
    else:
        serve(args.site)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["MedvecWorker", "execute", "main", "serve", "standby"]
