"""N hospitals landing signed vectors within a minute, against the real distributed path.

Starts, on 127.0.0.1: a Prefect server (``prefect server start``), an S3 server
(SeaweedFS ``weed mini``), and the coordinator's medvec worker (``python -m
flows.worker``, the site file ``coordinator up`` wrote); ``medvec coordinator up`` publishes a tiny-CNN base
and deploys ``merge-and-evaluate`` with its ``medvec.vector.landed`` trigger, with
a keyring that holds every hospital's Ed25519 key.

A driver process then plays the hospitals: their vectors are pre-made with the
tiny model (seeded perturbations of θ_pre: no training), and each hospital signs
and publishes its vector to S3 and emits ``landed`` at a random time within
``--window`` seconds (8 hospitals at a time).  It waits until the newest merge
holds every vector, and checks that each appears there exactly once.

Measured per N: events per second emitted, seconds from the first landing to the
merge that holds all N (and from the last landing), merge runs (merged, skipped,
cancelled as superseded), how long the queue took to drain after that merge, and the peak memory of the coordinator's
worker with its flow-run processes (RSS summed over the process tree, sampled
every 0.2 s).

    python benchmarks/load.py [--hospitals 100 200 400] [--window 60]

Writes ``benchmarks/results/load.json`` (headline: the first N's ``hospitals``,
``in_final_merge``, ``applied_twice``, ``seconds_to_final_merge``) and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS, ROOT, table, write

from servers import PrefectServer, SeaweedS3, Worker, medvec

BREAST = ROOT / "data" / "breastmnist.npz"
OVERRIDES = [
    "model.name=tiny_cnn",
    "model.pretrained=false",
    "finetune.threads=1",
    "merge.method=weighted",
    "merge.lam=1.0",
    "batchnorm.strategy=average",
    f"coordinator.eval_data={BREAST}",
]

DRIVER = r"""
import json, random, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
from medvec.batchnorm import RunningStats
from medvec.store import open_store
from medvec.vectors.vector import DataVector
from flows.events import emit_vector_landed

store_url, keys, n, window, seed, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
store = open_store(store_url)
base = store.get_base(store.current_base())
state = base.model.state_dict()

def make(i):
    g = torch.Generator().manual_seed(seed * 100_000 + i)
    tuned = {k: v + torch.randn(v.shape, generator=g) * 0.01 if v.is_floating_point() else v for k, v in state.items()}
    model = base.fresh()
    model.load_state_dict(tuned)
    return DataVector.from_states(
        state, tuned, hospital=f"h{i:03d}", base_sha256=base.sha256, base_model=base.spec.name,
        num_classes=base.num_classes, n_train=20 + i % 50, label_counts=[10, 10 + i % 50],
        task=base.task, classes_sha256=base.classes_sha256, running=RunningStats.of(model, 20 + i % 50),
    )

vectors = [make(i) for i in range(1, n + 1)]
rng = random.Random(seed)
times = sorted((rng.uniform(0, window), v) for v in vectors)
log = []

def land(at, v):
    time.sleep(max(0.0, t0 + at - time.monotonic()))
    start = time.monotonic()
    key = store.put(v, key_file=f"{keys}/{v.meta.hospital}.key")
    put = time.monotonic()
    emit_vector_landed({"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "base_sha256": v.meta.base_sha256,
                        "content_sha256": v.content_sha256, "n_train": v.meta.n_train, "key": key, "store": store.url})
    log.append({"vector_id": v.meta.vector_id, "planned": at, "landed": start - t0, "put_s": put - start, "emit_s": time.monotonic() - put})

t0 = time.monotonic()
with ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda tv: land(*tv), times))
emitted = time.monotonic() - t0
ids = {v.meta.vector_id for v in vectors}
final = None
while time.monotonic() - t0 < window + timeout:
    m = store.latest_merge(base.sha256)
    if m is not None and ids <= set(m.input_ids()):
        final = m
        break
    time.sleep(0.2)
done = time.monotonic() - t0
merges = store.merges(base.sha256)
inputs = final.input_ids() if final else []
print(json.dumps({
    "emitted_s": emitted, "final_s": done if final else None, "last_landing_s": max(e["landed"] for e in log),
    "in_final_merge": len(ids & set(inputs)), "inputs": len(inputs), "distinct_inputs": len(set(inputs)),
    "merges": len(merges), "merge_sizes": [len(m.inputs) for m in merges],
    "merge_seconds": [m.seconds for m in merges], "landings": sorted(log, key=lambda e: e["landed"]),
}))
"""


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a flow-run process may exit between listing and reading
            total += p.memory_info().rss
    return total / 1024**2


class PeakSampler(threading.Thread):
    """The largest summed RSS of a process tree, sampled every 0.2 s until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self._stop_flag = pid, 0.0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stop_flag.wait(0.2):
            self.peak = max(self.peak, tree_rss_mb(self.pid))

    def stop(self) -> float:
        self._stop_flag.set()
        self.join()
        return self.peak


