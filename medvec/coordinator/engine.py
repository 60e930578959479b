"""The merge engine: θ = θ_start + λ·τ_m with batch-norm statistics restored, λ scanned on validation.

The coordinator never reads images of a hospital.  For the ``recompute`` BN
strategy it asks for moment sums through ``moments_fn(model)``, which in the
distributed setting is answered by the hospitals (each sends only its sums) and
otherwise by a coordinator calibration set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from medvec.batchnorm import MomentSums, RunningStats, moment_sums, restore_batchnorm
from medvec.config import Params
from medvec.coordinator.methods import MergeMethod, get_method, merge_delta
from medvec.coordinator.scoring import EvalSets, op_rule, score
from medvec.coordinator.server_opt import ServerStep
from medvec.coordinator.weights import StepWeight
from medvec.data.images import ImageSet
from medvec.evaluate import evaluate_model, with_operating_point
from medvec.models import Base
from medvec.preprocess import batches
from medvec.record import Contributions
from medvec.timing import timed
from medvec.vectors.vector import DataVector, VectorLike


class MomentsFn(Protocol):
    """Where ``recompute`` gets BN moment sums of a merged model from: the hospitals, or a calibration set."""

    def __call__(self, model: nn.Module) -> MomentSums:
        """The moment sums of every BN layer's input under ``model``."""
        ...


@runtime_checkable
class HospitalMoments(Protocol):
    """Moment sums answered by each hospital on its own data; ``only(hospitals)`` asks just those hospitals
    (the merge of a subset, for contribution scores)."""

    def __call__(self, model: nn.Module) -> MomentSums:
        """The hospitals' moment sums under ``model``, added up."""
        ...

    def only(self, hospitals: list[str]) -> MomentsFn:
        """A moments source that asks only ``hospitals``."""
        ...


def running_of(vectors: Sequence[VectorLike]) -> list[RunningStats]:
    """The BN running statistics the vectors carry (strategy ``average``)."""
    return [r for r in (v.running for v in vectors) if r is not None]


def lambda_grid(method: MergeMethod, params: Params) -> list[float]:
    """λ values to try: the method's own when fixed (the paper's ``sum``), else ``merge.lam``, else the grid."""
    if method.fixed_lambda:
        return list(method.lambdas)
    if params.merge.lam is not None:
        return [params.merge.lam]
    return list(params.merge.lambdas or method.lambdas)


