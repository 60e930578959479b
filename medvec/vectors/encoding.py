"""Storage encodings of a data vector's deltas: what a hospital uploads and the store keeps.

A vector file stores each delta ``k`` as a payload tensor named ``k``, plus companions
for the encodings that need them.  The encoding is part of the signed metadata
(:class:`medvec.vectors.vector.VectorMeta`), and intake decodes every delta back to float32,
so merges never see an encoded value.  Batch-norm aggregates (``bn:``, ``moments:``)
are never encoded.

==========  ===============================  ==================================  =====================
name        payload ``k``                    companions                          bytes per entry
==========  ===============================  ==================================  =====================
``fp32``    float32, the delta's shape       none                                4
``fp16``    float16                          none                                2
``bf16``    bfloat16                         none                                2
``int8``    int8 q, value = q·s              ``scale:k`` float32 [1]             1
``int8_channel``  int8 q, value = q·s[c]     ``scale:k`` float32 [shape[0]]      1
``int4``    uint8, two 4-bit q per byte      ``scale:k`` float32 [groups],       0.5
            (q + 8, low nibble first)        ``shape:k`` int64 (the shape)
``topk``    float16 values of the            ``index:k`` int32 (flat, ascending),  6 × density
            largest-magnitude entries        ``shape:k`` int64
==========  ===============================  ==================================  =====================

Quantized encodings are symmetric: ``s = max|x| / qmax`` (qmax 127 for int8, 7 for
int4, per group of ``group_size`` consecutive entries), ``q = round(x / s)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medvec.config import VectorsConfig
from medvec.errors import UserError

NAMES = ("fp32", "fp16", "bf16", "int8", "int8_channel", "int4", "topk")
COMPANIONS = ("scale", "index", "shape")  # tensor name prefixes: "scale:<key>" and so on
FP16_MAX = float(torch.finfo(torch.float16).max)
MAX_NUMEL = 1 << 29  # a decoded delta of at most 2 GiB in float32, the largest a vector file may be
QMAX = {"int8": 128, "int8_channel": 128, "int4": 8}  # the largest |q| a stored value can hold (int8: −128)


class EncodingError(UserError, ValueError):
    """A value an encoding cannot hold, or a stored tensor that does not fit its layout (intake: InvalidVectorError)."""


class Encoding(BaseModel):
    """How a vector's deltas are stored (recorded in the signed metadata)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["fp32", "fp16", "bf16", "int8", "int8_channel", "int4", "topk"] = "fp32"
    group_size: int | None = Field(None, ge=2, le=1 << 20, description="int4: entries per scale")
    density: float | None = Field(None, gt=0, le=1, description="topk: share of entries kept per tensor")

    @model_validator(mode="after")
    def _settings_fit(self) -> "Encoding":
        if (self.name == "int4") != (self.group_size is not None):
            raise ValueError("int4 needs group_size, and only int4 takes one")
        if (self.name == "topk") != (self.density is not None):
            raise ValueError("topk needs density, and only topk takes one")
        if self.group_size is not None and self.group_size % 2:
            raise ValueError(f"int4 group_size must be even, not {self.group_size}")
        return self

    @property
    def label(self) -> str:
        """``int4/g64``, ``topk/0.1`` or the plain name."""
        if self.name == "int4":
            return f"int4/g{self.group_size}"
        if self.name == "topk":
            return f"topk/{self.density:g}"
        return self.name

    def companions(self) -> tuple[str, ...]:
        """The companion tensors stored beside each payload (``scale``, ``index``, ``shape``); none for floats."""
        return {
            "int8": ("scale",),
            "int8_channel": ("scale",),
            "int4": ("scale", "shape"),
            "topk": ("index", "shape"),
        }.get(self.name, ())

    def payload_dtype(self) -> torch.dtype:
        """The dtype of each payload tensor (uint8 for int4's packed pairs, float16 for topk's values)."""
        return {
            "fp32": torch.float32,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
            "int8": torch.int8,
            "int8_channel": torch.int8,
            "int4": torch.uint8,
            "topk": torch.float16,
        }[self.name]


FP32 = Encoding()


