"""A hospital's answer to an evaluation request: each candidate scored on its own validation split, reported as
aggregates only (:mod:`medvec.answers`)."""

from __future__ import annotations

import numpy as np
from torch import nn

from medvec.answers import CandidateAnswer, EvalAnswer
from medvec.data.images import ImageSet
from medvec.evaluate import predict
from medvec.histograms import Grid, ScoreReport, summed_loss
from medvec.models import ModelSpec


def score_candidate(
    model: nn.Module, val: ImageSet, spec: ModelSpec, grid: Grid, min_count: int, batch_size: int = 256
) -> CandidateAnswer:
    """One candidate's aggregates on ``val``: count, summed loss, and histograms coarsened to ``min_count``."""
    proba = predict(model, val, spec, batch_size)
    labels = np.asarray(val.labels)
    report = ScoreReport.of(proba, labels, val.task, grid, min_count)
    return CandidateAnswer(n=len(val), loss_sum=summed_loss(proba, labels, val.task), histograms=report.to_json())


def answer(
    request_id: str,
    request_sha256: str,
    hospital: str,
    models: dict[str, nn.Module],
    val: ImageSet,
    split_sha256: str,
    spec: ModelSpec,
    grid: Grid,
    min_count: int,
    batch_size: int = 256,
) -> EvalAnswer:
    """The answer of ``hospital`` to a request: every candidate in ``models`` scored on ``val``."""
    scored = {name: score_candidate(m, val, spec, grid, min_count, batch_size) for name, m in models.items()}
    return EvalAnswer(
        request_id=request_id,
        request_sha256=request_sha256,
        hospital=hospital,
        task=val.task,
        split_n=len(val),
        split_sha256=split_sha256,
        min_count=min_count,
        candidates=scored,
    )


__all__ = ["answer", "score_candidate"]
