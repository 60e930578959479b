"""The MLflow tracking server medvec talks to, its experiments, and links into its UI."""

from __future__ import annotations

import json
import os
from pathlib import Path

HOSPITAL_EXPERIMENT = "medvec-hospitals"  # each hospital logs into its own: medvec-hospitals/<name>


def hospital_experiment(hospital: str) -> str:
    """The experiment of one hospital's fine-tune runs (one per hospital, so MLflow permissions can keep
    each hospital to its own runs): ``medvec-hospitals/<name>``."""
    return f"{HOSPITAL_EXPERIMENT}/{hospital}"


MERGE_EXPERIMENT = "medvec-merges"


DEFAULT_DIR = ".medvec"


NOTE = "mlflow.note.content"  # a run's description, rendered as markdown by the MLflow UI


RUN_NOTE_LIMIT = 8000  # MLflow's longest tag value


VERSION_NOTE_LIMIT = 5000  # MLflow's longest model version description


DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest: the first 32 hex digits of the sha256


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite database ``.medvec/mlflow.db`` (folder created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = Path(DEFAULT_DIR).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def connect():
    """The ``mlflow`` module, pointed at :func:`tracking_uri`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def experiment_id(name: str) -> str:
    """The id of the experiment ``name``, created when missing (embedded: artifacts under
    ``.medvec/mlartifacts/<name>``); another process creating it at the same time is tolerated."""
    mlflow = connect()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):  # embedded: artifacts in a local folder beside the database
        location = (Path(DEFAULT_DIR).resolve() / "mlartifacts" / name).as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process; anything else fails the lookup below
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flat_params(prefix: str, d: dict) -> dict:
    """``d`` flattened for MLflow: nested keys joined by dots after ``prefix``, lists and tuples as JSON."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(key + ".", v))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else json.dumps(v)
    return out


def run_link(experiment_id: str, run_id: str) -> str:
    """A link the MLflow UI follows from a run or model version description."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def version_link(name: str, version: str | int) -> str:
    """A link the MLflow UI follows to a registered model version."""
    return f"#/models/{name}/versions/{version}"


def ui_url(configured: str | None = None) -> str:
    """The MLflow UI's address: ``configured``, else the tracking server's, else ``make ui``'s."""
    uri = tracking_uri()
    if configured:
        return configured.rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(run_id: str, configured_ui: str | None = None) -> str:
    """An absolute link to an MLflow run page, for pages outside MLflow (Prefect artifacts)."""
    run = connect().MlflowClient().get_run(run_id)
    return f"{ui_url(configured_ui)}/{run_link(run.info.experiment_id, run_id)}"


def version_url(name: str, version: str | int, configured_ui: str | None = None) -> str:
    """An absolute link to a registered model version's page, for pages outside MLflow."""
    return f"{ui_url(configured_ui)}/{version_link(name, version)}"


def fit_note(text: str, limit: int) -> str:
    """``text`` cut at a line end to MLflow's length limit, saying so."""
    if len(text) <= limit:
        return text
    tail = "\n\n… (cut to fit MLflow's length limit; the full lists are in the run's tags and `inputs.json`)"
    return text[: limit - len(tail)].rsplit("\n", 1)[0] + tail
