"""A validated vector file read in place: a memory map, one tensor at a time, and the streaming weighted sum."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from medvec.batchnorm import MomentSums, RunningStats
from medvec.vectors.encoding import Encoding, decode
from medvec.vectors.format import DTYPES, InvalidVectorError
from medvec.vectors.vector import DataVector, VectorLike, VectorMeta

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
        absent: dict[str, tuple[int, ...]] | None = None,
    ):
        self.path = path
        self.meta = meta
        self.content_sha256 = content
        self._spans = {  # name → (first byte, end byte, dtype, shape) in the file
            name: (
                data_start + info["data_offsets"][0],
                data_start + info["data_offsets"][1],
                DTYPES[info["dtype"]],
                info["shape"],
            )
            for name, info in header.items()
            if name != "__metadata__"
        }
        self._data_start = data_start
        self._identity = identity  # (inode, size, mtime) when validated: a replaced file is refused
        # the base's deltas a partial vector (DP of head or bn_affine) leaves out: read as zero, so it merges
        # with full vectors by every method
        self._absent = dict(absent or {})
        self._shapes = {**shapes, **self._absent}
        self._delta_keys = sorted(self._shapes)
        self._extra_keys = extra_keys
        self._map: mmap.mmap | None = None
        self.window = MERGE_WINDOW_BYTES
        self._touched: tuple[int, int] | None = None

    def keys(self) -> list[str]:
        """The names of the deltas (not the BN aggregates), sorted."""
        return list(self._delta_keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """The decoded shape of delta ``key`` (whatever shape the encoding stores it in)."""
        return self._shapes[key]

    @property
    def encoding(self) -> Encoding:
        """How this file's deltas are stored, as its metadata says."""
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
        """The float32 delta ``key``; for fp32, a view of the mapped file; zeros for a key the file leaves out."""
        if key in self._absent:
            return torch.zeros(self._absent[key])
        return decode(key, self._stored, self._shapes[key], self.encoding)

    @property
    def stored_keys(self) -> list[str]:
        """The deltas the file holds (:meth:`keys` less those a partial vector leaves out), sorted."""
        return [k for k in self._delta_keys if k not in self._absent]

    def tensor(self, key: str) -> torch.Tensor:
        """The float32 delta ``key`` (a copy the caller owns)."""
        t = self._decoded(key)
        t = t.clone() if self.encoding.name == "fp32" and key not in self._absent else t
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
        if key in self._absent:  # zero: nothing to add
            return
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
        if self.encoding.name != "fp32" or self._absent:
            return None
        out = []
        for k in self._delta_keys:
            lo, hi, dtype, shape = self._spans[k]
            if dtype != torch.float32:
                return None
            out.append((lo - self._data_start, hi - self._data_start, k, tuple(shape)))
        return tuple(sorted(out))

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
        """The whole vector in memory, then the map closed: deltas decoded to float32, BN aggregates, and for
        a non-fp32 file its stored tensors as they are (encoding again need not reproduce them)."""
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


