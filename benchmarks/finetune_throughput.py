"""Images per second of medvec's fine-tune loop against a bare PyTorch loop, in the same process.

Both train a fresh copy of the same θ_pre (the demo's EfficientNet-Lite0 at 64 px,
``params.yaml``) with the same batch size, threads, optimizer (AdamW) and images
(the first ``--images`` of PneumoniaMNIST's train split).  The bare loop is the
floor of what a training step costs: images decoded and resized once up front,
a random permutation per epoch, forward, cross-entropy, backward, step; no
augmentation, no schedule, no progress bar.  It runs three ways: on a plain NCHW
tensor with AdamW's defaults; on the same tensor stored channels-last (as medvec's
batches are, about twice as fast on CPU); and channels-last with the fused AdamW
kernel (as medvec uses); the NCHW loop, the slowest and context only, runs in the
first repeat alone.  The headline ``ratio`` compares medvec's fastest run with
the fastest run of the fastest bare loop (interference on a shared machine only ever
slows a run); ``median_ratio`` compares the medians.  medvec's loop is
:func:`medvec.hospital.train.finetune` as a hospital runs it (augmentation, class weights,
LR schedule, progress bookkeeping), without the local validation and the BN
recalibration pass that follow training.  The loops alternate ``--repeats`` times,
so that drift hits all of them.

    python benchmarks/finetune_throughput.py [--images 1280] [--epochs 1] [--repeats 5]

Writes ``benchmarks/results/finetune_throughput.json`` (headline ``ratio``: medvec's
images per second ÷ the bare loop's) and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, table, write

DATA = ROOT / "data" / "pneumoniamnist.npz"
NCHW = "bare, NCHW, AdamW"


def bare_loop(
    model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, batch_size: int, epochs: int, seed: int, fused: bool
):
    """The plainest training loop over pre-decoded tensors; returns images per second."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True if fused else None)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_all), generator=g).split(batch_size):
            if len(idx) < 2:
                continue
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
    return seen / (time.perf_counter() - start)


def medvec_loop(model: nn.Module, data, spec, cfg) -> float:
    from medvec.hospital.train import finetune

    return finetune(model, data, spec, cfg, val=None, progress=False).samples_per_second


def main() -> None:
    from medvec.config import load_params
    from medvec.data.sources import load_split
    from medvec.models import base_from_config
    from medvec.preprocess import to_tensor
    from medvec.runtime import set_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1280)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="params override")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args()
    p = load_params(ROOT / "params.yaml", args.overrides)
    cfg = p.finetune.model_copy(update={"epochs": args.epochs, "bn_recalibrate": False})
    set_threads(cfg.threads)
    train = load_split(DATA, "train")
    data = train.subset(np.arange(min(args.images, len(train))))
    base = base_from_config(p.model, 2)
    y_all = torch.as_tensor(data.labels)
    nchw = to_tensor(data.images, base.spec).contiguous()
    last = nchw.contiguous(memory_format=torch.channels_last)
    bare = {  # the same pixels as a plain NCHW tensor and stored channels-last (as medvec's batches are)
        NCHW: (nchw, False),
        "bare, channels-last, AdamW": (last, False),
        "bare, channels-last, fused AdamW": (last, True),
    }
    runs: dict[str, list[float]] = {name: [] for name in (*bare, "medvec")}
    for x_all, fused in bare.values():  # warm every variant's kernels
        bare_loop(base.fresh(), x_all[: 2 * cfg.batch_size], y_all[: 2 * cfg.batch_size], cfg.batch_size, 1, 0, fused)
    for r in range(args.repeats):
        for name, (x_all, fused) in bare.items():
            if r and name == NCHW:  # context only (the slowest loop): one run
                continue
            runs[name].append(bare_loop(base.fresh(), x_all, y_all, cfg.batch_size, args.epochs, r, fused))
        runs["medvec"].append(medvec_loop(base.fresh(), data, base.spec, cfg))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in runs.items() if v), flush=True)
    rows: list[dict[str, Any]] = [
        {
            "loop": name,
            "images_per_second": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "runs": len(v),
        }
        for name, v in runs.items()
    ]
    # this machine is a shared VM: interference only ever slows a run down, so each loop's fastest run is its
    # least disturbed one; the medians are reported beside
    best = max(rows[:-1], key=lambda r: r["max"])
    ratio = rows[-1]["max"] / best["max"]
    median_ratio = rows[-1]["images_per_second"] / max(r["images_per_second"] for r in rows[:-1])
    head = {
        "ratio": round(ratio, 4),
        "against": best["loop"],
        "median_ratio": round(median_ratio, 4),
        "target": 0.95,
        "target_met": ratio >= 0.95,
    }
    md = "\n".join(
        [
            f"# Fine-tune throughput ({p.model.name}, {p.model.image_size} px, batch {cfg.batch_size}, "
            f"{torch.get_num_threads()} threads, {len(data)} images × {args.epochs} epoch(s))",
            "",
            f"`python benchmarks/finetune_throughput.py --images {args.images} --epochs {args.epochs} "
            f"--repeats {args.repeats}` — medians of alternating runs in one process.",
            "",
            table(rows, ["loop", "images_per_second", "min", "max", "runs"]),
            "",
            f"headline: {head}",
        ]
    )
    payload = {"headline": head, "model": p.model.name, "batch_size": cfg.batch_size, "rows": rows, "runs": runs}
    write("finetune_throughput", payload, md, args.out)


if __name__ == "__main__":
    main()
