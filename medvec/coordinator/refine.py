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

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from medvec.config import Params, RefineConfig
from medvec.coordinator.compare import scored_by_hospitals
from medvec.coordinator.contribution import guarded_merge, score_merge
from medvec.coordinator.engine import MergeOutcome, MomentsFn, choose_scale, merge_once
from medvec.coordinator.intake import Admission
from medvec.coordinator.judge import voted_out
from medvec.coordinator.scoring import EvalSets, beats, score
from medvec.coordinator.server_opt import ServerStep, State
from medvec.coordinator.weights import weighted_step
from medvec.data.images import ImageSet
from medvec.models import Base
from medvec.record import ContributionScore, MergeRecord, Rejection, StartPoint
from medvec.timing import Started
from medvec.vectors.vector import VectorLike


@dataclass(frozen=True)
class ChainState:
    """What a step needs beyond its vectors: the newest sample count the coordinator has verified for every
    hospital of the network (``refine.weighting: network``) and the server optimizer's state at the champion."""

    network: dict[str, int] = field(default_factory=dict)
    server: State = field(default_factory=dict)


def refine_step(
    champion: Base,
    version: int,
    vectors: Sequence[VectorLike],
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
    moments_fn: MomentsFn | None = None,
    chain: ChainState | None = None,
) -> MergeOutcome:
    """One step: θ_champion + η·d, d the server optimizer's direction for Δ = Σ w_i·s(staleness_i)·τ_i/Σ w,
    η chosen on validation, BN restored."""
    r, chain = params.refine, chain or ChainState()
    weights, delta = weighted_step(vectors, version, r, chain.network)
    server = ServerStep(r, chain.server, version + 1)
    tau = server.direction(delta)
    grid = [r.eta] if r.eta is not None else list(r.etas)
    outcome = choose_scale(champion, tau, grid, "async", vectors, params, evalsets, calibration, moments_fn)
    outcome.step_weights, outcome.server = weights, server
    return outcome


@dataclass
class Step:
    """A computed step: its outcome, the vectors in it, those the harmful rule excluded (with their scores), and
    the gate's verdict against the champion it started from.  Nothing is stored yet: the flow records it
    (:func:`step_record`) and finishes it (:func:`medvec.tracking.finish.finish_merge`)."""

    outcome: MergeOutcome
    vectors: list[VectorLike]
    parent: StartPoint
    promoted: bool
    reason: str
    excluded: list[tuple[VectorLike, ContributionScore]] = field(default_factory=list)


def compute_step(
    champion: Base,
    parent: StartPoint,
    admitted: Sequence[VectorLike],
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
    moments_fn: MomentsFn | None = None,
    chain: ChainState | None = None,
) -> Step:
    """Merge the admitted buffer into the champion (start point ``parent``), score each input under
    ``intake.harmful``, and gate the result against the champion on validation.

    ``moments_fn`` (hospitals answering moment sums under each candidate, as in the demo) makes
    ``recompute`` exact; without it the BN plan follows what the vectors carry
    (:func:`medvec.coordinator.engine.plan_bn`).
    """
    # on the coordinator's set the champion is scored once, for the gate and as v(∅) of the contribution scores;
    # with the hospitals it is asked beside the step's scan (the gate reads those answers), and the scores ask
    # for v(∅) in their own request
    champion_val = None
    evalsets.beside_scan("champion", champion.model)
    if evalsets.judge is None:
        champion_val = evalsets.validate_one(champion.model, champion.spec, params.evaluate.batch_size)
    if params.refine.first_step == "oneshot" and parent.version == 0:  # the paper's merge starts the chain

        def merge(vs: list) -> MergeOutcome:
            return merge_once(champion, vs, params, evalsets, calibration, moments_fn)
    else:

        def merge(vs: list) -> MergeOutcome:
            return refine_step(champion, parent.version, vs, params, evalsets, calibration, moments_fn, chain)

    guarded = guarded_merge(
        merge,
        lambda vs, o: score_merge(champion, vs, o, params, evalsets, calibration, moments_fn, start_val=champion_val),
        admitted,
        params.intake,
    )
    metric = params.evaluate.select_metric
    if evalsets.judge is not None:  # both scored in one request, by the same sites
        promoted, reason = evalsets.judge.gate(guarded.outcome.model, champion.model, f"champion v{parent.version}")
    else:
        assert champion_val is not None
        promoted, reason = beats(score(guarded.outcome.val, metric), score(champion_val, metric), params)
    return Step(guarded.outcome, guarded.vectors, parent, promoted, reason, guarded.excluded)


