"""The worker's whole decision (``flows.site.refusal``) and the site file, without servers.

``test_tenancy.py`` makes the same runs on a real Prefect server; here each rule is checked on its own, with the
exact reason a hospital reads in its log.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from flows.site import RunView, Site, SiteError, for_run, pool_site_files, refusal

HOSPITAL = Site(
    "hospital",
    "hospital-b",
    "hospital-finetune",
    "flows/hospital_finetune.py:hospital_finetune",
    "dep-b",
    {"hospital": "b", "data_dir": "/data/b", "store_url": "s3://medvec/run"},
)
COORDINATOR = dataclasses.replace(
    HOSPITAL,
    role="coordinator",
    pool="coordinator",
    flow="merge-and-evaluate",
    entrypoint="flows/merge_and_evaluate.py:merge_and_evaluate",
    deployment_id="dep-c",
    run_parameters=("trigger",),
)


def view(site: Site = HOSPITAL, **changes) -> RunView:
    clean = RunView(site.deployment_id, site.flow, site.entrypoint, [], {}, {}, False)
    return dataclasses.replace(clean, **changes)


def test_the_site_s_own_untouched_run_is_run():
    assert refusal(HOSPITAL, view()) is None
    trigger = {"event_id": "e1", "vector": "medvec.vector.a", "occurred": "2026-12-05T00:00:00Z"}
    assert refusal(COORDINATOR, view(COORDINATOR, parameters={"trigger": trigger})) is None
    assert refusal(COORDINATOR, view(COORDINATOR)) is None  # the reconciling schedule's run carries none


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"deployment_id": None}, "not started from a deployment"),
        ({"deployment_id": "dep-x"}, "deployment dep-x is not the one this site created (dep-b)"),
        ({"flow": "evil"}, "flow 'evil' is not 'hospital-finetune'"),
        (
            {"entrypoint": "evil.py:evil"},
            "entrypoint 'evil.py:evil' was changed on the server (this site runs "
            "'flows/hospital_finetune.py:hospital_finetune')",
        ),
        (
            {"pull_steps": [{"prefect.deployments.steps.run_shell_script": {"script": "id"}}]},
            "the deployment has pull steps on the server (run_shell_script); this worker runs none",
        ),
        ({"job_variables": {"command": "sh -c id", "env": {}}}, "job variables were set on the server (command, env)"),
        ({"pool_template_changed": True}, "pool hospital-b's base job template was changed on the server"),
        (
            {"parameters": {"store_url": "s3://evil", "data_dir": "/tmp/x"}},
            "parameters set on the server (data_dir, store_url); this site pins its own",
        ),
        ({"parameters": {"trigger": {"event_id": "e"}}}, "parameters set on the server (trigger)"),
    ],
)
def test_a_hospital_worker_refuses_anything_the_server_changed(changes, reason):
    assert refusal(HOSPITAL, view(**changes)).startswith(reason)


@pytest.mark.parametrize(
    ("trigger", "reason"),
    [
        ("medvec.vector.a", "parameter trigger is not a mapping of strings"),
        ({"vector": 3}, "parameter trigger is not a mapping of strings"),
        ({"vector": "v", "store_url": "s3://evil"}, "parameter trigger has unexpected keys: store_url"),
    ],
)
def test_the_coordinator_takes_only_a_well_formed_trigger(trigger, reason):
    assert refusal(COORDINATOR, view(COORDINATOR, parameters={"trigger": trigger})) == reason
    extra = view(COORDINATOR, parameters={"force": True})
    assert refusal(COORDINATOR, extra) == "parameters set on the server (force); this site pins its own"


def test_a_run_gets_the_pinned_parameters_and_only_the_allowed_ones_from_the_server():
    server = {"trigger": {"vector": "v"}, "store_url": "s3://evil"}
    assert HOSPITAL.run_arguments(server) == HOSPITAL.parameters
    assert COORDINATOR.run_arguments(server) == {**COORDINATOR.parameters, "trigger": {"vector": "v"}}


def test_the_site_file_round_trips_is_private_and_a_bad_one_is_one_line(tmp_path):
    path = COORDINATOR.save(tmp_path / "sites" / "coordinator.json")
    assert Site.load(path) == COORDINATOR
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SiteError, match="no site file here: join first"):
        Site.load(tmp_path / "sites" / "hospital-x.json")
    (tmp_path / "bad.json").write_text('{"role": "hospital"}')
    with pytest.raises(SiteError, match="not a medvec site file"):
        Site.load(tmp_path / "bad.json")


EVALUATE = dataclasses.replace(
    HOSPITAL,
    flow="hospital-evaluate",
    entrypoint="flows/hospital_evaluate.py:hospital_evaluate",
    deployment_id="dep-b-eval",
    run_parameters=("request",),
)


@pytest.mark.parametrize(
    ("request_id", "reason"),
    [
        ("eval-20261205T164500-ab12cd", None),
        (None, "parameter request None is not an evaluation request id"),
        ("../../etc/passwd", "parameter request '../../etc/passwd' is not an evaluation request id"),
        ("eval-x/../y", "parameter request 'eval-x/../y' is not an evaluation request id"),
        (["eval-x"], "parameter request ['eval-x'] is not an evaluation request id"),
    ],
)
def test_an_evaluation_run_takes_one_request_id_from_the_server_and_nothing_else(request_id, reason):
    assert refusal(EVALUATE, view(EVALUATE, parameters={"request": request_id})) == reason


def test_a_pool_s_runs_go_to_the_site_file_of_their_own_deployment(tmp_path):
    main = HOSPITAL.save(tmp_path / "hospital-b.json")
    second = EVALUATE.save(tmp_path / "hospital-b.evaluate.json")
    HOSPITAL.save(tmp_path / "hospital-bb.json")  # another pool's file is not this pool's
    assert pool_site_files(main) == [main, second]
    sites = [(p, Site.load(p)) for p in pool_site_files(main)]
    assert for_run(sites, "dep-b-eval") == (second, EVALUATE)
    assert for_run(sites, "dep-b") == (main, HOSPITAL)
    path, site = for_run(sites, "dep-x")  # unknown: the main site, whose refusal names the mismatch
    assert path == main and refusal(site, view(deployment_id="dep-x")).startswith("deployment dep-x is not")


SWALLOWED = """
import signal, sys, time
from flows.worker import _interrupt
signal.signal(signal.SIGTERM, lambda s, f: _interrupt(s, f, grace=1.0))
try:
    signal.raise_signal(signal.SIGTERM)
