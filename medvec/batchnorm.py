"""Batch-norm statistics: running statistics, moment sums and restoration.

Running means and variances are not weights: summing hospitals' deltas of
``running_var`` can drive variances negative (we saw NaN outputs from four
hospitals).  So data vectors exclude them (see :mod:`medvec.vectors`) and the
merged model's statistics are restored by one of three strategies:

``none``
    keep θ_pre's statistics.
``average``
    μ = Σ_h n_h μ_h / Σ_h n_h and σ² = Σ_h n_h σ²_h / Σ_h n_h over the hospitals'
    own running statistics (what synchronous FedAvg does with BN buffers).
``recompute``
    re-estimate every layer under the merged weights.  Each hospital computes
    per-channel moment sums (count, Σx, Σx²) of every BN layer's input on its own
    data and sends only those; sums add exactly across hospitals, so
    μ = Σx / n and σ² = (Σx² − (Σx)²/n) / (n − 1) equal one pass over all the
    hospitals' batches together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

STRATEGIES = ("none", "average", "recompute")


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Batch-norm layers that track running statistics, by qualified name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


def is_bn_stat(key: str) -> bool:
    """True for state-dict keys that hold batch-norm running statistics."""
    return key.endswith(".running_mean") or key.endswith(".running_var") or key.endswith(".num_batches_tracked")


@dataclass
class RunningStats:
    """A model's BN running statistics and the number of samples behind them."""

    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    count: int

    @classmethod
    def of(cls, model: nn.Module, count: int) -> "RunningStats":
        """``model``'s BN running means and variances (float32 copies), credited to ``count`` samples."""
        layers = bn_layers(model)
        return cls(
            {k: _stat(m, "running_mean").detach().clone().float() for k, m in layers.items()},
            {k: _stat(m, "running_var").detach().clone().float() for k, m in layers.items()},
            int(count),
        )

    def to_tensors(self, prefix: str = "bn:") -> dict[str, torch.Tensor]:
        """The statistics as flat tensors for a vector file: ``<prefix><layer>.running_mean`` and ``.running_var``."""
        out: dict[str, torch.Tensor] = {}
        for k in self.mean:
            out[f"{prefix}{k}.running_mean"] = self.mean[k].contiguous()
            out[f"{prefix}{k}.running_var"] = self.var[k].contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], count: int, prefix: str = "bn:") -> "RunningStats":
        """The inverse of :meth:`to_tensors`: the statistics under ``prefix`` in ``tensors`` (other keys ignored),
        credited to ``count`` samples."""
        mean: dict[str, torch.Tensor] = {}
        var: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if not key.startswith(prefix):
                continue
            layer, _, stat = key[len(prefix) :].rpartition(".")
            (mean if stat == "running_mean" else var)[layer] = t
        return cls(mean, var, count)


