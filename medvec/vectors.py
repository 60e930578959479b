"""The data vector τ_h = θ_h − θ_pre (arXiv 2408.13038, eq. 1) as a typed value object.

* Only floating-point parameters and buffers are differenced.  Integer buffers
  (``num_batches_tracked``) and batch-norm running statistics are excluded: the
  hospital's own running statistics travel beside the deltas as aggregates
  (``bn:<layer>.running_mean|running_var``), optionally with per-layer moment sums
  (``moments:<layer>.count|sum|sumsq``), and :mod:`medvec.batchnorm` combines them.
* Algebra: ``a + b``, ``sum(vectors)``, ``k * v``, ``-v``, ``a - b`` and
  ``v.apply_to(base_state, lam)`` = θ_pre + λ·τ.
* File format: safetensors (never pickle).  The header's metadata holds the
  JSON :class:`VectorMeta` and the ``content_sha256`` of all tensors.
* :func:`load_vector` validates everything and raises :class:`InvalidVectorError`
  naming the file and the exact problem.  Tensors are then read lazily, one at a
  time, so merges never hold more than one tensor per vector.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import medvec
from medvec.batchnorm import MomentSums, RunningStats, is_bn_stat
from medvec.errors import UserError
from medvec.models import hash_tensor

FORMAT = "medvec-vector/1"
DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_HEADER_BYTES = 16 * 1024**2
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"


class InvalidVectorError(UserError, ValueError):
    """A vector that fails validation; the message names the file and the problem."""

    def __init__(self, source: str | Path, problem: str, check: str = "invalid"):
        self.source = str(source)
        self.problem = problem
        self.check = check
        super().__init__(f"{source}: {problem}")


class PrivacySpent(BaseModel):
    """The differential privacy a DP-SGD fine-tune spent, as Opacus' accountant reports it (signed with the vector)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "prv"]
    noise_multiplier: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    epochs: int = Field(ge=0)
    batchnorm: Literal["frozen"] = "frozen"


class VectorMeta(BaseModel):
    """Aggregate metadata a hospital publishes with its vector (nothing per patient)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vector_id: str
    hospital: str
    base_sha256: str = Field(min_length=64, max_length=64)
    base_model: str
    num_classes: int = Field(ge=1)
    n_train: int = Field(ge=0)
    label_counts: list[int] = Field(description="images per class; multilabel: images with each label")
    task: Literal["multiclass", "multilabel"] = "multiclass"
    classes_sha256: str | None = Field(None, min_length=64, max_length=64, description="sha256 of the class list")
    finetune: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str
    medvec_version: str = medvec.__version__
    moments_model_sha256: str | None = None
    start_version: int = Field(0, ge=0, description="the start point fine-tuned from: 0 is θ_pre")
    start_sha256: str | None = Field(None, description="that start point's sha256 (None: θ_pre, base_sha256)")
    privacy: PrivacySpent | None = Field(None, description="DP-SGD's accounted (ε, δ); None: trained without DP")

    @property
    def start(self) -> str:
        """The sha256 of the weights this vector is a difference from."""
        return self.start_sha256 or self.base_sha256


def vector_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys that a data vector differences: floating point, not BN running statistics."""
    return [k for k, v in state.items() if v.is_floating_point() and not is_bn_stat(k)]


