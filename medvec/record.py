"""Typed records of what the coordinator did: the merge record and its parts.

A :class:`MergeRecord` holds everything one merge used, so that any merge can be
replayed bit for bit (``medvec lineage NAME@ALIAS --rebuild``): the base, the
input vectors by id and content hash, the method and λ, the batch-norm strategy
*and* where its statistics came from, the key of the BN moment sums actually
used, the parameters, the data and the identity of the validation set that chose
λ.  It is built in one place, :meth:`MergeRecord.build`, and read by the store,
MLflow tracking, the DVC registry and the rebuild.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from medvec.config import Params
from medvec.timing import Started, utcnow

if TYPE_CHECKING:
    from medvec.data.images import ImageSet

BnStrategy = Literal["none", "average", "recompute"]
BnSource = Literal["base", "running", "hospitals", "calibration"]
"""``base``: θ_pre's statistics (strategy none); ``running``: the hospitals' running statistics (average);
``hospitals`` or ``calibration``: moment sums of the hospitals' data or of a coordinator calibration set (recompute)."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_json(self) -> dict:
        """The record as JSON-ready data (``lam`` written as ``lambda``)."""
        return self.model_dump(mode="json", by_alias=True)


class VectorRef(_Record):
    """One input vector of a merge, by id and content hash."""

    vector_id: str
    hospital: str
    content_sha256: str
    n_train: int = 0
    start_version: int = 0
    staleness: int = 0
    weight: float | None = Field(None, description="w·s(staleness)/Σw in an async step; None in a one-shot merge")
    epsilon: float | None = Field(None, description="the DP-SGD ε its hospital spent on it; None: no DP")
    label_counts: tuple[int, ...] = Field((), description="its training images per class (aggregates only)")

    @classmethod
    def of(cls, vector, contribution=None) -> "VectorRef":
        """The reference to ``vector``; an async step's ``contribution`` (a
        :class:`~medvec.coordinator.weights.StepWeight`) adds its staleness and weight, and a DP vector its ε."""
        extra = {}
        if contribution is not None:
            extra = {"staleness": contribution.staleness, "weight": contribution.weight}
        if vector.meta.privacy is not None:
            extra["epsilon"] = vector.meta.privacy.epsilon
        return cls(
            vector_id=vector.meta.vector_id,
            hospital=vector.meta.hospital,
            content_sha256=vector.content_sha256,
            n_train=int(vector.meta.n_train),
            start_version=int(vector.meta.start_version),
            label_counts=tuple(int(n) for n in vector.meta.label_counts),
            **extra,
        )


class StartPoint(_Record):
    """A model hospitals fine-tune from: version 0 is θ_pre, each promoted champion the next version."""

    version: int
    sha256: str
    merge_id: str | None = None
    parent_version: int | None = None
    promoted_at: str
    val: dict[str, float] = Field(default_factory=dict)


class ModelPointer(_Record):
    """The newest merged model of a base as hospitals see it: which merge, its weights and their sha256
    (``models/<base>/latest.json``), so that a hospital computes its BN moment sums under it without
    reading ``merges/``."""

    merge_id: str
    merged_sha256: str
    weights_key: str
    finished_at: str

    @classmethod
    def of(cls, record: MergeRecord) -> ModelPointer:
        """The pointer to ``record``'s stored weights."""
        if record.weights_key is None:
            raise ValueError(f"merge {record.merge_id} has no stored weights to point at")
        return cls(
            merge_id=record.merge_id,
            merged_sha256=record.merged_sha256,
            weights_key=record.weights_key,
            finished_at=record.finished_at,
        )


class EvalSetRef(_Record):
    """The identity of an evaluation set: where it came from, its size and a hash of its pixels and labels."""

    source: str
    split: str
    size: int
    sha256: str

    @classmethod
    def of(cls, data: ImageSet, source: str, split: str) -> EvalSetRef:
        """The identity of ``data``, the ``split`` read from ``source``."""
        return cls(source=str(source), split=split, size=len(data), sha256=data.sha256())

    def describe(self) -> str:
        """One line for reports: source, split, size and the first 12 hex digits of the hash."""
        return f"{self.source} {self.split} ({self.size} images, sha256 {self.sha256[:12]}…)"


