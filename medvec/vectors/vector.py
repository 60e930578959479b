"""The data vector τ_h = θ_h − θ_start (arXiv 2408.13038, eq. 1) as a typed value object."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field

import medvec
from medvec.batchnorm import MomentSums, RunningStats, is_bn_stat
from medvec.models import head_keys  # the head's one definition (with models.head_name); importable from here too
from medvec.timing import utcnow
from medvec.vectors.encoding import (
    FP32,
    Encoding,
    decode,
    encode_all,
)
from medvec.vectors.format import FORMAT, content_sha256, write_safetensors

Trainable = Literal["all", "bn_affine", "head"]  # privacy.trainable: what DP-SGD trains
TRAINABLE: tuple[str, ...] = get_args(Trainable)


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
    trainable: Trainable = Field(
        "all", description="what DP-SGD trained (privacy.trainable); a vector of head or bn_affine carries only that"
    )


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
    encoding: Encoding = Field(
        FP32, description="how the deltas are stored (medvec.vectors.encoding); BN aggregates: fp32"
    )

    @property
    def start(self) -> str:
        """The sha256 of the weights this vector is a difference from."""
        return self.start_sha256 or self.base_sha256


def vector_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys that a data vector differences: floating point, not BN running statistics."""
    return [k for k, v in state.items() if v.is_floating_point() and not is_bn_stat(k)]


def bn_affine_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Every batch-norm layer's scale and shift (``weight``, ``bias`` beside a ``running_mean``)."""
    layers = [k.removesuffix("running_mean") for k in state if k.endswith(".running_mean")]
    return [p + n for p in layers for n in ("weight", "bias") if p + n in state]


def trained_keys(state: dict[str, torch.Tensor], trainable: str = "all") -> list[str]:
    """The keys a vector of ``trainable`` (``privacy.trainable``) carries, in :func:`vector_keys`' order: every
    one for ``all``; the head's (:func:`~medvec.models.head_keys`) for ``head``; the batch-norm scales and shifts
    and the head's for ``bn_affine``. The hospital trains exactly these, and intake expects exactly these."""
    if trainable == "all":
        return vector_keys(state)
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown privacy.trainable {trainable!r}: valid are {', '.join(TRAINABLE)}")
    chosen = set(head_keys(state)) | (set(bn_affine_keys(state)) if trainable == "bn_affine" else set())
    return [k for k in vector_keys(state) if k in chosen]


def new_vector_id(hospital: str, content_sha256: str, when: _dt.datetime | None = None) -> str:
    """A vector id: ``<hospital>-<time to the microsecond>-<first 8 hex digits of the content sha256>``, the time
    ``when`` (default: now, in UTC)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return f"{hospital}-{when.strftime('%Y%m%dT%H%M%S%f')}-{content_sha256[:8]}"


class VectorLike(Protocol):
    """What merging reads of a vector: a :class:`DataVector` in memory, a validated
    :class:`~medvec.vectors.file.VectorFile` read in place, or a norm-clipped one
    (:class:`~medvec.coordinator.defence.Scaled`)."""

    @property
    def meta(self) -> VectorMeta:
        """The metadata the hospital published with the vector."""
        ...

    @property
    def content_sha256(self) -> str:
        """The sha256 of the vector's stored tensors (:func:`~medvec.vectors.format.content_sha256`)."""
        ...

    @property
    def running(self) -> RunningStats | None:
        """The hospital's BN running statistics (strategy ``average``); None when the vector carries none."""
        ...

    @property
    def moments(self) -> MomentSums | None:
        """BN moment sums of the hospital's data under a merged model (``recompute``); None when it carries none."""
        ...

    def keys(self) -> list[str]:
        """The names of the deltas, sorted."""
        ...

    def tensor(self, key: str) -> torch.Tensor:
        """The float32 delta ``key``, to read (a :class:`DataVector` hands out its own tensor; others a copy)."""
        ...

    def scaled(self, key: str, alpha: float) -> torch.Tensor:
        """A new tensor ``alpha · τ[key]``."""
        ...

    def accumulate(self, key: str, out: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha · τ[key]`` in place."""
        ...

    def to_vector(self) -> DataVector:
        """The whole vector in memory."""
        ...


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
        self._meta = meta
        self.running = running
        self.moments = moments
        self._stored: dict[str, torch.Tensor] | None = None  # the encoded deltas, once encoded

    @property
    def meta(self) -> VectorMeta:
        """The metadata the hospital published with the vector; a derived vector (a merge's τ_m, a sum) has
        none, and asking for it is a ValueError."""
        if self._meta is None:
            raise ValueError("a derived vector (a merge or a sum of vectors) has no metadata")
        return self._meta

    @meta.setter
    def meta(self, meta: VectorMeta | None) -> None:
        self._meta = meta

    @property
    def has_meta(self) -> bool:
        """Whether this is a hospital's vector with its metadata (not a derived one)."""
        return self._meta is not None

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
        for k in trained_keys(base, privacy.trainable if privacy is not None else "all"):
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

        Raises :class:`~medvec.vectors.encoding.EncodingError` when a value does not fit (fp16 overflow).
        """
        if not self.has_meta:
            raise ValueError("only a vector with metadata can be encoded (the encoding is part of it)")
        stored = encode_all(self.deltas, encoding)
        shapes = {k: tuple(v.shape) for k, v in self.deltas.items()}
        deltas = {k: decode(k, stored.__getitem__, shapes[k], encoding) for k in self.deltas}
        out = DataVector(deltas, self.meta.model_copy(update={"encoding": encoding}), self.running, self.moments)
        out._stored = stored
        return out

    @property
    def encoding(self) -> Encoding:
        """How this vector's deltas are stored (fp32 unless the metadata names another encoding)."""
        return self._meta.encoding if self._meta is not None else FP32

    # ---------------------------------------------------------------- algebra
    def keys(self) -> list[str]:
        """The names of the deltas, sorted."""
        return sorted(self.deltas)

    def tensor(self, key: str) -> torch.Tensor:
        """The delta ``key`` as held, not a copy: writing to it changes this vector."""
        return self.deltas[key]

    def scaled(self, key: str, alpha: float) -> torch.Tensor:
        """A new tensor ``alpha · τ[key]``."""
        return torch.mul(self.deltas[key], alpha)

    def accumulate(self, key: str, out: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha · τ[key]`` in place (``out`` flat or shaped)."""
        src = self.deltas[key]
        out.add_(src.reshape(out.shape), alpha=alpha)

    def _combine(self, other: "DataVector", op) -> "DataVector":
        if set(self.deltas) != set(other.deltas):
            raise ValueError(f"vectors differ in keys: {sorted(set(self.deltas) ^ set(other.deltas))[:5]}")
        return DataVector({k: op(self.deltas[k], other.deltas[k]) for k in self.deltas})

    def __add__(self, other: "DataVector | int") -> "DataVector":
        if isinstance(other, int):  # so that sum(vectors) works: it starts from 0
            if other != 0:
                return NotImplemented
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
        """The sha256 of what a file of this vector stores (the encoded deltas and BN aggregates), computed anew."""
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
        if not self.has_meta:
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

    def __repr__(self) -> str:
        who = self._meta.hospital if self._meta is not None else "derived"
        return f"DataVector({who}, {len(self.deltas)} tensors, norm={self.norm():.4g})"
