"""The data vector τ_h = θ_h − θ_pre (arXiv 2408.13038, eq. 1) as a typed value object.

* Only floating-point parameters and buffers are differenced.  Integer buffers
  (``num_batches_tracked``) and batch-norm running statistics are excluded: the
  hospital's own running statistics travel beside the deltas as aggregates
  (``bn:<layer>.running_mean|running_var``), optionally with per-layer moment sums
  (``moments:<layer>.count|sum|sumsq``), and :mod:`medvec.batchnorm` combines them.
* Algebra: ``a + b``, ``sum(vectors)``, ``k * v``, ``-v``, ``a - b`` and
  ``v.apply_to(base_state, lam)`` = θ_pre + λ·τ.
* File format: safetensors (never pickle).  The header's metadata holds the
  JSON :class:`VectorMeta` and the ``content_sha256`` of all stored tensors.  The
  deltas may be stored compactly (fp16, bf16, int8, int4, top-k: ``meta.encoding``,
  :mod:`medvec.encoding`); they are decoded to float32 on read.
* :func:`load_vector` validates everything and raises :class:`InvalidVectorError`
  naming the file and the exact problem.  Tensors are then read lazily from a
  memory map, one at a time, so merges never hold more than one tensor per vector.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import medvec
from medvec.batchnorm import MomentSums, RunningStats, is_bn_stat
from medvec.encoding import (
    COMPANIONS,
    FP32,
    Encoding,
    EncodingError,
    check_values,
    companion,
    decode,
    encode_all,
    expected_layout,
    logical_shape,
    topk_count,
)
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
    encoding: Encoding = Field(FP32, description="how the deltas are stored (medvec.encoding); BN aggregates: fp32")

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
        self._stored: dict[str, torch.Tensor] | None = None  # the encoded deltas, once encoded

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

    def encoded(self, encoding: Encoding) -> "DataVector":
        """This vector as ``encoding`` stores it: metadata naming the encoding, deltas as the coordinator decodes them.

        Raises :class:`~medvec.encoding.EncodingError` when a value does not fit (fp16 overflow).
        """
        if self.meta is None:
            raise ValueError("only a vector with metadata can be encoded (the encoding is part of it)")
        stored = encode_all(self.deltas, encoding)
        shapes = {k: tuple(v.shape) for k, v in self.deltas.items()}
        deltas = {k: decode(k, stored.__getitem__, shapes[k], encoding) for k in self.deltas}
        out = DataVector(deltas, self.meta.model_copy(update={"encoding": encoding}), self.running, self.moments)
        out._stored = stored
        return out

    @property
    def encoding(self) -> Encoding:
        return self.meta.encoding if self.meta is not None else FP32

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
        """What a file of this vector stores: the (encoded) deltas and the BN aggregates."""
        if self._stored is None and self.encoding != FP32:
            self._stored = encode_all(self.deltas, self.encoding)
        tensors = dict(self._stored if self._stored is not None else self.deltas)
        if self.running is not None:
            tensors.update(self.running.to_tensors())
        if self.moments is not None:
            tensors.update(self.moments.to_tensors())
        return tensors

    # ---------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write safetensors atomically (temporary file, then rename)."""
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
        write_safetensors(path, tensors, header)
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

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
LARGE_WRITE = 8 * 1024**2  # bytes per write() of a vector file, at offsets that are multiples of it


def write_large(dst: str | Path, src: bytes | memoryview | Path) -> None:
    """Write ``src`` (bytes, or a file to copy) to ``dst`` in writes of :data:`LARGE_WRITE` bytes.

    Linux caches what one large, aligned write filled as 2 MiB folios (ext4 and xfs on recent
    kernels), and a merge's memory map then maps each with one page-table entry instead of
    512 (``docs/performance.md`` measures the difference).  Small writes and ``sendfile``
    (``shutil.copyfile``) leave 4 KiB pages.
    """
    with open(dst, "wb") as out:
        if isinstance(src, Path):
            with open(src, "rb") as f:
                shutil.copyfileobj(f, out, LARGE_WRITE)
            return
        view = memoryview(src)
        for i in range(0, len(view), LARGE_WRITE):
            out.write(view[i : i + LARGE_WRITE])


