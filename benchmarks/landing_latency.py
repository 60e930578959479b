"""Seconds from ``medvec.vector.landed`` to a finished merge-and-evaluate (tiny CNN), and
the Prefect overhead relative to bare function calls.

Starts a real Prefect server and the coordinator's medvec worker on 127.0.0.1 (the
same helpers as the integration tests), deploys ``merge-and-evaluate`` with its
trigger, then ``--trials`` times: waits until no merge run is running (so a landing
never queues behind the last run's tail; bursts are ``benchmarks/load.py``'s),
publishes one new vector, emits the event and waits until a merge containing it is
recorded in the store.

    python benchmarks/landing_latency.py [--trials 5] [--poll SECONDS] [--no-registry]

Writes ``benchmarks/results/landing_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import PrefectServer, _Proc  # noqa: E402


class CoordinatorWorker(_Proc):
    """The coordinator's worker as operators start it: ``medvec coordinator worker`` (its own polling default)."""

    def __init__(self, env: dict, log_dir: Path, extra: dict):
        env = {**{k: v for k, v in env.items() if k != "PREFECT_WORKER_QUERY_SECONDS"}, **extra}
        self._start([sys.executable, "-m", "flows.cli", "coordinator", "worker"], env, log_dir / "worker.log")


BREAST = ROOT / "data" / "breastmnist.npz"
LABELS = {
    "publish_s": "publish the vector and emit the event",
    "event_to_flow_start_s": "event → the merging flow's first line (automation, worker poll, process start, imports)",
    "flow_start_to_merged_s": "the flow's first line → merge recorded (intake, merge, evaluation, registration)",
}
OVERRIDES = [
    "model.name=tiny_cnn",
    "model.pretrained=false",
    "finetune.epochs=1",
    "finetune.threads=1",
    "merge.method=weighted",
    "merge.lam=1.0",
    "batchnorm.strategy=average",
    f"coordinator.eval_data={BREAST}",
]