def encoding_of(cfg: VectorsConfig) -> Encoding:
    """The :class:`Encoding` that ``vectors.*`` settings name (``group_size`` for int4, ``density`` for topk)."""
    if cfg.encoding == "int4":
        return Encoding(name="int4", group_size=cfg.group_size)
    if cfg.encoding == "topk":
        return Encoding(name="topk", density=cfg.density)
    return Encoding(name=cfg.encoding)


def companion(prefix: str, key: str) -> str:
    """The name of a delta's companion tensor: ``<prefix>:<key>``."""
    return f"{prefix}:{key}"


# ------------------------------------------------------------------------ encode


def encode(key: str, t: torch.Tensor, enc: Encoding) -> dict[str, torch.Tensor]:
    """The stored tensors of one float delta: the payload ``key`` and its companions."""
    t = t.detach().float().contiguous()
    if enc.name == "fp32":
        return {key: t}
    if enc.name in ("fp16", "topk") and t.numel() and float(t.abs().max()) > FP16_MAX:
        raise EncodingError(f"{key}: values up to {float(t.abs().max()):.3g} overflow float16; use bf16 or fp32")
    if enc.name == "fp16":
        return {key: t.half()}
    if enc.name == "bf16":
        return {key: t.bfloat16()}
    if enc.name in ("int8", "int8_channel"):
        return _encode_int8(key, t, per_channel=enc.name == "int8_channel")
    if enc.name == "int4":
        return _encode_int4(key, t, enc.group_size or 0)
    return _encode_topk(key, t, enc.density or 1.0)


def channel_scaled(shape: torch.Size | tuple[int, ...], per_channel: bool) -> bool:
    """Whether an int8 tensor of ``shape`` has one scale per output channel (dim 0) rather than one in all."""
    return per_channel and len(shape) >= 2 and math.prod(shape) > 0


def _encode_int8(key: str, t: torch.Tensor, per_channel: bool) -> dict[str, torch.Tensor]:
    if channel_scaled(t.shape, per_channel):
        peak = t.abs().reshape(t.shape[0], -1).amax(1)
        scale = peak / 127.0
        view = scale.view(-1, *([1] * (t.ndim - 1)))
    else:
        scale = (t.abs().max() if t.numel() else torch.tensor(0.0)).reshape(1) / 127.0
        view = scale
    q = torch.where(view > 0, t / torch.where(view > 0, view, torch.ones_like(view)), torch.zeros_like(t))
    return {key: q.round().clamp(-127, 127).to(torch.int8), companion("scale", key): scale.float().contiguous()}


