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
    """The share of ``path``'s bytes that a read-only map of it maps with 2 MiB entries (None off Linux)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    path = str(Path(path).resolve())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i]  # fault every page in
        fields, inside = {}, False
        for line in smaps.read_text().splitlines():
            if line.endswith(path):
                inside = True
            elif inside and ":" in line and line.split(":")[0] in ("Rss", "FilePmdMapped"):
                fields[line.split(":")[0]] = int(line.split()[1])
            elif inside and "-" in line.split()[0]:
                break
    return fields.get("FilePmdMapped", 0) / fields["Rss"] if fields.get("Rss") else None
