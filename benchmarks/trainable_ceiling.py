"""What each ``privacy.trainable`` mode can reach without DP: the ceiling its DP runs train under.

The demo configuration's θ_pre (EfficientNet-Lite0, ImageNet weights, 64 px) is fine-tuned on the pooled
PneumoniaMNIST train split (every hospital's images together; no privacy, no federation), training only what the
mode names (:func:`medvec.hospital.privacy.select_trainable`: ``head``; ``bn_affine``, the batch-norm scales and
shifts and the head), with batch-norm statistics frozen as under DP. AdamW, class-weighted cross-entropy, batch 64,
no augmentation, for each learning rate of the grid; every epoch is scored on the validation and test splits.
"Chosen on validation" is the (lr, epoch) with the best validation AUC; the best test AUC over the grid is shown
beside it as what no rule could choose.

    python benchmarks/trainable_ceiling.py      # ~5 min on 2 cores

Writes ``benchmarks/results/trainable_ceiling.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from common import RESULTS, ROOT, table, write
from privacy_tradeoff import demo_base

from medvec.config import load_params
from medvec.data.images import ImageSet
from medvec.data.sources import load_split
from medvec.evaluate import evaluate_model
from medvec.hospital.privacy import select_trainable
from medvec.preprocess import to_tensor
from medvec.runtime import set_threads

DATA = ROOT / "data" / "pneumoniamnist.npz"
LRS = (0.001, 0.01)
MODES = ("head", "bn_affine")


@dataclass(frozen=True)
class Epoch:
    """One epoch of one (mode, lr): its validation and test AUC."""

    mode: str
    lr: float
    epoch: int
    val_auc: float
    test_auc: float


def train(base, mode: str, lr: float, epochs: int, x: torch.Tensor, y: torch.Tensor, sets: dict[str, ImageSet],
          seed: int) -> list[Epoch]:  # fmt: skip
    """``mode``'s parameters of a fresh θ_pre trained on the pooled train split (``x`` preprocessed, ``y``), scored
    on ``sets`` (val and test) after every epoch."""
    torch.manual_seed(seed)
    model = base.fresh()
    params = select_trainable(model, mode)
    weight = (len(y) / (2 * torch.bincount(y, minlength=2).clamp_min(1))).float()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    out = []
    for epoch in range(1, epochs + 1):
        model.eval()  # batch-norm statistics frozen, as under DP
        for idx in torch.randperm(len(y)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        auc = {s: round(float(evaluate_model(model, data, base.spec)["auc"]), 4) for s, data in sets.items()}
        out.append(Epoch(mode, lr, epoch, auc["val"], auc["test"]))
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    base = demo_base(load_params(ROOT / "params.yaml"))
    pooled = load_split(DATA, "train")
    x, y = to_tensor(pooled.images, base.spec), torch.as_tensor(np.asarray(pooled.labels).ravel())
    sets = {split: load_split(DATA, split) for split in ("val", "test")}
    got = [e for mode in MODES for lr in LRS for e in train(base, mode, lr, args.epochs, x, y, sets, args.seed)]
    headline: dict[str, dict] = {}
    for mode in MODES:
        mine = [e for e in got if e.mode == mode]
        chosen = max(mine, key=lambda e: e.val_auc)
        headline[mode] = {
            "chosen_on_val": {"lr": chosen.lr, "epoch": chosen.epoch, "val_auc": chosen.val_auc,
                              "test_auc": chosen.test_auc},
            "best_test_over_grid": max(e.test_auc for e in mine),
        }  # fmt: skip
    command = "python benchmarks/trainable_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = [{"mode": m, **h["chosen_on_val"], "best test over the grid": h["best_test_over_grid"]}
            for m, h in headline.items()]  # fmt: skip
    md = (
        table(rows, ["mode", "lr", "epoch", "val_auc", "test_auc", "best test over the grid"])
        + "\n\nEach mode's parameters trained on the pooled train split, no DP, BN statistics frozen; (lr, epoch)"
        + f" chosen on validation. Every epoch:\n\n{table([asdict(e) for e in got], list(asdict(got[0])))}"
        + f"\n\nMade by `{command.strip()}`."
    )
    write("trainable_ceiling", {"command": command.strip(), "seconds": round(time.perf_counter() - started, 1),
                                "headline": headline, "epochs": [asdict(e) for e in got]}, md, RESULTS)  # fmt: skip


if __name__ == "__main__":
    main()