except KeyboardInterrupt:
    pass  # swallowed, as when it lands in a weakref callback
time.sleep(60)
sys.exit(3)
"""


def test_a_worker_whose_sigterm_interrupt_is_swallowed_still_exits_after_the_grace():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SWALLOWED], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - started < 20  # the 1-second grace, not the 60-second sleep


PROBE = """
import os, pathlib
pathlib.Path(os.environ["PROBE_MARKER"]).write_text("imported")

def probe_flow(**kwargs):
    pathlib.Path(os.environ["PROBE_MARKER"]).write_text("ran")
"""


def test_a_standby_process_imports_its_site_s_flow_before_any_run_and_ends_at_end_of_input(tmp_path):
    """The worker's standby process (``--standby``): the site's flow module is imported while no run is handed,
    and closing its control socket (the worker stopped) ends it having run nothing."""
    (tmp_path / "standby_probe.py").write_text(PROBE)
    site = dataclasses.replace(HOSPITAL, entrypoint="standby_probe.py:probe_flow").save(tmp_path / "site.json")
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "PROBE_MARKER": str(marker)}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cmd = [sys.executable, "-m", "flows.worker", str(site), "--standby", "--control-fd", str(theirs.fileno())]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.read_text() == "imported"  # before any run: the imports are off the run's path
        ours.close()  # end of input: the worker stopped
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert marker.read_text() == "imported"  # and nothing ran


FORKER = """
import pathlib, socket, sys
from flows.worker import forked_run
handed = forked_run(socket.socket(fileno=int(sys.argv[1])), poll=0.05)
if handed is not None:  # the forked child: write the run id where the site path points, exit with a known status
    path, run_id = handed
    pathlib.Path(path).write_text(f"{run_id} {pathlib.Path(path).name}")
    sys.exit(7 if path.name == "a" else 0)
