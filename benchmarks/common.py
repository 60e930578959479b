"""What every ``make bench`` script shares: where results go, a Markdown table, peak memory, threads."""

from __future__ import annotations

import json
import mmap
import platform
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (floats to 3 significant decimals)."""

    def cell(x) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def ci95(diffs: list[float]) -> list[float]:
    """The 95 % t interval of the mean of paired differences (one difference: the value twice)."""
    import math
    import statistics

    from scipy import stats

    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return [m, m]
    h = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return [m - h, m + h]


def medvec_demo(out: Path, prefect_home: Path, args: list[str], sets: list[str], what: str) -> dict:
    """Run ``medvec demo ARGS --out OUT --no-progress -S SET…`` from the checkout, with its own MLflow database
    beside ``out`` and Prefect home, and return its results.json; a failed run stops the benchmark naming ``what``."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "flows.cli", "demo", *args, "--out", str(out), "--no-progress"]
    cmd += [a for s in sets for a in ("-S", s)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out}.db", "PREFECT_HOME": str(prefect_home)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"demo {what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def write(name: str, payload: dict, markdown: str, out: Path = RESULTS) -> Path:
    """Write ``<name>.json`` (with the machine) and ``<name>.md``, and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": machine()}
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nwrote {path} and {name}.md")
    return path


def machine() -> dict:
    import os

    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident set since start or :func:`reset_peak_rss` (MiB, file-backed pages included)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux ≥ 4.0: ``/proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def pmd_share(path: str) -> float | None:
    """The share of ``path``'s bytes that a read-only map of it maps with 2 MiB entries (None off Linux, or empty)."""
    import numpy as np

    smaps = Path("/proc/self/smaps")
    if not smaps.exists() or Path(path).stat().st_size == 0:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i]  # fault every page in
        view = np.frombuffer(m, dtype=np.uint8)
        try:
            fields = _smaps_fields(smaps.read_text(), view.ctypes.data)
        finally:
            del view  # before the map closes
    return fields.get("FilePmdMapped", 0) / fields["Rss"] if fields.get("Rss") else None


def _smaps_fields(text: str, address: int) -> dict[str, int]:
    """The kB fields of the smaps entry whose address range holds ``address``."""
    fields: dict[str, int] | None = None
    for line in text.splitlines():
        if not line.split():
            continue
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms offset dev inode path
            if fields is not None:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            fields = {} if lo <= address < hi else None
        elif fields is not None and line.split()[-1] == "kB":
            fields[head.rstrip(":")] = int(line.split()[1])
    return fields or {}
