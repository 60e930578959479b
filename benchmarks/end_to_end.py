"""Where ``medvec demo``'s wall time goes: fine-tuning, merging, BN restoration, evaluation, contribution scoring,
MLflow tracking, and the rest (orchestration: Prefect, Python start-up, data loading, reports).

Runs ``medvec demo --no-progress`` as a user would (the default ``params.yaml``), in
a fresh process with its own MLflow database and Prefect home, times the whole
command, and reads the per-phase seconds the flow measured itself
(``results.json`` → ``phases``, :mod:`medvec.timing`; nested phases are counted
once, in the innermost one).

    python benchmarks/end_to_end.py [--seed 0] [-S key=value ...]

Writes ``benchmarks/results/end_to_end.json`` (headline ``wall_seconds`` and the
largest phase) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, table, write

LABELS = {
    "finetune": "fine-tune (4 hospitals and the centralized baseline)",
    "merge": "merge (every method and subset)",
    "bn_restore": "BN restoration (moment sums at the hospitals, restore)",
    "evaluate": "evaluation (every candidate on validation, the chosen ones on test)",
    "contribution": "contribution scoring (its own work; its merges and evaluations are counted above)",
    "tracking": "MLflow tracking and registration",
}


def main() -> None:
    from medvec.timing import PHASES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="params override")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="medvec-e2e-") as tmp:
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "PREFECT_HOME": f"{tmp}/prefect",
            "PYTHONPATH": str(ROOT),
        }
        cmd = [sys.executable, "-m", "flows.cli", "demo", "--no-progress", "--out", f"{tmp}/demo"]
        cmd += ["--seed", str(args.seed)] if args.seed is not None else []
        cmd += [x for o in args.overrides for x in ("-S", o)]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        doc = json.loads(Path(f"{tmp}/demo/results.json").read_text())
    phases = doc["phases"]
    rows = [
        {"phase": LABELS[p], "seconds": phases[p]["seconds"], "calls": phases[p]["calls"]}
        for p in PHASES
        if p in phases
    ]
    measured = sum(r["seconds"] for r in rows)
    rows.append({"phase": "orchestration and the rest (wall − the phases above)", "seconds": wall - measured})
    for r in rows:
        r["share"] = f"{100 * r['seconds'] / wall:.1f} %"
    rows.append({"phase": "**`medvec demo`, wall**", "seconds": wall, "share": "100 %"})
    largest = max((p for p in PHASES if p in phases), key=lambda p: phases[p]["seconds"])
    head = {
        "wall_seconds": round(wall, 1),
        "flow_seconds": doc["seconds"],
        "largest_phase": largest,
        "largest_share": round(phases[largest]["seconds"] / wall, 3),
        "selected": next((r["name"] for r in doc["results"] if r.get("selected")), None),
    }
    md = "\n".join(
        [
            "# Where `medvec demo`'s time goes",
            "",
            "`python benchmarks/end_to_end.py` — one `medvec demo --no-progress` with the default params.yaml, "
            "phases as the flow measured them (results.json → phases).",
            "",
            table(rows, ["phase", "seconds", "calls", "share"]),
            "",
            f"headline: {head}",
        ]
    )
    write("end_to_end", {"headline": head, "phases": phases, "rows": rows}, md, args.out)


if __name__ == "__main__":
    main()
