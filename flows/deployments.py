"""Work pools and deployments for the distributed path (all against ``PREFECT_API_URL``).

* ``coordinator`` pool: deployment ``merge-and-evaluate/coordinator``, triggered by
  ``medvec.vector.landed``, reconciled on a schedule (hourly by default), one run at a
  time (others queue).
* ``hospital-<name>`` pool per hospital: deployment ``hospital-finetune/<name>``, with
  an optional cron or interval schedule for retraining, and ``hospital-evaluate/<name>``, which the
  coordinator starts with the id of an evaluation request.

Every pool is of type ``medvec`` and is served by a medvec worker (:mod:`flows.worker`).
A deployment on the server is only a trigger: it holds no parameter, path, pull step or
job variable.  What its runs do (the flow of this checkout and every parameter) is
pinned in the site file that deploying writes on this machine (:mod:`flows.site`); the
worker refuses runs of any other deployment, and of this one once it is changed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from flows.events import VECTOR_LANDED
from flows.names import (
    EVALUATE_ENTRYPOINT,
    EVALUATE_FLOW,
    HOSPITAL_ENTRYPOINT,
    HOSPITAL_FLOW,
    MERGE_ENTRYPOINT,
    MERGE_FLOW,
)
from flows.site import Site, site_file
from medvec.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]
COORDINATOR_POOL = "coordinator"
COORDINATOR_DEPLOYMENT = "coordinator"


def hospital_pool(name: str) -> str:
    return f"hospital-{name}"


class DeploymentTakenError(UserError, PermissionError):
    """A deployment on the server that another machine created (this one's site file does not pin it)."""


def ensure_pool(name: str) -> None:
    """Create work pool ``name`` of type ``medvec`` with the medvec worker's job template.

    A pool of another type (a process pool from an earlier medvec) is deleted and created again.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from flows.worker import WORKER_TYPE, MedvecWorker

    template = MedvecWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pool = None
        if pool is not None and pool.type == WORKER_TYPE:
            return
        if pool is not None:
            client.delete_work_pool(name)
        client.create_work_pool(WorkPoolCreate(name=name, type=WORKER_TYPE, base_job_template=template))


def _existing_id(flow_name: str, name: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return str(client.read_deployment_by_name(f"{flow_name}/{name}").id)
        except ObjectNotFound:
            return None


def _pinned_id(pool: str, kind: str | None = None) -> str | None:
    path = site_file(pool, kind)
    return Site.load(path).deployment_id if path.exists() else None


def check_not_taken(flow_name: str, name: str, pool: str, replace: bool, kind: str | None = None) -> None:
    """Refuse to overwrite a deployment this machine did not create, unless ``replace``."""
    existing = _existing_id(flow_name, name)
    if existing is None or replace or existing == _pinned_id(pool, kind):
        return
    raise DeploymentTakenError(
        f"{flow_name}/{name} already exists on the Prefect server and this machine did not create it "
        f"(no site file {site_file(pool, kind)} pins it): if this machine is {name}, pass --replace"
    )


def _apply(flow_name: str, name: str, pool: str, entrypoint: str, **fields: Any) -> str:
    """Create or update deployment ``flow_name/name`` on ``pool`` as a bare trigger; returns its id."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow_name)
        dep_id = client.create_deployment(
            flow_id=flow_id,
            name=name,
            work_pool_name=pool,
            entrypoint=entrypoint,
            parameters={},
            job_variables={},
            pull_steps=[],
            path=None,
            enforce_parameter_schema=False,
            **fields,
        )
    return str(dep_id)


def _schedules(cron: str | None, interval: float | None) -> list:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if cron and interval:
        raise ValueError("give --cron or --interval, not both")
    if cron:
        return [DeploymentScheduleCreate(schedule=CronSchedule(cron=cron), active=True)]
    if interval:
        return [DeploymentScheduleCreate(schedule=IntervalSchedule(interval=dt.timedelta(seconds=interval)))]
    return []


def _set_triggers(dep_id: str, triggers: list) -> None:
    """Replace the automations that start deployment ``dep_id``."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_resource_owned_automations(f"prefect.deployment.{dep_id}")
        for trigger in triggers:
            trigger.set_deployment_id(UUID(dep_id))
            client.create_automation(trigger.as_automation())


def deploy_coordinator(
    store_url: str,
    eval_data: str | None,
    params: dict,
    calibration_data: str | None = None,
    reconcile_seconds: float = 3600,
) -> tuple[str, Path]:
    """Create pool ``coordinator`` and deployment ``merge-and-evaluate/coordinator`` with its trigger; pin the
    merge's parameters in this machine's site file. Returns the deployment id and the site file."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.events import DeploymentEventTrigger

    ensure_pool(COORDINATOR_POOL)
    trigger = DeploymentEventTrigger(
        name="medvec-vector-landed",
        expect={VECTOR_LANDED},
        match={"prefect.resource.id": "medvec.vector.*"},
        parameters={
            "trigger": {
                "event_id": "{{ event.id | string }}",
                "vector": "{{ event.resource.id }}",
                "occurred": "{{ event.occurred | string }}",
            }
        },
    )
    interval = dt.timedelta(seconds=reconcile_seconds)
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    dep_id = _apply(
        MERGE_FLOW,
        COORDINATOR_DEPLOYMENT,
        COORDINATOR_POOL,
        MERGE_ENTRYPOINT,
        schedules=[DeploymentScheduleCreate(schedule=IntervalSchedule(interval=interval), active=True)],
        concurrency_limit=1,
        concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["medvec", "coordinator"],
    )
    _set_triggers(dep_id, [trigger])
    parameters = {
        "store_url": store_url,
        "eval_data": str(Path(eval_data).resolve()) if eval_data else None,
        "params": params,
        "calibration_data": calibration_data,
    }
    site = Site("coordinator", COORDINATOR_POOL, MERGE_FLOW, MERGE_ENTRYPOINT, dep_id, parameters, ("trigger",))
    return dep_id, site.save(site_file(COORDINATOR_POOL))


def deploy_hospital(
    name: str,
    data_dir: str,
    store_url: str,
    params: dict,
    cron: str | None = None,
    interval: float | None = None,
    key_file: str | None = None,
    replace: bool = False,
) -> tuple[str, Path]:
    """Create pool ``hospital-<name>`` and deployment ``hospital-finetune/<name>``, and pin its parameters
    in this machine's site file.  Returns the deployment id and the site file."""
    pool = hospital_pool(name)
    schedules = _schedules(cron, interval)
    check_not_taken(HOSPITAL_FLOW, name, pool, replace)
    check_not_taken(EVALUATE_FLOW, name, pool, replace, "evaluate")
    ensure_pool(pool)
    dep_id = _apply(
        HOSPITAL_FLOW,
        name,
        pool,
        HOSPITAL_ENTRYPOINT,
        schedules=schedules,
        tags=["medvec", "hospital", f"hospital:{name}"],
    )
    parameters = {
        "hospital": name,
        "data_dir": str(Path(data_dir).resolve()),
        "store_url": store_url,
        "params": params,
        "progress": False,
        "key_file": str(Path(key_file).resolve()) if key_file else None,
    }
    site = Site("hospital", pool, HOSPITAL_FLOW, HOSPITAL_ENTRYPOINT, dep_id, parameters)
    _deploy_evaluate(name, pool, parameters)
    return dep_id, site.save(site_file(pool))


def _deploy_evaluate(name: str, pool: str, finetune: dict) -> Path:
    """Deployment ``hospital-evaluate/<name>`` (no schedule: the coordinator starts it with a request id) and
    its site file, with the fine-tune's pinned parameters less those only training reads."""
    dep_id = _apply(EVALUATE_FLOW, name, pool, EVALUATE_ENTRYPOINT, tags=["medvec", "hospital", f"hospital:{name}"])
    keep = ("hospital", "data_dir", "store_url", "params", "key_file", "progress")
    parameters = {k: finetune[k] for k in keep}
    site = Site("hospital", pool, EVALUATE_FLOW, EVALUATE_ENTRYPOINT, dep_id, parameters, ("request",))
    return site.save(site_file(pool, "evaluate"))


def run_hospital_evaluate(name: str, request_id: str, timeout: float | None = None):
    """Start ``hospital-evaluate/<name>`` for evaluation request ``request_id`` and wait; returns the flow run."""
    from prefect.deployments import run_deployment

    try:
        return run_deployment(f"{EVALUATE_FLOW}/{name}", parameters={"request": request_id}, timeout=timeout)
    except Exception as exc:
        from prefect.exceptions import ObjectNotFound

        if isinstance(exc, ObjectNotFound):
            hint = f"hospital {name} joins again with this version (`medvec hospital join {name} ...`)"
            raise DeploymentNotFoundError(
                f"no deployment {EVALUATE_FLOW}/{name} on the Prefect server: {hint}"
            ) from exc
        raise


class DeploymentNotFoundError(UserError, LookupError):
    """A hospital or coordinator deployment that the Prefect server does not hold."""


@contextlib.contextmanager
def _hospital_deployment(name: str) -> Iterator[str]:
    """Yield ``hospital-finetune/<name>``; Prefect's ObjectNotFound for it becomes DeploymentNotFoundError."""
    from prefect.exceptions import ObjectNotFound

    full = f"{HOSPITAL_FLOW}/{name}"
    try:
        yield full
    except ObjectNotFound as exc:
        hint = f"create it with `medvec hospital join {name} --data FOLDER`"
        raise DeploymentNotFoundError(f"no deployment {full} on the Prefect server: {hint}") from exc


def set_hospital_schedule(name: str, cron: str | None = None, interval: float | None = None) -> None:
    """Replace the schedules of ``hospital-finetune/<name>``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, NoSchedule, RRuleSchedule

    with get_client(sync_client=True) as client, _hospital_deployment(name) as full:
        dep = client.read_deployment_by_name(full)
        for s in client.read_deployment_schedules(dep.id):
            client.delete_deployment_schedule(dep.id, s.id)
        schedule: IntervalSchedule | CronSchedule | RRuleSchedule | NoSchedule | None = None
        if cron:
            schedule = CronSchedule(cron=cron)
        elif interval:
            schedule = IntervalSchedule(interval=dt.timedelta(seconds=interval))
        if schedule is not None:
            client.create_deployment_schedules(dep.id, [(schedule, True)])


def run_hospital(name: str, timeout: float | None = None):
    """Start ``hospital-finetune/<name>`` now and wait for it; returns the flow run."""
    from prefect.deployments import run_deployment

    with _hospital_deployment(name) as full:
        return run_deployment(full, timeout=timeout)


def worker_command(pool: str) -> list[str]:
    """The command line of the medvec worker for ``pool`` (its site file on this machine)."""
    return [sys.executable, "-m", "flows.worker", str(site_file(pool))]


def start_worker(pool: str) -> NoReturn:
    """Become the medvec worker for ``pool`` (exec in place: signals to this PID reach the worker itself).

    SIGINT gets its default action first: a shell starts background jobs (``nohup medvec … &``) with
    SIGINT ignored, the ignore survives exec, and Prefect's worker stops on SIGINT, so without this a
    SIGTERM would never stop a worker started that way.
    """
    cmd = worker_command(pool)
    Site.load(Path(cmd[-1]))  # a missing site file: one line here, not a traceback from the worker
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(PROJECT_DIR)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execve(cmd[0], cmd, worker_env(pool))


def worker_env(pool: str) -> dict:
    """The worker's environment: the coordinator's worker polls every second unless the operator chose otherwise.

    A landed vector's merge run waits for the coordinator's next poll (Prefect's default: every 10 s, about
    5 s on average); hospitals' runs are scheduled, so their workers keep Prefect's default.
    """
    env = os.environ.copy()
    if pool == COORDINATOR_POOL:
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")
    return env


__all__ = [
    "COORDINATOR_POOL",
    "MERGE_FLOW",
    "deploy_coordinator",
    "deploy_hospital",
    "ensure_pool",
    "hospital_pool",
    "run_hospital",
    "run_hospital_evaluate",
    "set_hospital_schedule",
    "start_worker",
    "worker_command",
]
