"""Merge methods: how the coordinator turns data vectors into synthetic weights.

Every method computes a merged vector τ_m from the hospitals' vectors
τ_1..τ_N, tensor by tensor, and the merged model is θ = θ_pre + λ·τ_m.

=================  ==========================================================  =========================
name               τ_m (per coordinate)                                         paper
=================  ==========================================================  =========================
``sum``            Σ_h τ_h, λ fixed at 1                                        arXiv 2408.13038 (the data-vector paper)
``task_arithmetic`` Σ_h τ_h, λ chosen on validation                              Ilharco et al. 2023, arXiv 2212.04089
``mean``           (1/N) Σ_h τ_h                                                 Wortsman et al. 2022 (model soups)
``weighted``       Σ_h (n_h / Σ_g n_g) τ_h, n_h = training samples              McMahan et al. 2017 (FedAvg weights)
``ties``           trim each τ_h to its top-k% |·|, elect γ = sign(Σ_h τ̂_h),    Yadav et al. 2023, arXiv 2306.01708
                   mean of the τ̂_h whose sign is γ (disjoint mean)
``dare``           Σ_h m_h ⊙ τ_h / (1 − p), m_h ~ Bernoulli(1 − p), seeded       Yu et al. 2024, arXiv 2311.03099
``median``         median_h τ_h (mean of the two middle values for even N)      robust aggregation (Yin et al. 2018)
=================  ==========================================================  =========================

``task_arithmetic``, ``mean``, ``weighted``, ``ties`` and ``dare`` are settings of
one :class:`GeneralizedTaskArithmetic` (trim density, sign election, drop
probability, reduction), as in mergekit.  Vectors are read lazily: only one
tensor per vector is in memory at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from medvec.errors import UserError
from medvec.timing import timed
from medvec.vectors import HUGE_PAGE, MERGE_WINDOW_BYTES

__all__ = [
    "GeneralizedTaskArithmetic",
    "Median",
    "MergeMethod",
    "UnknownMethodError",
    "get_method",
    "merge_delta",
    "merge_vectors",
    "method_names",
]


class VectorLike(Protocol):
    meta: object

    def keys(self) -> list[str]: ...

    def tensor(self, key: str) -> torch.Tensor: ...


class UnknownMethodError(UserError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class MergeMethod:
    """Base class: ``merge_tensor`` maps the vectors' deltas of one key to τ_m."""

    name: str = ""
    formula: str = ""
    paper: str = ""
    lambdas: tuple[float, ...] = (1.0,)
    needs_weights: bool = False

    def merge_tensor(self, deltas: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "formula": self.formula, "paper": self.paper, "lambdas": list(self.lambdas)}