CHILD = r"""
import datetime, json, sys, time
from concurrent.futures import ThreadPoolExecutor
from medvec.config import load_params
from medvec.data.split import write_hospital_shards
from medvec.hospital.local import LocalData
from medvec.hospital.finetune import finetune_vector
from medvec.store import open_store
from medvec.coordinator.scoring import EvalSets
from medvec.coordinator.engine import merge_once
from medvec.coordinator.intake import admit
from flows.events import emit_vector_landed
from prefect.client.orchestration import get_client

store_url, tmp, trials, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
p = load_params("params.yaml", overrides)
store = open_store(store_url)
base = store.get_base(store.current_base())
write_hospital_shards(%(breast)r, tmp + "/h", hospitals=trials + 2, alpha=1.0, seed=0)
vecs = [finetune_vector(base, f"h{i}", LocalData.load(tmp + f"/h/h{i}"), p.finetune, progress=False)[0] for i in range(1, trials + 3)]
# two vectors land first (and are merged), then one per trial
out = {"trials": []}
def land(v):
    key = store.put(v)
    emit_vector_landed({"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "base_sha256": v.meta.base_sha256, "content_sha256": v.content_sha256, "n_train": v.meta.n_train, "key": key, "store": store.url})
def merged(vid):
    m = store.latest_merge(base.sha256)
    return m is not None and vid in m.input_ids()
def idle():  # no merge run queued or running: the next landing does not wait for the last run's tail
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    busy = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])))
    with get_client(sync_client=True) as c:
        return not c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["coordinator"])), flow_run_filter=busy)
for v in vecs[:2]:
    land(v)
t = time.monotonic()
while not merged(vecs[1].meta.vector_id) and time.monotonic() - t < 180:
    time.sleep(0.05)
for v in vecs[2:]:
    t = time.monotonic()
    while not idle() and time.monotonic() - t < 120:
        time.sleep(0.2)
    t0 = time.monotonic()
    land(v)
    t_emit = time.monotonic()
    while not merged(v.meta.vector_id):
        if time.monotonic() - t0 > 180:
            raise SystemExit("no merge within 180 s")
        time.sleep(0.05)
    m = store.latest_merge(base.sha256)
    emitted_at, merged_at = time.time() - (time.monotonic() - t_emit), time.time()
    started = datetime.datetime.fromisoformat(m.started_at).timestamp()  # the merging flow's first line
    out["trials"].append({"vector_id": v.meta.vector_id, "landed_to_merged_s": time.monotonic() - t0, "publish_s": t_emit - t0, "merge_seconds_in_flow": m.seconds,
        "event_to_flow_start_s": started - emitted_at, "flow_start_to_merged_s": merged_at - started, "triggered_by_this_vector": m.trigger.get("vector", "").endswith(v.meta.vector_id)})
# the same work as bare function calls: gather, merge, evaluate, publish
evalsets = EvalSets.load(%(breast)r)
bare = []
for _ in range(3):
    t0 = time.monotonic()
    vs = admit(store, base, p.intake.model_copy(update={"defence": "off"})).admitted
    outc = merge_once(base, vs, p, evalsets)
    bare.append(time.monotonic() - t0)
out["bare_merge_s"] = bare
with get_client(sync_client=True) as c:
    dep = c.read_deployment_by_name("merge-and-evaluate/coordinator")
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
    out["flow_runs"] = [{"total_run_time": r.total_run_time.total_seconds(), "start_delay_s": (r.start_time - r.expected_start_time).total_seconds() if r.start_time and r.expected_start_time else None, "state": r.state.type.value} for r in runs]
print(json.dumps(out))
""" % {"breast": str(BREAST)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--poll",
        type=float,
        default=None,
        help="worker polling interval in seconds (PREFECT_WORKER_QUERY_SECONDS); "
        "default: start `medvec coordinator worker` with its own default, as an operator does",
    )
    ap.add_argument(
        "--no-registry",
        action="store_true",
        help="merge without MLflow logging/registration (isolates Prefect's share)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default=None, help="file stem (default: landing_latency[_no_registry])")
    args = ap.parse_args(argv)
    overrides = OVERRIDES + (["registry.enabled=false"] if args.no_registry else [])
    name = args.name or ("landing_latency_no_registry" if args.no_registry else "landing_latency")
    tmp = Path(tempfile.mkdtemp(prefix="medvec-latency-"))
    server = PrefectServer(tmp / "prefect")
    env = server.client_env()
    store_url = str(tmp / "store")
    worker = None
    try:
        sets = [x for o in overrides + [f"store.url={store_url}"] for x in ("-S", o)]
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "coordinator", "up", *sets],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        poll = {} if args.poll is None else {"PREFECT_WORKER_QUERY_SECONDS": f"{args.poll:g}"}
        worker = CoordinatorWorker(env, tmp, poll)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, store_url, str(tmp), str(args.trials), json.dumps(overrides)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        raw = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
    lat = [t["landed_to_merged_s"] for t in raw["trials"]]
    parts = {  # medians of the decomposition of landed → merged, per trial
        k: statistics.median(t[k] for t in raw["trials"] if k in t)
        for k in ("publish_s", "event_to_flow_start_s", "flow_start_to_merged_s")
        if any(k in t for t in raw["trials"])
    }
    flow_runs = [r["total_run_time"] for r in raw["flow_runs"] if r["state"] == "COMPLETED" and r["total_run_time"] > 0]
    bare = statistics.median(raw["bare_merge_s"])
    result = {
        "command": f"python benchmarks/landing_latency.py --trials {args.trials}"
        + (f" --poll {args.poll:g}" if args.poll is not None else "")
        + (" --no-registry" if args.no_registry else ""),
        "mlflow_registration": not args.no_registry,
        "model": "tiny_cnn",
        "data": "breastmnist (coordinator val 78 / test 156)",
        "worker_poll_seconds": args.poll if args.poll is not None else "medvec coordinator worker's default",
        "landed_to_merged_s": {"median": statistics.median(lat), "min": min(lat), "max": max(lat), "values": lat},
        "bare_merge_s": {"median": bare, "values": raw["bare_merge_s"]},
        "flow_run_time_s": {"median": statistics.median(flow_runs) if flow_runs else None, "values": flow_runs},
        "decomposition_s": parts,
        "prefect_overhead_s": statistics.median(lat) - bare,
        "prefect_overhead_ratio": statistics.median(lat) / bare,
        "trials": raw["trials"],
    }
    ratio = statistics.median(lat) / result["flow_run_time_s"]["median"] if flow_runs else None
    result["headline"] = {
        "landed_to_merged_s": round(statistics.median(lat), 2),
        "flow_run_time_s": round(result["flow_run_time_s"]["median"], 2) if flow_runs else None,
        "ratio_to_flow_run": round(ratio, 2) if ratio else None,
        "goal_met": ratio is not None and ratio <= 2.0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    md = "\n".join(
        [
            f"Landing latency (`{result['command']}`), worker polling "
            + (f"every {args.poll:g} s" if args.poll is not None else "at `medvec coordinator worker`'s default")
            + f", tiny CNN on breastmnist, MLflow registration {'on' if not args.no_registry else 'off'}:",
            "",
            "| measure | seconds |",
            "|---|---|",
            f"| vector landed → merge recorded (median of {len(lat)}) | {result['landed_to_merged_s']['median']:.2f} (min {min(lat):.2f}, max {max(lat):.2f}) |",
            f"| merge-and-evaluate flow run time (median) | {result['flow_run_time_s']['median'] or float('nan'):.2f} |",
            f"| the same gather + merge + evaluate as bare function calls (median) | {bare:.2f} |",
            f"| orchestration overhead (landed→merged − bare) | {result['prefect_overhead_s']:.2f} ({result['prefect_overhead_ratio']:.1f}×) |",
            f"| landed→merged ÷ flow run time (goal ≤ 2) | {result['headline']['ratio_to_flow_run']} |",
            "",
            "Where landed → merged went (medians per trial, from the merge record's `started_at`):",
            "",
            "| part | seconds |",
            "|---|---|",
            *[f"| {LABELS[k]} | {v:.2f} |" for k, v in parts.items()],
            "",
        ]
    )
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
