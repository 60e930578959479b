"""The weights of an asynchronous step: each vector's staleness, its discount and its share of the step.

A vector started from champion version ``start``; when the champion is at
``version``, its staleness is ``version − start`` and its weight in the step is
``w · s(staleness) / Σ w``, with ``w`` its sample count and ``s`` a discount,
polynomial ``(1 + staleness)^−a`` or the hinge ``1`` up to ``b`` and
``1 / (a·(staleness − b) + 1)`` beyond (FedAsync, Xie et al. 2019, arXiv 1903.03934).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medvec.config import RefineConfig
from medvec.vectors.file import weighted_sum
from medvec.vectors.vector import DataVector, VectorLike


@dataclass(frozen=True)
class StepWeight:
    """A vector's place in a step: its staleness, discount and normalized weight."""

    vector_id: str
    hospital: str
    start_version: int
    staleness: int
    discount: float
    weight: float


def staleness_discount(staleness: int, kind: str = "polynomial", a: float = 0.5, b: int = 4) -> float:
    """s(staleness): ``(1 + staleness)^−a`` (polynomial) or the hinge with knee ``b``."""
    if staleness < 0:
        raise ValueError(f"negative staleness {staleness}: a vector cannot start from a future version")
    if kind == "polynomial":
        return float((1 + staleness) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness discount {kind!r}: valid are polynomial, hinge")


def step_weights(vectors: Sequence[VectorLike], champion_version: int, kind: str, a: float, b: int) -> list[StepWeight]:
    """Each vector's staleness, discount s and weight w·s/Σw (w = sample count; 1 each if any count is 0)."""
    counts = [int(v.meta.n_train) for v in vectors]
    w = [float(n) for n in counts] if all(n > 0 for n in counts) else [1.0] * len(vectors)
    total = sum(w)
    out = []
    for v, wi in zip(vectors, w):
        start = int(v.meta.start_version or 0)
        stale = champion_version - start
        s = staleness_discount(stale, kind, a, b)
        out.append(StepWeight(v.meta.vector_id, v.meta.hospital, start, stale, s, wi * s / total))
    return out


def weighted_step(vectors: Sequence[VectorLike], version: int, r: RefineConfig) -> tuple[list[StepWeight], DataVector]:
    """Each vector's place in a step from champion ``version`` (``refine.*``), and the step's Σ weight_i·τ_i."""
    weights = step_weights(vectors, version, r.staleness, r.staleness_a, r.staleness_b)
    return weights, weighted_sum(vectors, [w.weight for w in weights], fused=False)
