"""Wall-clock time: UTC timestamps for records (:func:`utcnow`), and where a run's wall time goes: seconds per
phase, without double counting nested phases.

``with phase("merge"): ...`` adds the block's time to ``merge``, minus the time of any
phase nested inside it (an evaluation inside contribution scoring counts as
``evaluate`` only).  Totals are process-wide and thread-safe; :func:`snapshot`
reads them and :func:`reset` starts over.  ``medvec demo`` writes them to
``results.json`` (``phases``) and ``benchmarks/end_to_end.py`` reads them there.
"""

from __future__ import annotations

import datetime as _dt
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

PHASES = ("finetune", "merge", "bn_restore", "evaluate", "contribution", "tracking")

_lock = threading.Lock()
_totals: dict[str, float] = {}
_counts: dict[str, int] = {}
_local = threading.local()
F = TypeVar("F", bound=Callable)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's exclusive wall time (nested phases subtracted) towards ``name``."""
    stack: list[list] = _local.__dict__.setdefault("stack", [])
    frame: list = [name, 0.0]  # [name, seconds spent in nested phases]
    stack.append(frame)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        stack.pop()
        if stack:
            stack[-1][1] += elapsed
        with _lock:
            _totals[name] = _totals.get(name, 0.0) + elapsed - frame[1]
            _counts[name] = _counts.get(name, 0) + 1


def timed(name: str) -> Callable[[F], F]:
    """Decorator form of :func:`phase`."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def utcnow() -> str:
    """The current UTC time in ISO 8601 with microseconds: the timestamp every record and vector carries."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Started:
    """When something began: the UTC timestamp a record shows, and the monotonic clock its duration is taken on."""

    at: str
    clock: float

    @classmethod
    def now(cls) -> Started:
        """Now: the UTC timestamp and the monotonic clock's reading."""
        return cls(utcnow(), time.perf_counter())

    def seconds(self) -> float:
        """Seconds since it began, rounded to 10 ms."""
        return round(time.perf_counter() - self.clock, 2)


def snapshot() -> dict[str, dict[str, float]]:
    """``{phase: {"seconds": s, "calls": n}}`` so far."""
    with _lock:
        return {k: {"seconds": round(_totals[k], 3), "calls": _counts[k]} for k in sorted(_totals)}


def reset() -> None:
    """Start the totals over: every phase's seconds and calls, process-wide."""
    with _lock:
        _totals.clear()
        _counts.clear()
