"""Who scores the coordinator's candidates (issue 25): its own held-out set, or the hospitals.

A :class:`HospitalJudge` never sees an image. For each batch of candidates (every λ and BN strategy of a scan,
the candidate and the champion of a gate, the merges of a contribution score) it asks the hospitals once,
through an :data:`Ask` (the store and the hospitals' ``hospital-evaluate`` flows in a network,
:class:`StoreAsk`; their local splits in process in the demo), waits up to ``evaluate.timeout_s``, and pools
the answers (:mod:`medvec.coordinator.pooled`): the pooled AUC from the summed histograms, the operating point
on the pooled ROC, the mean loss, and each site's AUC. Every round is kept as an
:class:`~medvec.record.EvalRound`: who answered, who was absent, which answers were rejected and why, and the
content hash of each answer, so the merge record shows what its choice rested on.

The gate reads the candidate and the champion from one request, so both are scored by the same sites, and
promotes only when the pooled AUC beats the champion's by ``evaluate.gate_z`` Hanley–McNeil standard errors.
A caller that knows the champion before the scan puts it ``beside`` the scan's candidates: the gate then reads
the scan round that scored the chosen candidate, and asks no round of its own.
A round that misses ``evaluate.quorum`` does not stop the merge: it is stored, not promoted, and the reason
says which quorum was missed. A site that did not answer one round within the timeout is still asked in the
merge's later rounds but not waited for, so a worker that is down delays a merge by one timeout, not one per
round.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from medvec.answers import EvalAnswer, EvalRequest
from medvec.config import ConfigError, EvaluateConfig, Params
from medvec.coordinator.intake import Admission
from medvec.coordinator.pooled import Pooled, collect, gate, pool
from medvec.histograms import Grid
from medvec.models import Base, state_sha256
from medvec.record import EvalRound, EvalSetRef, Evaluation, Rejection
from medvec.store import VectorStore
from medvec.vectors.signing import Keyring
from medvec.vectors.vector import VectorLike


@dataclass(frozen=True)
class Asked:
    """What one request brought back: the usable answers and the rejected ones."""

    request_id: str
    answers: list[EvalAnswer]
    rejected: list[Rejection] = field(default_factory=list)
    waited_s: float = 0.0


Ask = Callable[[Mapping[str, Base], Grid, int, list[str]], Asked]
"""Ask the hospitals to score the named candidates on a score grid with a minimum count per cell, waiting for
the listed hospitals (the others may answer, but are not waited for); their answers."""


def metrics_of(p: Pooled) -> dict:
    """A pooled candidate's metrics in the shape the coordinator's code reads (``auc``, ``threshold``, ...): the
    pooled AUC with its Hanley–McNeil SE, mean loss, images, sites and each site's AUC; binary tasks also get the
    operating point chosen on the pooled ROC (``threshold``) and its validation figures (``op_val``)."""
    out: dict = {"auc": p.auc, "auc_se": p.auc_se, "loss": p.loss, "n": p.n, "sites": list(p.sites)}
    out["per_site_auc"], out["per_site_se"] = dict(p.per_site_auc), dict(p.per_site_se)
    if p.threshold is not None:
        out["threshold"] = p.threshold
    if p.op is not None:
        out["op_val"] = dict(p.op)
    return out


@dataclass
class HospitalJudge:
    """Scores candidates with the hospitals' answers; keeps every round for the merge record."""

    ask: Ask
    template: Base  # the architecture, spec and classes every candidate shares
    hospitals: list[str]  # the sites asked: the quorum is a share of them
    config: EvaluateConfig
    weights: Mapping[str, int] = field(default_factory=dict)  # quorum_by samples: each site's weight
    rounds: list[EvalRound] = field(default_factory=list)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)  # model → site → AUC
    matrix_se: dict[str, dict[str, float]] = field(default_factory=dict)  # model → site → its SE
    vote_z: float = 1.0  # below chance: AUC + vote_z·SE < 0.5 at the site
    beside: dict[str, nn.Module] = field(default_factory=dict)  # asked beside every scan round (the champion)
    scored: list[tuple[dict[str, str], Asked]] = field(default_factory=list)  # per round: model sha256 → its key

    def validate(self, models: Mapping[str, nn.Module], purpose: str = "scan") -> dict[str, dict]:
        """Each named model's pooled validation metrics (one request for all of them). A ``matrix`` round
        (each input hospital's own model, named by hospital) also fills the cross-site matrix."""
        names = {f"c{i}": name for i, name in enumerate(models)}
        asked = self._round({c: models[name] for c, name in names.items()}, purpose)
        out = {name: self._metrics(asked.answers, c) for c, name in names.items()}
        if purpose == "matrix":
            for name, m in out.items():
                self._into_matrix(name, m)
        return out

    def gate(self, candidate: nn.Module, champion: nn.Module, champion_name: str = "the champion") -> tuple[bool, str]:
        """Whether ``candidate`` beats ``champion`` on the sites that scored both; the reason. Both models'
        per-site AUCs join the matrix (``merged``, ``champion``)."""
        found = self.answered_together(candidate, champion)
        if found is None:
            found = (self._round({"candidate": candidate, "champion": champion}, "gate"), "candidate", "champion")
        asked, new, old = found
        for name, c in (("merged", new), ("champion", old)):
            self._into_matrix(name, self._metrics(asked.answers, c))
        missed = [r for r in self.rounds if not r.quorum_met]
        if missed:
            return False, f"not promoted: {missed[0].purpose} round {missed[0].request_id}: {missed[0].quorum}"
        promote, reason = gate(asked.answers, new, old, self.config.gate_z, self.config.reading)
        return promote, reason.replace("the champion's", f"{champion_name}'s") + f"; round {asked.request_id}"

    def answered_together(self, a: nn.Module, b: nn.Module) -> tuple[Asked, str, str] | None:
        """The latest round that scored both models (by their weights' sha256), with their keys in it."""
        sha_a, sha_b = state_sha256(a.state_dict()), state_sha256(b.state_dict())
        for keys, asked in reversed(self.scored):
            if sha_a in keys and sha_b in keys:
                return asked, keys[sha_a], keys[sha_b]
        return None

    def fresh(self) -> HospitalJudge:
        """The same hospitals and settings, with no rounds and no matrix yet."""
        return HospitalJudge(self.ask, self.template, self.hospitals, self.config, self.weights, vote_z=self.vote_z)

    def evaluation(self) -> Evaluation:
        """Every round so far, the cross-site matrix and the below-chance vote, for the merge record."""
        matrix = _rounded(self.matrix)
        se = _rounded(self.matrix_se)
        flagged = below_chance(matrix, [h for h in self.hospitals if h in matrix], se, self.vote_z)
        return Evaluation(where="hospitals", rounds=tuple(self.rounds), matrix=matrix, matrix_se=se, flagged=flagged)

    def _into_matrix(self, name: str, metrics: dict) -> None:
        """One model's row of the matrix: the sites where its AUC is defined (a withheld class leaves it out)."""
        auc, se = metrics.get("per_site_auc", {}), metrics.get("per_site_se", {})
        self.matrix[name] = {s: a for s, a in auc.items() if math.isfinite(a)}
        self.matrix_se[name] = {s: se[s] for s in self.matrix[name] if s in se and math.isfinite(se[s])}

    def ref(self) -> EvalSetRef:
        """The identity of what scored the merge: the answering sites' validation splits, by hash."""
        splits = {h: sha for r in self.rounds for h, sha in r.splits.items()}
        n = max((r.n for r in self.rounds), default=0)
        sha = hashlib.sha256(repr(sorted(splits.items())).encode()).hexdigest()
        return EvalSetRef(source=f"hospitals {','.join(sorted(splits))}", split="val", size=n, sha256=sha)

    def _metrics(self, answers: list[EvalAnswer], candidate: str) -> dict:
        try:
            c = self.config
            p = pool(answers, candidate, c.threshold, c.target_sensitivity, None, c.reading, c.site_reading)
        except ValueError:  # nobody answered
            return {"auc": math.nan, "n": 0, "sites": []}
        return metrics_of(p)

    def _round(self, models: Mapping[str, nn.Module], purpose: str) -> Asked:
        candidates = {c: self.template.with_model(m, state_sha256(m.state_dict())) for c, m in models.items()}
        if purpose == "scan":  # the champion beside the candidates: the gate reads this round
            known = {c.sha256 for c in candidates.values()}
            for i, m in enumerate(self.beside.values()):
                found = self.template.with_model(m, state_sha256(m.state_dict()))
                if found.sha256 not in known:
                    candidates[f"beside{i}"] = found
        missed = {h for r in self.rounds for h in r.absent}  # a site absent once is not waited for again
        wait_for = [h for h in self.hospitals if h not in missed]
        asked = self.ask(candidates, Grid(self.config.bins), self.config.min_count, wait_for)
        self.rounds.append(self._record(asked, purpose, len(candidates)))
        self.scored.append(({c.sha256: key for key, c in candidates.items()}, asked))
        return asked

    def _record(self, asked: Asked, purpose: str, candidates: int) -> EvalRound:
        answered = sorted(a.hospital for a in asked.answers)
        met, words = quorum(answered, self.hospitals, self.config, self.weights)
        return EvalRound(
            request_id=asked.request_id,
            purpose=purpose,
            candidates=candidates,
            answered=tuple(answered),
            absent=tuple(h for h in sorted(self.hospitals) if h not in answered),
            rejected=tuple(asked.rejected),
            answer_sha256={a.hospital: a.sha256() for a in asked.answers},
            splits={a.hospital: a.split_sha256 for a in asked.answers},
            n=sum(a.split_n for a in asked.answers),
            quorum_met=met,
            quorum=words,
            waited_s=round(asked.waited_s, 3),
        )


