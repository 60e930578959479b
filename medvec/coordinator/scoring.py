"""How the coordinator scores candidate models: its held-out sets, the selection metric, the operating point and the champion gate."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from torch import nn

from medvec.config import Params
from medvec.data.images import DataSpec, ImageSet
from medvec.data.sources import has_split, load_split
from medvec.evaluate import evaluate_model, with_operating_point
from medvec.models import ModelSpec
from medvec.record import EvalSetRef, Evaluation


class Judge(Protocol):
    """Scores candidates without the coordinator's images: the hospitals (:mod:`medvec.coordinator.judge`)."""

    beside: dict[str, nn.Module]  # models asked beside every scan round (the champion, for the gate)

    def validate(self, models: Mapping[str, nn.Module], purpose: str = "scan") -> dict[str, dict]:
        """Each named model's validation metrics, asked for at once."""
        ...

    def gate(self, candidate: nn.Module, champion: nn.Module, champion_name: str = "the champion") -> tuple[bool, str]:
        """Whether ``candidate`` beats ``champion`` on the same sites; the reason."""
        ...

    def evaluation(self) -> Evaluation:
        """Who answered each round so far."""
        ...

    def ref(self) -> EvalSetRef:
        """The identity of what scored the candidates."""
        ...

    def fresh(self) -> "Judge":
        """The same judge with no rounds yet (one merge's record holds that merge's rounds only)."""
        ...


@dataclass
class EvalSets:
    """What scores the coordinator's candidates: its own held-out ``val`` (and ``test``, which reports), or a
    ``judge``, the hospitals answering on their own validation splits (``evaluate.where: hospitals``).

    With a judge, ``val`` is not read (and may be None); ``test``, where given, still reports."""

    val: ImageSet | None
    test: ImageSet | None
    source: str = ""
    judge: Judge | None = None

    def validate(
        self, models: Mapping[str, nn.Module], spec: ModelSpec, batch_size: int, purpose: str = "scan"
    ) -> dict[str, dict]:
        """Each named model's validation metrics: from the judge (one request for all), or the coordinator's set."""
        if self.judge is not None:
            return self.judge.validate(models, purpose)
        if self.val is None:
            raise ValueError("no validation data: set coordinator.eval_data, or evaluate.where: hospitals")
        return {name: evaluate_model(m, self.val, spec, batch_size) for name, m in models.items()}

    def validate_one(self, model: nn.Module, spec: ModelSpec, batch_size: int, purpose: str = "scan") -> dict:
        """One model's validation metrics."""
        return self.validate({"model": model}, spec, batch_size, purpose)["model"]

    def beside_scan(self, name: str, model: nn.Module) -> None:
        """Where the hospitals score, ask them for ``model`` beside every scan's candidates (the champion: the
        gate then reads the scan's answers instead of asking again)."""
        if self.judge is not None:
            self.judge.beside[name] = model

    def fresh(self) -> "EvalSets":
        """The same sets, with a judge that has no rounds yet: what the next merge's record will list."""
        return replace(self, judge=self.judge.fresh()) if self.judge is not None else self

    def evaluation(self) -> Evaluation:
        """Who scored the candidates (the merge record's ``evaluation``)."""
        return self.judge.evaluation() if self.judge is not None else Evaluation()

    @classmethod
    def load(cls, source: str | Path, with_test: bool = True, spec: DataSpec | None = None) -> "EvalSets":
        """The ``val`` split (and ``test`` where the source has one and ``with_test``) of a data source."""
        test = load_split(source, "test", spec) if with_test and has_split(source, "test") else None
        return cls(load_split(source, "val", spec), test, str(source))

    def ref(self) -> EvalSetRef:
        """The identity of the validation set (the one that chooses λ and gates the champion)."""
        if self.judge is not None:
            return self.judge.ref()
        if self.val is None:
            raise ValueError("no validation data: set coordinator.eval_data, or evaluate.where: hospitals")
        return EvalSetRef.of(self.val, self.source, "val")


def evaluate_on(
    model: nn.Module, evalsets: EvalSets, spec, batch_size: int, rule: str = "youden", target: float = 0.9
) -> tuple[dict, dict]:
    """(validation metrics, test metrics with the validation-chosen operating point, or {} without a test split)."""
    val = evalsets.validate_one(model, spec, batch_size, "reference")
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
