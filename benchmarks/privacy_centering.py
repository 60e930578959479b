"""Does DP-SGD of the head gain from features centred (and scaled) by public statistics? A probe for issue 28.

``privacy.trainable: head`` trains the classifier on the frozen network's features. Those features (after ReLU6
and pooling) are all positive, with a mean of norm 42 here; per-example gradients of a linear head carry that
common direction, which clipping and noise then share with the informative part. ``privacy.centre``
(:class:`medvec.hospital.privacy.FeatureCentre`) trains the head on ``(x − μ) / s`` instead, with μ the mean
feature of **public** images (here BreastMNIST train through θ_pre, the data the learning rate and clipping norm
are tuned on) and s one scalar (their centred RMS per coordinate), and maps the trained head back exactly. μ and
s are public, so the DP guarantee is unchanged.

Everything else is :mod:`benchmarks.privacy_tradeoff`'s head mode on the demo configuration (4 Dirichlet-0.5
hospitals of PneumoniaMNIST, 64 px, 3 seeds that change the split): lr and the clipping norm tuned again on
BreastMNIST with the centring (``tune_on_public``, three public splits), the merge and its λ chosen on
validation. Both sides are ``privacy_tradeoff.py``'s stored head runs for the same seed and ε (its recipe with
``centre`` and without, as before the option), so the differences are paired.

    python benchmarks/privacy_centering.py              # ε 3 1 8, seeds 0 1 2 (about 14 min on 2 cores)

Resumable: each (ε, seed) result is the one ``privacy_tradeoff.py`` keeps in ``benchmarks/results/privacy_runs/``
(a missing centred one is run and kept there), the centred tuning in ``centred-head-tuning.json``. Writes
``benchmarks/results/privacy_centering.{json,md}``. (The first measurement patched the head's training, before
``privacy.centre`` existed; the option gave its numbers to the last digit.) Its stored results predate DP-SGD's
per-example loss and ``privacy.augmentations``; the recipes are kept as measured (one view an image), so a missing
run is trained at K = 1 with today's loss (which moved the centred head's results by at most 0.002).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import privacy_tradeoff as pt  # noqa: E402

from medvec.config import load_params  # noqa: E402
from medvec.coordinator import scoring  # noqa: E402
from medvec.data.sources import load_split  # noqa: E402
from medvec.hospital.privacy import tune_on_public  # noqa: E402
from medvec.runtime import set_threads  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def tune(params, public, base) -> dict:
    """lr and the clipping norm of the centred head, chosen on BreastMNIST as privacy_tradeoff.py --tune does."""
    grid = tune_on_public(public, base, params.finetune, pt.privacy_for("head", 3.0, len(public)))
    return vars(grid[0])


def summarise(rows: list[dict]) -> dict:
    """Per ε: the means, the paired differences (centred − raw) and their mean."""
    out = {}
    for eps in sorted({r["epsilon"] for r in rows}):
        mine = sorted((r for r in rows if r["epsilon"] == eps), key=lambda r: r["seed"])
        diff = [r["centred"] - r["raw"] for r in mine]
        out[f"{eps:g}"] = {
            "seeds": [r["seed"] for r in mine],
            "raw": statistics.fmean(r["raw"] for r in mine),
            "centred": statistics.fmean(r["centred"] for r in mine),
            "paired_differences": diff,
            "mean_difference": statistics.fmean(diff),
            "centred_balanced_accuracy_at_op": statistics.fmean(r["centred_bal_acc"] for r in mine),
        }
    return out


def write(rows: list[dict], tuned: dict, out: Path) -> None:
    summary = summarise(rows)
    doc = {"headline": {"merged_test_auc": summary}, "tuned": tuned, "rows": rows}
    (out / "privacy_centering.json").write_text(json.dumps(doc, indent=2))
    lines = [
        "| target ε | merged test AUC, raw features | centred | paired differences (centred − raw) | mean |",
        "|---|---|---|---|---|",
    ]
    for eps, s in summary.items():
        diffs = ", ".join(f"{d:+.3f}" for d in s["paired_differences"])
        lines.append(f"| {eps} | {s['raw']:.3f} | {s['centred']:.3f} | {diffs} | {s['mean_difference']:+.3f} |")
    note = (
        f"\n\nHead-only DP-SGD, seeds {sorted({r['seed'] for r in rows})}; centred: lr {tuned['lr']}, clipping "
        f"{tuned['max_grad_norm']} (tuned on BreastMNIST); raw: the stored `privacy_tradeoff.py --modes head` runs. "
        "Made by `python benchmarks/privacy_centering.py`.\n"
    )
    (out / "privacy_centering.md").write_text("\n".join(lines) + note)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 1.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    set_threads(2)
    params = load_params(ROOT / "params.yaml", ["finetune.threads=2", "batchnorm.strategy=average"])
    data = str(ROOT / params.demo.data)
    settings = pt.run_settings(params, data)
    centred = pt.recipe("head")  # privacy_tradeoff's head recipe: privacy.centre set
    centred.pop("augmentations")  # as measured: one view an image, before privacy.augmentations (names the runs)
    raw_recipe = {k: v for k, v in centred.items() if k != "centre"}  # the head as it was before the option
    public = load_split(ROOT / "data" / "breastmnist.npz", "train")
    tuned = pt.cached(pt.RUNS / "centred-head-tuning.json", tune, params, public, pt.demo_base(params))
    centred |= {"lr": tuned["lr"], "max_grad_norm": tuned["max_grad_norm"]}
    pt.recipe = lambda mode, epsilon=None: centred  # what run_one trains with, below
    evalsets = scoring.EvalSets.load(data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in args.epsilons:
            for seed in args.seeds:
                raw_path = pt.run_key("utility", "head", seed, eps, settings | {"recipe": raw_recipe})
                if not raw_path.is_file():
                    raise SystemExit(f"{raw_path.name}: run `python benchmarks/privacy_tradeoff.py --modes head` first")
                raw = json.loads(raw_path.read_text())
                path = pt.run_key("utility", "head", seed, eps, settings | {"recipe": centred})
                got = pt.cached(path, pt.run_one, "head", seed, eps, params, data, Path(tmp), evalsets)
                rows.append(
                    {
                        "epsilon": eps,
                        "seed": seed,
                        "raw": raw["merged"]["test_auc"],
                        "centred": got["merged"]["test_auc"],
                        "centred_bal_acc": got["merged"]["test_balanced_accuracy_at_op"],
                        "centred_single_mean": got["mean_single_test_auc"],
                        "raw_single_mean": raw["mean_single_test_auc"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(rows, tuned, out)
    print((out / "privacy_centering.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
