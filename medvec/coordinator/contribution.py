"""What each vector contributed to a merge, and the harmful-vector rule built on it.

The value of a subset S of a merge's inputs, v(S), is the validation metric
(``evaluate.select_metric``) of the merge of S made exactly as the merge itself
was made: the same method and λ (an async step: the same η, its weights
renormalized over S), the same BN strategy with statistics from S alone, the
same evaluation (:func:`medvec.coordinator.engine.apply_delta`,
:func:`medvec.evaluate.evaluate_model`).  v(∅) is the start model (θ_pre, or the
champion an async step starts from).

- **Leave-one-out** (``contribution.method: loo``, K extra merges):
  ``loo_i = v(all) − v(all without i)``, so a positive score means the vector
  helped.  Its standard error comes from a paired bootstrap over the
  validation images (both models scored on the same resample).
- **Shapley** (``shapley``, K ≤ ``contribution.max_vectors``): the mean of
  ``v(P ∪ {i}) − v(P)`` over join orders, P the vectors before i.  When every
  subset fits the budget (``contribution.budget`` extra merges) every order is
  used and the value is exact; otherwise orders are sampled (seeded) until the
  budget is spent, with the standard error of the mean.

The harmful rule (``intake.harmful``): a vector whose ``loo`` is below both
``−intake.harm_min`` and ``−intake.harm_z`` × its standard error made the merge
significantly worse.  ``flag`` records it; ``exclude`` also moves it to
quarantine with that reason and merges again without it.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from medvec.config import IntakeConfig, Params
from medvec.coordinator.engine import (
    BnPlan,
    HospitalMoments,
    MergeOutcome,
    MomentsFn,
    apply_delta,
    merge_once,
    moments_source,
)
from medvec.coordinator.methods import get_method, merge_delta
from medvec.coordinator.scoring import EvalSets, score
from medvec.data.images import ImageSet
from medvec.evaluate import md_inert, metric_value
from medvec.models import Base
from medvec.record import Contributions, ContributionScore
from medvec.timing import timed
from medvec.vectors.vector import DataVector, VectorLike

Members = frozenset[int]


def subset_delta(vectors: Sequence, outcome: MergeOutcome, params: Params) -> DataVector:
    """The merged delta of ``vectors`` as ``outcome``'s merge made it (an async step renormalizes its weights)."""
    if outcome.step_weights is not None:  # an async step: w·s(staleness)/Σw over this subset
        from medvec.coordinator.weights import weighted_step
        from medvec.vectors.file import weighted_sum

        first = outcome.step_weights[0]
        if params.refine.weighting == "network":  # a share of the network's samples: the same with or without others
            recorded = {w.vector_id: w.weight for w in outcome.step_weights}
            delta = weighted_sum(vectors, [recorded[v.meta.vector_id] for v in vectors], fused=False)
        else:
            delta = weighted_step(vectors, first.start_version + first.staleness, params.refine)[1]
        return outcome.server.direction(delta, keep=False) if outcome.server is not None else delta
    return merge_delta(vectors, get_method(outcome.method, params.merge))


