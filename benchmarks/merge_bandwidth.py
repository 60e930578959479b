"""Merge read bandwidth and peak memory against the number of vectors K.

K random vectors with the exact tensor shapes of torchvision's ResNet-50 (25.6M
floating-point parameters, ~102 MB each in fp32) are written as medvec vector files.
For each K, a fresh process validates them (``load_vector``), then times
``merge_delta`` (the streaming weighted merge that the coordinator runs) and reports:

* GB/s read: K × the vector's bytes ÷ the merge's seconds (the best of 2 × ``--repeats``);
* the same-run baseline: the same K vectors already in memory, summed with
  ``torch.add`` into one output per tensor, kept as the merge keeps its own (the best
  of ``--repeats``, alternating with the second half of the merges);
* peak RSS of the merging process (file-backed pages included), from a fresh
  high-water mark after validation to the end of the weighted merges; the RSS before
  validation (Python, torch, medvec) and validation's own peak beside it;
* the median merge (TIES-like methods hold one tensor's K slices) at the smaller Ks;
* K = 8 again from copies written 1 MiB at a time.  medvec writes vector files in large
  writes, which Linux caches as 2 MiB folios that a map maps with one entry each; the
  copies stay 4 KiB pages, as a file another tool wrote may (``pmd_share`` per row).

    python benchmarks/merge_bandwidth.py [--ks 2,4,8,16,32] [--threads 2]

Writes ``benchmarks/results/merge_bandwidth.json`` (headline ``ratio_k8``,
``peak_rss_ratio_k32_k2``, ``ratio_k8_small_pages``) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, peak_rss_mb, pmd_share, reset_peak_rss, table, write


def shapes(model: str) -> dict:
    import torchvision

    from medvec.vectors.vector import vector_keys

    state = getattr(torchvision.models, model)(weights=None).state_dict()
    return {k: tuple(state[k].shape) for k in vector_keys(state)}


def make_vectors(folder: Path, k: int, model: str, encoding: str = "fp32") -> list[Path]:
    """K vector files with random N(0, 1e-3) deltas in ``model``'s shapes."""
    from medvec.timing import utcnow
    from medvec.vectors.encoding import Encoding
    from medvec.vectors.vector import DataVector, VectorMeta

    paths, layout = [], shapes(model)
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        deltas = {name: torch.randn(s, generator=g) * 1e-3 for name, s in layout.items()}
        meta = VectorMeta(
            vector_id=f"bench-{i}",
            hospital=f"h{i}",
            base_sha256="0" * 64,
            base_model=model,
            num_classes=1000,
            n_train=100 + i,
            label_counts=[1] * 1000,
            created_at=utcnow(),
            encoding=Encoding(name=encoding),
        )
        paths.append(DataVector(deltas, meta).save(folder / f"v{i}.safetensors"))
        print(f"  wrote {paths[-1].name}", flush=True)
    return paths


