"""Tasks that run on a hospital's worker."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec.batchnorm import MomentSums
from medvec.config import BatchNormConfig, FinetuneConfig, Params, PrivacyConfig
from medvec.hospital import LocalData, finetune_vector, local_moment_sums
from medvec.models import Base
from medvec.store import open_store
from medvec.vectors import DataVector


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def fetch_base(store_url: str, base_sha256: str) -> Base:
    """Load θ_pre from the store and check its sha256."""
    return open_store(store_url).get_base(base_sha256)


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def fetch_start(store_url: str, root: Base, start_from: str) -> tuple[Base, int]:
    """The start point to fine-tune: the current champion's weights and version, or θ_pre (version 0)."""
    store = open_store(store_url)
    version = store.champion(root.sha256).version if start_from == "champion" else 0
    return (store.get_start(root.sha256, version) if version else root), version


@task(cache_policy=NO_CACHE)
def load_local_data(data_dir: str, params: Params) -> LocalData:
    """Read this hospital's own data (nothing else): a folder, an ``.npz`` or a CSV manifest."""
    return LocalData.of(data_dir, params)


@dataclass(frozen=True)
class Training:
    """What a hospital's fine-tune run records beside its vector (all aggregate: nothing per image)."""

    history: list[dict]  # per epoch: loss and local validation metrics
    seconds: float  # wall time measured around training
    data: dict[str, dict]  # per local split: sha256, size, label counts (describe_local_data)


@task(cache_policy=NO_CACHE)
def finetune_hospital(
    base: Base,
    hospital: str,
    data: LocalData,
    cfg: FinetuneConfig,
    progress: bool = True,
    start: Base | None = None,
    start_version: int = 0,
    privacy: PrivacyConfig | None = None,
) -> tuple[DataVector, Training]:
    """Fine-tune the start point (θ_pre by default) on local data; returns the data vector and its :class:`Training`."""
    vector, record = finetune_vector(base, hospital, data, cfg, progress, start, start_version, privacy)
    return vector, Training(record.history, record.seconds, describe_local_data(data))


def describe_local_data(data: LocalData) -> dict[str, dict]:
    """Per split: a sha256 of the pixels and labels, the size and the label counts (no path, nothing per image)."""
    from medvec.record import EvalSetRef

    splits = {"train": data.train, "val": data.val}
    return {
        split: {"sha256": EvalSetRef.of(s, "local", split).sha256, "size": len(s), "label_counts": s.label_counts()}
        for split, s in splits.items()
        if s is not None and len(s)
    }


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def track_hospital_run(summary: dict, settings: dict, training: Training) -> str:
    """Log the fine-tune run to MLflow (params, per-epoch metrics, wall time, lineage tags, local data set, the vector)."""
    from medvec import tracking

    store = open_store(summary["store"])
    return tracking.log_hospital_run(
        summary,
        settings,
        training.history,
        store.local_file(summary["key"]),
        finetune_seconds=training.seconds,
        local_data=training.data,
    )


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def attach_moments(store_url: str, base: Base, vector: DataVector, data: LocalData, cfg: BatchNormConfig) -> DataVector:
    """Add moment sums of the local data under the current merged model, when one exists."""
    from medvec.models import load_base

    store = open_store(store_url)
    last = store.latest_merge(base.sha256)
    if last is None or last.weights_key is None:
        return vector
    merged = load_base(store.merge_weights(last), expected_sha256=last.merged_sha256)
    sums: MomentSums = local_moment_sums(merged.model, base, data.train, cfg)
    meta = vector.meta.model_copy(update={"moments_model_sha256": merged.sha256})
    return DataVector(vector.deltas, meta, vector.running, sums)


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def publish_vector(store_url: str, vector: DataVector, base: Base, key_file: str | None = None) -> dict:
    """Sign (when a key is configured), publish atomically, re-validate the stored copy, return its summary."""
    store = open_store(store_url)
    key = store.put(vector, key_file=key_file)
    stored = store.open_vector(key, base=base.model.state_dict(), base_sha256=base.sha256)
    return {
        "vector_id": stored.meta.vector_id,
        "hospital": stored.meta.hospital,
        "base_sha256": stored.meta.base_sha256,
        "content_sha256": stored.content_sha256,
        "n_train": stored.meta.n_train,
        "start_version": stored.meta.start_version,
        "key": key,
        "store": store.url,
        "privacy": stored.meta.privacy.model_dump(mode="json") if stored.meta.privacy else None,
    }


@task(cache_policy=NO_CACHE)
def spend_privacy_budget(vector: DataVector, privacy: PrivacyConfig, data_dir: str) -> None:
    """Before publishing a DP vector: refuse it past ``privacy.lifetime_epsilon`` (kept at the hospital), else
    add its ε to the local ledger. Written first, so a crash before the publish over-counts, never under-counts."""
    from medvec.privacy import Ledger

    ledger = Ledger.for_hospital(privacy, data_dir)
    ledger.check(vector, privacy.lifetime_epsilon)
    ledger.record(vector)
