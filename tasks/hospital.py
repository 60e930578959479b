"""Tasks that run on a hospital's worker: thin wrappers over :mod:`medvec.hospital` with retries on I/O."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec.config import BatchNormConfig, FinetuneConfig, Params, PrivacyConfig
from medvec.hospital.answer import answer_request
from medvec.hospital.finetune import Training, finetune_vector, with_moments
from medvec.hospital.local import LocalData
from medvec.hospital.privacy import Ledger
from medvec.hospital.publish import Published, publish
from medvec.keys import DocumentSigner
from medvec.models import Base
from medvec.store import VectorStore
from medvec.vectors.vector import DataVector
from tasks.common import IO_RETRIES


@task(**IO_RETRIES)
def fetch_start(store: VectorStore, root: Base, start_from: str) -> tuple[Base, int]:
    """The start point to fine-tune: the current champion's weights and version, or θ_pre (version 0)."""
    version = store.champion(root.sha256).version if start_from == "champion" else 0
    return (store.get_start(root.sha256, version) if version else root), version


@task(cache_policy=NO_CACHE)
def load_local_data(data_dir: str, params: Params) -> LocalData:
    """Read this hospital's own data (nothing else): a folder, an ``.npz`` or a CSV manifest."""
    return LocalData.of(data_dir, params)


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
    vector, result = finetune_vector(base, hospital, data, cfg, progress, start, start_version, privacy)
    return vector, Training.of(result, data)


@task(**IO_RETRIES)
def attach_moments(
    store: VectorStore, base: Base, vector: DataVector, data: LocalData, cfg: BatchNormConfig
) -> DataVector:
    """Add moment sums of the local data under the current merged model, when one exists (read from
    ``models/``, what the coordinator publishes for hospitals: ``merges/`` is not theirs to read)."""
    last = store.latest_model(base.sha256)
    if last is None:
        return vector
    return with_moments(vector, store.pointed_model(last), base, data, cfg)


@task(cache_policy=NO_CACHE)
def spend_privacy_budget(vector: DataVector, privacy: PrivacyConfig, data_dir: str) -> None:
    """Before publishing a DP vector: refuse it past ``privacy.lifetime_epsilon`` (kept at the hospital), else
    add its ε to the local ledger. Written first, so a crash before the publish over-counts, never under-counts."""
    Ledger.for_hospital(privacy, data_dir).spend(vector, privacy.lifetime_epsilon)


@task(**IO_RETRIES)
def answer_evaluation(
    store: VectorStore, request_id: str, hospital: str, data: LocalData, key_file: str, batch_size: int
) -> str:
    """Score the request's candidates on the local validation split and publish the signed answer; its key."""
    assert data.val is not None  # the flow checks first
    signer = DocumentSigner.load(key_file)
    return answer_request(store, request_id, hospital, data.val, data.val.sha256(), signer, batch_size)


@task(**IO_RETRIES)
def publish_vector(
    store: VectorStore, vector: DataVector, base: Base, folder: str, key_file: str | None = None
) -> Published:
    """Sign (when a key is configured), publish atomically, validate the published file; it stays in ``folder``."""
    return publish(store, vector, base, Path(folder), key_file)


@task(**IO_RETRIES)
def track_hospital_run(published: Published, settings: dict, training: Training) -> str:
    """Log the fine-tune run to MLflow (params, per-epoch metrics, wall time, lineage tags, local data set, the vector)."""
    from medvec.tracking.runs import log_hospital_run

    return log_hospital_run(published, settings, training)
