"""The front door as a newcomer meets it: a fresh clone of this checkout, an empty HOME, the README's commands.

The clone is ``git clone`` of this repository plus the working tree's uncommitted changes
(none in CI, which runs on a fresh clone), so what is tested is what you have.  The
installed virtual environment is reused (``make ... VENV=``): nothing is installed twice.
``make demo`` on a fresh clone is test_end_to_end's demo: its tests read what that run wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from servers import VENV, PrefectServer, fresh_clone, fresh_env, medvec_in, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture()
def clone(tmp_path) -> Path:
    """A fresh clone of this checkout (with its uncommitted changes), with no ``.medvec/``."""
    return fresh_clone(tmp_path / "medvec")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 (its own home and database)."""
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield srv
    finally:
        srv.stop()


def read_deployment(env: dict, name: str) -> dict:
    """A deployment read with the Prefect client, in a child process whose settings come from ``env``."""
    code = (
        "import json, sys\nfrom prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    d = c.read_deployment_by_name(sys.argv[1])\n"
        "    auto = [a for a in c.read_automations() if any(getattr(x, 'deployment_id', None) == d.id for x in a.actions)]\n"
        "    print(json.dumps({'id': str(d.id), 'pool': d.work_pool_name, 'pull_steps': d.pull_steps,\n"
        "                      'parameters': d.parameters, 'path': d.path, 'triggers': len(auto)}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_make_bench_script_runs_alone_on_a_fresh_clone(clone, tmp_path):
    """``python benchmarks/merge_bandwidth.py`` as docs/performance.md shows it, on a small model and two Ks (what it
    measures is for ``make bench``; here: it runs from a clone and writes its headline)."""
    out = tmp_path / "results"
    cmd = [str(VENV / "bin" / "python"), "benchmarks/merge_bandwidth.py", "--ks", "2,8", "--repeats", "1"]
    cmd += ["--model", "mobilenet_v3_small", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=clone, env=fresh_env(tmp_path / "home"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((out / "merge_bandwidth.json").read_text())
    assert doc["headline"]["ratio_k8"] > 0 and doc["headline"]["ratio_k8_small_pages"] > 0
    assert [(r["k"], r["written_by"]) for r in doc["rows"]] == [(2, "medvec"), (8, "medvec"), (8, "1 MiB writes")]
    assert (out / "merge_bandwidth.md").read_text().startswith("# Merge bandwidth (mobilenet_v3_small shapes")


def test_stored_privacy_tables_rebuild_on_a_fresh_clone(clone, tmp_path):
    """docs/results.md's DP tables come from runs kept in benchmarks/results/privacy_runs/: on a fresh clone the
    documented commands find every one of them (names hold no absolute path, no thread count, the recipes as they
    ran) and rebuild the committed tables to the digit, training nothing."""
    python, env, out = str(VENV / "bin" / "python"), fresh_env(tmp_path / "home"), tmp_path / "results"

    def run(*args: str) -> None:
        proc = subprocess.run([python, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    def rows(path: Path) -> list[str]:  # the table, without the line naming the command
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    run("benchmarks/privacy_centering.py", "--out", str(out))  # trains what is missing: a miss would time out
    committed = clone / "benchmarks" / "results"
    assert (out / "privacy_centering.md").read_text() == (committed / "privacy_centering.md").read_text()
    run("benchmarks/privacy_tradeoff.py", "--modes", "head", "--only-stored", "--no-attack", "--out", str(out))
    got = rows(out / "privacy_tradeoff.md")
    made = rows(committed / "privacy_tradeoff.md")  # make privacy's table: every mode; its header, rule and head's
    heads = [r for r in made if r.startswith(("| trains ", "|---", "| head "))]
    assert [r.split(" | ")[:6] for r in got] == [r.split(" | ")[:6] for r in heads]
    assert len(got) == 6  # the header, its rule and ε 1, 3, 8, ∞


def test_stored_async_tables_rebuild_on_a_fresh_clone(clone, tmp_path):
    """docs/results.md's async tables come from runs kept in benchmarks/results/async_runs/: on a fresh clone the
    documented commands with --only-stored find every one of them and rebuild the committed tables to the digit
    (a missing run leaves its seed out, and the table changes)."""
    python, env, results = str(VENV / "bin" / "python"), fresh_env(tmp_path / "home"), clone / "benchmarks" / "results"
    seeds = ["--seeds", "0", "1", "2", "3", "4", "5", "6", "-S", "model.image_size=32", "--only-stored"]
    commands = {
        "async_vs_sync.md": seeds,
        "async_ablations.md": ["--ablations", "--seeds", "0", "1", "2", "-S", "model.image_size=32", "--only-stored"],
        "async_ablations-fresh-fresh_screen_off.md": [
            "--ablations",
            "--protocols",
            "fresh",
            "fresh_screen_off",
            *seeds,
        ],
    }

    def body(text: str) -> list[str]:  # all but the line naming the command and the minutes of stored runs
        return [line for line in text.splitlines() if not line.startswith("`python")]

    for name, args in commands.items():
        committed = body((results / name).read_text())
        proc = subprocess.run(
            [python, "benchmarks/async_vs_sync.py", *args],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert body((results / name).read_text()) == committed, name
        assert len(committed) > 20, name


def test_distributed_first_steps_on_a_fresh_clone(clone, tmp_path, server):
    env = fresh_env(tmp_path / "home", PREFECT_API_URL=server.url, PYTHONPATH=str(clone))
    sets = ["-S", "model.name=tiny_cnn", "-S", f"store.url={tmp_path / 'store'}"]
    sets += ["-S", "coordinator.eval_data=data/breastmnist.npz"]  # the hospitals' data are breast ultrasound too
    sets += ["-S", f"intake.keyring={tmp_path / 'keyring.json'}"]  # whose answers the coordinator trusts
    medvec_in(
        clone,
        env,
        "split",
        "data/breastmnist.npz",
        "--out",
        str(tmp_path / "hospitals"),
        "-S",
        "split.hospitals=2",
        "-S",
        "split.names=null",
    )
    medvec_in(clone, env, "coordinator", "up", *sets)
    medvec_in(clone, env, "hospital", "join", "h1", "--data", str(tmp_path / "hospitals" / "h1"), "--no-worker", *sets)
    # docs/hospitals.md: from a DICOM export and a CSV to a joined worker
    export = tmp_path / "export"
    medvec_in(clone, env, "data", "export", "--data", "data/breastmnist.npz", "--out", str(export), "--format", "dicom")
    check = medvec_in(clone, env, "hospital", "check", "--data", str(export / "manifest.csv"), *sets)
    assert "train: 546 found, 546 read, 0 failed" in check.stdout and check.stdout.rstrip().endswith("usable: yes")
    joined = medvec_in(
        clone, env, "hospital", "join", "h2", "--data", str(export / "manifest.csv"), "--no-worker", *sets
    )
    assert "data check: 780 images read, usable" in joined.stdout
    assert read_deployment(env, "hospital-finetune/h2")["pool"] == "hospital-h2"
    coordinator = read_deployment(env, "merge-and-evaluate/coordinator")
    hospital = read_deployment(env, "hospital-finetune/h1")
    assert coordinator["pool"] == "coordinator" and coordinator["triggers"] == 1
    assert hospital["pool"] == "hospital-h1"
    # the server holds triggers only; what runs is pinned in the clone's own site files (.medvec/sites)
    assert coordinator["pull_steps"] == hospital["pull_steps"] == [] and str(clone) not in json.dumps(hospital)
    sites = {p.name: json.loads(p.read_text()) for p in (clone / ".medvec" / "sites").glob("*.json")}
    assert sorted(sites) == [
        "coordinator.json",
        "hospital-h1.evaluate.json",
        "hospital-h1.json",
        "hospital-h2.evaluate.json",
        "hospital-h2.json",
    ]  # each hospital's hospital-finetune and hospital-evaluate, pinned apart
    assert sites["hospital-h1.json"]["parameters"]["data_dir"] == str(tmp_path / "hospitals" / "h1")
    assert sites["hospital-h2.json"]["deployment_id"] == read_deployment(env, "hospital-finetune/h2")["id"]
    for args in (["run", "h9"], ["schedule", "h9", "--interval", "60"]):
        cmd = [str(VENV / "bin" / "medvec"), "hospital", *args]
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            "error: no deployment hospital-finetune/h9 on the Prefect server: "
            "create it with `medvec hospital join h9 --data FOLDER`"
        ], proc.stderr[-3000:]


def pool_workers(url: str, pool: str) -> list[str]:
    """Names of the workers the Prefect API lists for ``pool``."""
    response = httpx.post(f"{url}/work_pools/{pool}/workers/filter", json={}, timeout=5)
    response.raise_for_status()
    return [w["name"] for w in response.json()]


def worker_pids(session: int, pool: str) -> list[int]:
    """Live processes in ``session`` whose command line is a medvec worker (``flows.worker``) for ``pool``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == session and "flows.worker" in cmdline and pool in cmdline:
            pids.append(int(d.name))
    return pids


KEYRING = ["-S", "intake.keyring=keyring.json"]  # evaluate.where: hospitals (the default) asks signed answers


def test_sigterm_stops_a_worker_started_in_the_background_with_sigint_ignored(clone, tmp_path, server):
    env = fresh_env(
        tmp_path / "home", PREFECT_API_URL=server.url, PYTHONPATH=str(clone), PREFECT_WORKER_QUERY_SECONDS="1"
    )
    sets = ["-S", "model.name=tiny_cnn", "-S", f"store.url={tmp_path / 'store'}"]
    medvec_in(clone, env, "coordinator", "up", *sets, "-S", "coordinator.eval_data=data/breastmnist.npz", *KEYRING)
    with open(tmp_path / "worker.log", "w") as log:
        proc = subprocess.Popen(  # started as `nohup medvec coordinator worker &` would be: SIGINT ignored
            [str(VENV / "bin" / "medvec"), "coordinator", "worker"],
            cwd=clone,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        wait_until(lambda: pool_workers(server.url, "coordinator"), 90, "worker polling", proc, tmp_path / "worker.log")
        assert worker_pids(proc.pid, "coordinator"), "no medvec worker process for pool 'coordinator'"
        os.kill(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        proc.wait(timeout=20)
        assert time.monotonic() - started < 20
        time.sleep(1)
        assert worker_pids(proc.pid, "coordinator") == [], "a medvec worker outlived SIGTERM to the medvec PID"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
