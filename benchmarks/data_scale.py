"""Peak memory and speed of reading a PACS-like export: N full-resolution 16-bit DICOM files through medvec's data path.

It writes N synthetic 2,048 × 2,048 DICOM files (16 bits stored, a VOI window; medvec's own writer,
:func:`medvec.data.dicom.write_dicom`, over upscaled PneumoniaMNIST images so they look like X-rays) and a CSV
manifest, then reads the manifest's training split the way a hospital's fine-tune does
(:meth:`medvec.hospital.local.LocalData.load`) in a fresh process per run, and reports that process's peak RSS and
images per second:

* ``decode_size 256`` (``data.decode_size``, the default): each file shrunk to fit 256 × 256 as soon as it is
  decoded;
* ``full size``: the files kept as decoded (what medvec did before ``data.decode_size``).

* ``cache, first pass`` and ``second pass``: with ``data.cache`` (a fresh folder), read twice, each in its own
  process; the second decodes nothing.

The bare loop is ``pydicom.dcmread`` + ``pixel_array`` + a PIL resize to 256 × 256 per file, no medvec, in one
process: the floor of decoding these files on one core. ``decode_size 256, 2 workers`` decodes in two processes
(``data.workers``; this machine has 2 cores).

    python benchmarks/data_scale.py [--sizes 200 2000] [--side 2048] [--full-size-up-to 400]

The full-size run keeps about 12 MB per file, so it runs only up to ``--full-size-up-to`` files (2,000 would need
some 25 GB of memory); the default sizes are the issue's, 200 and 2,000 (16 GB of files on disk while they run).

Writes ``benchmarks/results/data_scale.json`` (headline: the peak-RSS growth from the smallest to the largest N
with ``decode_size``, and without it) and ``.md``. The files go to a temporary folder, removed afterwards.
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
from medvec.data.images import DataSpec
from medvec.hospital.local import LocalData
manifest, decode_size = sys.argv[1], (None if sys.argv[2] == "none" else int(sys.argv[2]))
cache = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "none" else None
workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
start = time.perf_counter()
local = LocalData.load(manifest, DataSpec(classes=("normal", "pneumonia"), decode_size=decode_size, cache=cache, workers=workers), local_val_fraction=0.1, seed=0)
seconds = time.perf_counter() - start
n = len(local.train) + len(local.val)
print(json.dumps({"images": n, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "kept_mb": (local.train.images.nbytes + local.val.images.nbytes) / 2**20}))
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


def bare_loop(folder: Path, n: int, size: int = 256) -> float:
    """Images per second of pydicom + PIL alone: read, window (pydicom's apply_voi_lut), resize."""
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
            written = time.perf_counter() - t
            runs: list[tuple[str, int | None, Path | None]] = [("decode_size 256", 256, None)]
            if n <= args.full_size_up_to:
                runs.append(("full size", None, None))
            runs += [
                ("cache, first pass", 256, scratch / f"cache{n}"),
                ("cache, second pass", 256, scratch / f"cache{n}"),
            ]
            runs.append(("decode_size 256, 2 workers", 256, None))
            for label, decode_size, cache in runs:
                got = read_in_child(manifest, decode_size, cache, 2 if "2 workers" in label else 1)
                rows.append({"files": n, "path": label, **got, "images_per_s": got["images"] / got["seconds"]})
            rows.append({"files": n, "path": "bare pydicom + PIL", "images_per_s": bare_loop(folder, min(n, 100))})
            print(f"N={n}: written in {written:.0f} s; {rows[-6:]}", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    small, large = min(args.sizes), max(args.sizes)

    def rss(n: int, path: str) -> float:
        return next(r["peak_rss_mb"] for r in rows if r["files"] == n and r["path"] == path)

    full = sorted(n for n in args.sizes if n <= args.full_size_up_to)

    def speed(n: int, path: str) -> float:
        return next(r["images_per_s"] for r in rows if r["files"] == n and r["path"] == path)

    headline = {
        "files": [small, large],
        "side": args.side,
        "peak_rss_growth_decode_size": round(rss(large, "decode_size 256") / rss(small, "decode_size 256"), 3),
        "peak_rss_growth_full_size": round(rss(full[-1], "full size") / rss(full[0], "full size"), 3) if full else None,
        "full_size_files": full,
        "peak_rss_mb_decode_size": [round(rss(n, "decode_size 256"), 1) for n in (small, large)],
        "peak_rss_mb_full_size": [round(rss(n, "full size"), 1) for n in full],
        "ratio_to_bare": round(speed(large, "decode_size 256") / speed(large, "bare pydicom + PIL"), 3),
        "cached_speedup": round(speed(large, "cache, second pass") / speed(large, "cache, first pass"), 1),
        "two_workers_speedup": round(speed(large, "decode_size 256, 2 workers") / speed(large, "decode_size 256"), 2),
        "goal_cached_speedup": 10,
        "goal_growth": 1.2,
        "goal_ratio_to_bare": 0.9,
    }
    cols = ["files", "path", "images", "seconds", "images_per_s", "peak_rss_mb", "kept_mb"]
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