class Rejection(_Record):
    """A vector (or sidecar) that intake refused, kept in quarantine with the reason."""

    check: str
    problem: str
    hospital_claimed: str
    time: str
    object: str


class EvalRound(_Record):
    """One evaluation request to the hospitals and who answered it (``evaluate.where: hospitals``)."""

    request_id: str
    purpose: str = Field(description="what it scored: scan (λ, method, BN), gate, contribution")
    candidates: int
    answered: tuple[str, ...]
    absent: tuple[str, ...]
    rejected: tuple[Rejection, ...] = ()
    answer_sha256: dict[str, str] = Field(default_factory=dict, description="hospital → its answer's content hash")
    splits: dict[str, str] = Field(default_factory=dict, description="hospital → its validation split's sha256")
    n: int = Field(0, description="validation images of the answering sites")
    quorum_met: bool
    quorum: str = Field(description="the quorum and whether it was met, in words")
    waited_s: float = 0.0


class Evaluation(_Record):
    """Who scored a merge's candidates: the coordinator's eval set, or the hospitals, round by round."""

    where: Literal["coordinator", "hospitals"] = "coordinator"
    rounds: tuple[EvalRound, ...] = ()
    matrix: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="model → site → AUC on that site's validation split: each input hospital's own model "
        "(by hospital), the merge (merged) and the champion it was gated against (champion)",
    )
    matrix_se: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="the matrix's Hanley–McNeil standard errors, model → site"
    )
    flagged: dict[str, str] = Field(
        default_factory=dict, description="hospital → why its own model looks poisoned (the below-chance vote)"
    )

    @property
    def quorum_met(self) -> bool:
        """Whether every round reached the quorum (always true on the coordinator's set)."""
        return all(r.quorum_met for r in self.rounds)

    def sites(self) -> list[str]:
        """Every hospital that answered some round."""
        return sorted({s for r in self.rounds for s in r.answered})


class Screened(_Record):
    """What the outlier screen found about one vector, and what it did."""

    vector_id: str
    hospital: str
    action: Literal["quarantine", "clip"]
    reason: str
    scale: float | None = None
    norm: float | None = None
    cosine_loo: float | None = None
    median_norm: float | None = None
    median_cosine: float | None = None


class ContributionScore(_Record):
    """What one vector contributed to a merge, in the validation metric's units (positive: it helped)."""

    vector_id: str
    hospital: str
    loo: float = Field(description="v(all) − v(all without this vector): the metric it added to the merge")
    loo_se: float | None = Field(None, description="paired-bootstrap standard error of loo over the validation split")
    shapley: float | None = Field(None, description="its Shapley value: the mean marginal gain over join orders")
    shapley_se: float | None = Field(None, description="standard error of the permutation estimate; 0 when exact")
    harmful: str | None = Field(None, description="why the harmful rule fired (intake.harmful); None: it did not")


class Contributions(_Record):
    """Contribution scores of one merge's inputs: the value v(S) of a subset S is the validation metric of the
    merge of S made as the merge itself was (method, λ or η, BN strategy); v(∅) is the start model."""

    method: Literal["loo", "shapley"]
    metric: str
    value_all: float
    value_none: float
    merges: int = Field(description="extra merges evaluated for the scores")
    permutations: int = 0
    exact: bool = Field(False, description="Shapley values from every join order (not sampled)")
    seconds: float
    scores: tuple[ContributionScore, ...]
    excluded: tuple[ContributionScore, ...] = Field(
        (), description="scored in a first merge, then excluded as harmful (intake.harmful=exclude)"
    )

    def of(self, vector_id: str) -> ContributionScore | None:
        """The score of ``vector_id``, among the scores or the excluded; None when it was not scored."""
        return next((s for s in (*self.scores, *self.excluded) if s.vector_id == vector_id), None)


class GateDecision(_Record):
    """The champion gate's verdict on a registered version."""

    run_id: str
    version: str
    champion: bool
    reason: str


def new_merge_id() -> str:
    """A new merge id: ``merge-<UTC time to the second>Z-<6 random hex digits>``."""
    stamp = utcnow().replace(":", "").replace("-", "").split(".")[0]
    return f"merge-{stamp}Z-{uuid.uuid4().hex[:6]}"


