"""Work pools and deployments for the distributed path (all against ``PREFECT_API_URL``).

* ``coordinator`` pool (process type): deployment ``merge-and-evaluate/coordinator``,
  triggered by ``medvec.vector.landed``, reconciled on a schedule (hourly by
  default), one run at a time (others queue).
* ``hospital-<name>`` pool per hospital: deployment ``hospital-finetune/<name>``
  whose parameters point at that hospital's own data folder; optional cron or
  interval schedule for retraining.

Code is deployed from this project directory (``flow.from_source``), so a process
worker started in a checkout with medvec installed runs it.
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
from flows.hospital_finetune import HOSPITAL_FLOW
from flows.merge_and_evaluate import MERGE_FLOW
from medvec.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]
COORDINATOR_POOL = "coordinator"
COORDINATOR_DEPLOYMENT = "coordinator"


def hospital_pool(name: str) -> str:
    return f"hospital-{name}"


def ensure_pool(name: str) -> None:
    """Create a process work pool (with the process worker's default job template) if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


def _deploy(flow, entrypoint: str, name: str, pool: str, **kwargs):
    remote = flow.from_source(source=str(PROJECT_DIR), entrypoint=entrypoint)
    return remote.deploy(
        name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False, ignore_warnings=True, **kwargs
    )


def deploy_coordinator(
    store_url: str, eval_data: str, params: dict, calibration_data: str | None = None, reconcile_seconds: float = 3600
) -> str:
    """Create the ``coordinator`` pool and deploy ``merge-and-evaluate`` with its trigger."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events import DeploymentEventTrigger

    from flows.merge_and_evaluate import merge_and_evaluate

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
    dep_id = _deploy(
        merge_and_evaluate,
        "flows/merge_and_evaluate.py:merge_and_evaluate",
        COORDINATOR_DEPLOYMENT,
        COORDINATOR_POOL,
        parameters={
            "store_url": store_url,
            "eval_data": str(Path(eval_data).resolve()),
            "params": params,
            "calibration_data": calibration_data,
        },
        triggers=[trigger],
        interval=dt.timedelta(seconds=reconcile_seconds),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["medvec", "coordinator"],
    )
    return str(dep_id)


def deploy_hospital(
    name: str,
    data_dir: str,
    store_url: str,
    params: dict,
    cron: str | None = None,
    interval: float | None = None,
    key_file: str | None = None,
) -> str:
    """Create pool ``hospital-<name>`` and deployment ``hospital-finetune/<name>``."""
    from flows.hospital_finetune import hospital_finetune

    if cron and interval:
        raise ValueError("give --cron or --interval, not both")
    ensure_pool(hospital_pool(name))
    kwargs: dict[str, Any] = {}
    if cron:
        kwargs["cron"] = cron
    if interval:
        kwargs["interval"] = dt.timedelta(seconds=interval)
    dep_id = _deploy(
        hospital_finetune,
        "flows/hospital_finetune.py:hospital_finetune",
        name,
        hospital_pool(name),
        parameters={
            "hospital": name,
            "data_dir": str(Path(data_dir).resolve()),
            "store_url": store_url,
            "params": params,
            "progress": False,
            "key_file": str(Path(key_file).resolve()) if key_file else None,
        },
        tags=["medvec", "hospital", f"hospital:{name}"],
        **kwargs,
    )
    return str(dep_id)


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
    """The command line of a process worker for ``pool``."""
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]


def start_worker(pool: str) -> NoReturn:
    """Become a process worker for ``pool`` (exec in place: signals to this PID reach the worker itself).

    SIGINT gets its default action first: a shell starts background jobs (``nohup medvec … &``) with
    SIGINT ignored, the ignore survives exec, and Prefect's worker stops its child worker with SIGINT,
    so without this a SIGTERM would never stop a worker started that way.
    """
    cmd = worker_command(pool)
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
    "set_hospital_schedule",
    "start_worker",
    "worker_command",
]
