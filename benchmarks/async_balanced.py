"""Issue 27's first report, rerun: asynchronous landings on a class-balanced PneumoniaMNIST image folder.

Issue 27 began with a user's try: a class-balanced PneumoniaMNIST subset read as image folders, 4 hospitals,
``medvec demo --data DIR --contributions 3``; the async champion ended below the best single hospital. This
builds such a folder (every normal training image and as many pneumonia ones, the first in file order;
validation and test whole: 776, 524 and 624 images) and runs ``medvec demo --data DIR --landings-per-hospital 3``
per seed (which moves the split and the training) and per step rule (:data:`PROTOCOLS`): FedAsync (B = 1,
n_i / Σ buffer), FedAsync that carries a kept-out step's vectors to the next (``refine.carry``), and the fresh
buffer (``refine.fresh=true``, ``refine.weighting=network``). Everything else is the product's default:
EfficientNet-Lite0 at 64 px, the gate on the hospitals' own validation answers (``evaluate.where: hospitals``,
one standard error). Test AUC is on the coordinator's test split, which nothing reads; an async row's val AUC is
the hospitals' pooled answers the gate read (a small sample the gate promoted on: biased up, the more so the
more steps it tested).

    python benchmarks/async_balanced.py [--seeds 0 1 2] [--work .medvec/async_balanced]   # about 4 min a run

Resumable: a run whose ``results.json`` is in ``--work`` is read, not rerun. Writes
``benchmarks/results/async_balanced.json`` (``headline``: means and paired differences) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from common import ROOT, ci95, medvec_demo, table, write
from PIL import Image

FEDASYNC = ["refine.fresh=false", "refine.buffer=1", "refine.weighting=buffer"]
PROTOCOLS = {  # each names its step rule, whatever params.yaml's default is
    "fedasync": FEDASYNC,
    "carry": [*FEDASYNC, "refine.carry=true"],
    "fresh": ["refine.fresh=true", "refine.weighting=network"],
}
PAIRS = (("fedasync", "fresh"), ("carry", "fresh"), ("carry", "fedasync"))  # paired by seed
SETTINGS = ["demo.centralized=false", "demo.control=false"]
CLASSES = ("normal", "pneumonia")


def build(npz: Path, root: Path) -> None:
    """The class-balanced image folder at ``root`` (train: the smaller class's count of each class)."""
    data = np.load(npz)
    for split in ("train", "val", "test"):
        x, y = data[f"{split}_images"], data[f"{split}_labels"].ravel()
        keep = np.arange(len(y))
        if split == "train":
            k = int(np.bincount(y).min())
            keep = np.concatenate([np.flatnonzero(y == c)[:k] for c in range(len(CLASSES))])
        for i in keep:
            folder = root / split / CLASSES[y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / f"{split}_{i:05d}.png")


def demo(data: Path, seed: int, protocol: str, work: Path) -> dict:
    """One ``medvec demo`` run (or the one already in ``work``): its results.json."""
    out = work / f"out-{protocol}-{seed}"
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    args = ["--data", str(data), "--landings-per-hospital", "3", "--seed", str(seed)]
    sets = [*SETTINGS, f"split.seed={seed}", *PROTOCOLS[protocol]]
    return medvec_demo(out, work / "prefect", args, sets, f"{protocol} seed {seed}")


def row(seed: int, protocol: str, results: dict) -> dict:
    """One run: the one-shot merge it selected, its best single hospital, its final async champion."""
    rows = results["results"]
    singles = [r for r in rows if r["kind"] == "single"]
    oneshot = next(r for r in rows if r.get("selected"))
    final = [r for r in rows if r["kind"] == "async"][-1]
    return {
        "seed": seed,
        "protocol": protocol,
        "hospital_images": [r["n_train"] for r in singles],
        "best_single_test_auc": max(r["test"]["auc"] for r in singles),
        "oneshot_test_auc": oneshot["test"]["auc"],
        "async_version": final["version"],
        "async_val_auc": final["val"]["auc"],
        "async_test_auc": final["test"]["auc"],
        "async_balanced_accuracy": final["test"]["balanced_accuracy"],
    }


def summary(rows: list[dict]) -> dict:
    """Means per protocol, the goals' counts, and the differences of :data:`PAIRS` paired by seed."""
    out: dict = {"seeds": sorted({r["seed"] for r in rows}), "protocols": {}}
    for pr in PROTOCOLS:
        got = [r for r in rows if r["protocol"] == pr]
        out["protocols"][pr] = {
            k: statistics.fmean(r[k] for r in got)
            for k in ("async_val_auc", "async_test_auc", "async_balanced_accuracy", "oneshot_test_auc")
        } | {
            "below_best_single": sum(r["async_test_auc"] < r["best_single_test_auc"] for r in got),
            "more_than_0.005_below_oneshot": sum(r["async_test_auc"] < r["oneshot_test_auc"] - 0.005 for r in got),
        }
    by = {(r["seed"], r["protocol"]): r for r in rows}
    for a, b in PAIRS:
        for key in ("async_val_auc", "async_test_auc"):
            d = [by[(s, a)][key] - by[(s, b)][key] for s in out["seeds"]]
            out[f"{a}_minus_{b}_{key}"] = {"mean": statistics.fmean(d), "ci95": ci95(d), "per_seed": d}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default=str(ROOT / ".medvec" / "async_balanced"))
    args = ap.parse_args()
    work = Path(args.work)
    data = work / "data"
    if not data.is_dir():
        build(ROOT / "data" / "pneumoniamnist.npz", data)
    counts = {
        split: [len(list((data / split / c).glob("*.png"))) for c in CLASSES] for split in ("train", "val", "test")
    }
    rows = [row(s, pr, demo(data, s, pr, work)) for s in args.seeds for pr in PROTOCOLS]
    head = summary(rows)
    command = "python benchmarks/async_balanced.py --seeds " + " ".join(map(str, args.seeds))
    lines = [
        f"# Async landings on a class-balanced image folder (`{command}`)",
        "",
        "PneumoniaMNIST, training images class-balanced (388 + 388), 4 hospitals (Dirichlet α = 0.5), 3 landings",
        "each; `fedasync` B = 1, `carry` FedAsync with refine.carry, `fresh` the fresh buffer. Test AUC on the coordinator's test",
        "split, which nothing reads; val AUC is the hospitals' pooled answers the gate promoted on (biased up).",
        "",
        table(rows, list(rows[0])),
        "",
        "| protocol | val AUC | test AUC | bal. acc | one-shot | seeds below best single | seeds > 0.005 below one-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    for pr, m in head["protocols"].items():
        lines.append(
            f"| {pr} | {m['async_val_auc']:.3f} | {m['async_test_auc']:.3f} | {m['async_balanced_accuracy']:.3f} | "
            f"{m['oneshot_test_auc']:.3f} | {m['below_best_single']} | {m['more_than_0.005_below_oneshot']} |"
        )
    for a, b in PAIRS:
        for key in ("async_val_auc", "async_test_auc"):
            d = head[f"{a}_minus_{b}_{key}"]
            lines.append(
                f"\n{a} − {b}, {key}: {d['mean']:+.3f}, 95 % CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                f" (per seed {', '.join(f'{x:+.3f}' for x in d['per_seed'])})."
            )
    payload = {"command": command, "headline": head, "rows": rows, "folder_counts": counts, "settings": SETTINGS}
    write("async_balanced", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
