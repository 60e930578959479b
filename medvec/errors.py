"""The errors a user can cause, and so fix: a bad path, a bad setting, an unknown model, a server that is down.

The ``medvec`` command prints their message on one line and exits with status 2
(``--debug`` shows the traceback).  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the problem."""


class LineageError(UserError, LookupError):
    """A registered model, version or alias that the tracking server does not hold."""


class ServerUnreachableError(UserError, ConnectionError):
    """A server (Prefect API, MLflow, S3) that does not answer at its URL."""


class Refusal(UserError):
    """A refusal that retrying cannot change (a document the pinned key did not sign, a revoked key): retries
    stop at once."""
