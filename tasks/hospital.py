"""Tasks that run on a hospital's worker."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec.config import FinetuneConfig
from medvec.hospital import LocalData, finetune_vector
from medvec.models import Base
from medvec.store import open_store
from medvec.vectors import DataVector, load_vector


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def fetch_base(store_url: str, base_sha256: str) -> Base:
    """Load θ_pre from the store and check its sha256."""
    return open_store(store_url).get_base(base_sha256)


@task(cache_policy=NO_CACHE)
def load_local_data(data_dir: str) -> LocalData:
    """Read this hospital's own folder (nothing else)."""
    return LocalData.load(data_dir)


@task(cache_policy=NO_CACHE)
def finetune_hospital(base: Base, hospital: str, data: LocalData, cfg: FinetuneConfig, progress: bool = True) -> DataVector:
    """Fine-tune θ_pre on local data and build the validated data vector."""
    vector, _ = finetune_vector(base, hospital, data, cfg, progress=progress)
    return vector


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def publish_vector(store_url: str, vector: DataVector, base: Base) -> dict:
    """Publish atomically, re-validate the stored copy against the base, return its summary."""
    path = open_store(store_url).put(vector)
    stored = load_vector(path, base=base.model.state_dict(), base_sha256=base.sha256)
    return {
        "vector_id": stored.meta.vector_id,
        "hospital": stored.meta.hospital,
        "base_sha256": stored.meta.base_sha256,
        "content_sha256": stored.content_sha256,
        "n_train": stored.meta.n_train,
        "path": str(path),
    }
