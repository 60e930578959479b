"""A hospital's answer to an evaluation request: for each candidate model, aggregates of its scores on the
hospital's own validation split, and nothing per image (issue 25).

The coordinator's :class:`EvalRequest` names the candidates (their weights in the store, by sha256), the grid
and the minimum count; it is signed like everything the coordinator publishes, and the hospital verifies it
before it loads anything.  An answer holds, per candidate, the number of images, the summed loss and the score histograms
(:mod:`medvec.histograms`), coarsened so that every reported cell counts at least ``min_count`` images. It
names the request it answers (id and sha256) and the hospital's validation split by count and hash, and the
hospital signs it like its vectors. :func:`answer_problems` lists what makes an answer unusable, each as one
line; the coordinator keeps a rejected answer with those reasons.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medvec.histograms import Grid, ScoreReport
from medvec.keys import canonical
from medvec.timing import utcnow

ANSWER_KIND = "medvec.eval-answer"
REQUEST_KIND = "medvec.eval-request"


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CandidateRef(_Answer):
    """One candidate model of a request: its weights in the store and their sha256."""

    key: str
    sha256: str


class EvalRequest(_Answer):
    """The coordinator's request: score these candidates (models of base ``base_sha256``) on your validation split."""

    kind: str = REQUEST_KIND
    request_id: str = Field(default_factory=lambda: f"eval-{utcnow()[:19].replace(':', '')}-{uuid.uuid4().hex[:6]}")
    base_sha256: str
    candidates: dict[str, CandidateRef]
    bins: int = 10000
    limit: float = 16.0
    min_count: int = Field(5, ge=1)
    created_at: str = Field(default_factory=utcnow)

    @property
    def grid(self) -> Grid:
        """The score grid every answer must use."""
        return Grid(self.bins, self.limit)

    def sha256(self) -> str:
        """The request's content hash, which every answer names."""
        return hashlib.sha256(canonical(self.model_dump(mode="json"))).hexdigest()

    def to_json(self) -> dict:
        """The request as JSON-ready data (what the coordinator signs and stores)."""
        return self.model_dump(mode="json")


class CandidateAnswer(_Answer):
    """One candidate's aggregates at one hospital."""

    n: int = Field(ge=0)
    loss_sum: float
    histograms: dict = Field(description="ScoreReport.to_json(): the grid, each row's groups, withheld rows")

    def report(self) -> ScoreReport:
        """The histograms as a :class:`~medvec.histograms.ScoreReport` (a ValueError when malformed)."""
        return ScoreReport.from_json(self.histograms)


class EvalAnswer(_Answer):
    """One hospital's answer to one evaluation request."""

    kind: str = ANSWER_KIND
    request_id: str
    request_sha256: str
    hospital: str
    task: str
    split_n: int = Field(ge=0, description="images in the hospital's validation split")
    split_sha256: str = Field(description="the split's identity (its images' hashes, as LocalData describes it)")
    min_count: int = Field(ge=1)
    candidates: dict[str, CandidateAnswer]
    created_at: str = Field(default_factory=utcnow)

    def to_json(self) -> dict:
        """The answer as JSON-ready data (what the hospital signs and stores)."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        """The answer's content hash (a merge record lists it per answering site)."""
        return hashlib.sha256(canonical(self.to_json())).hexdigest()


def answer_problems(answer: EvalAnswer, request: EvalRequest) -> list[str]:
    """Why ``answer`` cannot be used for ``request`` (empty when it can)."""
    problems = []
    if answer.request_id != request.request_id or answer.request_sha256 != request.sha256():
        problems.append(f"answers request {answer.request_id} ({answer.request_sha256[:12]}), not {request.request_id}")
    missing = sorted(set(request.candidates) - set(answer.candidates))
    extra = sorted(set(answer.candidates) - set(request.candidates))
    if missing or extra:
        problems.append(f"candidates differ from the request's: missing {missing}, not asked {extra}")
    if answer.min_count < request.min_count:
        problems.append(f"min_count {answer.min_count} is below the request's {request.min_count}")
    for name in sorted(set(request.candidates) & set(answer.candidates)):
        found = _candidate_problems(answer.candidates[name], answer, request.grid, request.min_count)
        problems += [f"candidate {name}: {p}" for p in found]
    return problems


def _candidate_problems(c: CandidateAnswer, answer: EvalAnswer, grid: Grid, min_count: int) -> list[str]:
    try:
        report = c.report()
    except (KeyError, TypeError, ValueError) as exc:
        return [f"histograms unreadable: {exc}"]
    problems = []
    if report.grid != grid:
        problems.append(f"grid {report.grid} is not the request's {grid}")
    smallest = report.smallest_group()
    if smallest is not None and smallest < min_count:
        problems.append(f"a group counts {smallest} images, fewer than min_count {min_count}")
    if c.n != answer.split_n:
        problems.append(f"n {c.n} differs from the split's {answer.split_n}")
    elif answer.task != "multilabel":
        problems += _count_problems(report, c.n, min_count)
    if not np.isfinite(c.loss_sum) or c.loss_sum < 0:
        problems.append(f"summed loss {c.loss_sum} is not a finite, non-negative number")
    return problems


def _count_problems(report: ScoreReport, n: int, min_count: int) -> list[str]:
    """Each column of a single-label task counts every image once: all ``n`` of them, or, with rows withheld,
    fewer by less than ``min_count`` per withheld row."""
    out = []
    for col in range(len(report.rows)):
        held = sum(1 for c, _ in report.withheld if c == col)
        missing = n - report.images(col)
        if not (missing == 0 if not held else 0 < missing < held * min_count):
            why = f"with {held} row(s) withheld" if held else "with none withheld"
            out.append(f"histograms count {report.images(col)} images in column {col}, not n {n} ({why})")
    return out


__all__ = [
    "ANSWER_KIND",
    "REQUEST_KIND",
    "CandidateAnswer",
    "CandidateRef",
    "EvalAnswer",
    "EvalRequest",
    "answer_problems",
]
