"""Retries with back-off for I/O that can fail for a moment: a store write, a DVC push, an MLflow call.

Prefect tasks declare their own retries; code that runs outside a task (the steps of
:func:`medvec.tracking.finish.finish_merge`, the DVC stages) uses :func:`retry`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from medvec.errors import Refusal

T = TypeVar("T")
IO_DELAYS = (1.0, 4.0, 10.0)  # seconds before each retry of a store read or write
SERVICE_DELAYS = (2.0, 8.0)  # before each retry of a DVC commit or an MLflow registration

log = logging.getLogger(__name__)


def retry(fn: Callable[[], T], what: str, delays: Sequence[float] = IO_DELAYS) -> T:
    """``fn()``, called again after each delay while it raises; the last failure is raised as it is.  A
    :class:`~medvec.errors.Refusal` is raised at once: trying again cannot change it."""
    for delay in delays:
        try:
            return fn()
        except Refusal:
            raise
        except Exception as exc:  # what failed is logged; the last attempt below raises it
            log.warning("%s failed (%s: %s); retrying in %g s", what, type(exc).__name__, exc, delay)
            time.sleep(delay)
    return fn()