def step_record(
    step: Step,
    admission: Admission,
    rejected: Sequence[Rejection],
    root_sha256: str,
    params: Params,
    evalsets: EvalSets,
    store_url: str,
    started: Started,
    trigger: dict[str, str] | None = None,
) -> MergeRecord:
    """The record of a computed step (``version`` is set when :func:`~medvec.tracking.finish.finish_merge`
    promotes it); ``rejected``: the rejections of the vectors the vote and the harmful rule excluded."""
    return MergeRecord.build(
        step.outcome,
        step.vectors,
        root_sha256,
        params,
        evalsets.ref(),
        store_url,
        started,
        mode="async" if step.outcome.step_weights is not None else "oneshot",
        parent_version=step.parent.version,
        parent_sha256=step.parent.sha256,
        screened=tuple(admission.screened),
        quarantined=(*admission.rejected, *rejected),
        trigger=trigger or {},
        evaluation=evalsets.evaluation(),
    )


def step_ready(
    admitted: Sequence[VectorLike],
    version: int,
    r: RefineConfig,
    network: Collection[str],
    waited: float,
    screened: Callable[[set[str]], Collection[str]] = lambda missing: (),
) -> tuple[bool, str]:
    """Whether the buffer makes a step now, and why (or why not).

    By default at ``refine.buffer`` vectors.  With ``refine.fresh`` (and for the first step, with
    ``first_step: oneshot``) once every hospital of the network (``refine.network``, else ``network``) has a
    vector in the buffer (``refine.quorum`` < 1: that share of them, rounded up), or once the oldest buffered
    vector has waited ``refine.timeout`` (``waited``, in the caller's clock).  A hospital counts once, however
    many vectors it buffered, and only if it belongs to the network.  A hospital of the network without a
    buffered vector that ``screened`` names (asked with those hospitals only, and only by a fresh buffer: the
    ones whose vector the outlier screen quarantined since the champion,
    :func:`~medvec.coordinator.intake.screened_out`) has reported too: waiting for it would only wait for the
    timeout.
    """
    n = len(admitted)
    if not r.fresh and not (r.first_step == "oneshot" and version == 0):
        return n >= r.buffer, f"buffer holds {n} of {r.buffer}"
    expected = set(r.network or network)
    absent = expected - {v.meta.hospital for v in admitted}
    left_out = absent & set(screened(absent)) if absent else set()
    missing = sorted(absent - left_out)
    if n and not missing:
        but = f"; the screen left out {', '.join(sorted(left_out))}" if left_out else ""
        return True, f"every hospital of the network reported ({n} vectors{but})"
    needed = math.ceil(r.quorum * len(expected) - 1e-9)
    if n and len(expected) - len(missing) >= needed:
        return True, f"a quorum of {needed} of {len(expected)} hospitals reported (not {', '.join(missing)})"
    if n and r.timeout is not None and waited >= r.timeout:
        return True, f"timeout: waited {waited:g} ≥ {r.timeout:g} for {', '.join(missing)}"
    return False, f"waiting for {', '.join(missing) or 'a vector'} ({n} buffered)"


ALL_VOTED_OUT = "the below-chance vote excluded every vector"  # no merge, no step: why, in one place


def vote_on_inputs(
    champion: Base, admitted: Sequence[VectorLike], starts: Mapping[int, Base], params: Params, evalsets: EvalSets
) -> tuple[list[VectorLike], list[tuple[VectorLike, str]]]:
    """With the hospitals scoring, before a step: each input's own model (its start point in ``starts``, else the
    champion, + τ with its BN statistics) at every site in one request, the cross-site matrix of the step's
    record, and the below-chance vote (``intake.vote``): the inputs to step with, and those it keeps out with the
    reason. On the coordinator's set, every input is kept."""
    if evalsets.judge is None:
        return list(admitted), []
    scored_by_hospitals(champion, admitted, evalsets, params, starts)
    return voted_out(admitted, evalsets.evaluation().flagged, params.intake.vote)


def step_verdict(record: MergeRecord, reason: str) -> str:
    """``v3 → v4: <the gate's reason>``, or ``v3 → kept: …`` for a step that was not promoted."""
    became = f"v{record.version}" if record.version is not None else "kept"
    return f"v{record.parent_version} → {became}: {reason}"
