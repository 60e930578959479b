"""Asynchronous refinement on the distributed path, on real servers started here: a Prefect server,
one process worker per hospital pool and one for the coordinator (MLflow on a SQLite file, a local store,
the DVC registry in a git repo here with a local DVC remote).

Three hospitals contribute in turn, h1 twice, each run starting from the champion of its time, the last two
landing at once (a burst); a fourth hospital fine-tunes θ_pre late, past ``max_staleness``, and is kept aside
with its reason.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import BREAST, TINY_FLOW
from servers import PrefectServer, Probe, Worker, medvec, wait_until

pytestmark = pytest.mark.integration

OVERRIDES = [
    *TINY_FLOW,
    "batchnorm.strategy=average",
    "refine.mode=async",
    "refine.fresh=false",  # a step per landing (B = 1): the chain and the stale vector are what this tests
    "refine.weighting=buffer",
    "refine.eta=1.0",
    "refine.max_staleness=1",
    f"coordinator.eval_data={BREAST}",
    "evaluate.where=coordinator",  # these tests are of the coordinator's own set; hospitals: test_tenancy
]


def state(probe: Probe, store_url: str) -> dict:
    """The store as the coordinator sees it: steps, start points, quarantine."""
    code = f"""
import json
from medvec.store import open_store
s = open_store({store_url!r})
root = s.current_base()
steps = [m for m in s.merges(root) if m.mode == "async"]
print(json.dumps({{
    "steps": [
        {{"inputs": [i.vector_id for i in m.inputs], "parent": m.parent_version, "version": m.version,
          "dvc_commit": m.dvc_commit, "merge_id": m.merge_id}}
        for m in steps
    ],
    "starts": [[p.version, p.parent_version, p.merge_id] for p in s.start_points(root)],
    "stale": [q.problem for q in s.quarantined() if q.check == "stale"],
    "landed": [d["meta"]["vector_id"] for d in s.sidecars(root)],
}}))
"""
    return probe.json(code)


def test_three_hospitals_in_turn_then_a_burst_climb_a_version_chain_and_a_stale_vector_is_kept_aside(tmp_path):
    from medvec.data.split import write_hospital_shards

    server = PrefectServer(tmp_path / "prefect")
    env = server.client_env()
    store_url = str(tmp_path / "store")
    registry = tmp_path / "registry"
    dvc = [f"registry.dvc_repo={registry}", f"registry.dvc_remote={tmp_path / 'dvc-remote'}"]
    sets = [a for o in [*OVERRIDES, f"store.url={store_url}", *dvc] for a in ("-S", o)]
    workers = []
    probe = Probe(env)  # reads the store as the coordinator does, importing medvec once for every poll
    try:
        medvec(env, "coordinator", "up", *sets)
        workers.append(Worker("coordinator", env, tmp_path))
        write_hospital_shards(BREAST, tmp_path / "hospitals", hospitals=4, alpha=1.0, seed=0)
        for name in ("h1", "h2", "h3", "h4"):
            late = ["-S", "hospital.start_from=base"] if name == "h4" else []  # h4 always fine-tunes θ_pre
            medvec(
                env, "hospital", "join", name, "--data", str(tmp_path / "hospitals" / name), "--no-worker", *sets, *late
            )
            workers.append(Worker(f"hospital-{name}", env, tmp_path))
        order = ["h2", "h1", "h3", "h1"]  # the last two land at once
        for n, name in enumerate(order[:2]):
            assert "COMPLETED" in medvec(env, "hospital", "run", name, "--timeout", "240").stdout
            # wait for this landing's step, so later runs start from a newer champion
            wait_until(lambda n=n: len(state(probe, store_url)["steps"]) == n + 1, 180, f"step {n + 1}")
        # the last two land in a burst (two hospitals at once): no vector lost, none merged twice
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(medvec, env, "hospital", "run", name, "--timeout", "240") for name in order[2:]]
            assert all("COMPLETED" in r.result().stdout for r in runs)

        def merged() -> list[str]:
            return [v for step in state(probe, store_url)["steps"] for v in step["inputs"]]

        def finished() -> bool:  # a step's record is stored before its DVC commit and registration, then again
            steps = state(probe, store_url)["steps"]
            return len({v for step in steps for v in step["inputs"]}) == 4 and all(st["dvc_commit"] for st in steps)

        wait_until(finished, 300, "both burst vectors merged, every step committed and registered")
        time.sleep(5)  # a second triggered run, if any, has had time to (wrongly) merge again
        wait_until(finished, 120, "every step, a wrongly second one included, committed and registered")
        s = state(probe, store_url)
        landed = set(s["landed"])
        assert len(merged()) == len(set(merged())) == 4 and set(merged()) == landed, "every landed vector in one step"
        versions = [v for v, _, _ in s["starts"]]
        assert versions == list(range(len(versions))) and len(versions) >= 2, s["starts"]  # v0 = θ_pre, a promotion
        assert all(parent == v - 1 for v, parent, _ in s["starts"][1:])
        promoted = [step for step in s["steps"] if step["version"] is not None]
        assert [step["version"] for step in promoted] == versions[1:]
        # the DVC registry commits every step, promoted or not, with its merge record
        log = subprocess.run(
            ["git", "log", "--format=%H %s"], cwd=registry, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        commits = [sha for sha, subject in (line.split(" ", 1) for line in log) if subject.startswith("merge ")]
        assert sorted(commits) == sorted(step["dvc_commit"] for step in s["steps"]), log
        for step in s["steps"]:
            assert (registry / "merges" / f"{step['merge_id']}.json").exists()
        # a vector from θ_pre, now past max_staleness 1: kept aside with its reason, never merged
        assert "COMPLETED" in medvec(env, "hospital", "run", "h4", "--timeout", "240").stdout
        wait_until(lambda: state(probe, store_url)["stale"], 120, "the stale vector kept aside")
        stale = state(probe, store_url)["stale"][0]
        assert stale.startswith(f"stale: started from version 0, champion is {versions[-1]}")
        # lineage: the chain back to θ_pre, replayed bit for bit
        out = medvec(env, "lineage", "medvec@champion", "--rebuild").stdout
        assert "version chain (θ_pre is v0):" in out and out.count("== registered (identical)") == versions[-1], out
        assert "!= registered" not in out
    finally:
        probe.stop()
        for w in workers:
            w.stop()
        server.stop()
