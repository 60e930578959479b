"""The hospital's fine-tune loop: AdamW, warm-up + cosine LR, light augmentation,
class-weighted cross-entropy (multi-label: BCE with pos_weight), seeded, on the best available device."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medvec.config import FinetuneConfig
from medvec.data.images import ImageSet
from medvec.models import ModelSpec
from medvec.preprocess import batches, predecode
from medvec.runtime import pick_device, set_threads
from medvec.timing import timed


def class_weights(label_counts: list[int]) -> torch.Tensor:
    """w_c = n / (K·n_c) for classes present (0 for absent classes)."""
    counts = torch.tensor(label_counts, dtype=torch.float32)
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def positive_weights(label_counts: list[int], n: int) -> torch.Tensor:
    """Multi-label ``pos_weight``: w_c = (n − n_c) / n_c, negatives per positive (1 for a label never seen)."""
    pos = torch.tensor(label_counts, dtype=torch.float32)
    return torch.where(pos > 0, (n - pos) / pos.clamp(min=1), torch.ones_like(pos))


def loss_function(train: ImageSet, cfg: FinetuneConfig, device: torch.device) -> nn.Module:
    """Cross-entropy, class-weighted (``finetune.class_weighting``); multi-label: BCE on logits with pos_weight."""
    if train.multilabel:
        weight = positive_weights(train.label_counts(), len(train)) if cfg.class_weighting else None
        return nn.BCEWithLogitsLoss(pos_weight=weight.to(device) if weight is not None else None)
    weight = class_weights(train.label_counts()) if cfg.class_weighting else None
    return nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)


def seed_everything(seed: int) -> None:
    """Seed torch's and NumPy's global generators (NumPy's with ``seed`` modulo 2³²)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@dataclass
class TrainResult:
    """A fine-tune's record: per-epoch history (loss, learning rate, local ``val_*`` metrics), wall seconds,
    images per second and the device it ran on."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    device: str = "cpu"


def recalibrate_bn(
    model: nn.Module, data: ImageSet, spec: ModelSpec, device: torch.device | str = "cpu", batch_size: int = 64
) -> None:
    """Set BN running statistics to the exact statistics of ``data`` (no augmentation).

    Short fine-tunes leave EMA running statistics mostly at their pre-training
    values (EfficientNet-Lite uses momentum 0.01), which hurts eval-mode accuracy.
    """
    from medvec.batchnorm import moment_sums, set_running

    sums = moment_sums(model, batches(data, spec, batch_size), mode="train", device=device)
    if sums.count:
        set_running(model, *sums.mean_var())


def lr_schedule(total: int, warmup: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def prepare_training(model: nn.Module, train: ImageSet, cfg: FinetuneConfig) -> tuple[torch.device, nn.Module]:
    """How every fine-tune starts: threads, seeds, the device (model moved there) and the loss."""
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    return device, loss_function(train, cfg, device)


def adamw(params, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for these tensors (a step about 3× faster on CPU), else
    the default implementation (same update, other rounding)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@timed("finetune")
def finetune(
    model: nn.Module,
    train: ImageSet,
    spec: ModelSpec,
    cfg: FinetuneConfig,
    val: ImageSet | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
) -> TrainResult:
    """Fine-tune ``model`` in place on ``train`` and return the loss history.

    The local validation set (if any) is evaluated after every epoch with
    :func:`medvec.evaluate.evaluate_model` and recorded in the history.
    """
    device, loss_fn = prepare_training(model, train, cfg)
    opt = adamw(model.parameters(), cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total, cfg.warmup_steps))
    amp = device.type == "cuda"
    result = TrainResult(device=str(device))
    decoded = predecode(train, spec)  # resized and normalised once, not every epoch (None for a large split)
    start = time.perf_counter()
    seen = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for epoch in range(cfg.epochs):
            model.train()
            running, n = 0.0, 0
            for x, y in batches(
                train,
                spec,
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed * 1000 + epoch,
                augment_data=cfg.augment,
                decoded=decoded,
            ):
                if len(y) < 2:  # batch norm needs two samples in training mode
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += loss.item() * len(y)
                n += len(y)
                seen += len(y)
                rate = seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / max(n, 1):.4f}", img_s=f"{rate:.0f}")
                bar.update(1)
            entry = {"epoch": epoch + 1, "loss": running / max(n, 1), "lr": sched.get_last_lr()[0]}
            if cfg.bn_recalibrate and epoch == cfg.epochs - 1:
                recalibrate_bn(model, train, spec, device)
            result.history.append(with_local_val(entry, model, val, spec, device))
    finally:
        bar.close()
    return finish_training(model, result, start, seen)


def with_local_val(entry: dict, model: nn.Module, val: ImageSet | None, spec: ModelSpec, device) -> dict:
    """An epoch's history entry, with the local validation metrics (``val_*``) when there is a local split."""
    from medvec.evaluate import evaluate_model

    if val is not None and len(val):
        m = evaluate_model(model, val, spec, batch_size=64, device=device)
        entry.update({f"val_{k}": v for k, v in m.items() if isinstance(v, float)})
    return entry


def finish_training(model: nn.Module, result: TrainResult, start: float, seen: int) -> TrainResult:
    """Leave the model in eval mode on the CPU and record the wall time and throughput."""
    model.eval()
    model.to("cpu")
    result.seconds = time.perf_counter() - start
    result.samples_per_second = seen / max(result.seconds, 1e-9)
    return result
