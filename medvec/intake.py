"""Vector intake at the coordinator: every check a vector must pass before a merge.

In order: size limits (before parsing), the safetensors layout, never a pickle,
metadata (size-limited) and values (:func:`medvec.vectors.load_vector`); the
base's hash, keys and shapes; the store path's hospital equals the metadata's
(a hospital cannot publish into another's folder); with a keyring, a valid
Ed25519 signature by that hospital; and no replay (a vector id or nonce already
seen at another place).  A rejected vector is quarantined with its reason —
never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from medvec.signing import Keyring, read_header
from medvec.vectors import DEFAULT_MAX_BYTES, InvalidVectorError, VectorFile, load_vector

SEEN_KEY = "intake/seen.json"


@dataclass
class IntakePolicy:
    keyring: Keyring | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_metadata_bytes: int = 64 * 1024


def check(store, key: str, base: dict | None, base_sha256: str | None, policy: IntakePolicy, seen: dict) -> VectorFile:
    """Validate one stored vector; raises :class:`InvalidVectorError` (the caller quarantines)."""
    path = store._local_file(key)
    vf = load_vector(path, base=base, base_sha256=base_sha256, max_bytes=policy.max_bytes, max_metadata_bytes=policy.max_metadata_bytes)
    hospital_in_path = key.split("/")[-2] if key.count("/") >= 2 else None
    if hospital_in_path is not None and hospital_in_path != vf.meta.hospital:
        raise InvalidVectorError(path, f"published under hospital {hospital_in_path!r} but claims {vf.meta.hospital!r}", "impersonation")
    nonce = None
    if policy.keyring is not None:
        nonce = policy.keyring.verify(path, vf.meta, vf.content_sha256, read_header(path))["nonce"]
    first = seen.get("ids", {}).get(vf.meta.vector_id)
    if first is not None and first != key:
        raise InvalidVectorError(path, f"replay: vector id {vf.meta.vector_id} was already seen at {first}", "replay")
    if nonce is not None:
        owner = seen.get("nonces", {}).get(nonce)
        if owner is not None and owner != vf.meta.vector_id:
            raise InvalidVectorError(path, f"replay: signature nonce already used by vector {owner}", "replay")
        seen.setdefault("nonces", {})[nonce] = vf.meta.vector_id
    seen.setdefault("ids", {})[vf.meta.vector_id] = key
    return vf
