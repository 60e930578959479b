"""The vector store: where hospitals publish data vectors and the coordinator reads them.

Layout (the same under a local root or an S3 prefix)::

    bases/<base-sha>.safetensors                          θ_pre, published by the coordinator
    vectors/<base-sha>/<hospital>/<vector-id>.safetensors  a data vector
    vectors/<base-sha>/<hospital>/<vector-id>.json         its sidecar (metadata, content sha256, size)
    quarantine/<hospital>/<vector-id or name>.*            a rejected upload and <…>.reason.json

Publishing is atomic: the file is written under a temporary name and renamed,
and the sidecar (which makes a vector visible to listings) is written last.
A vector that fails validation is moved to ``quarantine/`` with its reason;
nothing sent is ever silently dropped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from medvec.models import Base, load_base, save_base
from medvec.vectors import DataVector, InvalidVectorError, VectorFile, load_vector, utcnow


class StoreError(RuntimeError):
    """A store that cannot be reached or written."""


class LocalStore:
    """A vector store in a local directory (the embedded default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return str(self.root)

    # ---------------------------------------------------------------- bases
    def put_base(self, base: Base) -> Path:
        path = self.root / "bases" / f"{base.sha256}.safetensors"
        if not path.exists():
            save_base(base, path)
        return path

    def base_path(self, sha256: str) -> Path:
        path = self.root / "bases" / f"{sha256}.safetensors"
        if not path.exists():
            raise StoreError(f"{self.url}: no base model {sha256[:12]}… (publish it with put_base)")
        return path

    def get_base(self, sha256: str) -> Base:
        return load_base(self.base_path(sha256), expected_sha256=sha256)

    # ---------------------------------------------------------------- vectors
    def _vector_dir(self, base_sha: str, hospital: str) -> Path:
        return self.root / "vectors" / base_sha / hospital

    def put(self, vector: DataVector) -> Path:
        """Publish a vector atomically; returns its path in the store."""
        meta = vector.meta
        if meta is None:
            raise ValueError("only vectors with metadata can be published")
        folder = self._vector_dir(meta.base_sha256, meta.hospital)
        path = folder / f"{meta.vector_id}.safetensors"
        if path.exists():
            raise StoreError(f"vector id {meta.vector_id} already exists in {self.url}")
        vector.save(path)  # atomic rename
        self._write_sidecar(path, meta.model_dump(), vector.content_sha256)
        return path

    def _write_sidecar(self, path: Path, meta: dict, content: str) -> None:
        side = {"meta": meta, "content_sha256": content, "size": path.stat().st_size, "published_at": utcnow()}
        tmp = path.with_name(f".{path.stem}.json.tmp")
        tmp.write_text(json.dumps(side, indent=2))
        os.replace(tmp, path.with_suffix(".json"))

    def sidecars(self, base_sha: str | None = None) -> list[dict]:
        """Every published vector's sidecar (optionally for one base), oldest first."""
        top = self.root / "vectors" / base_sha if base_sha else self.root / "vectors"
        out = []
        for side in top.rglob("*.json") if top.exists() else []:
            data = json.loads(side.read_text())
            data["path"] = str(side.with_suffix(".safetensors"))
            out.append(data)
        return sorted(out, key=lambda d: (d["meta"]["created_at"], d["meta"]["vector_id"]))

    def get(self, vector_id: str, base: dict | None = None, base_sha256: str | None = None) -> VectorFile:
        for side in self.sidecars():
            if side["meta"]["vector_id"] == vector_id:
                return load_vector(side["path"], base=base, base_sha256=base_sha256)
        raise StoreError(f"{self.url}: no vector {vector_id}")

    def latest(self, base_sha256: str, base: dict | None = None) -> list[VectorFile]:
        """The newest valid vector of every hospital built on ``base_sha256``.

        A vector that fails validation is quarantined with its reason and the
        hospital's next-newest vector is used instead.
        """
        by_hospital: dict[str, list[dict]] = {}
        for side in self.sidecars(base_sha256):
            by_hospital.setdefault(side["meta"]["hospital"], []).append(side)
        chosen = []
        for hospital in sorted(by_hospital):
            for side in reversed(by_hospital[hospital]):
                try:
                    chosen.append(load_vector(side["path"], base=base, base_sha256=base_sha256))
                    break
                except InvalidVectorError as exc:
                    self.quarantine(side["path"], exc.check, exc.problem, hospital)
        return chosen

    def quarantine(self, path: str | Path, check: str, problem: str, hospital: str = "unknown") -> Path:
        """Move a rejected file (and its sidecar) under ``quarantine/`` with a JSON reason."""
        path = Path(path)
        folder = self.root / "quarantine" / hospital
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        if path.exists():
            shutil.move(str(path), target)
        side = path.with_suffix(".json")
        if side.exists():
            shutil.move(str(side), folder / f"{path.stem}.sidecar.json")
        reason = {"check": check, "problem": problem, "hospital_claimed": hospital, "time": utcnow(), "file": target.name}
        (folder / f"{path.stem}.reason.json").write_text(json.dumps(reason, indent=2))
        return target

    def quarantined(self) -> list[dict]:
        folder = self.root / "quarantine"
        return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.reason.json"))] if folder.exists() else []


def open_store(url: str | Path) -> LocalStore:
    """Open a store by URL: a local path (``file://`` optional)."""
    url = str(url)
    if url.startswith("s3://"):
        raise StoreError("the S3 store is not available in this version; use a local directory")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalStore(url)