def _rounded(matrix: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {m: {s: round(a, 6) for s, a in sites.items()} for m, sites in matrix.items()}


def below_chance(
    matrix: Mapping[str, Mapping[str, float]],
    inputs: list[str],
    se: Mapping[str, Mapping[str, float]] | None = None,
    z: float = 0.0,
) -> dict[str, str]:
    """The data-free poisoning vote: a hospital whose own model scores below chance at more than half of the
    other sites that scored it is flagged, with the figures; below chance at a site means AUC + z·SE < 0.5 (the
    site's Hanley–McNeil SE), so a near-random model from a tiny honest site is not taken for an attack. A
    label-flipped vector ranks the others' patients backwards; an honest one, however skewed, rarely does."""
    flagged = {}
    for h in inputs:
        others = {s: a for s, a in matrix.get(h, {}).items() if s != h and math.isfinite(a)}
        margin = {s: z * (se or {}).get(h, {}).get(s, 0.0) for s in others}
        below = sorted(s for s, a in others.items() if a + (margin[s] if math.isfinite(margin[s]) else 0.0) < 0.5)
        if others and len(below) > len(others) / 2:
            figures = ", ".join(f"{s} {others[s]:.3f}" for s in sorted(others))
            flagged[h] = f"its own model scores below chance at {len(below)} of {len(others)} other sites ({figures})"
    return flagged


def voted_out(
    vectors: Sequence[VectorLike], flagged: Mapping[str, str], mode: str
) -> tuple[list[VectorLike], list[tuple[VectorLike, str]]]:
    """The vectors to merge and those the vote keeps out (``intake.vote: exclude``), each with its reason; a
    vector is named in the matrix by its hospital, or by its id when its hospital sent more than one."""
    if mode != "exclude" or not flagged:
        return list(vectors), []
    kept, out = [], []
    for v in vectors:
        reason = flagged.get(v.meta.vector_id) or flagged.get(v.meta.hospital)
        if reason is None:
            kept.append(v)
        else:
            out.append((v, f"below-chance vote: {reason}"))
    return kept, out


def quorum(
    answered: list[str], hospitals: list[str], config: EvaluateConfig, weights: Mapping[str, int]
) -> tuple[bool, str]:
    """Whether the answering sites reach ``evaluate.quorum`` of ``hospitals`` (by count, or weighted by each
    site's training images); the verdict in words."""
    if config.quorum_by == "samples":
        total = sum(weights.get(h, 0) for h in hospitals)
        got = sum(weights.get(h, 0) for h in answered if h in hospitals)
        share, unit = (got / total if total else 0.0), f"{got} of {total} training images"
    else:
        got = len([h for h in answered if h in hospitals])
        share, unit = (got / len(hospitals) if hospitals else 0.0), f"{got} of {len(hospitals)} sites"
    met = share >= config.quorum
    return met, f"quorum {config.quorum:g} by {config.quorum_by} {'met' if met else 'missed'}: {unit} answered"


@dataclass
class StoreAsk:
    """Ask through the store: publish the candidates and the (signed) request, start the hospitals' flows, wait
    until every site answered or ``timeout_s`` passed, then collect the answers that verify with the keyring."""

    store: VectorStore
    keyring: Keyring
    base_sha256: str  # the network's base: every candidate is a model of it
    hospitals: list[str]
    timeout_s: float
    start: Callable[[str, list[str]], None] | None = None  # (request id, hospitals): runs their flows
    poll_s: float = 1.0

    def __call__(self, candidates: Mapping[str, Base], grid: Grid, min_count: int, wait_for: list[str]) -> Asked:
        """Publish, start every hospital's flow, wait for ``wait_for`` (at most ``timeout_s``), collect."""
        request = self.store.put_request(self.base_sha256, dict(candidates), min_count, grid.bins)
        began = time.monotonic()
        if self.start is not None:
            self.start(request.request_id, self.hospitals)
        while time.monotonic() - began < self.timeout_s and not self._all_in(request, wait_for):
            time.sleep(self.poll_s)
        collected = collect(self.store, request, self.keyring)
        return Asked(request.request_id, collected.answers, collected.rejected, time.monotonic() - began)

    def _all_in(self, request: EvalRequest, wait_for: list[str]) -> bool:
        return set(wait_for) <= set(self.store.answered(request.request_id))


def keyring_path(params: Params) -> str:
    """``intake.keyring``, which a network whose hospitals score (``evaluate.where: hospitals``) needs: they sign
    their answers. A ConfigError in one line without it (``coordinator up`` asks before anything is published)."""
    if not params.intake.keyring:
        raise ConfigError(
            "evaluate.where: hospitals (the default) needs intake.keyring: the hospitals sign their answers "
            "(medvec keyring add); or set evaluate.where: coordinator with a coordinator.eval_data"
        )
    return params.intake.keyring


def hospitals_judge(
    store: VectorStore,
    base: Base,
    params: Params,
    admission: Admission,
    start: Callable[[str, list[str]], None] | None,
) -> HospitalJudge:
    """The judge of a network: the hospitals of ``intake.keyring`` (their answers are signed), asked through
    ``store``; ``start`` runs their ``hospital-evaluate`` flows. Each site weighs (``quorum_by: samples``) as
    many training images as its newest admitted vector reports."""
    keyring = Keyring.load(keyring_path(params))
    hospitals = sorted(keyring.keys)
    weights = {v.meta.hospital: v.meta.n_train for v in admission.admitted}
    ask = StoreAsk(store, keyring, base.sha256, hospitals, params.evaluate.timeout_s, start)
    return HospitalJudge(ask, base, hospitals, params.evaluate, weights, vote_z=params.intake.vote_z)


__all__ = [
    "Ask",
    "Asked",
    "HospitalJudge",
    "StoreAsk",
    "below_chance",
    "hospitals_judge",
    "keyring_path",
    "metrics_of",
    "quorum",
    "voted_out",
]