def flow_run_states(env: dict) -> dict:
    """merge-and-evaluate runs by state name (Completed, Cancelled, AwaitingConcurrencySlot, ...), leaving out the
    reconciling schedule's runs due later."""
    code = (
        "import json, collections\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName\n"
        "import datetime as dt\n"
        "soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60)\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=['coordinator'])))\n"
        "    due = [r for r in runs if r.state.name != 'Scheduled' or r.expected_start_time is None or r.expected_start_time < soon]\n"
        "    print(json.dumps(collections.Counter(r.state.name for r in due)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}


ACTIVE = {"Scheduled", "AwaitingConcurrencySlot", "Pending", "Running"}


def drain(env: dict, timeout: float) -> tuple[dict[str, int], float | None]:
    """Wait until no merge-and-evaluate run is queued or running; (runs by state, seconds it took or None)."""
    t0 = time.monotonic()
    while True:
        states = flow_run_states(env)
        if not ACTIVE & set(states) or "error" in states:
            return states, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return states, None
        time.sleep(2)


def run_load(n: int, window: float, seed: int, timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"medvec-load{n}-"))
    server = s3 = worker = None
    try:
        server = PrefectServer(tmp / "prefect")
        s3 = SeaweedS3(tmp / "s3")
        env = {**server.client_env(), **s3.env(), "PYTHONPATH": str(ROOT)}
        store_url = f"s3://medvec/load{n}?endpoint_url={s3.endpoint}"
        keys, ring = tmp / "keys", tmp / "keyring.json"
        code = (
            "import sys\nfrom medvec.keys import keygen\nfrom medvec.vectors.signing import Keyring\nring = Keyring()\n"
            f"for i in range(1, {n} + 1):\n    name = f'h{{i:03d}}'\n    keygen(name, {str(keys)!r})\n"
            f"    ring.add(name, {str(keys)!r} + f'/{{name}}.pub')\nring.save({str(ring)!r})\n"
        )
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
        sets = [x for o in [*OVERRIDES, f"store.url={store_url}", f"intake.keyring={ring}"] for x in ("-S", o)]
        medvec(env, "coordinator", "up", *sets)
        worker = Worker("coordinator", env, tmp)
        sampler = PeakSampler(worker.proc.pid)
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, store_url, str(keys), str(n), str(window), str(seed), str(timeout)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=window + timeout + 600,
        )
        wall = time.monotonic() - t0
        peak = sampler.peak
        if out.returncode:
            raise RuntimeError(f"driver failed:\n{out.stderr[-3000:]}")
        raw = json.loads(out.stdout.strip().splitlines()[-1])
        states, drained = drain(env, timeout)
        peak = max(peak, sampler.peak)
        sampler.stop()
    finally:
        for proc in (worker, s3, server):
            if proc is not None:
                proc.stop()
    landings = raw.pop("landings")
    first = min(e["landed"] for e in landings)
    return {
        "hospitals": n,
        "in_final_merge": raw["in_final_merge"],
        "applied_twice": raw["inputs"] - raw["distinct_inputs"],
        "seconds_to_final_merge": None if raw["final_s"] is None else raw["final_s"] - first,
        "after_last_landing_s": None if raw["final_s"] is None else raw["final_s"] - raw["last_landing_s"],
        "events_per_second": len(landings) / max(raw["last_landing_s"] - first, 1e-9),
        "publish_p50_s": sorted(e["put_s"] + e["emit_s"] for e in landings)[len(landings) // 2],
        "publish_max_s": max(e["put_s"] + e["emit_s"] for e in landings),
        "merges": raw["merges"],
        "largest_merge_s": max(raw["merge_seconds"], default=None),
        "merge_sizes": raw["merge_sizes"],
        "flow_runs": states,
        "queue_drained_s": drained,
        "coordinator_peak_rss_mb": peak,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hospitals", type=int, nargs="+", default=[100])
    ap.add_argument("--window", type=float, default=60.0, help="landings spread over this many seconds")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds after the window to wait for the merge")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args()
    rows = []
    for n in args.hospitals:
        print(f"{n} hospitals ...", flush=True)
        try:
            rows.append(run_load(n, args.window, args.seed, args.timeout))
        except Exception as exc:  # report where it breaks, and go on to the next N
            rows.append({"hospitals": n, "error": f"{type(exc).__name__}: {str(exc)[-800:]}"})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "merge_sizes"}), flush=True)
    first = rows[0]
    head = {k: first.get(k) for k in ("hospitals", "in_final_merge", "applied_twice", "seconds_to_final_merge")}
    columns = ["hospitals", "in_final_merge", "applied_twice", "seconds_to_final_merge", "after_last_landing_s"]
    columns += ["events_per_second", "publish_p50_s", "merges", "largest_merge_s", "queue_drained_s"]
    columns += ["coordinator_peak_rss_mb"]
    runs = [{"hospitals": r["hospitals"], **r.get("flow_runs", {})} for r in rows]
    states = sorted({k for r in runs for k in r if k != "hospitals"})
    md = "\n".join(
        [
            f"# Load: hospitals landing signed vectors within {args.window:g} s (tiny CNN, real servers)",
            "",
            f"`python benchmarks/load.py --hospitals {' '.join(map(str, args.hospitals))} --window {args.window:g}` "
            "— Prefect server, SeaweedFS S3 and the coordinator's medvec worker on 127.0.0.1.",
            "",
            table(rows, columns),
            "",
            "merge-and-evaluate runs by final state:",
            "",
            table(runs, ["hospitals", *states]),
            "",
            *[f"- {r['hospitals']} hospitals: {r['error']}" for r in rows if "error" in r],
            f"headline: {head}",
        ]
    )
    write("load", {"headline": head, "window_s": args.window, "rows": rows}, md, args.out)


if __name__ == "__main__":
    main()
