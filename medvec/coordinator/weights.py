"""The weights of an asynchronous step: each vector's staleness, its discount and its share of the step.

A vector started from champion version ``start``; when the champion is at
``version``, its staleness is ``version − start`` and its weight in the step is
``w · s(staleness) / Σ w``, with ``w`` its sample count and ``s`` a discount,
polynomial ``(1 + staleness)^−a`` or the hinge ``1`` up to ``b`` and
``1 / (a·(staleness − b) + 1)`` beyond (FedAsync, Xie et al. 2019, arXiv 1903.03934).

``Σ w`` is the buffer's samples (``refine.weighting: buffer``) or the network's
(``network``: every hospital's newest known sample count), so that with the
network a 17-image hospital moves the champion by its share and not at full
weight.  With ``refine.staleness_cap`` c, a step whose stalest vector is
``s > c`` versions old is scaled by ``c / s`` (FADAS, Wang et al., ICML 2024,
which caps the step size by the largest delay); the factor is folded into every
weight, so the record's weights reproduce the step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
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


def step_weights(
    vectors: Sequence[VectorLike],
    champion_version: int,
    r: RefineConfig,
    network: Mapping[str, int] | None = None,
) -> list[StepWeight]:
    """Each vector's staleness, discount s and weight c·w·s/Σw (w = sample count, 1 each if any count is 0, and
    a hospital with k vectors in the step gives each w/k: flooding buys no weight; Σw over the buffer, or over
    ``network``'s newest counts per hospital with ``weighting: network``; c the staleness cap's factor)."""
    counts = [int(v.meta.n_train) for v in vectors]
    w = [float(n) for n in counts] if all(n > 0 for n in counts) else [1.0] * len(vectors)
    per = Counter(v.meta.hospital for v in vectors)
    w = [wi / per[v.meta.hospital] for v, wi in zip(vectors, w)]  # a hospital's share is split between its vectors
    total = sum(w)
    if r.weighting == "network" and network and all(n > 0 for n in counts):
        total = float(sum(({**network, **{v.meta.hospital: n for v, n in zip(vectors, counts)}}).values()))
    stale = [champion_version - int(v.meta.start_version or 0) for v in vectors]
    cap = staleness_cap_factor(max(stale, default=0), r.staleness_cap)
    out = []
    for v, wi, st in zip(vectors, w, stale):
        s = staleness_discount(st, r.staleness, r.staleness_a, r.staleness_b)
        out.append(StepWeight(v.meta.vector_id, v.meta.hospital, champion_version - st, st, s, cap * wi * s / total))
    return out


def staleness_cap_factor(largest: int, cap: int | None) -> float:
    """FADAS' cap: 1 while the stalest vector is at most ``cap`` versions old, else ``cap / largest``."""
    return 1.0 if cap is None or largest <= cap else cap / largest


def weighted_step(
    vectors: Sequence[VectorLike], version: int, r: RefineConfig, network: Mapping[str, int] | None = None
) -> tuple[list[StepWeight], DataVector]:
    """Each vector's place in a step from champion ``version`` (``refine.*``), and the step's Σ weight_i·τ_i."""
    weights = step_weights(vectors, version, r, network)
    return weights, weighted_sum(vectors, [w.weight for w in weights], fused=False)
