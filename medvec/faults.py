"""Failpoints for fault-injection tests: ``MEDVEC_FAILPOINT=<name>`` makes the named
point write ``MEDVEC_FAILPOINT_MARKER`` (if set) and sleep, so a test can kill the
process exactly there.  Unset (always, in production) they do nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path


def failpoint(name: str) -> None:
    """At the failpoint ``name``, when ``MEDVEC_FAILPOINT`` names it: write ``name`` to ``MEDVEC_FAILPOINT_MARKER``
    (if set) and sleep ``MEDVEC_FAILPOINT_SECONDS`` (default 120); otherwise return at once."""
    if os.environ.get("MEDVEC_FAILPOINT") != name:
        return
    marker = os.environ.get("MEDVEC_FAILPOINT_MARKER")
    if marker:
        Path(marker).write_text(name)
    time.sleep(float(os.environ.get("MEDVEC_FAILPOINT_SECONDS", "120")))
