"""Publishing a hospital's vector: sign it, put it in the store atomically, and keep the published file.

Only the vector file and its sidecar (aggregate metadata) leave the hospital.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from medvec.models import Base
from medvec.store import VectorStore
from medvec.vectors.checks import load_vector
from medvec.vectors.vector import DataVector


@dataclass(frozen=True)
class Published:
    """What a hospital published: the vector's identity, where it lies in the store, and the local file as
    uploaded (signed), which the hospital's MLflow run logs without reading the store back."""

    vector_id: str
    hospital: str
    base_sha256: str
    content_sha256: str
    n_train: int
    start_version: int
    key: str
    store: str
    file: Path
    privacy: dict | None = None  # the DP-SGD (ε, δ) accounted, when trained with DP

    def summary(self) -> dict:
        """The flow run's result and the landed event's fields: everything but the local file's path (no path
        leaves the hospital)."""
        out = asdict(self)
        del out["file"]
        return out


def publish(
    store: VectorStore, vector: DataVector, base: Base, folder: Path, key_file: str | Path | None = None
) -> Published:
    """Sign (with ``key_file``), publish atomically and validate the published file against ``base``.

    The published file stays in ``folder`` (the hospital's side) under its vector id.
    """
    if not vector.has_meta:
        raise ValueError("only vectors with metadata can be published")
    file = Path(folder) / f"{vector.meta.vector_id}.safetensors"
    key = store.put(vector, key_file=key_file, keep=file)
    published = load_vector(file, base=base.model.state_dict(), base_sha256=base.sha256)
    meta = published.meta
    return Published(
        vector_id=meta.vector_id,
        hospital=meta.hospital,
        base_sha256=meta.base_sha256,
        content_sha256=published.content_sha256,
        n_train=meta.n_train,
        start_version=meta.start_version,
        key=key,
        store=store.url,
        file=file,
        privacy=meta.privacy.model_dump(mode="json") if meta.privacy else None,
    )
