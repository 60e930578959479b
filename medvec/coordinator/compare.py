"""Comparison rows: every merge method × BN strategy, each hospital's own model, and the paper's random control."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from medvec.batchnorm import set_running
from medvec.config import Params
from medvec.coordinator.defence import scale_of
from medvec.coordinator.engine import (
    BnPlan,
    MergeOutcome,
    MomentsFn,
    build_model,
    lambda_grid,
    on_test_split,
    scan,
)
from medvec.coordinator.methods import get_method, merge_delta
from medvec.coordinator.scoring import EvalSets, evaluate_on, op_rule, score
from medvec.evaluate import evaluate_model, with_operating_point
from medvec.models import Base
from medvec.record import EvalSetRef
from medvec.store import VectorStore
from medvec.vectors.vector import DataVector, VectorLike


@dataclass(kw_only=True)
class Candidate:
    """One row of a comparison: a merged model, a hospital's own model, a baseline or an async champion."""

    name: str
    kind: str
    method: str | None = None
    lam: float | None = None
    bn: str
    val: dict
    test: dict | None = None
    n_train: int = 0
    selected: bool = False
    curve: list[tuple[float, float]] = field(default_factory=list)

    def row(self) -> dict:
        """This candidate as a report row: its settings, whether BN was restored, the scalar val and test metrics,
        and test's confusion matrix."""
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


def single_model(base: Base, vector: VectorLike) -> tuple[str, nn.Module, int]:
    """(hospital, θ_pre + τ_h with the hospital's BN statistics, n_train) of one vector."""
    vec = vector.to_vector()
    model = build_model(base, vec.apply_to(base.model.state_dict(), 1.0))
    if vec.running is not None:
        set_running(model, vec.running.mean, vec.running.var)
    return vector.meta.hospital, model, vector.meta.n_train


def single_rows(
    base: Base, vectors: Sequence[VectorLike], evalsets: EvalSets, params: Params, store: VectorStore | None = None
) -> list[dict]:
    """Each hospital's own model on the held-out set, as report rows.

    With a ``store``, a vector's row is computed once per held-out set and operating-point rule and kept
    under ``evals/`` (a merge of N vectors then evaluates only the vectors new since the last one).
    """
    if evalsets.judge is not None:
        return scored_by_hospitals(base, vectors, evalsets, params)
    rows = []
    for v in vectors:
        key = _single_row_key(base, v, evalsets, params)
        row = store.read_json(key) if store is not None else None
        if row is None:
            hospital, model, n = single_model(base, v)
            val, test = evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size, *op_rule(params))
            row = Candidate(name=hospital, kind="single", bn="own", val=val, test=test, n_train=n).row()
            if store is not None:
                store.write_json(key, row)
        rows.append(row)
    return rows


def scored_by_hospitals(
    base: Base,
    vectors: Sequence[VectorLike],
    evalsets: EvalSets,
    params: Params,
    starts: Mapping[int, Base] | None = None,
) -> list[dict]:
    """Each input's own model scored by every hospital in one request: the cross-site matrix (named by hospital,
    or by vector id when a hospital sent more than one); the test split, where the coordinator has one, reports.

    An input's own model is its start point + τ with its BN statistics: ``base`` (θ_pre, or the champion of an
    asynchronous step), or the start point ``starts`` holds for the version the vector names."""
    hospitals = [v.meta.hospital for v in vectors]
    singles = {
        (v.meta.hospital if hospitals.count(v.meta.hospital) == 1 else v.meta.vector_id): single_model(
            (starts or {}).get(v.meta.start_version, base), v
        )
        for v in vectors
    }
    bs = params.evaluate.batch_size
    vals = evalsets.validate({name: model for name, (_, model, _) in singles.items()}, base.spec, bs, "matrix")
    rows = []
    for name, (hospital, model, n) in singles.items():
        test = None
        if evalsets.test is not None:
            test = with_operating_point(
                vals[name], evaluate_model(model, evalsets.test, base.spec, bs), *op_rule(params)
            )
        rows.append(Candidate(name=hospital, kind="single", bn="own", val=vals[name], test=test or {}, n_train=n).row())
    return rows


def _single_row_key(base: Base, vector: VectorLike, evalsets: EvalSets, params: Params) -> str:
    test = EvalSetRef.of(evalsets.test, evalsets.source, "test").sha256 if evalsets.test is not None else None
    what = [  # a clipped input (intake.defence: clip) is θ_pre + s·τ: its scale is part of what was evaluated
        vector.content_sha256,
        vector.meta.vector_id,
        scale_of(vector),
        base.sha256,
        evalsets.ref().sha256,
        test,
        list(op_rule(params)),
    ]
    return f"evals/{base.sha256}/{hashlib.sha256(json.dumps(what).encode()).hexdigest()}.json"


@dataclass
class Comparison:
    """Every (method, BN strategy) candidate, and the merge the validation split selected among them."""

    candidates: list[Candidate]
    selected: MergeOutcome


def evaluate_merges(
    base: Base,
    vectors: Sequence[VectorLike],
    evalsets: EvalSets,
    params: Params,
    moments_fn: MomentsFn | None = None,
    methods: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    progress: bool = True,
) -> Comparison:
    """For every (method, BN strategy): choose λ on ``val``, then score it on ``test``.

    Returns one candidate per pair, each with its λ curve; the one with the best validation
    score (``evaluate.select_metric``, the first of equals) is marked ``selected``, and its
    merged model is kept as the comparison's outcome (BN statistics from the hospitals).
    """
    methods = list(methods or params.merge.methods)
    strategies = list(strategies or params.batchnorm.strategies)
    metric = params.evaluate.select_metric
    n_train = sum(int(v.meta.n_train) for v in vectors)
    candidates: list[Candidate] = []
    best: tuple[Candidate, MergeOutcome] | None = None
    bar = tqdm(total=len(methods) * len(strategies), desc="merge candidates", disable=not progress, leave=False)
    for name in methods:
        method = get_method(name, params.merge)
        tau = merge_delta(vectors, method)
        scanned = scan(base, tau, lambda_grid(method, params), strategies, vectors, moments_fn, evalsets, params)
        for strategy in strategies:
            s = scanned[strategy]
            test = on_test_split(s.model, s.val, evalsets, base, params)
            candidate = Candidate(
                name=f"{name} (bn={strategy})",
                kind="merged",
                method=name,
                lam=s.lam,
                bn=strategy,
                val=s.val,
                test=test,
                n_train=n_train,
                curve=s.curve,
            )
            candidates.append(candidate)
            if best is None or score(s.val, metric) > score(best[0].val, metric):
                bn = BnPlan.from_hospitals(strategy)
                best = (candidate, MergeOutcome(s.model, name, s.lam, bn, s.moments, s.val, test, s.curve))
            bar.update(1)
    bar.close()
    if best is None:
        raise ValueError("no merge candidates: merge.methods or batchnorm.strategies is empty")
    best[0].selected = True
    return Comparison(candidates, best[1])


def random_control(vectors: Sequence[VectorLike], seed: int = 0) -> list[DataVector]:
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
