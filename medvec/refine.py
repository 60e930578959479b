"""Asynchronous refinement: every landed vector moves the champion, weighted by its staleness.

Start points are the models hospitals fine-tune from: version 0 is θ_pre, and
every promoted champion is the next version.  A vector names the version it
started from; its staleness is the champion's version minus that one.  A step
merges a buffer of B vectors into the champion (FedBuff, Nguyen et al. 2022,
arXiv 2106.06639; B = 1 is FedAsync, Xie et al. 2019, arXiv 1903.03934)::

    θ ← θ_champion + η · Σ_i w_i · s(staleness_i) · τ_i / Σ_i w_i

with w_i the vector's sample count and s a staleness discount, polynomial
``(1 + staleness)^−a`` by default or the hinge ``1`` up to ``b`` and
``1 / (a·(staleness − b) + 1)`` beyond.  η is fixed or chosen on the
coordinator's validation split.  One-shot merging (the paper) is the case where
every vector starts from version 0 and one step merges them all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from medvec.config import Params, RefineConfig
from medvec.coordinator import EvalSets, MergeOutcome, beats, choose_scale, rebuild_merge
from medvec.data import ImageSet
from medvec.evaluate import evaluate_model
from medvec.models import Base
from medvec.record import MergeRecord
from medvec.vectors import DataVector, utcnow


@dataclass(frozen=True)
class Contribution:
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


def contributions(vectors: Sequence, champion_version: int, kind: str, a: float, b: int) -> list[Contribution]:
    """Each vector's staleness, discount s and weight w·s/Σw (w = sample count; 1 each if any count is 0)."""
    counts = [int(v.meta.n_train) for v in vectors]
    w = [float(n) for n in counts] if all(n > 0 for n in counts) else [1.0] * len(vectors)
    total = sum(w)
    out = []
    for v, wi in zip(vectors, w):
        start = int(v.meta.start_version or 0)
        stale = champion_version - start
        s = staleness_discount(stale, kind, a, b)
        out.append(Contribution(v.meta.vector_id, v.meta.hospital, start, stale, s, wi * s / total))
    return out


def step_delta(vectors: Sequence, weights: Sequence[float]) -> DataVector:
    """Σ_i weight_i · τ_i, tensor by tensor from lazily read vectors."""
    if not vectors:
        raise ValueError("nothing to step: no vectors")
    keys = vectors[0].keys()
    deltas = {}
    for k in keys:
        acc = None
        for v, w in zip(vectors, weights):
            t = v.tensor(k).float() * float(w)
            acc = t if acc is None else acc.add_(t)
        deltas[k] = acc.contiguous()
    return DataVector(deltas)


def weighted_step(vectors: Sequence, version: int, r: RefineConfig) -> tuple[list[Contribution], DataVector]:
    """Each vector's place in a step from champion ``version`` (``refine.*``), and the step's Σ weight_i·τ_i."""
    parts = contributions(vectors, version, r.staleness, r.staleness_a, r.staleness_b)
    return parts, step_delta(vectors, [c.weight for c in parts])


def refine_step(
    champion: Base,
    version: int,
    vectors: Sequence,
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
    moments_fn=None,
) -> MergeOutcome:
    """One step: θ_champion + η·Σ w_i·s(staleness_i)·τ_i/Σ w_i, η chosen on validation, BN restored."""
    r = params.refine
    parts, tau = weighted_step(vectors, version, r)
    grid = [r.eta] if r.eta is not None else list(r.etas)
    outcome = choose_scale(champion, tau, grid, "async", vectors, params, evalsets, calibration, moments_fn)
    outcome.contributions = parts
    return outcome


@dataclass
class Step:
    """An applied step: its record (``version`` set when promoted), its outcome and the gate's reason."""

    record: MergeRecord
    outcome: MergeOutcome
    promoted: bool
    reason: str
    vectors: list  # the step's inputs: the admitted ones, less any the harmful rule excluded


