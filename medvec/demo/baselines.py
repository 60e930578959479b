"""The demo's baselines beside the merges: the paper's random-vector control and the centralized upper bound."""

from __future__ import annotations

from collections.abc import Sequence

from medvec.config import Params
from medvec.coordinator.compare import Candidate, random_control
from medvec.coordinator.engine import BnPlan, MomentsFn, realize
from medvec.coordinator.scoring import EvalSets, evaluate_on, op_rule
from medvec.data.images import ImageSet
from medvec.hospital.local import LocalData
from medvec.hospital.train import finetune
from medvec.models import Base
from medvec.vectors.vector import VectorLike


def control_row(
    base: Base,
    vectors: Sequence[VectorLike],
    evalsets: EvalSets,
    params: Params,
    bn: BnPlan,
    moments_fn: MomentsFn | None,
) -> dict:
    """Random vectors with each hospital's per-tensor norms, summed (the paper's control)."""
    control = random_control(vectors, seed=params.merge.seed)
    model, _ = realize(base, control, "sum", 1.0, bn, params, moments_fn)
    val, test = evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size, *op_rule(params))
    n = sum(v.meta.n_train for v in vectors)
    name = f"random control (bn={bn.strategy})"
    return Candidate(
        name=name, kind="control", method="sum", lam=1.0, bn=bn.strategy, val=val, test=test, n_train=n
    ).row()


def centralized_row(base: Base, local: Sequence[LocalData], evalsets: EvalSets, params: Params, progress: bool) -> dict:
    """Upper bound: fine-tune θ_pre on all hospitals' training data pooled, same settings."""
    pooled = ImageSet.concat([d.train for d in local])
    model = base.fresh()
    finetune(model, pooled, base.spec, params.finetune, progress=progress, desc="centralized")
    val, test = evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size, *op_rule(params))
    return Candidate(
        name="centralized (pooled)", kind="centralized", bn="own", val=val, test=test, n_train=len(pooled)
    ).row()