def _seed_for(seed: int, key: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def trim_top_k(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density·numel)`` (at least 1) largest-magnitude entries, zero the rest."""
    if density >= 1.0:
        return t
    flat = t.reshape(-1)
    k = max(1, round(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(t.shape)


@dataclass
class GeneralizedTaskArithmetic(MergeMethod):
    """Task arithmetic with optional trimming, DARE dropping and TIES sign election.

    Parameters
    ----------
    reduce : "sum", "mean", "weighted" or "disjoint_mean".
    density : fraction of entries kept per vector and tensor (TIES trimming); 1 keeps all.
    drop : DARE drop probability p; kept entries are rescaled by 1/(1 − p).
    sign_election : elect γ = sign(Σ τ̂_h) and keep only agreeing entries.
    """

    name: str = "task_arithmetic"
    reduce: str = "sum"
    density: float = 1.0
    drop: float = 0.0
    sign_election: bool = False
    seed: int = 0
    lambdas: tuple[float, ...] = (0.25, 0.5, 1.0)
    formula: str = "θ_pre + λ Σ_h τ_h"
    paper: str = ""

    @property
    def needs_weights(self) -> bool:  # type: ignore[override]
        return self.reduce == "weighted"

    @property
    def streams(self) -> bool:
        """τ_m = Σ_h c_h · f(τ_h): each vector can be added into the output on its own (no sign election)."""
        return not self.sign_election and self.reduce in ("sum", "mean", "weighted")

    def coefficients(self, weights: list[float]) -> list[float]:
        """c_h of a streaming reduction: 1 (sum), 1/N (mean), n_h / Σ n (weighted)."""
        if self.reduce == "sum":
            return [1.0] * len(weights)
        if self.reduce == "mean":
            return [1.0 / len(weights)] * len(weights)
        w = torch.tensor(weights, dtype=torch.float64)
        if (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError("weighted merge needs non-negative weights with a positive sum")
        return (w / w.sum()).tolist()

    def transforms(self) -> bool:
        """Whether each vector is changed (DARE drop, trimming) before it is reduced."""
        return self.drop > 0 or self.density < 1.0

    def prepare(self, t: torch.Tensor, key: str, index: int) -> torch.Tensor:
        """f(τ_h) for one tensor: DARE's seeded drop and rescale, then top-k trimming."""
        t = t.float()
        if self.drop > 0:
            g = torch.Generator().manual_seed(_seed_for(self.seed, key, index))
            mask = torch.rand(t.shape, generator=g) >= self.drop
            t = torch.where(mask, t / (1.0 - self.drop), torch.zeros_like(t))
        return trim_top_k(t, self.density)

    def merge_tensor(self, deltas: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
        ts = [self.prepare(t, key, i) for i, t in enumerate(deltas)]
        stacked = torch.stack(ts)
        if self.sign_election:
            gamma = torch.sign(stacked.sum(0))
            agree = (torch.sign(stacked) == gamma) & (stacked != 0)
            stacked = torch.where(agree, stacked, torch.zeros_like(stacked))
            if self.reduce == "disjoint_mean":
                return stacked.sum(0) / agree.sum(0).clamp_min(1)
        if self.reduce == "sum":
            return stacked.sum(0)
        if self.reduce == "mean":
            return stacked.mean(0)
        if self.reduce == "weighted":
            w = torch.tensor(self.coefficients(weights), dtype=stacked.dtype)
            return (stacked * w.view(-1, *([1] * (stacked.ndim - 1)))).sum(0)
        if self.reduce == "disjoint_mean":
            nonzero = stacked != 0
            return stacked.sum(0) / nonzero.sum(0).clamp_min(1)
        raise ValueError(f"unknown reduction {self.reduce!r}")


@dataclass
class Median(MergeMethod):
    """Coordinate-wise median of the vectors: robust to a minority of outliers."""

    name: str = "median"
    lambdas: tuple[float, ...] = (1.0, 2.0, 3.0)
    formula: str = "θ_pre + λ median_h τ_h"
    paper: str = "Yin et al. 2018, arXiv 1803.01498"

    def merge_tensor(self, deltas: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
        stacked = torch.stack([t.float() for t in deltas]).sort(0).values
        n = stacked.shape[0]
        if n % 2:
            return stacked[n // 2]
        return (stacked[n // 2 - 1] + stacked[n // 2]) / 2


_SUM_GRID = (0.25, 0.5, 1.0)
_MEAN_GRID = (1.0, 2.0, 3.0)


def _registry(density: float, drop: float, seed: int) -> dict[str, MergeMethod]:
    return {
        "sum": GeneralizedTaskArithmetic(
            name="sum", reduce="sum", lambdas=(1.0,), formula="θ_pre + Σ_h τ_h", paper="arXiv 2408.13038"
        ),
        "task_arithmetic": GeneralizedTaskArithmetic(
            name="task_arithmetic",
            reduce="sum",
            lambdas=_SUM_GRID,
            formula="θ_pre + λ Σ_h τ_h",
            paper="arXiv 2212.04089",
        ),
        "mean": GeneralizedTaskArithmetic(
            name="mean", reduce="mean", lambdas=_MEAN_GRID, formula="θ_pre + λ (1/N) Σ_h τ_h", paper="arXiv 2203.05482"
        ),
        "weighted": GeneralizedTaskArithmetic(
            name="weighted",
            reduce="weighted",
            lambdas=_MEAN_GRID,
            formula="θ_pre + λ Σ_h (n_h/Σn) τ_h",
            paper="arXiv 1602.05629",
        ),
        "ties": GeneralizedTaskArithmetic(
            name="ties",
            reduce="disjoint_mean",
            density=density,
            sign_election=True,
            lambdas=_MEAN_GRID,
            formula="θ_pre + λ disjoint_mean(trim_k(τ_h), γ = sign Σ trim_k(τ_h))",
            paper="arXiv 2306.01708",
        ),
        "dare": GeneralizedTaskArithmetic(
            name="dare",
            reduce="sum",
            drop=drop,
            seed=seed,
            lambdas=_SUM_GRID,
            formula="θ_pre + λ Σ_h m_h ⊙ τ_h / (1 − p)",
            paper="arXiv 2311.03099",
        ),
        "median": Median(),
    }


def method_names() -> list[str]:
    return list(_registry(0.2, 0.5, 0))


def get_method(name: str, density: float = 0.2, drop: float = 0.5, seed: int = 0) -> MergeMethod:
    """The merge method registered as ``name``; unknown names list the valid ones."""
    methods = _registry(density, drop, seed)
    if name not in methods:
        raise UnknownMethodError(f"unknown merge method {name!r}: valid methods are {', '.join(methods)}")
    return methods[name]


def method_from_config(name: str, cfg) -> MergeMethod:
    """Build a method with the settings of a :class:`medvec.config.MergeConfig`."""
    return get_method(name, density=cfg.ties_density, drop=cfg.dare_drop, seed=cfg.seed)


@timed("merge")
def merge_delta(vectors: Sequence[VectorLike], method: MergeMethod | str):
    """τ_m, computed tensor by tensor from lazily read vectors (a derived :class:`DataVector`).

    Linear reductions (sum, mean, weighted, DARE) stream: each vector's tensor is added
    into the output where it lies, so memory does not grow with the number of vectors;
    fp32 files with one layout are added a few MiB of consecutive tensors at a time.
    Methods that need all values of a coordinate at once (TIES' sign election, the
    median) hold that one tensor's N slices.
    """
    from medvec.vectors import DataVector

    if isinstance(method, str):
        method = get_method(method)
    if not vectors:
        raise ValueError("nothing to merge: no vectors")
    keys = vectors[0].keys()
    for v in vectors[1:]:
        if v.keys() != keys:
            diff = sorted(set(v.keys()) ^ set(keys))
            raise ValueError(f"vectors differ in keys: {diff[:5]}")
    weights = (
        [float(getattr(v.meta, "n_train", 0) or 0) for v in vectors] if method.needs_weights else [1.0] * len(vectors)
    )
    for v in vectors:  # mapped file pages held across all vectors stay within one budget
        if hasattr(v, "window"):
            v.window = max(HUGE_PAGE, MERGE_WINDOW_BYTES // len(vectors) // HUGE_PAGE * HUGE_PAGE)
    try:
        if getattr(method, "streams", False):
            coeffs = method.coefficients(weights)
            if not method.transforms() and _same_fp32_layout(vectors):
                return DataVector(_stream_runs(vectors, coeffs))
            return DataVector({k: _stream_tensor(vectors, method, coeffs, k) for k in keys})
        return DataVector({k: method.merge_tensor([v.tensor(k) for v in vectors], weights, k) for k in keys})
    finally:
        for v in vectors:
            if hasattr(v, "release"):
                v.release()


RUN_CHUNK = 1 << 20  # values read per call (4 MiB) when whole runs of fp32 deltas are merged


def _same_fp32_layout(vectors: Sequence[VectorLike]) -> bool:
    """Every vector a file storing plain fp32 deltas at the same offsets as the first."""
    layouts = [getattr(v, "fp32_layout", lambda: None)() for v in vectors]
    return layouts[0] is not None and all(lay == layouts[0] for lay in layouts[1:])


def _chunks(runs: list[list[tuple]], outs: dict[str, torch.Tensor]) -> list[tuple[int, int, list[tuple]]]:
    """Each run cut into reads of at most :data:`RUN_CHUNK` values: (first byte, values, pieces), where a
    piece (output slice, first value, end value) is the part of one delta that the read covers."""
    chunks = []
    for run in runs:
        start, end = run[0][0], run[-1][1]
        for lo in range(start, end, 4 * RUN_CHUNK):
            hi = min(end, lo + 4 * RUN_CHUNK)
            pieces = [
                (
                    outs[key].view(-1)[(max(a, lo) - a) // 4 : (min(b, hi) - a) // 4],
                    (max(a, lo) - lo) // 4,
                    (min(b, hi) - lo) // 4,
                )
                for a, b, key, _ in run
                if a < hi and b > lo
            ]
            chunks.append((lo, (hi - lo) // 4, pieces))
    return chunks


def _stream_runs(vectors: Sequence[VectorLike], coeffs: list[float]) -> dict[str, torch.Tensor]:
    """Σ_h c_h τ_h read over runs of consecutive deltas, a few MiB per call, into one new tensor per delta
    (allocated as a state dict's are, so that memory an earlier merge freed is reused)."""
    runs = vectors[0].runs()
    outs = {key: torch.empty(shape) for run in runs for _, _, key, shape in run}
    for lo, n, pieces in _chunks(runs, outs):
        for i, (v, coeff) in enumerate(zip(vectors, coeffs)):
            v.add_range(lo, n, pieces, coeff, first=i == 0)
    return outs


def _stream_tensor(vectors: Sequence[VectorLike], method, coeffs: list[float], key: str) -> torch.Tensor:
    """Σ_h c_h · f(τ_h)[key], one vector at a time (read where it lies when f is the identity)."""
    in_place = not method.transforms()
    first = vectors[0]
    if in_place and hasattr(first, "scaled"):
        out = first.scaled(key, coeffs[0])
    else:
        out = method.prepare(first.tensor(key), key, 0) * coeffs[0]
    flat = out.view(-1)
    for i, (v, c) in enumerate(zip(vectors[1:], coeffs[1:]), start=1):
        if in_place and hasattr(v, "accumulate"):
            v.accumulate(key, flat, c)
        else:
            out.add_(method.prepare(v.tensor(key), key, i), alpha=c)
    return out


def merge_vectors(
    base: dict[str, torch.Tensor], vectors: Sequence[VectorLike], method: MergeMethod | str, lam: float = 1.0
) -> dict[str, torch.Tensor]:
    """θ = θ_pre + λ·τ_m as a new state dict (BN statistics still those of θ_pre)."""
    return merge_delta(vectors, method).apply_to(base, lam)
