"""Validation of a vector file before anything reads it: :func:`load_vector`."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from pydantic import ValidationError

from medvec.models import hash_tensor
from medvec.vectors.encoding import (
    COMPANIONS,
    Encoding,
    EncodingError,
    check_values,
    companion,
    expected_layout,
    logical_shape,
    topk_count,
)
from medvec.vectors.file import VectorFile, _identity
from medvec.vectors.format import DEFAULT_MAX_BYTES, DEFAULT_MAX_HEADER_BYTES, DTYPES, FORMAT, InvalidVectorError
from medvec.vectors.vector import VectorMeta, trained_keys, vector_keys

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


_ZIP_MAGIC = b"PK\x03\x04"


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
    and shapes as the vector's encoding lays them out (:mod:`medvec.vectors.encoding`);
    finite values, valid scales and indices; content sha256; and, when given, the
    base's hash, keys and shapes (a DP vector of ``privacy.trainable`` head or bn_affine: exactly the keys that mode
    trains; the others then read as zero, :class:`~medvec.vectors.file.VectorFile`).

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
            trainable = meta.privacy.trainable if meta.privacy is not None else "all"
            absent = _check_against_base(path, shapes, base, trainable) if base is not None else {}
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
    return VectorFile(path, meta, content, header, data_start, shapes, extra_keys, identity, absent)


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
            have_dtype = DTYPES.get(header[name]["dtype"], header[name]["dtype"])
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


def _check_against_base(
    path: Path, shapes: dict[str, tuple[int, ...]], base: dict[str, torch.Tensor], trainable: str
) -> dict[str, tuple[int, ...]]:
    """The base's keys, shapes and, for a partial vector (``trainable`` head or bn_affine), exactly the keys that
    mode trains; returns the shapes of the base's keys the vector leaves out, which read as zero."""
    expected = set(trained_keys(base, trainable))
    missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
    if missing:
        of = "the base" if trainable == "all" else f"the base that privacy.trainable {trainable} trains"
        raise InvalidVectorError(
            path, f"missing {len(missing)} key(s) of {of}: {', '.join(missing[:5])}", "missing_key"
        )
    if extra:
        outside = "not in the base" if trainable == "all" else f"that privacy.trainable {trainable} does not train"
        raise InvalidVectorError(path, f"{len(extra)} extra key(s) {outside}: {', '.join(extra[:5])}", "extra_key")
    for k, have in sorted(shapes.items()):
        want = tuple(base[k].shape)
        if want != have:
            raise InvalidVectorError(path, f"shape mismatch for {k}: vector {have}, base {want}", "shape")
    return {k: tuple(base[k].shape) for k in vector_keys(base) if k not in shapes}


def _check_values(path: Path, names: list[str], get, cache: dict) -> str:
    """Finite floating values everywhere (BN aggregates floating only); returns the content sha256."""
    h = hashlib.sha256()
    for k in sorted(names):
        t = get(k)
        if t.dtype not in DTYPES.values():
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
