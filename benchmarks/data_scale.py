"""Peak memory and speed of reading a PACS-like export: N full-resolution 16-bit DICOM files through medvec's data path.

It writes N synthetic 2,048 × 2,048 DICOM files (16 bits stored, a VOI window; medvec's own writer,
:func:`medvec.data.dicom.write_dicom`, over upscaled PneumoniaMNIST images so they look like X-rays) and a CSV
manifest, then, in a fresh process per run, reads the manifest's training split the way a hospital's fine-tune does
(:meth:`medvec.hospital.local.LocalData.load`) and runs one epoch of its batches (:func:`medvec.preprocess.predecode`
and :func:`~medvec.preprocess.batches`, as :mod:`medvec.hospital.train` does, without the model), and reports that
process's peak RSS and the read's images per second:

* ``decode_size 64 (the model's, default)``: each file shrunk to the model's input size as soon as it is decoded
  (``data.decode_size`` left null);
* ``decode_size 256``: a larger cache size (the model's resize then runs per batch);
* ``full size``: the files kept as decoded (what medvec did before ``data.decode_size``);
* ``cache, first pass`` and ``second pass``: with ``data.cache`` (a fresh folder), read twice, each in its own
  process; the second decodes nothing;
* ``2 workers``: ``data.workers: 2`` (this machine has 2 cores).

The bare loop is ``pydicom.dcmread`` + ``pixel_array`` + pydicom's VOI window + a PIL resize to 64 × 64 per file,
no medvec, in one process: the floor of decoding these files on one core. Each child imports its libraries before
its clock starts, as the bare loop does.

    python benchmarks/data_scale.py [--sizes 200 2000] [--side 2048] [--full-size-up-to 400]

The full-size run keeps about 12 MB per file, so it runs only up to ``--full-size-up-to`` files (2,000 would need
some 25 GB of memory); the default sizes are the issue's, 200 and 2,000 (16 GB of files on disk while they run).

Writes ``benchmarks/results/data_scale.json`` (headline: the peak-RSS growth from the smallest to the largest N
at the default decode size, at 256 and at full size) and ``.md``. The files go to a temporary folder, removed
afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, table, write

READ = """
import json, resource, sys, time
import PIL.Image, pydicom, torch  # imported before the clock starts, as they are in a worker that has run before
import medvec.data.dicom
from medvec.data.images import DataSpec
from medvec.hospital.local import LocalData
from medvec.models import ModelSpec
from medvec.preprocess import batches, predecode
torch.set_num_threads(1)
manifest, decode_size = sys.argv[1], (None if sys.argv[2] == "none" else int(sys.argv[2]))
cache = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "none" else None
workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
model = ModelSpec("efficientnet_lite0", 64, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the demo's model input
spec = DataSpec(classes=("normal", "pneumonia"), decode_size=decode_size, cache=cache, workers=workers)
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize() / 2**20  # resident after the imports
start = time.perf_counter()
local = LocalData.load(manifest, spec, local_val_fraction=0.1, seed=0)
seconds = time.perf_counter() - start
decoded = predecode(local.train, model)  # a fine-tune epoch's data path, as medvec.hospital.train runs it
for x, y in batches(local.train, model, 64, shuffle=True, seed=0, augment_data=True, decoded=decoded):
    pass
n = len(local.train) + len(local.val)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images": n, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before, "data_mb": peak - before,
                  "kept_mb": (local.train.images.nbytes + local.val.images.nbytes) / 2**20,
                  "float_copy_mb": 0 if decoded is None else decoded.numel() * 4 / 2**20,
                  "epoch_seconds": time.perf_counter() - start - seconds}))
