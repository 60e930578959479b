"""The coordinator's metrics from the hospitals' answers (issue 25): pooled over the sites that answered,
per site, and the champion gate on the sites that scored both models.

Pooling adds the sites' histograms, so the pooled AUC is the AUC of the union of their validation images (up
to ties within a bin and the ``min_count`` coarsening), not a mean of site AUCs. The operating point is chosen
on the pooled ROC. The gate promotes a candidate only when its pooled AUC beats the champion's, on the same
sites, by more than ``z`` Hanley–McNeil standard errors of the champion's pooled AUC: a margin that shrinks as
the hospitals' validation data grows, instead of a fixed one that a small set overfits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import ValidationError

from medvec.answers import EvalAnswer, EvalRequest, answer_problems
from medvec.histograms import Reading, ScoreHistograms
from medvec.record import Rejection
from medvec.store import VectorStore
from medvec.vectors.signing import DocumentRejected, Keyring


@dataclass(frozen=True)
class Pooled:
    """One candidate's metrics over ``sites``."""

    candidate: str
    sites: tuple[str, ...]
    n: int
    auc: float
    auc_se: float
    loss: float  # mean loss per image
    threshold: float | None = None  # binary tasks: the pooled operating point
    op: dict | None = None
    per_site_auc: dict[str, float] = field(default_factory=dict)
    per_site_se: dict[str, float] = field(default_factory=dict)  # each site's Hanley–McNeil SE

    def to_json(self) -> dict:
        """The metrics as JSON-ready data (for the merge record)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def pool(
    answers: list[EvalAnswer],
    candidate: str,
    rule: str = "youden",
    target: float = 0.9,
    sites: list[str] | None = None,
    reading: Reading = "ends",
    site_reading: Reading = "maxent",
) -> Pooled:
    """``candidate``'s metrics over the answers of ``sites`` (default: every answer that scored it), each group of
    bins read by ``reading`` (:meth:`medvec.histograms.ScoreReport.histograms`), and each site's own AUC and SE
    with its groups read by ``site_reading``."""
    chosen = [a for a in answers if candidate in a.candidates and (sites is None or a.hospital in sites)]
    if not chosen:
        raise ValueError(f"no answer scored candidate {candidate}")
    task = chosen[0].task
    reports = [a.candidates[candidate].report() for a in chosen]
    histograms = [r.histograms(reading) for r in reports]
    total: ScoreHistograms = sum(histograms[1:], histograms[0])
    n = sum(a.candidates[candidate].n for a in chosen)
    loss = sum(a.candidates[candidate].loss_sum for a in chosen) / n if n else math.nan
    threshold = op = None
    if total.counts.shape[0] == 1 and task != "multilabel":
        threshold = total.threshold(rule, target)
        op = total.at_threshold(threshold)
    own = histograms if site_reading == reading else [r.histograms(site_reading) for r in reports]
    per_site = {a.hospital: h.auc(task) for a, h in zip(chosen, own, strict=True)}
    per_site_se = {a.hospital: h.auc_se(task) for a, h in zip(chosen, own, strict=True)}
    return Pooled(
        candidate,
        tuple(a.hospital for a in chosen),
        n,
        total.auc(task),
        total.auc_se(task),
        loss,
        threshold,
        op,
        per_site,
        per_site_se,
    )


def both_scored(answers: list[EvalAnswer], a: str, b: str) -> list[str]:
    """The sites whose answers scored both ``a`` and ``b``."""
    return sorted(x.hospital for x in answers if a in x.candidates and b in x.candidates)


def gate(
    answers: list[EvalAnswer], candidate: str, champion: str, z: float = 1.0, reading: Reading = "ends"
) -> tuple[bool, str]:
    """Whether ``candidate`` beats ``champion`` on the sites that scored both, by more than ``z`` Hanley–McNeil
    standard errors of the champion's pooled AUC; and the reason."""
    sites = both_scored(answers, candidate, champion)
    if not sites:
        return False, f"no site scored both {candidate} and {champion}"
    new, old = (pool(answers, name, sites=sites, reading=reading) for name in (candidate, champion))
    margin = z * old.auc_se
    if math.isnan(new.auc) or math.isnan(margin):
        return False, f"pooled AUC undefined on {', '.join(sites)} (a class without images)"
    verdict = "beats" if new.auc > old.auc + margin else "does not beat"
    reason = (
        f"pooled val auc {new.auc:.4f} {verdict} the champion's {old.auc:.4f} + {z:g} SE ({margin:.4f}) "
        f"on {len(sites)} sites ({', '.join(sites)}; {new.n} images)"
    )
    return new.auc > old.auc + margin, reason


@dataclass(frozen=True)
class Collected:
    """The answers to one request that verified and fit it, and those rejected (kept in quarantine)."""

    answers: list[EvalAnswer]
    rejected: list[Rejection]

    @property
    def sites(self) -> list[str]:
        """The hospitals whose answers count."""
        return sorted(a.hospital for a in self.answers)


def collect(store: VectorStore, request: EvalRequest, keyring: Keyring) -> Collected:
    """Every answer stored for ``request``: verified with the keyring's key of the hospital its store key names,
    then checked against the request. A rejected answer moves to quarantine with its reason."""
    answers, rejected = [], []
    for hospital, stored in sorted(store.answer_envelopes(request.request_id).items()):
        problem = None
        try:
            doc = keyring.open_document(hospital, store.answer_key(request.request_id, hospital), stored)
            answer = EvalAnswer.model_validate(doc)
        except DocumentRejected as exc:
            problem = (exc.check, str(exc))
        except ValidationError as exc:
            problem = ("format", f"not an evaluation answer: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}")
        else:
            if answer.hospital != hospital:
                problem = ("impersonation", f"stored as {hospital}'s answer but names hospital {answer.hospital!r}")
            elif found := answer_problems(answer, request):
                problem = ("answer", "; ".join(found))
        if problem is None:
            answers.append(answer)
        else:
            rejected.append(store.quarantine_answer(request.request_id, hospital, *problem))
    return Collected(answers, rejected)


__all__ = ["Collected", "Pooled", "both_scored", "collect", "gate", "pool"]