def small_page_copies(paths: list[str], folder: Path) -> list[str]:
    """Copies written 1 MiB at a time, which this kernel caches as 4 KiB pages (as files other tools wrote may be)."""
    folder.mkdir()
    copies = []
    for p in paths:
        dst = folder / Path(p).name
        with open(p, "rb") as f, open(dst, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
        copies.append(str(dst))
    return copies


def child(paths: list[str], repeats: int, threads: int, median: bool) -> dict:
    """One K in its own process (so that its peak RSS is its own)."""
    from medvec.coordinator.methods import get_method, merge_delta
    from medvec.vectors.checks import load_vector

    torch.set_num_threads(threads)
    idle = peak_rss_mb()
    t0 = time.perf_counter()
    files = [load_vector(p) for p in paths]
    validate = time.perf_counter() - t0
    validate_peak = peak_rss_mb()
    reset_peak_rss()
    nbytes = sum(4 * _numel(f) for f in files)
    weighted = get_method("weighted")
    merge_delta(files, weighted)  # warm
    merges = [_timed(lambda: merge_delta(files, weighted)) for _ in range(repeats)]
    peak = peak_rss_mb()  # the merge's own peak, before the baseline's in-memory copies exist
    if median:  # after the peak: the median holds one tensor's K slices
        median_s = _timed(lambda: merge_delta(files, "median"))
    in_memory = [f.to_vector() for f in files]
    baselines = []
    for _ in range(repeats):  # alternate, so that drift on a shared machine hits both
        baselines.append(_timed(lambda: _baseline(in_memory)))
        merges.append(_timed(lambda: merge_delta(files, weighted)))
    seconds = min(merges)
    row = {
        "k": len(files),
        "gb_read": nbytes / 1e9,
        "validate_s": validate,
        "merge_s": seconds,
        "merge_gbps": nbytes / seconds / 1e9,
    }
    row.update(peak_rss_mb=peak, rss_before_mb=idle, validate_peak_rss_mb=validate_peak)
    if median:
        row["median_merge_s"] = median_s
    row["baseline_s"] = min(baselines)
    row["baseline_gbps"] = nbytes / row["baseline_s"] / 1e9
    row["ratio"] = row["merge_gbps"] / row["baseline_gbps"]
    return row


def _numel(f) -> int:
    import math

    return sum(math.prod(f.shape(k)) for k in f.keys())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _baseline(vectors) -> dict:
    """Σ_h τ_h with torch.add over tensors already in memory, one output tensor per key, kept as the merge keeps its own."""
    sums = {}
    for key in vectors[0].keys():
        out = torch.mul(vectors[0].deltas[key], 1.0)
        for v in vectors[1:]:
            out.add_(v.deltas[key])
        sums[key] = out
    return sums


def _run(k: int, paths: list[str], written_by: str, args) -> dict:
    """One K in a fresh process; the row notes who wrote the files and how much of them maps as 2 MiB folios."""
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--median"] if k <= 8 and written_by == "medvec" else []
    out = subprocess.run([*cmd, "--child", *paths[:k]], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"K={k} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(written_by=written_by, pmd_share=pmd_share(paths[0]))
    print(
        f"K={k} ({written_by}): {row['merge_gbps']:.2f} GB/s vs baseline {row['baseline_gbps']:.2f}, "
        f"rss {row['peak_rss_mb']:.0f} MB, 2 MiB-mapped {row['pmd_share']}"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="2,4,8,16,32")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--median", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.repeats, args.threads, args.median)))
        return
    ks = [int(x) for x in args.ks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="medvec-bw-"))
    try:
        print(f"writing {max(ks)} {args.model}-shaped vectors to {work}", flush=True)
        paths = [str(p) for p in make_vectors(work, max(ks), args.model)]
        os.sync()  # written back before timing: no writeback competes with the merges
        rows = [_run(k, paths, "medvec", args) for k in ks]
        if 8 in ks:  # the same merge from files cached as 4 KiB pages: what the 2 MiB folios are worth
            copies = small_page_copies(paths[:8], work / "small")
            os.sync()  # as for the originals: no writeback of the copies during their merges
            rows.append(_run(8, copies, "1 MiB writes", args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_k = {r["k"]: r for r in rows if r["written_by"] == "medvec"}
    small = [r for r in rows if r["written_by"] != "medvec"]
    headline = {
        "ratio_k8": by_k[8]["ratio"] if 8 in by_k else None,
        "peak_rss_ratio_k32_k2": by_k[32]["peak_rss_mb"] / by_k[2]["peak_rss_mb"] if {2, 32} <= set(by_k) else None,
        "ratio_k8_small_pages": small[0]["ratio"] if small else None,
    }
    columns = ["k", "written_by", "pmd_share", "gb_read", "merge_gbps", "baseline_gbps", "ratio", "rss_before_mb"]
    columns += ["peak_rss_mb", "validate_s", "validate_peak_rss_mb", "median_merge_s"]
    md = "\n".join(
        [
            f"# Merge bandwidth ({args.model} shapes, {args.threads} threads)",
            "",
            "`python benchmarks/merge_bandwidth.py` — streaming weighted merge from vector files (page cache) vs "
            "`torch.add` over the same bytes in memory. `written_by`: medvec's writer, or 1 MiB writes (a copy "
            "another tool made); `pmd_share`: the share of a file that its map maps with 2 MiB entries.",
            "",
            table(rows, columns),
            "",
            f"headline: {json.dumps({k: round(v, 3) if v else v for k, v in headline.items()})}",
        ]
    )
    payload = {"headline": headline, "model": args.model, "threads": args.threads, "rows": rows}
    write("merge_bandwidth", payload, md, args.out)


if __name__ == "__main__":
    main()