def _encode_int4(key: str, t: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    flat = t.reshape(-1)
    n = flat.numel()
    groups = math.ceil(n / group)
    padded = torch.zeros(groups * group)
    padded[:n] = flat
    g = padded.view(groups, group)
    scale = g.abs().amax(1) / 7.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    # groups·group is even and ≥ n, so the padding's zeros (stored as 8) fill an odd n's last nibble
    q = (g / safe).round().clamp(-7, 7).to(torch.int16).reshape(-1)[: _even(n)] + 8
    packed = (q[0::2] | (q[1::2] << 4)).to(torch.uint8)
    return {
        key: packed.contiguous(),
        companion("scale", key): scale.float().contiguous(),
        companion("shape", key): torch.tensor(list(t.shape), dtype=torch.int64),
    }


def _even(n: int) -> int:
    return n + (n % 2)


def topk_count(numel: int, density: float) -> int:
    """How many of ``numel`` entries topk keeps: ``round(density·numel)``, at least 1 and at most ``numel``
    (0 for an empty tensor)."""
    return min(numel, max(1, round(density * numel))) if numel else 0


def _encode_topk(key: str, t: torch.Tensor, density: float) -> dict[str, torch.Tensor]:
    flat = t.reshape(-1)
    k = topk_count(flat.numel(), density)
    index = flat.abs().topk(k, sorted=False).indices.sort().values if k else torch.zeros(0, dtype=torch.int64)
    return {
        key: flat[index].half().contiguous(),
        companion("index", key): index.to(torch.int32).contiguous(),
        companion("shape", key): torch.tensor(list(t.shape), dtype=torch.int64),
    }


def encode_all(deltas: dict[str, torch.Tensor], enc: Encoding) -> dict[str, torch.Tensor]:
    """The stored tensors of every delta, payloads and companions, in one dict."""
    out: dict[str, torch.Tensor] = {}
    for k, t in deltas.items():
        out.update(encode(k, t, enc))
    return out


# ------------------------------------------------------------------------ layout checks and decode


def logical_shape(key: str, get: Callable[[str], torch.Tensor], payload_shape: tuple[int, ...], enc: Encoding):
    """The delta's own shape: the payload's, or the ``shape:key`` companion's values (checked)."""
    if "shape" not in enc.companions():
        return tuple(payload_shape)
    s = get(companion("shape", key))
    if s.dtype != torch.int64 or s.ndim != 1 or s.numel() > 8:
        raise EncodingError(f"{companion('shape', key)} must be a 1-D int64 of at most 8 dimensions")
    shape = tuple(int(d) for d in s.tolist())
    if any(d < 0 for d in shape) or math.prod(shape) > MAX_NUMEL:
        raise EncodingError(f"{companion('shape', key)} holds an impossible shape {shape}")
    return shape


def expected_layout(key: str, shape: tuple[int, ...], enc: Encoding, stored: int | None = None) -> dict:
    """name → (dtype, shape) that the stored tensors of a delta of ``shape`` must have.

    ``stored`` is the payload's length for ``topk`` (how many entries the hospital kept).
    """
    n = math.prod(shape)
    pd = enc.payload_dtype()
    if enc.name in ("fp32", "fp16", "bf16"):
        return {key: (pd, shape)}
    if enc.name in ("int8", "int8_channel"):
        scales = shape[0] if channel_scaled(shape, enc.name == "int8_channel") else 1
        return {key: (pd, shape), companion("scale", key): (torch.float32, (scales,))}
    if enc.name == "int4":
        groups = math.ceil(n / (enc.group_size or 1))
        return {
            key: (pd, (_even(n) // 2,)),
            companion("scale", key): (torch.float32, (groups,)),
            companion("shape", key): (torch.int64, (len(shape),)),
        }
    m = topk_count(n, enc.density or 1.0) if stored is None else stored
    return {
        key: (pd, (m,)),
        companion("index", key): (torch.int32, (m,)),
        companion("shape", key): (torch.int64, (len(shape),)),
    }


def check_values(key: str, get: Callable[[str], torch.Tensor], shape: tuple[int, ...], enc: Encoding) -> None:
    """Value rules beyond dtype and shape: scales finite and ≥ 0; top-k indices ascending and in range."""
    if "scale" in enc.companions():
        s = get(companion("scale", key))
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise EncodingError(f"{companion('scale', key)} holds negative or non-finite scales")
        if not bool(torch.isfinite(s * QMAX[enc.name]).all()):  # so that every decoded value is finite
            raise EncodingError(f"{companion('scale', key)} holds scales too large for float32 values")
    if enc.name == "topk":
        idx = get(companion("index", key)).long()
        n = math.prod(shape)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise EncodingError(f"{companion('index', key)} has indices outside [0, {n})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise EncodingError(f"{companion('index', key)} is not strictly ascending")


def decode(key: str, get: Callable[[str], torch.Tensor], shape: tuple[int, ...], enc: Encoding) -> torch.Tensor:
    """The float32 delta from its stored tensors (``get`` reads one stored tensor by name)."""
    payload = get(key)
    if enc.name in ("fp32", "fp16", "bf16"):
        return payload.float().reshape(shape)
    if enc.name in ("int8", "int8_channel"):
        scale = get(companion("scale", key))
        if channel_scaled(shape, enc.name == "int8_channel"):
            scale = scale.view(-1, *([1] * (len(shape) - 1)))
        return (payload.float() * scale).reshape(shape)
    n = math.prod(shape)
    if enc.name == "int4":
        b = payload.to(torch.int16)
        q = torch.stack([b & 0xF, b >> 4], 1).reshape(-1)[:n].float().sub_(8.0)
        scale = get(companion("scale", key))
        group = enc.group_size or 1
        return q.mul_(scale.repeat_interleave(group)[:n]).reshape(shape)
    out = torch.zeros(n)
    out[get(companion("index", key)).long()] = payload.float()
    return out.reshape(shape)
