"""What both sides' tasks share: retries on I/O, and reading the base from the store."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec.errors import Refusal
from medvec.models import Base
from medvec.retry import IO_DELAYS
from medvec.store import VectorStore


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Whether a failed task run is worth a retry: not for a :class:`~medvec.errors.Refusal` (an untrusted
    document, a revoked key), which no retry can change."""
    try:
        state.result()
    except Refusal:
        return False
    except Exception:
        return True
    return True


# store, S3 and Prefect API calls: three retries with back-off, none for a refusal; nothing cached (tasks take
# live objects)
IO_RETRIES: dict[str, Any] = {
    "retries": len(IO_DELAYS),
    "retry_delay_seconds": list(IO_DELAYS),
    "retry_condition_fn": transient,
    "cache_policy": NO_CACHE,
}


@task(**IO_RETRIES)
def fetch_base(store: VectorStore, base_sha256: str) -> Base:
    """Load θ_pre from the store and check its sha256."""
    return store.get_base(base_sha256)
