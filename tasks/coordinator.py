"""Tasks that run on the coordinator's worker."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec import coordinator as core
from medvec.config import IntakeConfig, Params, RefineConfig
from medvec.contribution import Guarded, score_merge, scored_merge_once
from medvec.data import DataSpec, split_from_config, to_tensor
from medvec.evaluate import evaluate_model
from medvec.intake import Admission, admit, quarantine_harmful
from medvec.models import Base, base_from_config, load_base
from medvec.record import Contributions, GateDecision, MergeRecord, Rejection
from medvec.refine import Step, run_step
from medvec.store import open_store

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [1, 4, 10], "cache_policy": NO_CACHE}


@task(cache_policy=NO_CACHE)
def split_hospitals(source: str, out_dir: str, params: Params) -> dict:
    """Simulate hospitals: one folder per hospital with its own share."""
    return split_from_config(source, out_dir, params.split, DataSpec.of(params))


@task(**IO_RETRIES)
def publish_base(store_url: str, params: Params, num_classes: int, classes: list[str] | None = None) -> Base:
    """Build θ_pre from the model section (recording the class list) and publish it to the store."""
    base = base_from_config(params.model, num_classes, classes)
    open_store(store_url).put_base(base)
    return base


@task(**IO_RETRIES)
def admit_vectors(store_url: str, base: Base, intake: IntakeConfig, refine: RefineConfig | None = None) -> Admission:
    """Intake: the vectors to merge (newest per hospital, or every unconsumed one in async mode), screened."""
    return admit(open_store(store_url), base, intake, refine)


@task(cache_policy=NO_CACHE)
def refine_task(
    store_url: str, base: Base, admission: Admission, params: Params, evalsets: core.EvalSets, calibration, trigger
) -> Step:
    """One async step into the champion: merged, gated on validation, stored, promoted if better."""
    return run_step(open_store(store_url), base, admission, params, evalsets, calibration, trigger)


@task(cache_policy=NO_CACHE)
def single_rows(
    base: Base, vectors: list, evalsets: core.EvalSets, params: Params, store_url: str | None = None
) -> list[dict]:
    """Each hospital's own model θ_pre + τ_h (its BN statistics) on the coordinator's held-out set (with a store:
    evaluated once per vector, then read from the store's ``evals/``)."""
    return core.single_rows(base, vectors, evalsets, params, open_store(store_url) if store_url else None)


@task(cache_policy=NO_CACHE)
def evaluate_merges(
    base: Base, vectors: list, evalsets: core.EvalSets, params: Params, moments_fn=None, progress: bool = True
) -> list[core.Candidate]:
    """Every merge method × BN strategy, λ chosen on validation, scored on test."""
    return core.evaluate_merges(base, vectors, evalsets, params, moments_fn, progress=progress)


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
                result = client.set_flow_run_state(run.id, Cancelled(message=f"superseded by run {me}: {reason}"))
                cancelled += result.status.value == "ACCEPT"
    return cancelled


@task(**IO_RETRIES)
def last_merge(store_url: str, base_sha256: str) -> MergeRecord | None:
    """The newest merge record for this base."""
    return open_store(store_url).latest_merge(base_sha256)


@task(cache_policy=NO_CACHE)
def merge_task(base: Base, vectors: list, params: Params, evalsets: core.EvalSets, calibration) -> Guarded:
    """Merge with the configured method and λ, restore BN, evaluate, and score each input's contribution
    (merged again without the harmful ones under ``intake.harmful: exclude``)."""
    return scored_merge_once(base, vectors, params, evalsets, calibration)


@task(cache_policy=NO_CACHE)
def contribution_scores(
    base: Base, vectors: list, outcome: core.MergeOutcome, params: Params, evalsets: core.EvalSets, moments_fn, progress
) -> Contributions | None:
    """What each input contributed to ``outcome`` (leave-one-out, Shapley) on the validation split."""
    return score_merge(base, vectors, outcome, params, evalsets, None, moments_fn, progress)


@task(**IO_RETRIES)
def quarantine_excluded(store_url: str, excluded: list) -> list[Rejection]:
    """Keep the vectors the harmful rule excluded in quarantine, with the reason."""
    return quarantine_harmful(open_store(store_url), excluded)


@task(**IO_RETRIES)
def publish_merge(store_url: str, record: MergeRecord, outcome: core.MergeOutcome, base: Base) -> MergeRecord:
    """Write the merged weights, the BN moment sums used and the record (``latest.json`` is moved later)."""
    merged = base.with_model(outcome.model, record.merged_sha256)
    return open_store(store_url).put_merged_model(record, merged, outcome.moments)


@task(retries=2, retry_delay_seconds=[2, 8], cache_policy=NO_CACHE)
def record_in_dvc(record: MergeRecord, vectors: list, params: Params) -> str:
    """Commit the merge's input vectors to the DVC registry and push; returns the commit."""
    from medvec.dvc_registry import record_merge

    r = params.registry
    files = {v.meta.vector_id: v.path for v in vectors}
    return record_merge(r.dvc_repo, r.dvc_remote, record, files, r.dvc_endpoint_url)


@task(retries=2, retry_delay_seconds=[2, 8], cache_policy=NO_CACHE)
def register_merge(
    record: MergeRecord,
    model,
    base: Base,
    evalsets: core.EvalSets,
    plots: dict[str, Path] | None = None,
    decided: tuple[bool, str] | None = None,
) -> GateDecision:
    """Log the merge run to MLflow, register the model and apply the champion gate on the same validation set."""
    from medvec import tracking

    p = record.params
    example = to_tensor(evalsets.val.images[:2], base.spec).contiguous().numpy()  # plain NCHW for the signature
    tracking.register_base(p.registry.model_name, base, example)

    def rescore(champion: MergeRecord) -> dict:
        """The champion's stored merged weights, scored on this merge's validation set."""
        store = open_store(champion.store_url)
        merged = load_base(store.merge_weights(champion), expected_sha256=champion.merged_sha256)
        return evaluate_model(merged.model, evalsets.val, merged.spec, p.evaluate.batch_size)

    merged = base.with_model(model, record.merged_sha256)
    return tracking.log_merge(record, merged, example, rescore, plots, decided)
