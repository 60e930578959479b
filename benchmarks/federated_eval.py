"""Central selection (the coordinator's ``eval_data``) against hospital selection (``evaluate.where:
hospitals``, the hospitals' pooled answers on their own validation splits), side by side (issue 25).

For each seed (it moves the hospital split, the local validation splits and the training), ``medvec demo`` runs
twice with the same settings, once per ``evaluate.where``: the same hospitals fine-tune the same vectors, then
the coordinator picks the method, λ, BN strategy and threshold (one-shot), and gates an asynchronous champion
as every hospital lands more vectors. Both are reported on the coordinator's test split, which neither
selection reads. ``merge_seconds`` is the selected one-shot merge's record time (scan, contribution scores,
registration), with the hospitals answering in process.

    python benchmarks/federated_eval.py [--seeds 0 1 2] [--data data/pneumoniamnist.npz] [--landings 2] [-S key=value ...]
        [--name federated_eval]

Writes ``benchmarks/results/federated_eval.json`` (``headline``: seeds, one-shot and asynchronous test AUC and merge
seconds per mode, means over the seeds) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import ROOT, medvec_demo, table, write

MODES = ("central", "hospitals")
WHERE = {"central": "coordinator", "hospitals": "hospitals"}
SETTINGS = [
    "model.name=tiny_cnn",
    "model.pretrained=false",
    "finetune.epochs=2",
    "finetune.lr=0.003",
    "finetune.threads=2",
    "split.hospitals=4",
    "split.alpha=0.5",
    "demo.control=false",
    "demo.centralized=false",
]


def demo(data: str, seed: int, mode: str, landings: int, extra: list[str], folder: Path) -> dict:
    """One ``medvec demo`` run; its results.json and the selected merge's record."""
    out = folder / f"{mode}-{seed}"
    sets = [*SETTINGS, f"split.seed={seed}", f"finetune.seed={seed}", f"evaluate.where={WHERE[mode]}", *extra]
    args = ["--data", data, "--hospitals", "4", "--landings-per-hospital", str(landings)]
    results = medvec_demo(out, folder / "prefect", args, sets, f"{mode} seed {seed}")
    (record_file,) = (out / "merges").glob(f"*/{results['merge_id']}.json")
    record = json.loads(record_file.read_text())
    return {"results": results, "record": record.get("doc", record)}


def row(seed: int, mode: str, run: dict) -> dict:
    """What one run chose and how it did on test."""
    rows = run["results"]["results"]
    selected = next(r for r in rows if r.get("selected"))
    final = next(r for r in rows if r.get("final"))
    rounds = run["record"]["evaluation"]["rounds"]
    return {
        "seed": seed,
        "mode": mode,
        "selected": selected["name"],
        "lambda": selected["lambda"],
        "val_images": run["record"]["eval_set"]["size"],
        "val_auc": selected["val"]["auc"],
        "oneshot_test_auc": selected["test"]["auc"],
        "async_version": final["version"],
        "async_test_auc": final["test"]["auc"],
        "merge_seconds": run["record"]["seconds"],
        "rounds": len(rounds),
    }


def mean(rows: list[dict], mode: str, key: str) -> float:
    return statistics.fmean(r[key] for r in rows if r["mode"] == mode)


def paired(rows: list[dict], key: str) -> list[float]:
    """hospitals − central, seed by seed."""
    by = {(r["seed"], r["mode"]): r[key] for r in rows}
    return [by[(s, "hospitals")] - by[(s, "central")] for s in sorted({r["seed"] for r in rows})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", default=str(ROOT / "data" / "pneumoniamnist.npz"))
    ap.add_argument("--landings", type=int, default=2, help="more vectors per hospital into the async champion")
    ap.add_argument("-S", dest="sets", action="append", default=[])
    ap.add_argument("--name", default="federated_eval", help="results file name (a variant's settings: another)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in MODES:
                rows.append(row(seed, mode, demo(args.data, seed, mode, args.landings, args.sets, Path(tmp))))
                print(json.dumps(rows[-1]), flush=True)
    headline = {"seeds": args.seeds}
    for key, name in (("oneshot_test_auc", "oneshot_auc"), ("async_test_auc", "async_auc")):
        headline[name] = {m: round(mean(rows, m, key), 4) for m in MODES}
    headline["merge_seconds"] = {m: round(mean(rows, m, "merge_seconds"), 1) for m in MODES}
    diffs = {k: paired(rows, k) for k in ("oneshot_test_auc", "async_test_auc")}
    headline["paired_hospitals_minus_central"] = {k: round(statistics.fmean(v), 4) for k, v in diffs.items()}
    columns = list(rows[0])
    md = [
        "# Central selection against hospital selection (`python benchmarks/federated_eval.py`)",
        "",
        f"Data {Path(args.data).name}, tiny CNN, 4 hospitals (Dirichlet α = 0.5), {args.landings} more landings",
        "per hospital into the asynchronous champion; test AUC on the coordinator's test split, read by neither.",
        "",
        table(rows, columns),
        "",
        "| mean over seeds | central | hospitals | paired difference (hospitals − central), per seed |",
        "|---|---|---|---|",
    ]
    for key, name in (("oneshot_test_auc", "one-shot test AUC"), ("async_test_auc", "async champion test AUC")):
        per_seed = ", ".join(f"{d:+.4f}" for d in diffs[key])
        md.append(f"| {name} | {mean(rows, 'central', key):.4f} | {mean(rows, 'hospitals', key):.4f} | {per_seed} |")
    md.append(
        f"| merge seconds | {headline['merge_seconds']['central']} | {headline['merge_seconds']['hospitals']} | |"
    )
    command = "python benchmarks/federated_eval.py " + " ".join(
        ["--seeds", *map(str, args.seeds), "--landings", str(args.landings), *(f"-S {o}" for o in args.sets)]
    )
    md[0] = f"# Central selection against hospital selection (`{command}`)"
    payload = {"command": command, "headline": headline, "rows": rows, "settings": SETTINGS + args.sets}
    write(args.name, payload, "\n".join(md))


if __name__ == "__main__":
    main()