@dataclass
class MomentSums:
    """Per-channel (count, Σx, Σx²) of every BN layer's input, in float64."""

    count: dict[str, float] = field(default_factory=dict)
    sum: dict[str, torch.Tensor] = field(default_factory=dict)
    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)

    def __add__(self, other: "MomentSums") -> "MomentSums":
        if not self.count:
            return other
        if not other.count:
            return self
        if set(self.count) != set(other.count):
            raise ValueError("moment sums cover different batch-norm layers")
        return MomentSums(
            {k: self.count[k] + other.count[k] for k in self.count},
            {k: self.sum[k] + other.sum[k] for k in self.sum},
            {k: self.sumsq[k] + other.sumsq[k] for k in self.sumsq},
        )

    __radd__ = __add__

    @staticmethod
    def combine(parts: Iterable["MomentSums"]) -> "MomentSums":
        """The sum of ``parts``; empty sums when there are none."""
        total = MomentSums()
        for p in parts:
            total = total + p
        return total

    def mean_var(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """μ = Σx/n and unbiased σ² = (Σx² − (Σx)²/n)/(n − 1), per layer (float64)."""
        mean, var = {}, {}
        for k, n in self.count.items():
            mean[k] = self.sum[k] / n
            var[k] = ((self.sumsq[k] - self.sum[k] ** 2 / n) / max(n - 1.0, 1.0)).clamp_min(0.0)
        return mean, var

    def to_tensors(self, prefix: str = "moments:") -> dict[str, torch.Tensor]:
        """The sums as flat tensors for a file: ``<prefix><layer>.count`` (one float64), ``.sum`` and ``.sumsq``."""
        out: dict[str, torch.Tensor] = {}
        for k in self.count:
            out[f"{prefix}{k}.count"] = torch.tensor([self.count[k]], dtype=torch.float64)
            out[f"{prefix}{k}.sum"] = self.sum[k].contiguous()
            out[f"{prefix}{k}.sumsq"] = self.sumsq[k].contiguous()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the sums as safetensors (float64, exact); returns the path."""
        from safetensors.torch import save_file

        save_file(self.to_tensors(), str(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "MomentSums":
        """Read sums that :meth:`save` wrote."""
        from safetensors.torch import load_file

        return cls.from_tensors(load_file(str(path)))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "moments:") -> "MomentSums":
        """The inverse of :meth:`to_tensors`: the sums under ``prefix`` in ``tensors`` (other keys ignored), float64."""
        m = cls()
        for key, t in tensors.items():
            if not key.startswith(prefix):
                continue
            layer, _, stat = key[len(prefix) :].rpartition(".")
            if stat == "count":
                m.count[layer] = float(t.reshape(-1)[0])
            else:
                getattr(m, stat)[layer] = t.to(torch.float64)
        return m


@torch.no_grad()
def moment_sums(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    mode: str = "train",
    device: str | torch.device = "cpu",
) -> MomentSums:
    """Accumulate (count, Σx, Σx²) of every BN layer's input over ``batches``.

    ``mode="train"`` normalises with each batch's own statistics (as SWA's
    ``update_bn`` does), so layer k's input does not depend on the stale
    statistics of layers before it; ``mode="eval"`` uses the current running
    statistics.  The model's buffers and modes are left as they were.
    """
    layers = bn_layers(model)
    sums = MomentSums()
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            dims = [d for d in range(x.ndim) if d != 1]
            n = x.numel() // x.shape[1]
            # per-batch moments, two-pass (mean, then the mean squared deviation: stable, and 5-10x faster on CPU
            # than torch.var_mean's Welford kernel), accumulated as float64 sums
            x = x.float()
            mean = x.mean(dim=dims)
            var = (x - mean.view([1, -1] + [1] * (x.ndim - 2))).square_().mean(dim=dims)
            mean, var = mean.double().cpu(), var.double().cpu()
            s, q = n * mean, n * (var + mean * mean)
            sums.count[name] = sums.count.get(name, 0.0) + float(n)
            sums.sum[name] = sums.sum[name] + s if name in sums.sum else s
            sums.sumsq[name] = sums.sumsq[name] + q if name in sums.sumsq else q

        return fn

    saved = {
        k: (
            m.training,
            m.momentum,
            {b: getattr(m, b).clone() for b in ("running_mean", "running_var", "num_batches_tracked")},
        )
        for k, m in layers.items()
    }
    was_training = model.training
    model.eval()
    if mode == "train":
        for m in layers.values():
            m.train()
    elif mode != "eval":
        raise ValueError(f"unknown mode {mode!r}: valid are train, eval")
    try:
        for k, m in layers.items():
            handles.append(m.register_forward_pre_hook(hook(k)))
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        for k, m in layers.items():
            training, momentum, buffers = saved[k]
            for b, v in buffers.items():
                getattr(m, b).copy_(v)
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return sums


def set_running(model: nn.Module, mean: dict[str, torch.Tensor], var: dict[str, torch.Tensor]) -> None:
    """Copy ``mean`` and ``var`` into every BN layer's running statistics, in place; ValueError naming the layers
    ``mean`` has no statistics for."""
    layers = bn_layers(model)
    missing = set(layers) - set(mean)
    if missing:
        raise ValueError(f"no statistics for batch-norm layers {sorted(missing)[:5]}")
    for k, m in layers.items():
        for stat, value in (("running_mean", mean[k]), ("running_var", var[k])):
            target = _stat(m, stat)
            target.copy_(value.to(target))


def average_running(stats: list[RunningStats]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sample-weighted average of the hospitals' running means and variances."""
    total = float(sum(s.count for s in stats))
    if total <= 0:
        raise ValueError("average needs hospitals with a positive sample count")
    shares = [s.count / total for s in stats]
    mean = {k: _weighted_sum([s.mean[k] for s in stats], shares) for k in stats[0].mean}
    var = {k: _weighted_sum([s.var[k] for s in stats], shares) for k in stats[0].var}
    return mean, var


def _weighted_sum(tensors: list[torch.Tensor], shares: list[float]) -> torch.Tensor:
    """Σ_i share_i · t_i in float64, summed left to right from 0 as Python's ``sum`` does."""
    total: torch.Tensor | int = 0
    for t, share in zip(tensors, shares):
        total = total + t.double() * share
    assert isinstance(total, torch.Tensor), "no statistics to average"
    return total


def _stat(layer: nn.Module, name: str) -> torch.Tensor:
    """A BN layer's running statistic; a layer built without running statistics has none to use."""
    value = getattr(layer, name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"a batch-norm layer without {name} (track_running_stats=False) cannot be merged")
    return value


def restore_batchnorm(
    model: nn.Module,
    strategy: str,
    running: list[RunningStats] | None = None,
    moments: MomentSums | None = None,
) -> nn.Module:
    """Set the merged model's BN statistics by ``strategy`` (in place; returns the model)."""
    if strategy == "none":
        return model
    if strategy == "average":
        if not running:
            raise ValueError("strategy 'average' needs the hospitals' running statistics")
        set_running(model, *average_running(running))
        return model
    if strategy == "recompute":
        if moments is None or not moments.count:
            raise ValueError("strategy 'recompute' needs moment sums from the hospitals or a calibration set")
        set_running(model, *moments.mean_var())
        return model
    raise ValueError(f"unknown batch-norm strategy {strategy!r}: valid are {', '.join(STRATEGIES)}")
