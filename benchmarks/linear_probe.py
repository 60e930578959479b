"""What a linear head on θ_pre's features can reach without DP: the ceiling of ``privacy.trainable: head``.

The demo configuration's θ_pre (EfficientNet-Lite0, ImageNet weights, 64 px) computes the head's inputs for the
pooled PneumoniaMNIST train split (every hospital's images together, no privacy), once plain and once as K views an
image (view 0 plain, K − 1 shifted or flipped: :func:`medvec.hospital.privacy.head_views`, as the DP head trains on).
An L2-regularised logistic regression (scikit-learn, balanced class weights, features standardised on the train
split) is fitted for each inverse regularisation C of a grid; each is scored on the validation and test splits.
"Chosen on validation" is the C with the best validation AUC, the rule every other choice in medvec follows; the
best test AUC over the grid is shown beside it as what no rule could choose.

    python benchmarks/linear_probe.py                 # ~3 min on 2 cores
    python benchmarks/linear_probe.py --views 1       # plain features only

Writes ``benchmarks/results/linear_probe.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from common import RESULTS, ROOT, table, write
from privacy_tradeoff import demo_base

from medvec.config import load_params
from medvec.data.sources import load_split
from medvec.hospital.privacy import head_features, head_views
from medvec.models import head_name
from medvec.preprocess import batches
from medvec.runtime import set_threads

DATA = ROOT / "data" / "pneumoniamnist.npz"
CS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Fit:
    """One C of the grid on one feature set: its validation and test AUC."""

    features: str
    c: float
    val_auc: float
    test_auc: float


Sets = dict[str, tuple[np.ndarray, np.ndarray]]  # split: (features, labels)


def features(views: int, batch: int, seed: int) -> dict[str, Sets]:
    """The head's inputs and labels of each split through θ_pre, each image computed once: ``plain`` (every split
    plain) and, with ``views`` K > 1, ``K views`` (train as (n·K, d) rows, view 0 the plain one; val and test
    plain)."""
    base = demo_base(load_params(ROOT / "params.yaml"))
    model = base.model
    head = model.get_submodule(head_name(model))
    plain: Sets = {}
    for split in ("val", "test"):
        data = load_split(DATA, split)
        x = head_features(model, head, (b for b, _ in batches(data, base.spec, batch)), "cpu").numpy()
        plain[split] = (x, np.asarray(data.labels).ravel())
    train = load_split(DATA, "train")
    labels = np.asarray(train.labels).ravel()
    x = head_views(model, head, train, base.spec, batch, views, seed, "cpu").numpy()  # (n, d), or (n, K, d)
    if views == 1:
        return {"plain": plain | {"train": (x, labels)}}
    augmented = plain | {"train": (x.reshape(-1, x.shape[2]), np.repeat(labels, views))}
    return {"plain": plain | {"train": (x[:, 0], labels)}, f"{views} views": augmented}


def fits(name: str, sets: Sets) -> list[Fit]:
    """The logistic regression at every C of :data:`CS`, scored on validation and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y = sets["train"]
    mean, std = x.mean(0), x.std(0) + 1e-6
    out = []
    for c in CS:
        model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit((x - mean) / std, y)
        auc = {
            s: float(roc_auc_score(sets[s][1], model.decision_function((sets[s][0] - mean) / std)))
            for s in ("val", "test")
        }
        out.append(Fit(name, c, round(auc["val"], 4), round(auc["test"], 4)))
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=8, help="K views an image for the second feature set (1: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the augmented views' seed")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    got = [fit for name, sets in features(args.views, 256, args.seed).items() for fit in fits(name, sets)]
    headline: dict[str, dict] = {}
    for name in dict.fromkeys(f.features for f in got):
        mine = [f for f in got if f.features == name]
        chosen = max(mine, key=lambda f: f.val_auc)
        headline[name] = {
            "chosen_on_val": {"c": chosen.c, "val_auc": chosen.val_auc, "test_auc": chosen.test_auc},
            "best_test_over_grid": max(f.test_auc for f in mine),
        }
    rows = [
        asdict(f) | {"chosen on val": "yes" if f.c == headline[f.features]["chosen_on_val"]["c"] else ""} for f in got
    ]
    command = "python benchmarks/linear_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (
        table(rows, ["features", "c", "val_auc", "test_auc", "chosen on val"])
        + f"\n\nLogistic regression on θ_pre's features of the pooled train split, no DP. Made by `{command.strip()}`."
    )
    write("linear_probe", {"command": command.strip(), "seconds": round(time.perf_counter() - started, 1),
                           "headline": headline, "fits": [asdict(f) for f in got]}, md, RESULTS)  # fmt: skip


if __name__ == "__main__":
    main()