class MergeRecord(_Record):
    """Everything one merge used and produced."""

    merge_id: str
    mode: Literal["oneshot", "async"] = "oneshot"
    parent_version: int = Field(0, description="the champion version an async step started from (0: θ_pre)")
    parent_sha256: str | None = None
    version: int | None = Field(None, description="the start-point version this merge became, if promoted")
    started_at: str
    finished_at: str
    seconds: float
    store_url: str
    base_sha256: str
    method: str
    lam: float = Field(alias="lambda")
    bn_strategy: BnStrategy
    bn_source: BnSource
    inputs: tuple[VectorRef, ...]
    screened: tuple[Screened, ...] = ()
    quarantined: tuple[Rejection, ...] = ()
    val: dict[str, float]
    test: dict[str, float] = Field(default_factory=dict)
    operating_point: dict[str, float] = Field(
        default_factory=dict, description="threshold chosen on validation; sensitivity, specificity… at it on test"
    )
    lambda_curve: tuple[tuple[float, float], ...] = ()
    params: Params
    data: str | None = Field(None, description="the training data the demo split; None: the hospitals' own data")
    eval_set: EvalSetRef
    merged_sha256: str
    weights_key: str | None = None
    moments_key: str | None = Field(None, description="store key of the BN moment sums used (recompute)")
    dvc_commit: str | None = None
    trigger: dict[str, str] = Field(default_factory=dict)
    registry: GateDecision | None = None
    contribution: Contributions | None = None
    evaluation: Evaluation = Field(default_factory=Evaluation)

    @classmethod
    def build(
        cls,
        outcome,
        vectors,
        base_sha256: str,
        params: Params,
        eval_set: EvalSetRef,
        store_url: str,
        started: Started,
        **extra,
    ) -> MergeRecord:
        """The one constructor: a record from a merge outcome (:class:`medvec.coordinator.engine.MergeOutcome`)."""
        from medvec.models import state_sha256

        return cls(
            merge_id=extra.pop("merge_id", None) or new_merge_id(),
            started_at=started.at,
            finished_at=utcnow(),
            seconds=started.seconds(),
            store_url=store_url,
            base_sha256=base_sha256,
            method=outcome.method,
            lam=outcome.lam,
            bn_strategy=outcome.bn.strategy,
            bn_source=outcome.bn.source,
            inputs=tuple(VectorRef.of(v, w) for v, w in zip(vectors, outcome.step_weights or [None] * len(vectors))),
            val=_floats(outcome.val),
            test=_floats(outcome.test or {}),
            operating_point=_operating_point(outcome, params),
            lambda_curve=tuple((float(lam), float(v)) for lam, v in outcome.curve),
            params=params,
            eval_set=eval_set,
            merged_sha256=state_sha256(outcome.model.state_dict()),
            contribution=outcome.scores,
            **extra,
        )

    @property
    def n_train(self) -> int:
        """The training images behind the merge: the inputs' sample counts, summed."""
        return sum(i.n_train for i in self.inputs)

    def input_ids(self) -> list[str]:
        """The input vectors' ids, sorted."""
        return sorted(i.vector_id for i in self.inputs)

    def scales(self) -> dict[str, float]:
        """Vector id → the norm-clipping factor applied before merging."""
        return {s.vector_id: s.scale for s in self.screened if s.action == "clip" and s.scale is not None}


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, float)}


def _operating_point(outcome, params: Params) -> dict[str, float]:
    """The threshold chosen on validation with its test figures; the threshold alone when there is no test split."""
    op = (outcome.test or {}).get("op")
    if op:
        return _floats(op)
    val = outcome.val or {}
    if val.get("threshold") is not None:  # chosen on the hospitals' pooled ROC
        return {"threshold": float(val["threshold"])}
    if "scores" not in val:  # not a binary task: the label is the argmax
        return {}
    from medvec.evaluate import choose_threshold

    rule, target = params.evaluate.threshold, params.evaluate.target_sensitivity
    return {"threshold": float(choose_threshold(val["labels"], val["scores"], rule, target))}