@dataclass
class Game:
    """v(S) for subsets of one merge's inputs, each merge evaluated once (cached by subset)."""

    start: Base
    vectors: list
    outcome: MergeOutcome
    params: Params
    evalsets: EvalSets
    calibration: ImageSet | None = None
    moments_fn: MomentsFn | None = None
    cache: dict[Members, dict] = field(default_factory=dict)
    bar: tqdm | None = None

    @property
    def k(self) -> int:
        """K, the number of vectors the merge took."""
        return len(self.vectors)

    @property
    def metric(self) -> str:
        """The validation metric v(S) is read from (``evaluate.select_metric``)."""
        return self.params.evaluate.select_metric

    def metrics(self, members: Members) -> dict:
        """The validation metrics of the merge of ``members`` (the start model for none), evaluated once and cached."""
        if members not in self.cache:
            self.cache[members] = self._evaluate(members)
            if self.bar is not None:
                self.bar.update(1)
        return self.cache[members]

    @property
    def merges(self) -> int:
        """Extra merges evaluated so far: subsets other than all inputs (the merge itself) and none (the start)."""
        return sum(0 < len(m) < self.k for m in self.cache)

    def value(self, members: Members) -> float:
        """v(S); a metric that is undefined (a model whose outputs are not finite) counts as 0, the worst value."""
        v = score(self.metrics(members), self.metric)
        return v if math.isfinite(v) else 0.0

    def prefetch(self, subsets: Sequence[Members]) -> None:
        """With the hospitals scoring (``evaluate.where: hospitals``), the merges of every uncached subset in one
        request instead of one each; on the coordinator's set nothing (each is scored when first asked for)."""
        todo = [m for m in dict.fromkeys(subsets) if m not in self.cache]
        if self.evalsets.judge is None or not todo:
            return
        models = {str(i): self._model(m) for i, m in enumerate(todo)}
        scored = self.evalsets.validate(models, self.start.spec, self.params.evaluate.batch_size, "contribution")
        for i, members in enumerate(todo):
            self.cache[members] = scored[str(i)]
            if self.bar is not None:
                self.bar.update(1)

    def _model(self, members: Members) -> nn.Module:
        """The merge of ``members`` as the outcome's merge made it (the start model for none)."""
        if not members:
            return self.start.model
        subset = [self.vectors[i] for i in sorted(members)]
        tau = subset_delta(subset, self.outcome, self.params)
        model, _ = apply_delta(
            self.start, tau, self.outcome.lam, self.outcome.bn.strategy, subset, self._moments(subset)
        )
        return model

    def _evaluate(self, members: Members) -> dict:
        model = self._model(members)
        return self.evalsets.validate_one(model, self.start.spec, self.params.evaluate.batch_size, "contribution")

    def _moments(self, subset: list) -> MomentsFn | None:
        """BN moment sums from the subset's hospitals only (live answers, their stored sums, or the calibration set)."""
        bn: BnPlan = self.outcome.bn
        if bn.strategy != "recompute":
            return None
        if isinstance(self.moments_fn, HospitalMoments):  # ask only the subset's hospitals
            return self.moments_fn.only([v.meta.hospital for v in subset])
        if self.moments_fn is not None:
            return self.moments_fn
        return moments_source(subset, bn, self.start, self.calibration, self.params.batchnorm.batch_size)


def paired_se(a: dict, b: dict, metric: str, resamples: int, seed: int) -> float | None:
    """Standard error of metric(a) − metric(b) by a paired bootstrap over the same images (an AUC of the log-odds
    where both kept them); None without resamples."""
    if resamples < 2 or "proba" not in a or "proba" not in b:
        return None
    y, pa, pb = np.asarray(a["labels"]), a["proba"], b["proba"]
    ra, rb = (a["log_odds"], b["log_odds"]) if "log_odds" in a and "log_odds" in b else (None, None)
    y = y if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1)  # multi-label rows stay rows
    idx = np.random.default_rng(seed).integers(0, len(y), (resamples, len(y)))
    if metric == "auc" and pa.shape[1] == 2 and y.ndim == 1:
        sa, sb = (ra, rb) if ra is not None and rb is not None else (pa, pb)
        diffs = _binary_auc(y, sa[:, 1], idx) - _binary_auc(y, sb[:, 1], idx)
    else:

        def resampled(p: np.ndarray, r: np.ndarray | None, i: np.ndarray) -> float:
            return metric_value(y[i], p[i], metric, None if r is None else r[i])

        diffs = np.array([resampled(pa, ra, i) - resampled(pb, rb, i) for i in idx])
    diffs = diffs[np.isfinite(diffs)]
    return float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None


