"""Hospital data paths and tasks: the demo on PNG and DICOM manifests against the .npz, and on a multi-label
and a four-class task built from the shipped files.

1. Equivalence: ``medvec demo`` (default params, seed 0) on ``data/pneumoniamnist.npz``, on a CSV manifest
   of the same images as PNG files, and on one of DICOM files (MONOCHROME2, MONOCHROME1, a 16-bit rescale with
   a window, RLE, rotating; synthetic patient tags).  Same split, same seed: every row's test AUC should agree.
2. Tasks, seeds 0 1 2 (each seed also moves the hospital split):
   ``multilabel``: the chest|breast composite, two labels (``model.task=multilabel``);
   ``multiclass``: the four-class union of PneumoniaMNIST and BreastMNIST.
   Per-label test AUC for the singles, the selected merge and the centralized model.

    python benchmarks/data_tasks.py                    # everything (about 50 min on 2 cores)
    python benchmarks/data_tasks.py --only equivalence
    python benchmarks/data_tasks.py --reuse            # keep runs whose results.json exists

Writes ``benchmarks/results/data_tasks.json`` and ``data_tasks.md``.  The runs use their own MLflow database
in the work folder, never the user's registry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvec.data.examples import EXAMPLES, export_manifest, write_manifest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASK_ARGS = {"multilabel": ["-S", "model.task=multilabel"], "multiclass": []}


def make_data(work: Path) -> dict[str, Path]:
    """The manifests the runs read (written once)."""
    out = {"npz": ROOT / "data" / "pneumoniamnist.npz"}
    for fmt in ("png", "dicom"):
        target = work / "data" / f"pneumonia-{fmt}" / "manifest.csv"
        out[fmt] = target if target.is_file() else export_manifest(out["npz"], target.parent, fmt)
    for task, build in EXAMPLES.items():
        target = work / "data" / task / "manifest.csv"
        out[task] = target if target.is_file() else write_manifest(build(ROOT / "data"), target.parent, "png")
    return out


def run_demo(out: Path, data: Path, seed: int, extra: list[str], reuse: bool, env: dict) -> dict:
    """One ``medvec demo`` run; its results.json with the wall time."""
    if not (reuse and (out / "results.json").is_file()):
        cmd = [sys.executable, "-m", "flows.cli", "demo", "--data", str(data), "--out", str(out), "--no-progress"]
        if seed:  # seed 0 is params.yaml's own: the default demo
            cmd += ["--seed", str(seed), "-S", f"split.seed={seed}"]
        cmd += extra
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - t:.1f}")
    doc = json.loads((out / "results.json").read_text())
    wall = out / "wall_seconds.txt"
    doc["wall_seconds"] = float(wall.read_text()) if wall.is_file() else None
    return doc


def row_aucs(doc: dict) -> dict[str, float]:
    return {r["name"]: r["test"]["auc"] for r in doc["results"]}


def equivalence(docs: dict[str, dict]) -> dict:
    """Per run: the largest |test AUC − the .npz run's| over every row, and the selected rows."""
    ref = row_aucs(docs["npz"])
    out = {}
    for name, doc in docs.items():
        got = row_aucs(doc)
        sel = next(r for r in doc["results"] if r.get("selected"))
        out[name] = {
            "max_abs_delta_auc": max(abs(got[k] - ref[k]) for k in ref),
            "rows": len(ref),
            "selected": sel["name"],
            "selected_test_auc": sel["test"]["auc"],
            "wall_seconds": doc["wall_seconds"],
        }
    return out


def summary(doc: dict) -> dict:
    """Selected merge, mean single and centralized: test AUC and, for multi-label, per-label AUC."""
    rows = doc["results"]
    sel = next(r for r in rows if r.get("selected"))
    singles = [r for r in rows if r["kind"] == "single"]
    central = next((r for r in rows if r["kind"] == "centralized"), None)

    def of(r: dict) -> dict:
        return {"auc": r["test"]["auc"], **{f"auc:{k}": v for k, v in (r["test"].get("auc_by_label") or {}).items()}}

    single = {k: statistics.fmean(of(r)[k] for r in singles) for k in of(singles[0])}
    return {"merged": of(sel), "merged_name": sel["name"], "mean single": single, "centralized": of(central or sel)}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def task_table(task: str, runs: list[dict]) -> list[str]:
    keys = list(runs[0]["mean single"])
    lines = [f"### {task} (seeds {', '.join(str(r['seed']) for r in runs)})", ""]
    lines += ["| model | " + " | ".join(k.replace("auc:", "AUC ") if k != "auc" else "AUC" for k in keys) + " |"]
    lines += ["|---" * (len(keys) + 1) + "|"]
    for what in ("merged", "mean single", "centralized"):
        cells = [mean_std([r[what][k] for r in runs]) for k in keys]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines += ["", "selected merges: " + ", ".join(f"seed {r['seed']}: {r['merged_name']}" for r in runs), ""]
    return lines


def markdown(doc: dict) -> str:
    lines = [
        "# Data paths and tasks (`python benchmarks/data_tasks.py`)",
        "",
        "Test AUC. Equivalence: the default demo (seed 0) on the same images read three ways.",
        "",
    ]
    if doc.get("equivalence"):
        lines += [
            "| data | rows | max abs Δ test AUC vs .npz | selected | its test AUC | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for name, e in doc["equivalence"].items():
            lines.append(
                f"| {name} | {e['rows']} | {e['max_abs_delta_auc']:.4f} | {e['selected']} | "
                f"{e['selected_test_auc']:.3f} | {e['wall_seconds'] or '–'} |"
            )
        lines.append("")
    for task, runs in (doc.get("tasks") or {}).items():
        lines += task_table(task, runs)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / ".medvec" / "bench" / "data_tasks"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=("equivalence", "tasks"), default=None)
    ap.add_argument("--reuse", action="store_true", help="keep runs whose results.json exists")
    args = ap.parse_args(argv)
    work = Path(args.work)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work)
    doc: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    if args.only in (None, "equivalence"):
        docs = {k: run_demo(work / "runs" / k, data[k], 0, [], args.reuse, env) for k in ("npz", "png", "dicom")}
        doc["equivalence"] = equivalence(docs)
    if args.only in (None, "tasks"):
        doc["tasks"] = {}
        for task in EXAMPLES:
            extra = [*TASK_ARGS[task], "-S", f"registry.model_name=medvec-{task}"]
            runs = []
            for seed in args.seeds:
                res = run_demo(work / "runs" / f"{task}-s{seed}", data[task], seed, extra, args.reuse, env)
                runs.append({"seed": seed, **summary(res), "wall_seconds": res["wall_seconds"]})
            doc["tasks"][task] = runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_tasks.json").write_text(json.dumps(doc, indent=2))
    text = markdown(doc)
    (RESULTS / "data_tasks.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
