"""How far the AUC pooled from hospitals' score reports is from the exact AUC on the union of their images,
by ``min_count`` and by how the coordinator reads a group of bins (issue 25).

For each data set and seed, a tiny CNN is fine-tuned on the training split (seeded), the validation split is
divided among three hospitals (20 / 35 / 45 %, a seeded permutation: the seed moves the split too), each
hospital reports its scores with ``min_count`` k (``medvec.histograms.ScoreReport``), and the coordinator pools
the reports. The error is pooled AUC − scikit-learn's AUC on the union.

Two models per seed: the fine-tuned model ``as trained``, and the same model ``sharpened`` (its logit × 8: the
same ranking, saturated scores, as a merge with a large λ makes them). Three readings of a group: ``maxent`` (the
spread over its bins of most entropy with its mean bin: what each site's own AUC reads), ``ends`` (its images at
its first and last bin, in the shares of its mean bin: what the pooled figures read) and ``even`` (spread evenly
over its bins). Beside the pooled
error, each site's own AUC read from its report against its exact AUC (what the below-chance vote reads).

    python benchmarks/pooled_auc.py [--seeds 0 1 2] [--min-counts 1 5 10]

Writes ``benchmarks/results/pooled_auc.json`` (headline: the mean and largest absolute error per data set and
k) and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, table, write

from medvec.config import FinetuneConfig
from medvec.data.sources import load_split
from medvec.evaluate import predict
from medvec.histograms import Grid, Reading, ScoreReport
from medvec.hospital.train import finetune
from medvec.models import create_base

DATASETS = {"pneumoniamnist": ROOT / "data" / "pneumoniamnist.npz", "breastmnist": ROOT / "data" / "breastmnist.npz"}
SHARES = (0.2, 0.35)  # cut points of the three hospitals' shares: 20 %, 35 %, 45 %


MODELS = {"as trained": 1.0, "sharpened": 8.0}  # the factor on the model's logit
READINGS: tuple[Reading, ...] = ("maxent", "ends", "even")


def sharpened(proba: np.ndarray, factor: float) -> np.ndarray:
    """Two-class probabilities with the logit multiplied by ``factor`` (float64: the ranking is kept)."""
    p = np.clip(proba[:, 1].astype(np.float64), 1e-12, 1 - 1e-12)
    q = 1.0 / (1.0 + np.exp(-factor * np.log(p / (1 - p))))
    return np.stack([1 - q, q], axis=1)


def one_seed(path: Path, seed: int, min_counts: list[int]) -> list[dict]:
    """The rows of one data set and seed: per model, the exact AUC, and each k's and reading's pooled AUC and its
    error."""
    base = create_base("tiny_cnn", 2, pretrained=False, seed=seed)
    model = base.fresh()
    cfg = FinetuneConfig(epochs=3, lr=0.003, threads=torch.get_num_threads(), seed=seed)
    finetune(model, load_split(path, "train"), base.spec, cfg, progress=False)
    val = load_split(path, "val")
    trained, labels = predict(model, val, base.spec), np.asarray(val.labels).reshape(-1)
    order = np.random.default_rng(seed).permutation(len(labels))
    sites = np.split(order, [int(SHARES[0] * len(labels)), int((SHARES[0] + SHARES[1]) * len(labels))])
    rows = []
    for name, factor in MODELS.items():
        proba = sharpened(trained, factor)
        exact = float(roc_auc_score(labels, proba[:, 1]))
        for k in min_counts:
            reports = [ScoreReport.of(proba[i], labels[i], "multiclass", Grid(), k) for i in sites]
            site_exact = [_auc(labels[i], proba[i, 1]) for i in sites]
            for reading in READINGS:
                first, *rest = [r.histograms(reading) for r in reports]
                pooled = sum(rest, first).auc("multiclass")
                site_errors = [h.auc("multiclass") - e for h, e in zip([first, *rest], site_exact, strict=True)]
                rows.append(
                    {
                        "data": path.stem,
                        "seed": seed,
                        "model": name,
                        "min_count": k,
                        "reading": reading,
                        "images": len(labels),
                        "sites": "/".join(str(len(i)) for i in sites),
                        "exact_auc": exact,
                        "pooled_auc": pooled,
                        "error": pooled - exact,
                        "withheld_rows": sum(len(r.withheld) for r in reports),
                        "site_errors": site_errors,  # each site's own AUC read from its report − its exact AUC
                    }
                )
    return rows


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's AUC, NaN where a class is missing."""
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def summary(rows: list[dict]) -> list[dict]:
    """Mean error and mean and largest absolute error per data set, model, k and reading."""
    out = []
    keys = dict.fromkeys((r["data"], r["model"], r["min_count"], r["reading"]) for r in rows)
    for data, model, k, reading in keys:
        errors = [
            r["error"]
            for r in rows
            if (r["data"], r["model"], r["min_count"], r["reading"]) == (data, model, k, reading)
        ]
        defined = [e for e in errors if not np.isnan(e)]
        site = [
            abs(e)
            for r in rows
            if (r["data"], r["model"], r["min_count"], r["reading"]) == (data, model, k, reading)
            for e in r["site_errors"]
            if not np.isnan(e)
        ]
        out.append(
            {
                "data": data,
                "model": model,
                "min_count": k,
                "reading": reading,
                "mean_error": statistics.mean(defined) if defined else float("nan"),
                "mean_abs_error": statistics.mean(abs(e) for e in defined) if defined else float("nan"),
                "max_abs_error": max(abs(e) for e in defined) if defined else float("nan"),
                "undefined": len(errors) - len(defined),
                "site_mean_abs_error": statistics.mean(site) if site else float("nan"),
                "site_max_abs_error": max(site) if site else float("nan"),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--min-counts", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for path in DATASETS.values() for seed in args.seeds for r in one_seed(path, seed, args.min_counts)]
    summed = summary(rows)
    command = "python benchmarks/pooled_auc.py " + " ".join(sys.argv[1:])
    headline = {
        f"{s['data']}/{s['model']}/k={s['min_count']}/{s['reading']}": {
            "mean_error": s["mean_error"],
            "mean_abs": s["mean_abs_error"],
            "max_abs": s["max_abs_error"],
            "site_mean_abs": s["site_mean_abs_error"],
        }
        for s in summed
    }
    markdown = "\n\n".join(
        [
            f"Pooled AUC from three hospitals' score reports against the exact AUC on the union (`{command.strip()}`):",
            table(
                summed,
                [
                    "data",
                    "model",
                    "min_count",
                    "reading",
                    "mean_error",
                    "mean_abs_error",
                    "max_abs_error",
                    "site_mean_abs_error",
                    "site_max_abs_error",
                ],
            ),
            "Every seed:",
            table(
                rows,
                ["data", "seed", "model", "min_count", "reading", "sites", "exact_auc", "error", "withheld_rows"],
            ),
        ]
    )
    write("pooled_auc", {"command": command.strip(), "headline": headline, "rows": rows, "summary": summed}, markdown)


if __name__ == "__main__":
    main()