def _binary_auc(y: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC of every resample (rows of ``idx``) at once, by the rank-sum formula (ties get average ranks)."""
    from scipy.stats import rankdata

    ys, ranks = y[idx] == 1, rankdata(scores[idx], axis=1)
    pos = ys.sum(1)
    neg = ys.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * ys).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def unpaired_se(a: dict, b: dict) -> float | None:
    """√(SE_a² + SE_b²) of two pooled AUCs (the hospitals' answers carry no image to resample): larger than the
    paired bootstrap's, so the harmful rule errs toward keeping a vector. None when either has no SE."""
    if a.get("auc_se") is None or b.get("auc_se") is None:
        return None
    se = math.hypot(a["auc_se"], b["auc_se"])
    return se if math.isfinite(se) else None


def leave_one_out(game: Game) -> list[tuple[float, float | None]]:
    """(v(all) − v(all without i), its paired-bootstrap standard error, or with the hospitals scoring the
    unpaired one of their pooled AUCs) per vector."""
    c = game.params.contribution
    everyone = frozenset(range(game.k))
    game.prefetch([everyone, frozenset(), *(everyone - {i} for i in range(game.k))])  # v(∅): value_none
    full = game.metrics(everyone)
    out = []
    for i in range(game.k):
        without = game.metrics(everyone - {i})
        se = paired_se(full, without, game.metric, c.bootstrap, c.seed + i)
        if se is None:  # the hospitals scored: no image to resample
            se = unpaired_se(full, without)
        out.append((game.value(everyone) - game.value(everyone - {i}), se))
    return out


def _marginals(game: Game, order: Sequence[int]) -> dict[int, float]:
    """Each vector's marginal gain v(P ∪ {i}) − v(P) along one join order."""
    out: dict[int, float] = {}
    before, members = game.value(frozenset()), frozenset[int]()
    for i in order:
        members = members | {i}
        after = game.value(members)
        out[i], before = after - before, after
    return out


def _sampled_orders(game: Game, until: int, seed: int, cap: int = 10_000):
    """Seeded random join orders until ``until`` extra merges are evaluated (at most ``cap`` orders)."""
    rng = random.Random(seed)
    for _ in range(cap):
        if game.merges >= until:
            return
        yield rng.sample(range(game.k), game.k)


def shapley(game: Game) -> tuple[list[float], list[float | None], int, bool]:
    """(values, standard errors, join orders used, exact) within ``contribution.budget`` extra merges."""
    c, k = game.params.contribution, game.k
    exact = 2**k - 2 - game.merges <= c.budget
    orders = itertools.permutations(range(k)) if exact else _sampled_orders(game, game.merges + c.budget, c.seed)
    if exact:  # every subset is needed: one request when the hospitals score
        game.prefetch([frozenset(s) for r in range(k + 1) for s in itertools.combinations(range(k), r)])
    gains: dict[int, list[float]] = {i: [] for i in range(k)}
    for order in orders:
        for i, g in _marginals(game, order).items():
            gains[i].append(g)
    n = len(gains[0])
    values = [statistics.fmean(gains[i]) for i in range(k)]
    errors = [0.0 if exact else statistics.stdev(gains[i]) / math.sqrt(n) if n > 1 else None for i in range(k)]
    return values, errors, n, exact


def harmful_reason(s: ContributionScore, cfg: IntakeConfig, metric: str) -> str | None:
    """Why ``s`` made the merge significantly worse, or None (``intake.harm_min`` and ``intake.harm_z``)."""
    if s.loo >= -cfg.harm_min:
        return None
    if s.loo_se is not None and s.loo > -cfg.harm_z * s.loo_se:
        return None
    se = f" ± {s.loo_se:.4f}" if s.loo_se is not None else ""
    return (
        f"harmful: the merge's validation {metric} is {-s.loo:.4f}{se} higher without it "
        f"(beyond harm_min {cfg.harm_min} and {cfg.harm_z} standard errors)"
    )


@timed("contribution")
def score_merge(
    start: Base,
    vectors: Sequence,
    outcome: MergeOutcome,
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
    moments_fn: MomentsFn | None = None,
    progress: bool = False,
    start_val: dict | None = None,
) -> Contributions | None:
    """Contribution scores of ``outcome``'s inputs; None when ``contribution.method`` and ``intake.harmful`` are off.

    ``start_val``: the start model's validation metrics when the caller has them already (v(∅), not evaluated again).
    """
    c = params.contribution
    if (c.method == "off" and params.intake.harmful == "off") or not vectors:
        return None
    t0 = time.perf_counter()
    game = Game(start, list(vectors), outcome, params, evalsets, calibration, moments_fn)
    game.cache[frozenset(range(game.k))] = outcome.val  # the merge itself, already evaluated
    if start_val is not None:
        game.cache[frozenset()] = start_val
    with tqdm(desc="contribution merges", disable=not progress, leave=False) as game.bar:
        loo = leave_one_out(game)
        sv = shapley(game) if c.method == "shapley" and game.k <= c.max_vectors else None
    scores = []
    for i, v in enumerate(vectors):
        s = ContributionScore(
            vector_id=v.meta.vector_id,
            hospital=v.meta.hospital,
            loo=loo[i][0],
            loo_se=loo[i][1],
            shapley=sv[0][i] if sv else None,
            shapley_se=sv[1][i] if sv else None,
        )
        if params.intake.harmful != "off":
            s = s.model_copy(update={"harmful": harmful_reason(s, params.intake, game.metric)})
        scores.append(s)
    return Contributions(
        method="shapley" if sv else "loo",
        metric=game.metric,
        value_all=game.value(frozenset(range(game.k))),
        value_none=game.value(frozenset()),
        merges=game.merges,
        permutations=sv[2] if sv else 0,
        exact=bool(sv and sv[3]),
        seconds=round(time.perf_counter() - t0, 2),
        scores=tuple(scores),
    )


@dataclass
class Guarded:
    """A scored merge after the harmful rule: the outcome, the vectors in it, and those excluded with their scores."""

    outcome: MergeOutcome
    vectors: list[VectorLike]
    excluded: list[tuple[VectorLike, ContributionScore]] = field(default_factory=list)


def guarded_merge(
    merge: Callable[[list], MergeOutcome],
    score_fn: Callable[[list, MergeOutcome], Contributions | None],
    vectors: Sequence,
    cfg: IntakeConfig,
) -> Guarded:
    """Merge and score; with ``intake.harmful: exclude``, merge and score again without the harmful vectors.

    At least one vector always stays (a merge of nothing is no merge); the caller quarantines ``excluded``.
    """
    vectors = list(vectors)
    outcome = merge(vectors)
    outcome.scores = score_fn(vectors, outcome)
    if cfg.harmful != "exclude" or outcome.scores is None:
        return Guarded(outcome, vectors)
    bad = {s.vector_id: s for s in outcome.scores.scores if s.harmful}
    kept = [v for v in vectors if v.meta.vector_id not in bad]
    if not bad or not kept:
        return Guarded(outcome, vectors)
    excluded = [(v, bad[v.meta.vector_id]) for v in vectors if v.meta.vector_id in bad]
    again = merge(kept)
    scores = score_fn(kept, again)
    again.scores = scores.model_copy(update={"excluded": tuple(s for _, s in excluded)}) if scores else None
    return Guarded(again, kept, excluded)


def scored_merge_once(
    base: Base,
    vectors: Sequence,
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
) -> Guarded:
    """One production merge (:func:`medvec.coordinator.engine.merge_once`), scored, under ``intake.harmful``."""
    return guarded_merge(
        lambda vs: merge_once(base, vs, params, evalsets, calibration),
        lambda vs, o: score_merge(base, vs, o, params, evalsets, calibration),
        vectors,
        params.intake,
    )


def table_rows(scores: Contributions, hospitals: set[str] | None = None) -> list[dict]:
    """One row per scored vector (``hospitals``: only theirs), excluded ones last: what reports and MLflow show."""
    excluded = {s.vector_id for s in scores.excluded}
    return [
        {
            "hospital": s.hospital,
            "vector_id": s.vector_id,
            "loo": s.loo,
            "loo_se": s.loo_se,
            "shapley": s.shapley,
            "shapley_se": s.shapley_se,
            "verdict": "excluded" if s.vector_id in excluded else "harmful" if s.harmful else "ok",
            "reason": s.harmful or "",
        }
        for s in (*scores.scores, *scores.excluded)
        if hospitals is None or s.hospital in hospitals
    ]


def markdown(scores: Contributions, hospitals: set[str] | None = None) -> list[str]:
    """The contribution table as markdown lines (``hospitals``: only their rows)."""
    how = "exact" if scores.exact else f"{scores.permutations} sampled orders" if scores.permutations else ""
    lines = [
        f"validation {scores.metric}: all inputs {scores.value_all:.4f}, start model {scores.value_none:.4f}; "
        f"{scores.merges} extra merges, {scores.seconds:.1f} s" + (f"; Shapley {how}" if how else ""),
        "",
        "| hospital | vector | leave-one-out | Shapley | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in table_rows(scores, hospitals):
        loo = f"{r['loo']:+.4f}{_pm(r['loo_se'])}"
        sv = f"{r['shapley']:+.4f}{_pm(r['shapley_se'])}" if r["shapley"] is not None else "–"
        lines.append(f"| {md_inert(r['hospital'])} | `{r['vector_id']}` | {loo} | {sv} | {r['verdict']} |")
    return lines


def score_text(s: dict, reasons: bool = True) -> str:
    """One vector's scores on one line: leave-one-out ± SE, Shapley ± SE, and the harmful rule's verdict."""
    out = f"leave-one-out {s['loo']:+.4f}{_pm(s.get('loo_se'))}"
    if s.get("shapley") is not None:
        out += f"  Shapley {s['shapley']:+.4f}{_pm(s.get('shapley_se'))}"
    if not s.get("in_merge", True):
        out += "  EXCLUDED"
    if s.get("harmful"):
        out += f"  ({s['harmful']})" if reasons else "  HARMFUL"
    return out


def _pm(se: float | None) -> str:
    return f" ± {se:.4f}" if se is not None else ""
