"""Thin Prefect tasks over the medvec core: retries on I/O, no logic of their own.

Importing this package (``flows`` imports it first) sets Prefect's local defaults, because Prefect
reads its settings once, when it is imported: no analytics, the ephemeral API allowed, and 120 s for
the ephemeral server to start. Prefect's own 20 s (counting only its sleeps) ran out on a busy 2-core
machine and in CI, where a flow called from Python failed with "Timed out while attempting to connect
to ephemeral Prefect API server". A value the user set wins.
"""

import os


def prefect_local_defaults() -> None:
    """Prefect settings for local runs, each only where the environment has none."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


prefect_local_defaults()
