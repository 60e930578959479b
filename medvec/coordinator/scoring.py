"""How the coordinator scores candidate models: its held-out sets, the selection metric, the operating point and the champion gate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from medvec.config import Params
from medvec.data.images import DataSpec, ImageSet
from medvec.data.sources import has_split, load_split
from medvec.evaluate import evaluate_model, with_operating_point
from medvec.record import EvalSetRef


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


def score(metrics: dict, metric: str) -> float:
    """``metrics[metric]`` as a number to compare; a missing or undefined value counts as −∞, the worst."""
    v = metrics.get(metric, float("nan"))
    return -math.inf if v is None or math.isnan(v) else float(v)


def beats(new: float, champion: float, params: Params, champion_name: str = "the champion's") -> tuple[bool, str]:
    """The champion gate: whether ``new`` beats ``champion`` (validation scores on the same set) by
    ``registry.champion_margin``; returns the verdict and its reason."""
    metric, margin = params.evaluate.select_metric, params.registry.champion_margin
    promote = new > champion + margin
    verdict = "beats" if promote else "does not beat"
    return promote, f"val {metric} {new:.4f} {verdict} {champion_name} {champion:.4f} + margin {margin}"