"""


def write_export(folder: Path, n: int, side: int) -> Path:
    """N DICOM files of ``side`` × ``side`` (16 bits stored under a window) and their manifest."""
    from PIL import Image

    from medvec.data.dicom import write_dicom
    from medvec.data.sources import load_npz

    source = load_npz(ROOT / "data" / "pneumoniamnist.npz", "train")
    rows = ["path,label"]
    for i in range(n):
        pixels = np.asarray(Image.fromarray(source.images[i]).resize((side, side), Image.Resampling.BILINEAR))
        write_dicom(folder / f"{i:05d}.dcm", pixels, window=(128, 256))
        rows.append(f"{i:05d}.dcm,{source.classes[source.labels[i]]}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def read_in_child(manifest: Path, decode_size: int | None, cache: Path | None = None, workers: int = 1) -> dict:
    cmd = [sys.executable, "-c", READ, str(manifest), str(decode_size or "none"), str(cache or "none"), str(workers)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


MODEL_SIZE = 64  # the demo's model input, which data.decode_size defaults to
DEFAULT = f"decode_size {MODEL_SIZE} (the model's, default)"
LARGER = "decode_size 256"
FIRST, SECOND, WORKERS, BARE = "cache, first pass", "cache, second pass", "2 workers", "bare pydicom + PIL"


def bare_loop(folder: Path, n: int, size: int = MODEL_SIZE) -> float:
    """Images per second of pydicom + PIL alone: read, window (pydicom's apply_voi_lut), resize to ``size``."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_voi_lut

    files = sorted(folder.glob("*.dcm"))[:n]
    start = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        arr = apply_voi_lut(ds.pixel_array, ds).astype(np.float32)
        arr = np.clip((arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
    return len(files) / (time.perf_counter() - start)


def runs_for(n: int, full_size_up_to: int, scratch: Path) -> list[tuple[str, int | None, Path | None, int]]:
    """(label, decode size, cache folder, workers) of each read of the N-file export."""
    runs: list[tuple[str, int | None, Path | None, int]] = [(DEFAULT, MODEL_SIZE, None, 1), (LARGER, 256, None, 1)]
    if n <= full_size_up_to:
        runs.append(("full size", None, None, 1))
    cache = scratch / f"cache{n}"
    return runs + [(FIRST, MODEL_SIZE, cache, 1), (SECOND, MODEL_SIZE, cache, 1), (WORKERS, MODEL_SIZE, None, 2)]


def headline_of(rows: list[dict], sizes: list[int], full_size_up_to: int, side: int) -> dict:
    small, large = min(sizes), max(sizes)

    def get(n: int, path: str, key: str) -> float:
        return next(r[key] for r in rows if r["files"] == n and r["path"] == path)

    def growth(path: str, ns: list[int]) -> float | None:
        return round(get(ns[-1], path, "peak_rss_mb") / get(ns[0], path, "peak_rss_mb"), 3) if len(ns) > 1 else None

    full = sorted(n for n in sizes if n <= full_size_up_to)
    speed = lambda path: get(large, path, "images_per_s")  # noqa: E731
    return {
        "files": [small, large],
        "side": side,
        "peak_rss_growth": growth(DEFAULT, [small, large]),
        "peak_rss_mb": [round(get(n, DEFAULT, "peak_rss_mb"), 1) for n in (small, large)],
        "data_mb": [round(get(n, DEFAULT, "data_mb"), 1) for n in (small, large)],
        "peak_rss_growth_decode_256": growth(LARGER, [small, large]),
        "peak_rss_growth_full_size": growth("full size", full),
        "full_size_files": full,
        "ratio_to_bare": round(speed(DEFAULT) / speed(BARE), 3),
        "ratio_to_bare_cache_first_pass": round(speed(FIRST) / speed(BARE), 3),
        "cached_speedup": round(speed(SECOND) / speed(FIRST), 1),
        "two_workers_speedup": round(speed(WORKERS) / speed(DEFAULT), 2),
        "goal_growth": 1.2,
        "goal_ratio_to_bare": 0.9,
        "goal_cached_speedup": 10,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--full-size-up-to", type=int, default=400, help="run the full-size read only up to this N")
    ap.add_argument("--side", type=int, default=2048)
    args = ap.parse_args()
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="data-scale-"))
    try:
        for n in args.sizes:
            folder = scratch / f"n{n}"
            folder.mkdir()
            t = time.perf_counter()
            manifest = write_export(folder, n, args.side)
            print(f"N={n}: written in {time.perf_counter() - t:.0f} s", flush=True)
            for label, decode_size, cache, workers in runs_for(n, args.full_size_up_to, scratch):
                got = read_in_child(manifest, decode_size, cache, workers)
                rows.append({"files": n, "path": label, **got, "images_per_s": got["images"] / got["seconds"]})
                print(f"  {rows[-1]}", flush=True)
            rows.append({"files": n, "path": BARE, "images_per_s": bare_loop(folder, min(n, 300))})
            shutil.rmtree(folder)
            shutil.rmtree(scratch / f"cache{n}", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    headline = headline_of(rows, args.sizes, args.full_size_up_to, args.side)
    cols = [
        "files",
        "path",
        "images",
        "seconds",
        "images_per_s",
        "epoch_seconds",
        "peak_rss_mb",
        "kept_mb",
        "float_copy_mb",
    ]
    markdown = "\n".join(
        [
            "# data_scale",
            "",
            f"`python benchmarks/data_scale.py --sizes {' '.join(map(str, args.sizes))} --side {args.side}"
            f" --full-size-up-to {args.full_size_up_to}`",
            "",
            table(rows, cols),
            "",
            "headline: " + json.dumps(headline),
        ]
    )
    write("data_scale", {"headline": headline, "settings": vars(args), "rows": rows}, markdown)


if __name__ == "__main__":
    main()
