"""What the coordinator does with the vectors: merge, restore BN, choose λ and the
model to promote on the validation split, and report on the test split.

The coordinator never reads images of a hospital.  For the ``recompute`` BN
strategy it asks for moment sums through ``moments_fn(model)``, which in the
distributed setting is answered by the hospitals (each sends only its sums) and
otherwise by a coordinator calibration set.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medvec.batchnorm import MomentSums, RunningStats, restore_batchnorm, set_running
from medvec.config import Params
from medvec.data import DataSpec, ImageSet, has_split, load_split
from medvec.evaluate import evaluate_model, with_operating_point
from medvec.merge import MergeMethod, merge_delta, method_from_config
from medvec.models import Base
from medvec.record import Contributions, EvalSetRef
from medvec.timing import timed
from medvec.vectors import DataVector

MomentsFn = Callable[[nn.Module], MomentSums]


@dataclass
class EvalSets:
    """The coordinator's own held-out data: ``val`` chooses, ``test`` reports."""

    val: ImageSet
    test: ImageSet | None
    source: str = ""

    @classmethod
    def load(cls, source: str | Path, with_test: bool = True, spec: DataSpec | None = None) -> "EvalSets":
        """The ``val`` split (and ``test`` where the source has one and ``with_test``) of a data source."""
        test = load_split(source, "test", spec) if with_test and has_split(source, "test") else None
        return cls(load_split(source, "val", spec), test, str(source))

    def ref(self) -> EvalSetRef:
        """The identity of the validation set (the one that chooses λ and gates the champion)."""
        return EvalSetRef.of(self.val, self.source, "val")


@dataclass
class Candidate:
    name: str
    kind: str
    method: str | None
    lam: float | None
    bn: str
    val: dict
    test: dict | None = None
    n_train: int = 0
    selected: bool = False
    curve: list[tuple[float, float]] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "method": self.method,
            "lambda": self.lam,
            "bn": self.bn,
            "bn_restored": self.bn != "none",
            "selected": self.selected,
            "n_train": self.n_train,
            "val": _scalars(self.val),
            "test": _scalars(self.test or {}),
            "confusion": (self.test or {}).get("confusion"),
        }


def _scalars(m: dict) -> dict:
    """The metrics a report row keeps: AUC (per label too, for multi-label), balanced accuracy and accuracy, and the
    operating point."""
    return {k: v for k, v in m.items() if k in ("auc", "balanced_accuracy", "accuracy", "op", "auc_by_label")}


def evaluate_on(
    model: nn.Module, evalsets: EvalSets, spec, batch_size: int, rule: str = "youden", target: float = 0.9
) -> tuple[dict, dict]:
    """(validation metrics, test metrics with the validation-chosen operating point, or {} without a test split)."""
    val = evaluate_model(model, evalsets.val, spec, batch_size)
    test = evaluate_model(model, evalsets.test, spec, batch_size) if evalsets.test is not None else None
    return val, with_operating_point(val, test, rule, target) or {}


def op_rule(params: Params) -> tuple[str, float]:
    """How the operating point is chosen on validation (``evaluate.threshold``, ``evaluate.target_sensitivity``)."""
    return params.evaluate.threshold, params.evaluate.target_sensitivity


def score(m: dict, metric: str) -> float:
    v = m.get(metric, float("nan"))
    return -math.inf if v is None or math.isnan(v) else float(v)


def running_of(vectors: Sequence) -> list[RunningStats]:
    return [r for r in (v.running for v in vectors) if r is not None]


def lambda_grid(name: str, method: MergeMethod, params: Params) -> list[float]:
    """λ values to try: 1 for the paper's ``sum``, ``merge.lam`` when fixed, else the grid."""
    if name == "sum":
        return [1.0]
    if params.merge.lam is not None:
        return [params.merge.lam]
    return list(params.merge.lambdas or method.lambdas)


def build_model(base: Base, state: dict[str, torch.Tensor]) -> nn.Module:
    model = base.fresh()
    model.load_state_dict(state)
    model.eval()
    return model


