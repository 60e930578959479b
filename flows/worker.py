"""The medvec worker: a Prefect worker (type ``medvec``) that runs only its own site's flow, as the site pinned it.

``medvec hospital join`` and ``medvec coordinator worker`` start it; ``python -m flows.worker SITE_FILE``
is the same thing.  It polls its pool like any Prefect worker, and for each run:

1. reads what the server says of the run (deployment, flow, pull steps, job variables, parameters, the
   pool's job template) and asks :func:`flows.site.refusal` whether to run it;
2. a refused run is marked Failed (named ``Refused``) with the reason, which the worker also logs; nothing
   of it runs: no pull step, no command, no code;
3. otherwise it hands the run to its **standby process**: ``python -m flows.worker SITE_FILE --standby``, started
   in this checkout with this worker's own environment before the run was asked for, which has already
   imported the site's flow (torch, Prefect, medvec: 10 to 30 s on 2 cores, off the run's path).  The worker
   writes the run's site file and id to its stdin; it runs the flow under the existing flow run with the
   site's pinned parameters (:func:`execute`) and exits, and the worker starts the next standby process.
   It never loads the deployment's code, so Prefect's pull steps, the deployment's command and the pool's
   job template play no part.  A standby process with no run ends at end of input (the worker stopped).
   It holds about 750 MB while it waits; ``MEDVEC_WORKER_STANDBY=0`` starts each run's process when the run
   comes instead.

A process worker (``prefect worker start --type process``) would run whatever the server asks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
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


def standby_command(site_path: Path) -> list[str]:
    return [sys.executable, "-m", "flows.worker", str(site_path), "--standby"]


def handed_run(site_path: Path, flow_run_id: UUID) -> bytes:
    """What the worker writes to a standby process's stdin: the run's site file and id, one line."""
    return f"{site_path}\t{flow_run_id}\n".encode()


async def _hand(proc: anyio.abc.Process, line: bytes) -> bool:
    """Give ``proc`` its run; False when it has already ended (its stdin is closed)."""
    if proc.returncode is not None or proc.stdin is None:
        return False
    try:
        await proc.stdin.send(line)
        await proc.stdin.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return False
    return True


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
        self._standby: tuple[anyio.abc.Process, float] | None = None  # the next run's process, and when it started
        super().__init__(work_pool_name=self.site.pool, create_pool_if_not_found=False, **kwargs)

    async def setup(self) -> None:
        await super().setup()
        if standby_enabled(os.environ):
            self._standby = await self._start_standby()

    async def teardown(self, *exc_info: Any) -> None:
        """Stop the standby process (it holds no run), then Prefect's own clean-up."""
        standby, self._standby = self._standby, None
        if standby is not None and standby[0].returncode is None:
            standby[0].kill()
            with anyio.move_on_after(5):
                await standby[0].wait()
        await super().teardown(*exc_info)

    async def _start_standby(self) -> tuple[anyio.abc.Process, float]:
        proc = await anyio.open_process(
            standby_command(self.site_path),
            cwd=PROJECT_DIR,
            env=dict(os.environ),
            stdin=subprocess.PIPE,
            stdout=None,
            stderr=None,
        )
        return proc, time.monotonic()

    async def _process_for(self, path: Path, flow_run: FlowRun) -> anyio.abc.Process:
        """The run's process: the standby one, handed the run (a new one, which imports first, if it has
        ended or there is none); the next run's standby process starts at once (unless turned off)."""
        standby, self._standby = self._standby, None
        line = handed_run(path, flow_run.id)
        if standby is not None and await _hand(standby[0], line):
            proc = standby[0]
            self._logger.info(
                "flow run %s: in standby process %d, started %.0f s before", flow_run.name, proc.pid,
                time.monotonic() - standby[1],
            )  # fmt: skip
        else:
            proc, _ = await self._start_standby()
            if not await _hand(proc, line):
                raise RuntimeError(f"the process for flow run {flow_run.id} ended before it was handed the run")
        if standby_enabled(os.environ):
            self._standby = await self._start_standby()
        return proc

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
        proc = await self._process_for(path, flow_run)
        status.started(proc.pid)
        code = await proc.wait()
        return MedvecWorkerResult(identifier=str(proc.pid), status_code=code)

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
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
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


def standby(site_path: Path) -> None:
    """A run's process, started before its run: import the site's flow and Prefect's engine, then run the one
    flow run the worker hands it on stdin (:func:`handed_run`). At end of input (the worker stopped, or
    replaced it) it ends having run nothing; so does Ctrl-C while it waits."""
    try:
        _load_flow(Site.load(site_path))
        importlib.import_module("prefect.flow_engine")
        line = sys.stdin.readline()
    except KeyboardInterrupt:
        return
    if line.strip():
        path, _, run_id = line.rstrip("\n").partition("\t")
        execute(Path(path), UUID(run_id))


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
    args = parser.parse_args(argv)
    if args.standby:
        standby(args.site)
    else:
        serve(args.site)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["MedvecWorker", "execute", "main", "serve", "standby"]
