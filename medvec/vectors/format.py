"""The vector file format: safetensors (never pickle) with medvec's metadata and a content hash, written in large writes."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from medvec.errors import UserError
from medvec.models import hash_tensor

FORMAT = "medvec-vector/1"


DEFAULT_MAX_BYTES = 2 * 1024**3


DEFAULT_MAX_HEADER_BYTES = 16 * 1024**2


class InvalidVectorError(UserError, ValueError):
    """A vector that fails validation; the message names the file and the problem."""

    def __init__(self, source: str | Path, problem: str, check: str = "invalid"):
        self.source = str(source)
        self.problem = problem
        self.check = check
        super().__init__(f"{source}: {problem}")


def content_sha256(tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """A vector's content hash: sha256 over the named tensors in key order (name, dtype, shape and bytes each)."""
    items = sorted(tensors.items()) if isinstance(tensors, dict) else sorted(tensors, key=lambda kv: kv[0])
    h = hashlib.sha256()
    for k, t in items:
        hash_tensor(h, k, t)
    return h.hexdigest()


DTYPES = {
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