@timed("bn_restore")
def restore(model: nn.Module, strategy: str, vectors: Sequence, moments_fn: MomentsFn | None) -> MomentSums | None:
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
    base: Base, tau: DataVector, scale: float, strategy: str, vectors: Sequence, moments_fn: MomentsFn | None
) -> tuple[nn.Module, MomentSums | None]:
    """θ = base + scale·τ with BN restored by ``strategy``; returns the model and the moment sums used, if any."""
    model = build_model(base, tau.apply_to(base.model.state_dict(), scale))
    return model, restore(model, strategy, vectors, moments_fn)


def single_models(base: Base, vectors: Sequence) -> list[tuple[str, nn.Module, int]]:
    """Rebuild each hospital's fine-tuned model θ_h = θ_pre + τ_h with its own BN statistics."""
    return [single_model(base, v) for v in vectors]


def single_model(base: Base, vector) -> tuple[str, nn.Module, int]:
    """(hospital, θ_pre + τ_h with the hospital's BN statistics, n_train) of one vector."""
    vec = vector.to_vector()
    model = build_model(base, vec.apply_to(base.model.state_dict(), 1.0))
    if vec.running is not None:
        set_running(model, vec.running.mean, vec.running.var)
    return vec.meta.hospital, model, vec.meta.n_train


def single_rows(base: Base, vectors: Sequence, evalsets: EvalSets, params: Params, store=None) -> list[dict]:
    """Each hospital's own model on the held-out set, as report rows.

    With a ``store``, a vector's row is computed once per held-out set and operating-point rule and kept
    under ``evals/`` (a merge of N vectors then evaluates only the vectors new since the last one).
    """
    rows = []
    for v in vectors:
        key = _single_row_key(base, v, evalsets, params)
        row = store.read_json(key) if store is not None else None
        if row is None:
            hospital, model, n = single_model(base, v)
            val, test = evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size, *op_rule(params))
            row = Candidate(hospital, "single", None, None, "own", val, test, n).row()
            if store is not None:
                store.write_json(key, row)
        rows.append(row)
    return rows


def _single_row_key(base: Base, vector, evalsets: EvalSets, params: Params) -> str:
    test = EvalSetRef.of(evalsets.test, evalsets.source, "test").sha256 if evalsets.test is not None else None
    what = [  # a clipped input (intake.defence: clip) is θ_pre + s·τ: its scale is part of what was evaluated
        vector.content_sha256,
        vector.meta.vector_id,
        float(getattr(vector, "scale", 1.0)),
        base.sha256,
        evalsets.ref().sha256,
        test,
        list(op_rule(params)),
    ]
    return f"evals/{base.sha256}/{hashlib.sha256(json.dumps(what).encode()).hexdigest()}.json"


def evaluate_merges(
    base: Base,
    vectors: Sequence,
    evalsets: EvalSets,
    params: Params,
    moments_fn: MomentsFn | None = None,
    methods: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Candidate]:
    """For every (method, BN strategy): choose λ on ``val``, then score it on ``test``.

    Returns one candidate per pair, each with its λ curve; the one with the best
    validation score (``evaluate.select_metric``) is marked ``selected``.
    """
    methods = list(methods or params.merge.methods)
    strategies = list(strategies or params.batchnorm.strategies)
    metric = params.evaluate.select_metric
    bs = params.evaluate.batch_size
    base_state = base.model.state_dict()
    n_train = sum(int(v.meta.n_train) for v in vectors)
    results: list[Candidate] = []
    jobs = [(m, s) for m in methods for s in strategies]
    bar = tqdm(total=len(jobs), desc="merge candidates", disable=not progress, leave=False)
    for name in methods:
        method: MergeMethod = method_from_config(name, params.merge)
        tau = merge_delta(vectors, method)
        grid = lambda_grid(name, method, params)
        per_strategy: dict[str, list[tuple[float, dict]]] = {s: [] for s in strategies}
        for lam in grid:
            merged_state = tau.apply_to(base_state, lam)  # once per λ, shared by the BN strategies
            for strategy in strategies:
                model = build_model(base, merged_state)
                restore(model, strategy, vectors, moments_fn)
                per_strategy[strategy].append((lam, evaluate_model(model, evalsets.val, base.spec, bs)))
        for strategy in strategies:
            lam, val = max(per_strategy[strategy], key=lambda p: score(p[1], metric))
            model, _ = apply_delta(base, tau, lam, strategy, vectors, moments_fn)
            test = with_operating_point(val, evaluate_model(model, evalsets.test, base.spec, bs), *op_rule(params))
            curve = [(x, m[metric]) for x, m in per_strategy[strategy]]
            results.append(
                Candidate(f"{name} (bn={strategy})", "merged", name, lam, strategy, val, test, n_train, curve=curve)
            )
            bar.update(1)
    bar.close()
    if results:
        best = max(results, key=lambda c: score(c.val, metric))
        best.selected = True
    return results