"""


def test_the_standby_process_forks_each_run_reports_its_pid_and_status_and_ends_after_its_children():
    """The protocol between the worker (``Standby``) and its standby process (``forked_run``), on real processes:
    each handed run is a forked child of its own, whose pid comes back at once and whose exit status comes back
    when it ends; a retired standby process ends once its children have."""
    import tempfile
    import uuid

    import anyio

    from flows.worker import Standby, handed_run

    async def scenario(folder: Path) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = await anyio.open_process(
            [sys.executable, "-c", FORKER, str(theirs.fileno())],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        standby = Standby(proc, ours, time.monotonic(), "stamp")
        runs = {name: uuid.uuid4() for name in ("a", "b")}
        forked = {name: await standby.fork(handed_run(folder / name, run)) for name, run in runs.items()}
        pids = {name: f.pid for name, f in forked.items() if f is not None}
        assert len(set(pids.values()) | {proc.pid}) == 3  # two processes of their own, neither the standby
        codes = {name: await f.exit_code() for name, f in forked.items() if f is not None}
        assert codes == {"a": 7, "b": 0}
        assert {n: (folder / n).read_text() for n in runs} == {n: f"{r} {n}" for n, r in runs.items()}
        standby.retire()
        with anyio.fail_after(30):
            assert await proc.wait() == 0
        assert await standby.fork(handed_run(folder / "c", uuid.uuid4())) is None  # it has ended: the worker
        # starts another

    with tempfile.TemporaryDirectory() as folder:
        anyio.run(scenario, Path(folder))


def test_after_the_checkout_s_code_changes_the_next_run_gets_a_new_standby_process(tmp_path, monkeypatch):
    """The worker forks runs from its standby process while the checkout's code is the one it imported; once the
    code changes, the next run comes from a new standby process, and the old one ends. The runs here name no flow
    run on the session's Prefect server, so each forked process fails, and its exit status comes back."""
    import uuid

    import anyio
    from prefect.client.schemas.objects import FlowRun

    import flows.worker as worker_module

    (tmp_path / "standby_probe.py").write_text(PROBE)
    site = dataclasses.replace(HOSPITAL, entrypoint="standby_probe.py:probe_flow").save(tmp_path / "site.json")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{tmp_path}")
    monkeypatch.setenv("PROBE_MARKER", str(tmp_path / "marker"))
    stamps = iter(["imported", "changed"])
    monkeypatch.setattr(worker_module, "code_stamp", lambda root=None: next(stamps))

    async def scenario() -> None:
        worker = worker_module.MedvecWorker(site)
        first = worker._standby = await worker._start_standby("imported")  # as setup() starts it
        run = FlowRun(flow_id=uuid.uuid4(), name="probe")
        forked = await worker._fork(site, run)
        assert worker._standby is first and forked.pid != first.proc.pid
        assert await forked.exit_code() == 1  # no such flow run: the run's process failed, and said so
        forked = await worker._fork(site, run)
        second = worker._standby
        assert second is not None and second is not first and second.stamp == "changed"
        with anyio.fail_after(60):
            assert await first.proc.wait() == 0  # retired: it ended, having no run left
        assert await forked.exit_code() == 1
        await second.stop()

    anyio.run(scenario)


def test_the_code_stamp_changes_when_a_file_of_the_checkout_does(tmp_path):
    from flows.worker import code_stamp

    (tmp_path / "medvec").mkdir()
    module = tmp_path / "medvec" / "m.py"
    module.write_text("x = 1\n")
    before = code_stamp(tmp_path)
    assert code_stamp(tmp_path) == before
    module.write_text("x = 22\n")
    assert code_stamp(tmp_path) != before


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("off", False), (" False ", False)])
def test_the_standby_process_is_on_unless_medvec_worker_standby_turns_it_off(value, on):
    from flows.worker import standby_enabled

    assert standby_enabled({} if value is None else {"MEDVEC_WORKER_STANDBY": value}) is on