def new_vector_id(hospital: str, content_sha256: str, when: _dt.datetime | None = None) -> str:
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return f"{hospital}-{when.strftime('%Y%m%dT%H%M%S%f')}-{content_sha256[:8]}"


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class DataVector:
    """τ = θ_fine − θ_pre over floating-point weights, with metadata and BN aggregates."""

    def __init__(
        self,
        deltas: dict[str, torch.Tensor],
        meta: VectorMeta | None = None,
        running: RunningStats | None = None,
        moments: MomentSums | None = None,
    ):
        self.deltas = dict(deltas)
        self.meta = meta
        self.running = running
        self.moments = moments

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_states(
        cls,
        base: dict[str, torch.Tensor],
        tuned: dict[str, torch.Tensor],
        *,
        hospital: str,
        base_sha256: str,
        base_model: str,
        num_classes: int,
        n_train: int,
        label_counts: list[int],
        task: str = "multiclass",
        classes_sha256: str | None = None,
        finetune: dict | None = None,
        metrics: dict | None = None,
        running: RunningStats | None = None,
        moments: MomentSums | None = None,
        moments_model_sha256: str | None = None,
        start_version: int = 0,
        start_sha256: str | None = None,
        privacy: PrivacySpent | None = None,
    ) -> "DataVector":
        """Build τ from θ_pre and θ_h (keys and shapes must agree)."""
        if set(base) != set(tuned):
            raise ValueError(f"state dicts differ in keys: {sorted(set(base) ^ set(tuned))[:5]}")
        deltas = {}
        for k in vector_keys(base):
            if base[k].shape != tuned[k].shape:
                raise ValueError(f"{k}: base shape {tuple(base[k].shape)} != fine-tuned {tuple(tuned[k].shape)}")
            deltas[k] = (tuned[k].detach().cpu().float() - base[k].detach().cpu().float()).contiguous()
        v = cls(deltas, running=running, moments=moments)
        meta = VectorMeta(
            vector_id=new_vector_id(hospital, v.content_sha256),
            hospital=hospital,
            base_sha256=base_sha256,
            base_model=base_model,
            num_classes=num_classes,
            n_train=n_train,
            label_counts=list(label_counts),
            task=task,
            classes_sha256=classes_sha256,
            finetune=dict(finetune or {}),
            # non-finite local metrics (e.g. AUC of a one-class local split) are left out: JSON has no NaN
            metrics={k: float(x) for k, x in (metrics or {}).items() if math.isfinite(float(x))},
            created_at=utcnow(),
            moments_model_sha256=moments_model_sha256,
            start_version=start_version,
            start_sha256=start_sha256,
            privacy=privacy,
        )
        v.meta = meta
        return v

    # ---------------------------------------------------------------- algebra
    def keys(self) -> list[str]:
        return sorted(self.deltas)

    def tensor(self, key: str) -> torch.Tensor:
        return self.deltas[key]

    def _combine(self, other: "DataVector", op) -> "DataVector":
        if set(self.deltas) != set(other.deltas):
            raise ValueError(f"vectors differ in keys: {sorted(set(self.deltas) ^ set(other.deltas))[:5]}")
        return DataVector({k: op(self.deltas[k], other.deltas[k]) for k in self.deltas})

    def __add__(self, other: "DataVector | int") -> "DataVector":
        if isinstance(other, int) and other == 0:  # so that sum(vectors) works
            return DataVector(dict(self.deltas))
        return self._combine(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other: "DataVector") -> "DataVector":
        return self._combine(other, torch.sub)

    def __neg__(self) -> "DataVector":
        return DataVector({k: -v for k, v in self.deltas.items()})

    def __mul__(self, scale: float) -> "DataVector":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return DataVector({k: v * float(scale) for k, v in self.deltas.items()})

    __rmul__ = __mul__

    def norm(self) -> float:
        """L2 norm over all deltas."""
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.deltas.values()))

    def apply_to(self, base: dict[str, torch.Tensor], lam: float = 1.0) -> dict[str, torch.Tensor]:
        """θ_pre + λ·τ as a new state dict; excluded keys are copied from the base."""
        missing = set(self.deltas) - set(base)
        if missing:
            raise ValueError(f"base lacks vector keys {sorted(missing)[:5]}")
        out = {}
        for k, v in base.items():
            if k in self.deltas:
                out[k] = (v.detach().float() + lam * self.deltas[k]).to(v.dtype)
            else:
                out[k] = v.detach().clone()
        return out

    @property
    def content_sha256(self) -> str:
        return content_sha256(self._all_tensors())

    def _all_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.deltas)
        if self.running is not None:
            tensors.update(self.running.to_tensors())
        if self.moments is not None:
            tensors.update(self.moments.to_tensors())
        return tensors

    # ---------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write safetensors atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        if self.meta is None:
            raise ValueError("a vector needs metadata to be saved (derived vectors have none)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self._all_tensors().items()}
        header = {
            "format": FORMAT,
            "medvec": self.meta.model_dump_json(),
            "content_sha256": content_sha256(tensors),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    def to_vector(self) -> "DataVector":
        """Itself (a :class:`VectorFile` loads into one), so callers need not tell them apart."""
        return self

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "DataVector":
        """Validate and load a whole vector (see :func:`load_vector`)."""
        return load_vector(path, **kwargs).to_vector()

    def __repr__(self) -> str:
        who = self.meta.hospital if self.meta else "derived"
        return f"DataVector({who}, {len(self.deltas)} tensors, norm={self.norm():.4g})"


def content_sha256(tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    items = sorted(tensors.items()) if isinstance(tensors, dict) else sorted(tensors, key=lambda kv: kv[0])
    h = hashlib.sha256()
    for k, t in items:
        hash_tensor(h, k, t)
    return h.hexdigest()


# ------------------------------------------------------------------------ validated files


class VectorFile:
    """A validated vector file; tensors are read lazily, one at a time."""

    def __init__(self, path: Path, meta: VectorMeta, content: str, delta_keys: list[str], extra_keys: list[str]):
        self.path = path
        self.meta = meta
        self.content_sha256 = content
        self._delta_keys = delta_keys
        self._extra_keys = extra_keys

    def keys(self) -> list[str]:
        return list(self._delta_keys)

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            for k in keys:
                yield k, f.get_tensor(k)

    @property
    def running(self) -> RunningStats | None:
        """The hospital's BN running statistics (read on access), as on :class:`DataVector`."""
        keys = [k for k in self._extra_keys if k.startswith("bn:")]
        if not keys:
            return None
        return RunningStats.from_tensors(dict(self.iter_tensors(keys)), self.meta.n_train)

    @property
    def moments(self) -> MomentSums | None:
        """Moment sums if the file carries them (read on access), as on :class:`DataVector`."""
        keys = [k for k in self._extra_keys if k.startswith("moments:")]
        if not keys:
            return None
        return MomentSums.from_tensors(dict(self.iter_tensors(keys)))

    def to_vector(self) -> DataVector:
        return DataVector(dict(self.iter_tensors(self._delta_keys)), self.meta, self.running, self.moments)

    def __repr__(self) -> str:
        return f"VectorFile({self.path.name}, hospital={self.meta.hospital})"


def _read_header(path: Path, max_bytes: int, max_header_bytes: int) -> tuple[dict, int]:
    if not path.exists():
        raise InvalidVectorError(path, "no such file", "not_a_file")
    if not path.is_file():
        raise InvalidVectorError(path, "not a file (a directory or special file)", "not_a_file")
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidVectorError(path, f"file is {size} bytes, over the limit of {max_bytes}", "too_large")
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] in _PICKLE_MAGIC:
            raise InvalidVectorError(path, "is a pickle file, not safetensors; medvec never unpickles", "pickle")
        if head[:4] == _ZIP_MAGIC:
            raise InvalidVectorError(
                path, "is a zip archive (torch.save pickle), not safetensors; medvec never unpickles", "pickle"
            )
        if len(head) < 8:
            raise InvalidVectorError(path, f"truncated: {size} bytes is shorter than a safetensors header", "truncated")
        (n,) = struct.unpack("<Q", head)
        if n > max_header_bytes:
            raise InvalidVectorError(
                path, f"header length {n} is over the limit of {max_header_bytes} bytes", "too_large"
            )
        if 8 + n > size:
            raise InvalidVectorError(path, f"truncated: header says {n} bytes, file has {size - 8}", "truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidVectorError(path, f"corrupt safetensors header ({exc.__class__.__name__})", "corrupt") from exc
    if not isinstance(header, dict):
        raise InvalidVectorError(path, "corrupt safetensors header (not a JSON object)", "corrupt")
    end = 0
    for k, info in header.items():
        if k == "__metadata__":
            continue
        try:
            _, stop = info["data_offsets"]
            end = max(end, int(stop))
            shape, dtype = info["shape"], info["dtype"]
        except (TypeError, KeyError, ValueError) as exc:
            raise InvalidVectorError(path, f"corrupt safetensors header entry {k!r}", "corrupt") from exc
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(dtype, str)
        ):
            raise InvalidVectorError(path, f"corrupt safetensors header entry {k!r} (shape or dtype)", "corrupt")
    if 8 + n + end > size:
        raise InvalidVectorError(path, f"truncated: tensors need {8 + n + end} bytes, file has {size}", "truncated")
    if 8 + n + end < size:
        raise InvalidVectorError(path, f"{size - 8 - n - end} unexpected trailing bytes after the tensors", "corrupt")
    return header, size


def load_vector(
    path: str | Path,
    base: dict[str, torch.Tensor] | None = None,
    base_sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_metadata_bytes: int = 64 * 1024,
) -> VectorFile:
    """Validate a vector file and return a lazy :class:`VectorFile`.

    Checks, in order: a regular file within the size limit; not a pickle; a
    complete safetensors layout; medvec metadata; floating dtypes; finite values;
    content sha256; and, when given, the base's hash, keys and shapes.

    Raises
    ------
    InvalidVectorError
        naming the file and the first problem found; ``.check`` names the check.
    """
    from safetensors import safe_open

    path = Path(path)
    header, _ = _read_header(path, max_bytes, max_header_bytes)
    meta_raw = header.get("__metadata__") or {}
    if meta_raw.get("format") != FORMAT or "medvec" not in meta_raw:
        raise InvalidVectorError(
            path, f"not a medvec vector (header format is {meta_raw.get('format')!r}, expected {FORMAT!r})", "metadata"
        )
    if len(str(meta_raw["medvec"]).encode()) > max_metadata_bytes:
        raise InvalidVectorError(
            path,
            f"metadata is {len(str(meta_raw['medvec']).encode())} bytes, over the limit of {max_metadata_bytes}",
            "too_large",
        )
    try:
        meta = VectorMeta.model_validate_json(meta_raw["medvec"])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidVectorError(path, f"invalid metadata ({problems})", "metadata") from exc
    expected_content = meta_raw.get("content_sha256", "")
    if base_sha256 is not None and meta.base_sha256 != base_sha256:
        raise InvalidVectorError(
            path,
            f"built on base {meta.base_sha256[:12]}…, expected base {base_sha256[:12]}… (stale or foreign base)",
            "base_hash",
        )
    names = [k for k in header if k != "__metadata__"]
    delta_keys = sorted(k for k in names if ":" not in k)
    extra_keys = sorted(k for k in names if ":" in k)
    bad_prefix = [k for k in extra_keys if not k.startswith(("bn:", "moments:"))]
    if bad_prefix:
        raise InvalidVectorError(path, f"unknown tensor namespace in {bad_prefix[:3]}", "extra_key")
    if base is not None:
        expected = set(vector_keys(base))
        missing, extra = sorted(expected - set(delta_keys)), sorted(set(delta_keys) - expected)
        if missing:
            raise InvalidVectorError(
                path, f"missing {len(missing)} key(s) of the base: {', '.join(missing[:5])}", "missing_key"
            )
        if extra:
            raise InvalidVectorError(
                path, f"{len(extra)} extra key(s) not in the base: {', '.join(extra[:5])}", "extra_key"
            )
        for k in delta_keys:
            want, have = tuple(base[k].shape), tuple(header[k]["shape"])
            if want != have:
                raise InvalidVectorError(path, f"shape mismatch for {k}: vector {have}, base {want}", "shape")
    h = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in sorted(names):
                t = f.get_tensor(k)
                if not t.is_floating_point():
                    raise InvalidVectorError(
                        path, f"{k} has dtype {t.dtype}; vectors hold floating-point tensors only", "dtype"
                    )
                finite = torch.isfinite(t)
                if not bool(finite.all()):
                    n_nan = int(torch.isnan(t).sum())
                    n_inf = int(torch.isinf(t).sum())
                    what = " and ".join(
                        x for x in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if x
                    )
                    raise InvalidVectorError(path, f"{k} holds non-finite values ({what})", "non_finite")
                hash_tensor(h, k, t)
    except InvalidVectorError:
        raise
    except Exception as exc:  # safetensors raises its own error types on corrupt data
        raise InvalidVectorError(path, f"corrupt tensor data ({exc})", "corrupt") from exc
    content = h.hexdigest()
    if content != expected_content:
        raise InvalidVectorError(
            path,
            f"content sha256 {content[:12]}… does not match header {str(expected_content)[:12]}… (modified or corrupt)",
            "integrity",
        )
    return VectorFile(path, meta, content, delta_keys, extra_keys)