IN_MEMORY_SAVE = 512 * 1024**2  # tensor bytes up to which a file is serialized in memory before it is written


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` as a safetensors file at ``path``, atomically (temporary file, then rename), in large writes.

    Up to :data:`IN_MEMORY_SAVE` bytes the file is built in memory (about its size again);
    a larger one is written to a scratch file by safetensors' ``save_file`` (which writes
    from the tensors' own memory in safetensors 0.8) and copied.
    """
    from safetensors.torch import save, save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch = tmp.with_name(tmp.name + ".scratch")
    try:
        if sum(t.numel() * t.element_size() for t in tensors.values()) <= IN_MEMORY_SAVE:
            write_large(tmp, save(tensors, metadata=metadata))
        else:
            save_file(tensors, str(scratch), metadata=metadata)
            write_large(tmp, scratch)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        scratch.unlink(missing_ok=True)


MERGE_WINDOW_BYTES = 64 * 1024**2  # mapped file pages a merge may hold across all its vectors
HUGE_PAGE = 2 * 1024**2  # file pages may be mapped as 2 MiB folios: release whole ones
# reads view the read-only map in place and never write to it; torch warns about every such view
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class VectorFile:
    """A validated vector file; its deltas are decoded to float32 on read, one tensor at a time.

    Reads memory-map the file once and view each stored tensor in place (no copy for
    fp32).  Pages already read are handed back to the kernel every ``window`` bytes, so
    a merge over K files holds about K × ``window`` of mapped file, not K whole files.
    """

    def __init__(
        self,
        path: Path,
        meta: VectorMeta,
        content: str,
        header: dict,
        data_start: int,
        shapes: dict[str, tuple[int, ...]],
        extra_keys: list[str],
        identity: tuple | None = None,
    ):
        self.path = path
        self.meta = meta
        self.content_sha256 = content
        self._spans = {  # name → (first byte, end byte, dtype, shape) in the file
            name: (
                data_start + info["data_offsets"][0],
                data_start + info["data_offsets"][1],
                _DTYPES[info["dtype"]],
                info["shape"],
            )
            for name, info in header.items()
            if name != "__metadata__"
        }
        self._data_start = data_start
        self._identity = identity  # (inode, size, mtime) when validated: a replaced file is refused
        self._shapes = shapes
        self._delta_keys = sorted(shapes)
        self._extra_keys = extra_keys
        self._map: mmap.mmap | None = None
        self.window = MERGE_WINDOW_BYTES
        self._touched: tuple[int, int] | None = None

    def keys(self) -> list[str]:
        return list(self._delta_keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    @property
    def encoding(self) -> Encoding:
        return self.meta.encoding

    # ---------------------------------------------------------------- raw stored tensors
    def _open(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:  # the map keeps its own handle
                if self._identity is not None and _identity(os.fstat(f.fileno())) != self._identity:
                    raise InvalidVectorError(self.path, "changed on disk after it was validated", "integrity")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _stored(self, name: str) -> torch.Tensor:
        """A view of one stored tensor in the mapped file (valid until :meth:`close`)."""
        return self._flat(name).view(self._spans[name][3])

    def _flat(self, name: str) -> torch.Tensor:
        """:meth:`_stored` as one flat run of values."""
        lo, hi, dtype, _ = self._spans[name]
        return self._view(lo, hi, dtype)

    def _view(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """The file's bytes [lo, hi) as a flat tensor where they lie, recorded as read (for :meth:`_release_pages`)."""
        m = self._map if self._map is not None else self._open()
        touched = self._touched
        self._touched = (lo, hi) if touched is None else (min(lo, touched[0]), max(hi, touched[1]))
        if hi == lo:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(m, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=lo)

    def release(self) -> None:
        """Hand every page read so far back to the kernel (the file stays mapped)."""
        self._release_pages(force=True)

    def _release_pages(self, force: bool = False) -> None:
        """Give read pages back to the kernel once ``window`` bytes have been touched (they stay in the page cache).

        Ranges end on a 2 MiB boundary, so a huge page the next read continues in is not split.
        """
        if self._map is None or self._touched is None:
            return
        lo, hi = self._touched
        if not force and hi - lo < self.window:
            return
        lo = lo // HUGE_PAGE * HUGE_PAGE
        end = len(self._map) if force else hi // HUGE_PAGE * HUGE_PAGE
        if end > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, min(end, len(self._map)) - lo)
        self._touched = None if force or end >= hi else (max(end, lo), hi)

    def close(self) -> None:
        """Drop this file's map (reads map it again). Views handed out keep it alive; it goes with the last one."""
        self._map, self._touched = None, None

    # ---------------------------------------------------------------- decoded deltas
    def _decoded(self, key: str) -> torch.Tensor:
        """The float32 delta ``key``; for fp32, a view of the mapped file."""
        return decode(key, self._stored, self._shapes[key], self.encoding)

    def tensor(self, key: str) -> torch.Tensor:
        """The float32 delta ``key`` (a copy the caller owns)."""
        t = self._decoded(key)
        t = t.clone() if self.encoding.name == "fp32" else t
        self._release_pages()
        return t

    def scaled(self, key: str, alpha: float) -> torch.Tensor:
        """A new tensor ``alpha · τ[key]``, computed from the stored tensor where it lies (one pass)."""
        out = torch.mul(self._decoded(key), alpha)
        self._release_pages()
        return out

    def accumulate(self, key: str, out: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha · τ[key]`` in place for a contiguous ``out``, reading the stored tensor where it lies.

        fp32 is added straight from the mapped file (no copy); ``out`` may be flat or shaped.
        """
        if self.encoding.name == "fp32":  # the common case, without decode's indirection
            src = self._flat(key)
        else:
            src = self._decoded(key).reshape(-1)
        out.add_(src if out.ndim == 1 else src.view(out.shape), alpha=alpha)
        self._release_pages()

    # ---------------------------------------------------------------- runs of fp32 deltas
    def fp32_layout(self) -> tuple | None:
        """The deltas' places relative to the tensor data, when every delta is stored as plain fp32 (else None).

        Two files with equal layouts hold the same tensors at the same offsets: a merge can then add whole
        runs of consecutive deltas at once (:meth:`runs`, :meth:`add_range`).
        """
        if self.encoding.name != "fp32":
            return None
        out = []
        for k in self._delta_keys:
            lo, hi, dtype, shape = self._spans[k]
            if dtype != torch.float32:
                return None
            out.append((lo - self._data_start, hi - self._data_start, k, tuple(shape)))
        return tuple(sorted(out))

    def runs(self) -> list[list[tuple[int, int, str, tuple[int, ...]]]]:
        """The fp32 deltas in file order, grouped into runs that follow each other without a gap."""
        groups: list[list] = []
        for entry in self.fp32_layout() or ():
            if groups and groups[-1][-1][1] == entry[0]:
                groups[-1].append(entry)
            else:
                groups.append([entry])
        return groups

    def add_range(
        self, offset: int, n: int, pieces: list[tuple[torch.Tensor, int, int]], alpha: float, first: bool = False
    ) -> None:
        """For each piece ``(out, a, b)``: ``out (+)= alpha ·`` values ``a:b`` of the ``n`` fp32 values at
        ``offset`` bytes into the tensor data (``first``: write instead of add)."""
        lo = self._data_start + offset
        src = self._view(lo, lo + 4 * n, torch.float32)
        for out, a, b in pieces:
            if first:
                torch.mul(src[a:b], alpha, out=out)
            else:
                out.add_(src[a:b], alpha=alpha)
        del src
        self._release_pages()

    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Stored tensors by name, as copies (BN aggregates; deltas through :meth:`tensor`)."""
        for k in keys:
            yield k, self._stored(k).clone()
        self._release_pages(force=True)

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
        deltas = {k: self.tensor(k) for k in self._delta_keys}
        vector = DataVector(deltas, self.meta, self.running, self.moments)
        if self.encoding.name != "fp32":  # the stored bytes as they are: encoding again need not reproduce them
            vector._stored = {
                k: self._stored(k).clone() for k in self._spans if k.split(":", 1)[0] not in ("bn", "moments")
            }
        self.close()
        return vector

    def __getstate__(self) -> dict:  # a mapped file does not pickle: it reopens in the other process
        state = dict(self.__dict__)
        state.update(_map=None, _touched=None)
        return state

    def __repr__(self) -> str:
        return f"VectorFile({self.path.name}, hospital={self.meta.hospital}, {self.encoding.label})"


def _read_header(path: Path, max_bytes: int, max_header_bytes: int) -> tuple[dict, int]:
    """The parsed safetensors header and where the tensor data starts (8 + header length)."""
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
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
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
    return header, 8 + n


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
    complete safetensors layout; medvec metadata; the stored tensors' names, dtypes
    and shapes as the vector's encoding lays them out (:mod:`medvec.encoding`);
    finite values, valid scales and indices; content sha256; and, when given, the
    base's hash, keys and shapes.

    Raises
    ------
    InvalidVectorError
        naming the file and the first problem found; ``.check`` names the check.
    """
    from safetensors import safe_open

    path = Path(path)
    identity = _identity(path.stat()) if path.is_file() else None
    header, data_start = _read_header(path, max_bytes, max_header_bytes)
    meta, expected_content = _read_meta(path, header, max_metadata_bytes)
    if base_sha256 is not None and meta.base_sha256 != base_sha256:
        raise InvalidVectorError(
            path,
            f"built on base {meta.base_sha256[:12]}…, expected base {base_sha256[:12]}… (stale or foreign base)",
            "base_hash",
        )
    names = [k for k in header if k != "__metadata__"]
    delta_keys, extra_keys = _partition(path, names, meta.encoding)
    try:
        with safe_open(str(path), framework="pt") as f:
            cache: dict[str, torch.Tensor] = {}

            def get(name: str) -> torch.Tensor:
                if name not in cache:
                    cache[name] = f.get_tensor(name)
                return cache[name]

            shapes = {k: _check_layout(path, k, header, get, meta.encoding) for k in delta_keys}
            if base is not None:
                _check_against_base(path, shapes, base)
            content = _check_values(path, names, get, cache)
    except InvalidVectorError:
        raise
    except Exception as exc:  # safetensors raises its own error types on corrupt data
        raise InvalidVectorError(path, f"corrupt tensor data ({exc})", "corrupt") from exc
    if content != expected_content:
        raise InvalidVectorError(
            path,
            f"content sha256 {content[:12]}… does not match header {str(expected_content)[:12]}… (modified or corrupt)",
            "integrity",
        )
    return VectorFile(path, meta, content, header, data_start, shapes, extra_keys, identity)


def _identity(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_meta(path: Path, header: dict, max_metadata_bytes: int) -> tuple[VectorMeta, str]:
    meta_raw = header.get("__metadata__") or {}
    if not isinstance(meta_raw, dict):
        meta_raw = {}
    if meta_raw.get("format") != FORMAT or "medvec" not in meta_raw:
        raise InvalidVectorError(
            path, f"not a medvec vector (header format is {meta_raw.get('format')!r}, expected {FORMAT!r})", "metadata"
        )
    size = len(str(meta_raw["medvec"]).encode())
    if size > max_metadata_bytes:
        raise InvalidVectorError(path, f"metadata is {size} bytes, over the limit of {max_metadata_bytes}", "too_large")
    try:
        meta = VectorMeta.model_validate_json(meta_raw["medvec"])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidVectorError(path, f"invalid metadata ({problems})", "metadata") from exc
    return meta, meta_raw.get("content_sha256", "")


def _partition(path: Path, names: list[str], enc: Encoding) -> tuple[list[str], list[str]]:
    """(delta keys, BN aggregate keys); every companion tensor must belong to a delta the encoding stores it for."""
    delta_keys = sorted(k for k in names if ":" not in k)
    prefixed = sorted(k for k in names if ":" in k)
    unknown = [k for k in prefixed if k.split(":", 1)[0] not in ("bn", "moments", *COMPANIONS)]
    if unknown:
        raise InvalidVectorError(path, f"unknown tensor namespace in {unknown[:3]}", "extra_key")
    wanted = enc.companions()
    stray = [k for k in prefixed if k.split(":", 1)[0] in COMPANIONS and k.split(":", 1)[0] not in wanted]
    stray += [k for k in prefixed if k.split(":", 1)[0] in wanted and k.split(":", 1)[1] not in delta_keys]
    if stray:
        raise InvalidVectorError(path, f"{stray[0]} is not a tensor that a {enc.label} vector stores", "encoding")
    present = set(names)
    for k in delta_keys:
        for prefix in wanted:
            if companion(prefix, k) not in present:
                raise InvalidVectorError(path, f"{k} lacks {companion(prefix, k)}, which {enc.label} needs", "encoding")
    return delta_keys, [k for k in prefixed if k.startswith(("bn:", "moments:"))]


def _check_layout(path: Path, key: str, header: dict, get, enc: Encoding) -> tuple[int, ...]:
    """The delta's logical shape, after its stored tensors' dtypes and shapes match the encoding's layout."""
    payload_shape = tuple(header[key]["shape"])
    try:
        shape = logical_shape(key, get, payload_shape, enc)
        stored = payload_shape[0] if enc.name == "topk" and len(payload_shape) == 1 else None
        for name, (dtype, want) in expected_layout(key, shape, enc, stored).items():
            have_dtype = _DTYPES.get(header[name]["dtype"], header[name]["dtype"])
            if have_dtype != dtype:
                raise InvalidVectorError(
                    path, f"{name} has dtype {have_dtype}; a {enc.label} vector stores {dtype}", "dtype"
                )
            if tuple(header[name]["shape"]) != tuple(want):
                raise InvalidVectorError(
                    path, f"{name} has shape {tuple(header[name]['shape'])}; {enc.label} needs {tuple(want)}", "shape"
                )
        if enc.name == "topk" and stored != topk_count(math.prod(shape), enc.density or 1.0):
            raise EncodingError(
                f"{key} keeps {stored} entries; topk/{enc.density:g} of {shape} keeps {topk_count(math.prod(shape), enc.density or 1.0)}"
            )
        check_values(key, get, shape, enc)
    except EncodingError as exc:
        raise InvalidVectorError(path, str(exc), "encoding") from exc
    return shape


def _check_against_base(path: Path, shapes: dict[str, tuple[int, ...]], base: dict[str, torch.Tensor]) -> None:
    expected = set(vector_keys(base))
    missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
    if missing:
        raise InvalidVectorError(
            path, f"missing {len(missing)} key(s) of the base: {', '.join(missing[:5])}", "missing_key"
        )
    if extra:
        raise InvalidVectorError(
            path, f"{len(extra)} extra key(s) not in the base: {', '.join(extra[:5])}", "extra_key"
        )
    for k, have in sorted(shapes.items()):
        want = tuple(base[k].shape)
        if want != have:
            raise InvalidVectorError(path, f"shape mismatch for {k}: vector {have}, base {want}", "shape")


def _check_values(path: Path, names: list[str], get, cache: dict) -> str:
    """Finite floating values everywhere (BN aggregates floating only); returns the content sha256."""
    h = hashlib.sha256()
    for k in sorted(names):
        t = get(k)
        if t.dtype not in _DTYPES.values():
            raise InvalidVectorError(path, f"{k} has dtype {t.dtype}, which no vector stores", "dtype")
        if ":" in k and k.split(":", 1)[0] in ("bn", "moments") and not t.is_floating_point():
            raise InvalidVectorError(path, f"{k} has dtype {t.dtype}; BN aggregates are floating point", "dtype")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = " and ".join(x for x in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if x)
            raise InvalidVectorError(path, f"{k} holds non-finite values ({what})", "non_finite")
        hash_tensor(h, k, t)
        cache.pop(k, None)
    return h.hexdigest()
