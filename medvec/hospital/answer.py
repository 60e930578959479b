"""A hospital's answer to an evaluation request: each candidate scored on its own validation split, reported as
aggregates only (:mod:`medvec.answers`)."""

from __future__ import annotations

import numpy as np
from torch import nn

from medvec.answers import CandidateAnswer, EvalAnswer, EvalRequest
from medvec.data.images import ImageSet
from medvec.evaluate import predict
from medvec.histograms import Grid, ScoreReport, summed_loss
from medvec.keys import DocumentSigner
from medvec.models import ModelSpec
from medvec.store import VectorStore


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


def answer_request(
    store: VectorStore,
    request_id: str,
    hospital: str,
    val: ImageSet,
    split_sha256: str,
    signer: DocumentSigner,
    batch_size: int = 256,
) -> str:
    """Answer the request ``request_id`` in ``store`` and publish the answer signed with the hospital's key.

    The request is read through the store, so a hospital that pinned the coordinator's key
    (``store.trusting(verifier=…)``) refuses one the coordinator did not sign before it loads any candidate;
    each candidate's weights are checked against the sha256 the request names. Candidates are loaded and
    scored one at a time. Returns the answer's store key."""
    request = store.get_request(request_id)
    scored = {}
    for name in request.candidates:
        model = store.candidate(request, name)
        scored[name] = score_candidate(model.model, val, model.spec, request.grid, request.min_count, batch_size)
    reply = _answer_of(request, hospital, val, split_sha256, scored)
    key = store.answer_key(request.request_id, hospital)
    return store.put_answer(request.request_id, hospital, signer.sign(key, reply.to_json()))


def _answer_of(
    request: EvalRequest, hospital: str, val: ImageSet, split_sha256: str, scored: dict[str, CandidateAnswer]
) -> EvalAnswer:
    return EvalAnswer(
        request_id=request.request_id,
        request_sha256=request.sha256(),
        hospital=hospital,
        task=val.task,
        split_n=len(val),
        split_sha256=split_sha256,
        min_count=request.min_count,
        candidates=scored,
    )


__all__ = ["answer", "answer_request", "score_candidate"]
