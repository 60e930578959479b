"""Outlier defence before a merge: norms and directions compared robustly.

For every vector τ_h we compute its L2 norm n_h and the cosine c_h between τ_h and
the mean of the *other* vectors (leave-one-out).  A vector is an outlier when

    |n_h − median(n)| > k · 1.4826 · MAD(n)      (a huge or tiny update), or
    median(c) − c_h   > k · 1.4826 · MAD(c)       (pointing away from the rest),

with MAD the median absolute deviation and k = ``defence.mad_k``.  To avoid
flagging honest spread when the MAD is tiny, a norm must also differ from the
median by more than ``min_ratio``× and a cosine must be below ``max_cosine``.

``quarantine`` moves outliers to quarantine with these statistics;
``clip`` keeps them but scales them down to the median norm (norm clipping);
it cannot fix a vector that points the wrong way (measured in the README).
The ``median`` merge method remains the robust choice that needs no screening.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from medvec.batchnorm import MomentSums, RunningStats
from medvec.vectors.file import VectorFile
from medvec.vectors.vector import DataVector, VectorLike, VectorMeta


@dataclass
class Screening:
    """The screen's verdict: the vectors kept (some norm-clipped), those flagged with why, and the statistics."""

    kept: list[VectorLike]
    flagged: list[tuple[VectorFile, str]] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)


class Scaled:
    """A validated vector file multiplied by a constant (norm clipping), read as the file is."""

    def __init__(self, vector: VectorFile, scale: float):
        self._v, self.scale = vector, float(scale)
        self.path = vector.path

    @property
    def meta(self) -> VectorMeta:
        """The file's metadata (clipping leaves it as it is)."""
        return self._v.meta

    @property
    def content_sha256(self) -> str:
        """The file's content hash (of the stored tensors, not the scaled ones)."""
        return self._v.content_sha256

    @property
    def running(self) -> RunningStats | None:
        """The file's BN running statistics, not scaled."""
        return self._v.running

    @property
    def moments(self) -> MomentSums | None:
        """The file's BN moment sums, not scaled."""
        return self._v.moments

    def keys(self) -> list[str]:
        """The file's delta names, sorted."""
        return self._v.keys()

    def tensor(self, key: str) -> torch.Tensor:
        """The float32 delta ``key`` times ``scale``, a new tensor."""
        return self._v.tensor(key) * self.scale

    def scaled(self, key: str, alpha: float) -> torch.Tensor:
        """A new tensor ``alpha · scale · τ[key]``."""
        return self.tensor(key) * alpha

    def accumulate(self, key: str, out: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha · scale · τ[key]`` in place (``out`` flat or shaped)."""
        out.add_(self.tensor(key).reshape(out.shape), alpha=alpha)

    def to_vector(self) -> DataVector:
        """The clipped vector in memory: each delta times ``scale``, with the file's metadata and BN aggregates."""
        v = self._v.to_vector()
        return DataVector({k: t * self.scale for k, t in v.deltas.items()}, v.meta, v.running, v.moments)


def scale_of(vector: VectorLike) -> float:
    """The norm-clipping factor a vector is merged with (1: not clipped)."""
    return vector.scale if isinstance(vector, Scaled) else 1.0


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def vector_stats(vectors: Sequence) -> tuple[list[float], list[float]]:
    """(norms, leave-one-out cosines), computed tensor by tensor."""
    n = len(vectors)
    keys = vectors[0].keys()
    sq = [0.0] * n
    dot_total = [0.0] * n  # <τ_h, Σ_g τ_g>
    total_sq = 0.0
    for k in keys:
        ts = [v.tensor(k).double().reshape(-1) for v in vectors]
        s = torch.stack(ts).sum(0)
        total_sq += float(s @ s)
        for i, t in enumerate(ts):
            sq[i] += float(t @ t)
            dot_total[i] += float(t @ s)
    norms = [math.sqrt(x) for x in sq]
    cos = []
    for i in range(n):
        # other = S − τ_i; <τ_i, other> = dot_total − |τ_i|²; |other|² = |S|² − 2 dot_total + |τ_i|²
        dot = dot_total[i] - sq[i]
        other_sq = max(total_sq - 2 * dot_total[i] + sq[i], 0.0)
        cos.append(dot / (norms[i] * math.sqrt(other_sq)) if norms[i] > 0 and other_sq > 0 else 0.0)
    return norms, cos


def screen(
    vectors: Sequence,
    mode: str = "quarantine",
    mad_k: float = 5.0,
    min_ratio: float = 3.0,
    max_cosine: float = 0.0,
    min_vectors: int = 3,
) -> Screening:
    """Flag outliers; ``mode`` is ``off``, ``quarantine`` or ``clip``."""
    if mode == "off" or len(vectors) < min_vectors:
        return Screening(list(vectors))
    if mode not in ("quarantine", "clip"):
        raise ValueError(f"unknown defence mode {mode!r}: valid are off, quarantine, clip")
    norms, cos = vector_stats(vectors)
    med_n, med_c = _median(norms), _median(cos)
    mad_n = 1.4826 * _median([abs(x - med_n) for x in norms])
    mad_c = 1.4826 * _median([abs(x - med_c) for x in cos])
    out = Screening([])
    for v, n, c in zip(vectors, norms, cos):
        vid = v.meta.vector_id
        out.stats[vid] = {"norm": n, "cosine_loo": c, "median_norm": med_n, "median_cosine": med_c}
        reasons = []
        ratio = n / med_n if med_n > 0 else math.inf
        if abs(n - med_n) > mad_k * mad_n and (ratio > min_ratio or ratio < 1 / min_ratio):
            reasons.append(f"norm {n:.4g} is {ratio:.1f}× the median {med_n:.4g} (beyond {mad_k} MAD)")
        if med_c - c > mad_k * mad_c and c < max_cosine:
            reasons.append(f"cosine with the others' mean {c:.3f} vs median {med_c:.3f} (beyond {mad_k} MAD)")
        if not reasons:
            out.kept.append(v)
            continue
        reason = "; ".join(reasons)
        if mode == "clip":  # down-weight only: a wrong direction stays (clipping cannot fix it)
            scale = min(1.0, med_n / n) if n > 0 else 1.0
            out.scales[vid] = scale
            out.kept.append(Scaled(v, scale))
            out.flagged.append((v, f"clipped ×{scale:.4g}: {reason}"))
        else:
            out.flagged.append((v, reason))
    return out
