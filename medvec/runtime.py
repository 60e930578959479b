"""Where torch runs: the device (cuda, then mps, then cpu) and the number of CPU threads."""

from __future__ import annotations

import os

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is passed to torch."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads explicitly (default: the cores this process may use).

    Oversubscribed threads made training ~20× slower on a 2-core machine, so
    callers running jobs side by side should pass ``threads`` = cores / jobs.
    """
    if threads is None:
        env = os.environ.get("MEDVEC_THREADS")
        threads = (
            int(env)
            if env
            else len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    threads = max(1, int(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
