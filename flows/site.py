"""A site's pinned configuration: what its own worker runs, decided on its own machine, never by the server.

The Prefect server is shared by every member of the network, and anyone who can reach its API can create
deployments on any pool, PATCH them, change a pool's job template or start runs with any parameters.  So
a medvec worker (``flows.worker``) takes nothing from the server but the fact that a run was asked for:

* the flow, its entrypoint in this checkout and every parameter (data folder, store, key, privacy
  settings, hospital name) come from the site file that ``medvec hospital join`` (or ``medvec coordinator
  up``) wrote here, ``.medvec/sites/<pool>.json`` (``MEDVEC_SITE_DIR`` moves the folder); a pool with a
  second flow (a hospital's ``hospital-evaluate``) has one more file, ``<pool>.<flow-kind>.json``;
* a run is refused, before any code of it runs, unless it comes from the deployment that file pins (by
  id), with the pinned entrypoint, no pull steps, no job variables, the pool's job template as medvec
  made it, and no parameters beyond the few a site takes from the server (the coordinator: the landed
  event that triggered it, which its merge re-reads from the store anyway; a hospital's evaluation: the id
  of the coordinator's request, whose signature the flow checks before it loads anything).

:func:`refusal` is the whole decision, a pure function over :class:`RunView`; the worker only builds the
view from the server's answers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medvec.errors import UserError

SITE_DIR_ENV = "MEDVEC_SITE_DIR"
DEFAULT_SITE_DIR = ".medvec/sites"
TRIGGER_KEYS = frozenset({"event_id", "vector", "occurred"})
REQUEST_ID = re.compile(r"eval-[0-9A-Za-z-]{1,80}")  # medvec.answers.EvalRequest's ids
Role = Literal["hospital", "coordinator"]


class SiteError(UserError, ValueError):
    """A site file that is missing, unreadable or not for this pool."""


@dataclass(frozen=True)
class Site:
    """What one pool's worker runs: one flow of this checkout, with parameters pinned on this machine."""

    role: Role
    pool: str
    flow: str  # the flow's name: hospital-finetune or merge-and-evaluate
    entrypoint: str  # relative to the checkout, as the deployment names it
    deployment_id: str  # the deployment this site created; any other is refused
    parameters: dict[str, Any] = field(default_factory=dict)
    run_parameters: tuple[str, ...] = ()  # names a run may carry from the server

    def save(self, path: Path) -> Path:
        """Write the site file (mode 600: it names local paths), atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({**asdict(self), "run_parameters": list(self.run_parameters)}, fh, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> Site:
        """Read a site file; a clear one-line error when it is missing or malformed."""
        try:
            raw = json.loads(Path(path).read_text())
            raw["run_parameters"] = tuple(raw.get("run_parameters", ()))
            return cls(**raw)
        except FileNotFoundError:
            raise SiteError(f"{path}: no site file here: join first (`medvec hospital join` writes it)") from None
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise SiteError(f"{path}: not a medvec site file ({exc})") from None

    def run_arguments(self, from_server: dict[str, Any]) -> dict[str, Any]:
        """The flow's parameters for one run: the pinned ones, plus the allowed ones the run carried."""
        return {**self.parameters, **{k: v for k, v in from_server.items() if k in self.run_parameters}}


def site_dir() -> Path:
    """Where site files live: ``MEDVEC_SITE_DIR``, else ``.medvec/sites`` under the working directory."""
    return Path(os.environ.get(SITE_DIR_ENV) or DEFAULT_SITE_DIR).resolve()


def site_file(pool: str, kind: str | None = None) -> Path:
    """The site file of ``pool``'s main flow, or of its flow ``kind`` (``evaluate``)."""
    return site_dir() / (f"{pool}.{kind}.json" if kind else f"{pool}.json")


def pool_site_files(main: Path) -> list[Path]:
    """The main site file of a pool and the files of its other flows (``<pool>.<kind>.json``) beside it."""
    main = Path(main)
    return [main, *sorted(main.parent.glob(main.stem + ".*.json"))]


def for_run(sites: list[tuple[Path, Site]], deployment_id: str | None) -> tuple[Path, Site]:
    """The site file whose deployment started the run; the pool's main one when none did (it refuses)."""
    return next(((p, s) for p, s in sites if s.deployment_id == deployment_id), sites[0])


@dataclass(frozen=True)
class RunView:
    """What the server says about one flow run, reduced to what :func:`refusal` checks."""

    deployment_id: str | None
    flow: str
    entrypoint: str | None
    pull_steps: list[dict[str, Any]]
    job_variables: dict[str, Any]  # the deployment's and the run's, together
    parameters: dict[str, Any]
    pool_template_changed: bool


def _pull_step_names(steps: list[dict[str, Any]]) -> str:
    return ", ".join(sorted({name.rsplit(".", 1)[-1] for step in steps for name in step})) or "?"


def _trigger_problem(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return "parameter trigger is not a mapping of strings"
    extra = set(value) - TRIGGER_KEYS
    return f"parameter trigger has unexpected keys: {', '.join(sorted(extra))}" if extra else None


def refusal(site: Site, run: RunView) -> str | None:
    """Why ``site``'s worker must not run ``run`` (None: run it, with the pinned parameters)."""
    if run.deployment_id is None:
        return "not started from a deployment"
    if run.deployment_id != site.deployment_id:
        return f"deployment {run.deployment_id} is not the one this site created ({site.deployment_id})"
    if run.flow != site.flow:
        return f"flow {run.flow!r} is not {site.flow!r}"
    if run.entrypoint != site.entrypoint:
        return f"entrypoint {run.entrypoint!r} was changed on the server (this site runs {site.entrypoint!r})"
    if run.pull_steps:
        return (
            f"the deployment has pull steps on the server ({_pull_step_names(run.pull_steps)}); this worker runs none"
        )
    if run.job_variables:
        names = ", ".join(sorted(run.job_variables))
        return f"job variables were set on the server ({names}); this worker takes none"
    if run.pool_template_changed:
        return f"pool {site.pool}'s base job template was changed on the server"
    extra = sorted(set(run.parameters) - set(site.run_parameters))
    if extra:
        return f"parameters set on the server ({', '.join(extra)}); this site pins its own"
    if "request" in site.run_parameters:
        return _request_problem(run.parameters.get("request"))
    return _trigger_problem(run.parameters.get("trigger")) if "trigger" in site.run_parameters else None


def _request_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not REQUEST_ID.fullmatch(value):
        return f"parameter request {value!r} is not an evaluation request id"
    return None


__all__ = ["RunView", "Site", "SiteError", "for_run", "pool_site_files", "refusal", "site_dir", "site_file"]