def realize(
    base: Base,
    vectors: Sequence,
    method: str,
    lam: float,
    bn: BnPlan,
    params: Params,
    moments_fn: MomentsFn | None = None,
) -> tuple[nn.Module, MomentSums | None]:
    """The merged model for one (method, λ, BN plan), with the moment sums its BN statistics came from."""
    tau = merge_delta(vectors, method_from_config(method, params.merge))
    return apply_delta(base, tau, lam, bn.strategy, vectors, moments_fn)


def random_control(vectors: Sequence, seed: int = 0) -> list[DataVector]:
    """Random vectors with the same per-tensor L2 norms as each hospital's (the paper's control)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in vectors:
        vec = v.to_vector()
        deltas = {}
        for k, t in vec.deltas.items():
            r = torch.randn(t.shape, generator=g)
            n = float(r.norm())
            deltas[k] = r * (float(t.norm()) / n) if n > 0 else r
        out.append(DataVector(deltas, vec.meta, vec.running, vec.moments))
    return out


@dataclass(frozen=True)
class BnPlan:
    """How a merged model gets its BN statistics: a strategy and the source of its statistics."""

    strategy: str  # none | average | recompute
    source: str  # base | running | hospitals | calibration

    @classmethod
    def from_hospitals(cls, strategy: str) -> "BnPlan":
        """The plan when the hospitals answer moment sums under the merged model itself (the demo)."""
        return cls(strategy, {"none": "base", "average": "running", "recompute": "hospitals"}[strategy])


def plan_bn(vectors: Sequence, strategy: str, calibration: ImageSet | None) -> BnPlan:
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
    if vectors and consistent and all(v.moments is not None and v.moments.count for v in vectors):
        return BnPlan("recompute", "hospitals")
    if calibration is not None:
        return BnPlan("recompute", "calibration")
    return BnPlan("average", "running")


def moments_source(
    vectors: Sequence, bn: BnPlan, base: Base, calibration: ImageSet | None, batch_size: int = 64
) -> MomentsFn | None:
    """A ``moments_fn`` for :func:`restore` that matches a :class:`BnPlan`."""
    from medvec.batchnorm import moment_sums
    from medvec.data import batches

    if bn.source == "hospitals":
        total = MomentSums.combine(v.moments for v in vectors)
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
    contributions: list | None = None  # an async step's :class:`medvec.refine.Contribution` per vector
    scores: Contributions | None = None  # what each input contributed (:mod:`medvec.contribution`)


def merge_once(
    base: Base,
    vectors: Sequence,
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
) -> MergeOutcome:
    """One production merge: ``merge.method``, λ fixed or chosen on validation, BN restored, evaluated."""
    name = params.merge.method
    method = method_from_config(name, params.merge)
    tau = merge_delta(vectors, method)
    return choose_scale(base, tau, lambda_grid(name, method, params), name, vectors, params, evalsets, calibration)


def choose_scale(
    base: Base,
    tau: DataVector,
    grid: Sequence[float],
    name: str,
    vectors: Sequence,
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None,
    moments_fn: MomentsFn | None = None,
) -> MergeOutcome:
    """θ = base + scale·τ for every scale in ``grid`` (λ or η), BN restored; the best on validation wins.

    A ``moments_fn`` given here (hospitals answering under each candidate) takes ``recompute`` from the hospitals.
    """
    if moments_fn is not None and params.batchnorm.strategy == "recompute":
        bn = BnPlan("recompute", "hospitals")
    else:
        bn = plan_bn(vectors, params.batchnorm.strategy, calibration)
        moments_fn = moments_source(vectors, bn, base, calibration, params.batchnorm.batch_size)
    metric, bs = params.evaluate.select_metric, params.evaluate.batch_size
    scored = []
    for lam in grid:
        model, moments = apply_delta(base, tau, lam, bn.strategy, vectors, moments_fn)
        scored.append((lam, evaluate_model(model, evalsets.val, base.spec, bs), model, moments))
    lam, val, model, moments = max(scored, key=lambda s: score(s[1], metric))
    test = evaluate_model(model, evalsets.test, base.spec, bs) if evalsets.test is not None else None
    test = with_operating_point(val, test, *op_rule(params))
    return MergeOutcome(model, name, lam, bn, moments, val, test, [(x, m[metric]) for x, m, _, _ in scored])


def beats(new: dict, champion: dict, params: Params) -> tuple[bool, str]:
    """The core champion gate: does ``new`` beat ``champion`` (both on the same validation set)?"""
    metric, margin = params.evaluate.select_metric, params.registry.champion_margin
    a, b = score(new, metric), score(champion, metric)
    verdict = "beats" if a > b + margin else "does not beat"
    return a > b + margin, f"val {metric} {a:.4f} {verdict} the champion's {b:.4f} + margin {margin}"


def outcome_of(
    base: Base, vectors: Sequence, candidate: Candidate, bn: BnPlan, params: Params, moments_fn, evalsets: EvalSets
) -> MergeOutcome:
    """The outcome behind one evaluated candidate (the demo registers the selected one)."""
    model, moments = realize(base, vectors, candidate.method, candidate.lam, bn, params, moments_fn)
    return MergeOutcome(
        model, candidate.method, candidate.lam, bn, moments, candidate.val, candidate.test, candidate.curve
    )


def rebuild_merge(store, record, parent: Base | None = None) -> tuple[nn.Module, str]:
    """Rebuild a recorded merge bit for bit from its :class:`~medvec.record.MergeRecord`.

    Inputs come from the store by id (content hashes checked), norm clipping is
    re-applied, and a ``recompute`` merge takes the moment sums stored with it.
    An async step starts from ``parent`` (default: its stored parent start point).
    Returns (model, sha256 of its state); equal to ``record.merged_sha256`` when reproducible.
    """
    from medvec.defence import Scaled
    from medvec.models import state_sha256
    from medvec.refine import step_delta

    root = store.get_base(record.base_sha256)
    vectors = [store.get(i.vector_id, base=root.model.state_dict(), base_sha256=root.sha256) for i in record.inputs]
    for v, i in zip(vectors, record.inputs):
        if v.content_sha256 != i.content_sha256:
            raise ValueError(
                f"vector {i.vector_id}: content {v.content_sha256[:12]}… differs from the lineage's {i.content_sha256[:12]}…"
            )
    scales = record.scales()
    vectors = [Scaled(v, scales[v.meta.vector_id]) if v.meta.vector_id in scales else v for v in vectors]
    moments_fn = None
    if record.bn_strategy == "recompute":
        if not record.moments_key:
            raise ValueError(f"merge {record.merge_id}: recompute merge without stored moment sums")
        stored = store.get_moments(record.moments_key)
        moments_fn = lambda model: stored  # noqa: E731
    if record.mode == "async":
        start = parent or store.get_start(root.sha256, record.parent_version)
        tau = step_delta(vectors, [i.weight for i in record.inputs])
    else:
        start, tau = root, merge_delta(vectors, method_from_config(record.method, record.params.merge))
    model, _ = apply_delta(start, tau, record.lam, record.bn_strategy, vectors, moments_fn)
    return model, state_sha256(model.state_dict())