def build_model(base: Base, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model of ``base``'s architecture holding ``state``, in eval mode."""
    model = base.fresh()
    model.load_state_dict(state)
    model.eval()
    return model


@timed("bn_restore")
def restore(
    model: nn.Module, strategy: str, vectors: Sequence[VectorLike], moments_fn: MomentsFn | None
) -> MomentSums | None:
    """Apply a BN strategy to a freshly merged model (in place); returns the moment sums used, if any."""
    if strategy == "recompute":
        if moments_fn is None:
            raise ValueError("strategy 'recompute' needs a moments source (hospitals or calibration set)")
        moments = moments_fn(model)
        restore_batchnorm(model, "recompute", moments=moments)
        return moments
    restore_batchnorm(model, strategy, running=running_of(vectors))
    return None


def apply_delta(
    base: Base,
    tau: DataVector,
    scale: float,
    strategy: str,
    vectors: Sequence[VectorLike],
    moments_fn: MomentsFn | None,
) -> tuple[nn.Module, MomentSums | None]:
    """θ = base + scale·τ with BN restored by ``strategy``; returns the model and the moment sums used, if any."""
    model = build_model(base, tau.apply_to(base.model.state_dict(), scale))
    return model, restore(model, strategy, vectors, moments_fn)


@dataclass(frozen=True)
class BnPlan:
    """How a merged model gets its BN statistics: a strategy and the source of its statistics."""

    strategy: str  # none | average | recompute
    source: str  # base | running | hospitals | calibration

    @classmethod
    def from_hospitals(cls, strategy: str) -> BnPlan:
        """The plan when the hospitals answer moment sums under the merged model itself (the demo)."""
        return cls(strategy, {"none": "base", "average": "running", "recompute": "hospitals"}[strategy])


def plan_bn(vectors: Sequence[VectorLike], strategy: str, calibration: ImageSet | None) -> BnPlan:
    """Where the merged model's BN statistics will come from, given what is available.

    ``recompute`` uses the hospitals' moment sums when every vector carries them
    (computed under the same earlier merged model), else a coordinator
    calibration set, else falls back to ``average`` of the running statistics.
    """
    if strategy == "none":
        return BnPlan("none", "base")
    if strategy == "average":
        return BnPlan("average", "running")
    moments_models = {v.meta.moments_model_sha256 for v in vectors}
    consistent = len(moments_models) == 1 and None not in moments_models
    if vectors and consistent and all((m := v.moments) is not None and m.count for v in vectors):
        return BnPlan("recompute", "hospitals")
    if calibration is not None:
        return BnPlan("recompute", "calibration")
    return BnPlan("average", "running")


def moments_source(
    vectors: Sequence[VectorLike], bn: BnPlan, base: Base, calibration: ImageSet | None, batch_size: int = 64
) -> MomentsFn | None:
    """A ``moments_fn`` for :func:`restore` that matches a :class:`BnPlan`."""
    if bn.source == "hospitals":
        total = MomentSums.combine(v.moments for v in vectors if v.moments is not None)
        return lambda model: total
    if bn.source == "calibration" and calibration is not None:
        return lambda model: moment_sums(model, batches(calibration, base.spec, batch_size))
    return None


@dataclass
class MergeOutcome:
    """One merge's model and how it was made; :meth:`medvec.record.MergeRecord.build` records it."""

    model: nn.Module
    method: str
    lam: float
    bn: BnPlan
    moments: MomentSums | None
    val: dict
    test: dict | None
    curve: list[tuple[float, float]]
    step_weights: list[StepWeight] | None = None  # an async step's weight per vector
    server: ServerStep | None = None  # an async step's server optimizer (refine.server_optimizer), its new state
    scores: Contributions | None = None  # what each input contributed (medvec.coordinator.contribution)


@dataclass
class Scanned:
    """The best scale of a scan under one BN strategy (the first of equals), with the whole validation curve."""

    lam: float
    val: dict
    model: nn.Module
    moments: MomentSums | None
    curve: list[tuple[float, float]] = field(default_factory=list)


def scan(
    base: Base,
    tau: DataVector,
    grid: Sequence[float],
    strategies: Sequence[str],
    vectors: Sequence[VectorLike],
    moments_fn: MomentsFn | None,
    evalsets: EvalSets,
    params: Params,
) -> dict[str, Scanned]:
    """The one λ scan: θ = base + λ·τ for every λ in ``grid`` (λ or an async step's η) and every BN strategy,
    each scored on validation.  Per strategy, the best λ with its model; the others are not kept.

    On the coordinator's set each model is scored as it is built; with the hospitals (``evalsets.judge``) every
    model of the scan goes out in one request."""
    metric = params.evaluate.select_metric
    best: dict[str, Scanned] = {}
    curves: dict[str, list[tuple[float, float]]] = {s: [] for s in strategies}
    built = _built(base, tau, grid, strategies, vectors, moments_fn)
    for lam, strategy, model, moments, val in _scored(built, evalsets, base, params.evaluate.batch_size):
        curves[strategy].append((lam, val[metric]))
        if strategy not in best or score(val, metric) > score(best[strategy].val, metric):
            best[strategy] = Scanned(lam, val, model, moments)
    for strategy, found in best.items():
        found.curve = curves[strategy]
    return best


def _built(
    base: Base,
    tau: DataVector,
    grid: Sequence[float],
    strategies: Sequence[str],
    vectors: Sequence[VectorLike],
    moments_fn: MomentsFn | None,
) -> Iterator[tuple[float, str, nn.Module, MomentSums | None]]:
    for lam in grid:
        state = tau.apply_to(base.model.state_dict(), lam)  # once per λ, shared by the BN strategies
        for strategy in strategies:
            model = build_model(base, state)
            yield lam, strategy, model, restore(model, strategy, vectors, moments_fn)


def _scored(
    built: Iterator[tuple[float, str, nn.Module, MomentSums | None]], evalsets: EvalSets, base: Base, bs: int
) -> Iterator[tuple[float, str, nn.Module, MomentSums | None, dict]]:
    """Every (λ, strategy) model with its validation metrics."""
    if evalsets.judge is None:  # one at a time: only the best model per strategy stays in memory
        for lam, strategy, model, moments in built:
            yield lam, strategy, model, moments, evalsets.validate_one(model, base.spec, bs)
        return
    every = list(built)
    scored = evalsets.validate({f"{i}": m for i, (_, _, m, _) in enumerate(every)}, base.spec, bs)
    for i, (lam, strategy, model, moments) in enumerate(every):
        yield lam, strategy, model, moments, scored[f"{i}"]


def on_test_split(model: nn.Module, val: dict, evalsets: EvalSets, base: Base, params: Params) -> dict | None:
    """The model on the test split at the operating point chosen on validation; None without a test split."""
    if evalsets.test is None:
        return None
    test = evaluate_model(model, evalsets.test, base.spec, params.evaluate.batch_size)
    return with_operating_point(val, test, *op_rule(params))


def merge_once(
    base: Base,
    vectors: Sequence[VectorLike],
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
    moments_fn: MomentsFn | None = None,
) -> MergeOutcome:
    """One production merge: ``merge.method``, λ fixed or chosen on validation, BN restored, evaluated."""
    method = get_method(params.merge.method, params.merge)
    tau = merge_delta(vectors, method)
    grid = lambda_grid(method, params)
    return choose_scale(base, tau, grid, method.name, vectors, params, evalsets, calibration, moments_fn)


def choose_scale(
    base: Base,
    tau: DataVector,
    grid: Sequence[float],
    name: str,
    vectors: Sequence[VectorLike],
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None,
    moments_fn: MomentsFn | None = None,
) -> MergeOutcome:
    """θ = base + scale·τ for every scale in ``grid`` (λ or η), BN restored by ``batchnorm.strategy``; the best
    on validation wins.

    A ``moments_fn`` given here (hospitals answering under each candidate) takes ``recompute`` from the hospitals.
    """
    if moments_fn is not None and params.batchnorm.strategy == "recompute":
        bn = BnPlan("recompute", "hospitals")
    else:
        bn = plan_bn(vectors, params.batchnorm.strategy, calibration)
        moments_fn = moments_source(vectors, bn, base, calibration, params.batchnorm.batch_size)
    best = scan(base, tau, grid, [bn.strategy], vectors, moments_fn, evalsets, params)[bn.strategy]
    test = on_test_split(best.model, best.val, evalsets, base, params)
    return MergeOutcome(best.model, name, best.lam, bn, best.moments, best.val, test, best.curve)


def realize(
    base: Base,
    vectors: Sequence[VectorLike],
    method: str,
    lam: float,
    bn: BnPlan,
    params: Params,
    moments_fn: MomentsFn | None = None,
) -> tuple[nn.Module, MomentSums | None]:
    """The merged model for one (method, λ, BN plan), with the moment sums its BN statistics came from."""
    tau = merge_delta(vectors, get_method(method, params.merge))
    return apply_delta(base, tau, lam, bn.strategy, vectors, moments_fn)