def run_step(
    store, root: Base, admission, params: Params, evalsets: EvalSets, calibration=None, trigger=None, moments_fn=None
) -> Step:
    """Merge the admitted buffer into the champion, gate it on validation, store it and promote it if better.

    The step's record is stored before promotion, so its vectors count as
    consumed even if a later stage fails: a vector is never applied twice.
    ``moments_fn`` (hospitals answering moment sums under each candidate, as in
    the demo) makes ``recompute`` exact; without it the BN plan follows
    what the vectors carry (:func:`medvec.coordinator.plan_bn`).
    """
    from medvec.contribution import guarded_merge, score_merge
    from medvec.intake import quarantine_harmful

    started_at, clock = utcnow(), time.perf_counter()
    point = store.champion(root.sha256)
    champion = store.get_start(root.sha256, point.version)
    champion_val = evaluate_model(champion.model, evalsets.val, champion.spec, params.evaluate.batch_size)
    guarded = guarded_merge(
        lambda vs: refine_step(champion, point.version, vs, params, evalsets, calibration, moments_fn),
        lambda vs, o: score_merge(champion, vs, o, params, evalsets, calibration, moments_fn, start_val=champion_val),
        admission.admitted,
        params.intake,
    )
    outcome, vectors = guarded.outcome, guarded.vectors
    harmful = quarantine_harmful(store, guarded.excluded)
    promoted, reason = beats(outcome.val, champion_val, params)
    record = MergeRecord.build(
        outcome,
        vectors,
        root.sha256,
        params,
        evalsets.ref(),
        store.url,
        started_at,
        clock,
        mode="async",
        parent_version=point.version,
        parent_sha256=point.sha256,
        screened=tuple(admission.screened),
        quarantined=(*admission.rejected, *harmful),
        trigger=trigger or {},
    )
    merged = champion.with_model(outcome.model, record.merged_sha256)
    record = store.put_merged_model(record, merged, outcome.moments)
    if promoted:
        new = store.put_start(root.sha256, merged, record.merge_id, record.val)
        record = record.model_copy(update={"version": new.version})
        record = store.put_merge(record, latest=False)
    verdict = f"v{point.version} → {'v' + str(record.version) if promoted else 'kept'}: {reason}"
    return Step(record, outcome, promoted, verdict, vectors)


def chain(store, record: MergeRecord) -> list[MergeRecord]:
    """The promoted steps from θ_pre to ``record``, oldest first (a one-shot merge is its own chain)."""
    by_version = {r.version: r for r in store.merges(record.base_sha256) if r.version is not None}
    steps = [record]
    while steps[-1].mode == "async" and steps[-1].parent_version > 0:
        parent = by_version.get(steps[-1].parent_version)
        if parent is None:
            raise ValueError(
                f"{store.url}: no record of champion v{steps[-1].parent_version}, parent of {steps[-1].merge_id}"
            )
        steps.append(parent)
    return steps[::-1]


def chain_rows(store, record: MergeRecord) -> list[dict]:
    """The version chain for lineage: each step's version, parent, η, metric and its vectors with staleness and weight."""
    rows = []
    for r in chain(store, record):
        vectors = [
            {
                "vector_id": i.vector_id,
                "hospital": i.hospital,
                "start_version": i.start_version,
                "staleness": i.staleness,
                "weight": i.weight,
            }
            for i in r.inputs
        ]
        rows.append(
            {
                "version": r.version,
                "parent_version": r.parent_version,
                "merge_id": r.merge_id,
                "mode": r.mode,
                "eta": r.lam,
                "bn": f"{r.bn_strategy} from {r.bn_source}",
                "val": r.val,
                "vectors": vectors,
            }
        )
    return rows


def replay_chain(store, record: MergeRecord) -> list[tuple[int, str, bool]]:
    """Rebuild every promoted step from θ_pre up to ``record``, each from the *rebuilt* parent.

    Returns (version, rebuilt sha256, identical to the recorded one) per step, oldest first.
    """
    root = store.get_base(record.base_sha256)
    out, parent = [], None
    for step in chain(store, record):
        model, sha = rebuild_merge(store, step, parent=parent)
        out.append((step.version or 0, sha, sha == step.merged_sha256))
        parent = root.with_model(model, sha)
    return out
