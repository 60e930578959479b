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

import torch

from medvec.config import MergeConfig
from medvec.errors import UserError
from medvec.timing import timed
from medvec.vectors.file import common_keys, reading, weighted_sum
from medvec.vectors.vector import DataVector, VectorLike

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


class UnknownMethodError(UserError, KeyError):
    """A merge method name that is not registered; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class MergeMethod:
    """Base class: ``merge_tensor`` maps the vectors' deltas of one key to τ_m."""

    name: str = ""
    formula: str = ""
    paper: str = ""
    lambdas: tuple[float, ...] = (1.0,)
    fixed_lambda: bool = False  # λ is the method's own (the paper's sum: 1), never scanned or set by merge.lam

    @property
    def needs_weights(self) -> bool:
        """Whether the reduction weighs each vector by its sample count."""
        return False

    def merge_tensor(self, deltas: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
        """τ_m[key] from every vector's delta of ``key`` (``weights``: sample counts, or 1 each); methods define it."""
        raise NotImplementedError

    @property
    def streams(self) -> bool:
        """Whether τ_m = Σ_h c_h · f(τ_h), so each vector can be added into the output on its own."""
        return False

    def transforms(self) -> bool:
        """Whether each vector is changed (DARE drop, trimming) before it is reduced."""
        return False

    def coefficients(self, weights: list[float]) -> list[float]:
        """c_h of a streaming reduction (only methods that :attr:`streams` have them)."""
        raise NotImplementedError(f"{self.name} does not stream")

    def prepare(self, t: torch.Tensor, key: str, index: int) -> torch.Tensor:
        """f(τ_h) for one tensor before it is reduced (the identity unless the method transforms)."""
        return t.float()


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
    fixed_lambda: bool = False
    formula: str = "θ_pre + λ Σ_h τ_h"
    paper: str = ""

    @property
    def needs_weights(self) -> bool:
        """True for the ``weighted`` reduction, which weighs each vector by its sample count."""
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
        """τ_m[key] from all the vectors' deltas at once: each prepared, then sign-elected (TIES) and reduced."""
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
        """The coordinate-wise median of the deltas (mean of the two middle ones for even N); ``weights`` are unused."""
        stacked = torch.stack([t.float() for t in deltas]).sort(0).values
        n = stacked.shape[0]
        if n % 2:
            return stacked[n // 2]
        return (stacked[n // 2 - 1] + stacked[n // 2]) / 2


_SUM_GRID = (0.25, 0.5, 1.0)


_MEAN_GRID = (1.0, 2.0, 3.0)


def _registry(cfg: MergeConfig) -> dict[str, MergeMethod]:
    density, drop, seed = cfg.ties_density, cfg.dare_drop, cfg.seed
    return {
        "sum": GeneralizedTaskArithmetic(
            name="sum",
            reduce="sum",
            lambdas=(1.0,),
            fixed_lambda=True,
            formula="θ_pre + Σ_h τ_h",
            paper="arXiv 2408.13038",
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
    """The registered merge methods, in catalogue order (``medvec methods``)."""
    return list(_registry(MergeConfig()))


def get_method(name: str, cfg: MergeConfig | None = None) -> MergeMethod:
    """The merge method registered as ``name``, with the TIES, DARE and seed settings of ``cfg`` (``merge.*``);
    unknown names list the valid ones."""
    methods = _registry(cfg or MergeConfig())
    if name not in methods:
        raise UnknownMethodError(f"unknown merge method {name!r}: valid methods are {', '.join(methods)}")
    return methods[name]


@timed("merge")
def merge_delta(vectors: Sequence[VectorLike], method: MergeMethod | str) -> DataVector:
    """τ_m, computed tensor by tensor from lazily read vectors (a derived :class:`DataVector`).

    Linear reductions (sum, mean, weighted) are a weighted sum of the vectors
    (:func:`medvec.vectors.file.weighted_sum`): each vector is added into the output where it
    lies, so memory does not grow with the number of vectors.  DARE streams too, each
    vector dropped and rescaled on its way in.  Methods that need all values of a
    coordinate at once (TIES' sign election, the median) hold that one tensor's N slices.
    """
    if isinstance(method, str):
        method = get_method(method)
    keys = common_keys(vectors)
    weights = [float(v.meta.n_train) for v in vectors] if method.needs_weights else [1.0] * len(vectors)
    if method.streams and not method.transforms():
        return weighted_sum(vectors, method.coefficients(weights))
    with reading(vectors):
        if method.streams:
            coeffs = method.coefficients(weights)
            return DataVector({k: _prepared_sum(vectors, method, coeffs, k) for k in keys})
        return DataVector({k: method.merge_tensor([v.tensor(k) for v in vectors], weights, k) for k in keys})


def _prepared_sum(vectors: Sequence[VectorLike], method: MergeMethod, coeffs: list[float], key: str) -> torch.Tensor:
    """Σ_h c_h · f(τ_h)[key] for a method that changes each vector first (DARE's drop), one vector at a time."""
    out = method.prepare(vectors[0].tensor(key), key, 0) * coeffs[0]
    for i, (v, c) in enumerate(zip(vectors[1:], coeffs[1:]), start=1):
        out.add_(method.prepare(v.tensor(key), key, i), alpha=c)
    return out


def merge_vectors(
    base: dict[str, torch.Tensor], vectors: Sequence[VectorLike], method: MergeMethod | str, lam: float = 1.0
) -> dict[str, torch.Tensor]:
    """θ = θ_pre + λ·τ_m as a new state dict (BN statistics still those of θ_pre)."""
    return merge_delta(vectors, method).apply_to(base, lam)