def _identity(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def group_runs(layout: Iterable[tuple[int, int, str, tuple[int, ...]]]) -> list[list[tuple]]:
    """An fp32 layout (:meth:`VectorFile.fp32_layout`) grouped into runs of deltas that follow each other."""
    groups: list[list] = []
    for entry in layout:
        if groups and groups[-1][-1][1] == entry[0]:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups


# ---------------------------------------------------------------------------- the weighted sum of vectors

RUN_CHUNK = 1 << 20  # values read per call (4 MiB) when whole runs of fp32 deltas are summed


def common_keys(vectors: Sequence[VectorLike]) -> list[str]:
    """The keys every vector holds; ValueError when there are no vectors or their keys differ."""
    if not vectors:
        raise ValueError("nothing to merge: no vectors")
    keys = vectors[0].keys()
    for v in vectors[1:]:
        if v.keys() != keys:
            raise ValueError(f"vectors differ in keys: {sorted(set(v.keys()) ^ set(keys))[:5]}")
    return keys


@contextmanager
def reading(vectors: Sequence[VectorLike]) -> Iterator[None]:
    """While the block reads ``vectors``, the mapped pages of the files among them stay within one budget
    (:data:`MERGE_WINDOW_BYTES` in all); every page read is handed back after it."""
    files = [v for v in vectors if isinstance(v, VectorFile)]
    for f in files:
        f.window = max(HUGE_PAGE, MERGE_WINDOW_BYTES // len(vectors) // HUGE_PAGE * HUGE_PAGE)
    try:
        yield
    finally:
        for f in files:
            f.release()


def weighted_sum(vectors: Sequence[VectorLike], coefficients: Sequence[float], fused: bool = True) -> DataVector:
    """Σ_h c_h τ_h, each vector read where it lies, one tensor (or a few MiB) at a time.

    Files that store plain fp32 deltas at the same offsets are added whole runs of consecutive
    tensors at a time; otherwise tensor by tensor.  Memory does not grow with the number of vectors.

    ``fused``: each c_h·τ_h is added with one rounding (torch's add with ``alpha``, a fused multiply-add
    on most CPUs), as merges sum.  ``fused=False`` rounds each product before adding it, as asynchronous
    steps sum: the arithmetic a recorded step is rebuilt with must not change.
    """
    keys = common_keys(vectors)
    if len(coefficients) != len(vectors):
        raise ValueError(f"{len(coefficients)} coefficients for {len(vectors)} vectors")
    with reading(vectors):
        layout = same_fp32_layout(vectors) if fused else None
        if layout is not None:
            return DataVector(_sum_runs([v for v in vectors if isinstance(v, VectorFile)], coefficients, layout))
        return DataVector({k: _sum_tensor(vectors, coefficients, k, fused) for k in keys})


def same_fp32_layout(vectors: Sequence[VectorLike]) -> tuple | None:
    """The fp32 layout every vector shares, when every one is a file storing plain fp32 deltas at the same offsets."""
    layouts = [v.fp32_layout() if isinstance(v, VectorFile) else None for v in vectors]
    same = layouts[0] is not None and all(lay == layouts[0] for lay in layouts[1:])
    return layouts[0] if same else None


def _sum_tensor(
    vectors: Sequence[VectorLike], coefficients: Sequence[float], key: str, fused: bool = True
) -> torch.Tensor:
    """Σ_h c_h τ_h[key], one vector at a time, each read where it lies (``fused``: see :func:`weighted_sum`)."""
    out = vectors[0].scaled(key, coefficients[0])
    for v, c in zip(vectors[1:], coefficients[1:]):
        if fused:
            v.accumulate(key, out, c)
        else:
            out.add_(v.scaled(key, c).reshape(out.shape))
    return out


def _chunks(runs: list[list[tuple]], outs: dict[str, torch.Tensor]) -> list[tuple[int, int, list[tuple]]]:
    """Each run cut into reads of at most :data:`RUN_CHUNK` values: (first byte, values, pieces), where a
    piece (output slice, first value, end value) is the part of one delta that the read covers."""
    chunks = []
    for run in runs:
        start, end = run[0][0], run[-1][1]
        for lo in range(start, end, 4 * RUN_CHUNK):
            hi = min(end, lo + 4 * RUN_CHUNK)
            pieces = [
                (
                    outs[key].view(-1)[(max(a, lo) - a) // 4 : (min(b, hi) - a) // 4],
                    (max(a, lo) - lo) // 4,
                    (min(b, hi) - lo) // 4,
                )
                for a, b, key, _ in run
                if a < hi and b > lo
            ]
            chunks.append((lo, (hi - lo) // 4, pieces))
    return chunks


def _sum_runs(files: list[VectorFile], coefficients: Sequence[float], layout: tuple) -> dict[str, torch.Tensor]:
    """Σ_h c_h τ_h read over runs of consecutive deltas, a few MiB per call, into one new tensor per delta
    (allocated as a state dict's are, so that memory an earlier merge freed is reused)."""
    runs = group_runs(layout)
    outs = {key: torch.empty(shape) for run in runs for _, _, key, shape in run}
    for lo, n, pieces in _chunks(runs, outs):
        for i, (f, coeff) in enumerate(zip(files, coefficients)):
            f.add_range(lo, n, pieces, coeff, first=i == 0)
    return outs
