"""Tasks that run on the coordinator's worker: thin wrappers over :mod:`medvec.coordinator` and
:mod:`medvec.tracking` with retries on I/O.  Each takes the run's one open store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec.config import IntakeConfig, Params, RefineConfig
from medvec.coordinator.compare import Comparison, evaluate_merges, single_rows
from medvec.coordinator.contribution import Guarded, score_merge, scored_merge_once
from medvec.coordinator.engine import MergeOutcome, MomentsFn
from medvec.coordinator.intake import Admission, admit, quarantine_harmful
from medvec.coordinator.scoring import EvalSets
from medvec.data.images import DataSpec, ImageSet
from medvec.data.split import split_from_config
from medvec.models import Base, base_from_config
from medvec.record import Contributions, ContributionScore, MergeRecord, Rejection
from medvec.store import VectorStore
from medvec.tracking.finish import FinishedStep, finish_merge, finish_step
from medvec.vectors.vector import VectorLike
from tasks.common import IO_RETRIES


@task(cache_policy=NO_CACHE)
def split_hospitals(source: str, out_dir: str, params: Params) -> dict:
    """Simulate hospitals: one folder per hospital with its own share."""
    return split_from_config(source, out_dir, params.split, DataSpec.of(params))


@task(**IO_RETRIES)
def publish_base(store: VectorStore, params: Params, num_classes: int, classes: list[str] | None = None) -> Base:
    """Build θ_pre from the model section (recording the class list) and publish it to the store."""
    base = base_from_config(params.model, num_classes, classes)
    store.put_base(base)
    return base


@task(**IO_RETRIES)
def admit_vectors(
    store: VectorStore, base: Base, intake: IntakeConfig, refine: RefineConfig | None = None
) -> Admission:
    """Intake: the vectors to merge (newest per hospital, or every unconsumed one in async mode), screened."""
    return admit(store, base, intake, refine)


@task(**IO_RETRIES)
def last_merge(store: VectorStore, base_sha256: str) -> MergeRecord | None:
    """The newest merge record for this base."""
    return store.latest_merge(base_sha256)


@task(cache_policy=NO_CACHE)
def merge_task(
    base: Base, vectors: Sequence[VectorLike], params: Params, evalsets: EvalSets, calibration: ImageSet | None
) -> Guarded:
    """Merge with the configured method and λ, restore BN, evaluate, and score each input's contribution
    (merged again without the harmful ones under ``intake.harmful: exclude``)."""
    return scored_merge_once(base, vectors, params, evalsets, calibration)


@task(cache_policy=NO_CACHE)
def async_step(
    store: VectorStore,
    root: Base,
    admission: Admission,
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None,
    trigger: dict[str, str],
) -> FinishedStep | None:
    """One async step into the champion: merged, scored, gated on validation, and finished (:func:`finish_step`;
    its steps retry on their own). None when the hospitals' vote excluded every input."""
    return finish_step(store, root, admission, params, evalsets, calibration, trigger=trigger)


@task(**IO_RETRIES)
def quarantine_excluded(
    store: VectorStore, excluded: Sequence[tuple[VectorLike, ContributionScore]]
) -> list[Rejection]:
    """Keep the vectors the harmful rule excluded in quarantine, with the reason."""
    return quarantine_harmful(store, excluded)


@task(cache_policy=NO_CACHE)
def finish(
    store: VectorStore,
    record: MergeRecord,
    outcome: MergeOutcome,
    root: Base,
    vectors: Sequence[VectorLike],
    evalsets: EvalSets,
    plots: dict[str, Path] | None = None,
) -> MergeRecord:
    """Store, version in DVC, register through the gate and publish the merge (:func:`finish_merge`; its steps
    retry on their own: a retry of the whole would register the merge twice)."""
    return finish_merge(store, record, outcome, root, vectors, evalsets, plots)


@task(cache_policy=NO_CACHE)
def hospital_rows(
    base: Base, vectors: Sequence[VectorLike], evalsets: EvalSets, params: Params, store: VectorStore | None = None
) -> list[dict]:
    """Each hospital's own model θ_pre + τ_h (its BN statistics) on the coordinator's held-out set (with a store:
    evaluated once per vector, then read from the store's ``evals/``)."""
    return single_rows(base, vectors, evalsets, params, store)


@task(cache_policy=NO_CACHE)
def compare_merges(
    base: Base,
    vectors: Sequence[VectorLike],
    evalsets: EvalSets,
    params: Params,
    moments_fn: MomentsFn | None = None,
    progress: bool = True,
) -> Comparison:
    """Every merge method × BN strategy, λ chosen on validation, scored on test; the selected one kept."""
    return evaluate_merges(base, vectors, evalsets, params, moments_fn, progress=progress)


@task(cache_policy=NO_CACHE)
def contribution_scores(
    base: Base,
    vectors: Sequence[VectorLike],
    outcome: MergeOutcome,
    params: Params,
    evalsets: EvalSets,
    moments_fn: MomentsFn | None,
    progress: bool,
) -> Contributions | None:
    """What each input contributed to ``outcome`` (leave-one-out, Shapley) on the validation split."""
    return score_merge(base, vectors, outcome, params, evalsets, None, moments_fn, progress)


@task(**IO_RETRIES)
def supersede_queued(listed: list[str], reason: str) -> int:
    """Cancel this deployment's queued runs fired by a vector this run listed (``listed``: vector ids); returns
    how many.

    Each would only start a process to find nothing new: this run's stored merge (or its "nothing new")
    already answers its vector.  Runs on the reconciling schedule, running ones, and ones fired by a vector
    this run did not list are left alone.  Called once the merge is stored: a crash before that leaves the
    queue as it was.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import deployment, flow_run
    from prefect.states import Cancelled

    me, dep, ids = flow_run.id, deployment.id, set(listed)
    if not me or not dep:  # not a deployment run (medvec demo, tests calling the flow directly)
        return 0
    queued = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
    cancelled = 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep])), flow_run_filter=queued
        )
        for run in runs:
            vector = str(((run.parameters or {}).get("trigger") or {}).get("vector", "")).removeprefix("medvec.vector.")
            if str(run.id) != str(me) and vector in ids:
                result: Any = client.set_flow_run_state(run.id, Cancelled(message=f"superseded by run {me}: {reason}"))
                cancelled += result.status.value == "ACCEPT"
    return cancelled
