"""The demo's baselines beside the merges: the paper's random-vector control and two centralized references, one
at equal compute (the hospitals' epochs on the pooled images) and one trained to convergence (early stopping on
validation), which is the one that bounds what federated training can reach."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from medvec.config import Params
from medvec.coordinator.compare import Candidate, random_control
from medvec.coordinator.engine import BnPlan, MomentsFn, realize
from medvec.coordinator.scoring import EvalSets, evaluate_on, op_rule
from medvec.data.images import ImageSet
from medvec.evaluate import evaluate_model
from medvec.hospital.local import LocalData
from medvec.hospital.train import finetune
from medvec.models import Base
from medvec.vectors.vector import VectorLike

PATIENCE = 3  # epochs without a better validation AUC before the converged reference stops


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
    """The equal-compute reference: θ_pre fine-tuned on all hospitals' training data pooled, same settings."""
    pooled = ImageSet.concat([d.train for d in local])
    model = base.fresh()
    finetune(model, pooled, base.spec, params.finetune, progress=progress, desc="centralized")
    return _centralized("centralized (pooled)", model, base, evalsets, params, len(pooled))


def _centralized(name: str, model: nn.Module, base: Base, evalsets: EvalSets, params: Params, n: int) -> dict:
    """A centralized reference's row, scored like every other row."""
    val, test = evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size, *op_rule(params))
    return Candidate(name=name, kind="centralized", bn="own", val=val, test=test, n_train=n).row()


CONVERGED = "centralized (pooled, converged)"  # the row's name: the reference that bounds the federated models


@dataclass
class Converged:
    """A model trained on pooled images until validation stopped improving: its epochs and validation curve."""

    model: nn.Module
    epochs: int
    curve: list[float]
    stopped_early: bool  # validation stopped improving; False: ``max_epochs`` ran out first


def train_to_convergence(
    base: Base, pooled: ImageSet, val: ImageSet, params: Params, max_epochs: int, patience: int = PATIENCE
) -> Converged:
    """Fine-tune θ_pre on ``pooled`` one epoch at a time (``finetune.*``, the seed moved each epoch) until the
    validation AUC has not improved for ``patience`` epochs or ``max_epochs`` ran; keep the best epoch's model
    (early stopping: the epochs are chosen on validation)."""
    model, best, best_state, curve, early = base.fresh(), -1.0, None, [], False
    for e in range(max_epochs):
        cfg = params.finetune.model_copy(update={"epochs": 1, "seed": params.finetune.seed + e})
        finetune(model, pooled, base.spec, cfg, progress=False)
        auc = evaluate_model(model, val, base.spec, params.evaluate.batch_size)["auc"]
        curve.append(auc)
        if auc > best:
            best, best_state = auc, {k: v.clone() for k, v in model.state_dict().items()}
        if len(curve) - 1 - curve.index(best) >= patience:
            early = True
            break
    assert best_state is not None, "max_epochs is at least 1"
    model.load_state_dict(best_state)
    return Converged(model, curve.index(best) + 1, curve, early)


def converged_row(base: Base, local: Sequence[LocalData], evalsets: EvalSets, params: Params) -> dict:
    """The centralized reference trained to convergence (``demo.converged_max_epochs``), scored like the rest.

    Its epochs are chosen on the validation the rows are scored by: with the hospitals judging, their local
    validation splits pooled (as a centralized trainer would hold them); else the coordinator's split."""
    pooled = ImageSet.concat([d.train for d in local])
    vals = [d.val for d in local if d.val is not None and len(d.val)]
    stop_on = ImageSet.concat(vals) if evalsets.judge is not None and vals else evalsets.val
    assert stop_on is not None, "early stopping needs a validation split"
    done = train_to_convergence(base, pooled, stop_on, params, params.demo.converged_max_epochs)
    row = _centralized(CONVERGED, done.model, base, evalsets, params, len(pooled))
    curve = [round(a, 4) for a in done.curve]
    return row | {"epochs": done.epochs, "val_curve": curve, "stopped_early": done.stopped_early}
