"""Hospital fine-tune runs in MLflow, and data sets logged by identity only (digest, size, label counts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset

from medvec.evaluate import md_inert
from medvec.hospital.finetune import Training
from medvec.hospital.monitor import DriftReport
from medvec.hospital.publish import Published
from medvec.record import MergeRecord
from medvec.timing import timed
from medvec.tracking.server import (
    DIGEST_CHARS,
    NOTE,
    RUN_NOTE_LIMIT,
    connect,
    experiment_id,
    fit_note,
    flat_params,
    hospital_experiment,
    run_link,
    version_link,
)


@timed("tracking")
def log_hospital_run(published: Published, settings: dict, training: Training) -> str:
    """Record one hospital fine-tune; returns the MLflow run id.

    Logged: the fine-tune settings, loss and local validation per epoch, the wall time around training
    (metric ``finetune_seconds``), the local splits as data sets (digest, size and label counts: no path,
    no per-image value), lineage tags, and the vector file exactly as it was published.
    """
    mlflow = connect()
    exp = experiment_id(hospital_experiment(published.hospital))
    with mlflow.start_run(experiment_id=exp, run_name=f"{published.hospital}-finetune") as run:
        mlflow.log_params(flat_params("finetune.", settings))
        for entry in training.history:
            step = int(entry.get("epoch", 0))
            mlflow.log_metrics(
                {k: float(v) for k, v in entry.items() if k not in ("epoch",) and isinstance(v, (int, float))},
                step=step,
            )
        metrics = {"finetune_seconds": float(training.seconds)}
        mlflow.log_metric("finetune_seconds", metrics["finetune_seconds"])
        tags = {
            "medvec.kind": "hospital-finetune",
            "medvec.hospital": published.hospital,
            "medvec.base_sha256": published.base_sha256,
            "medvec.content_sha256": published.content_sha256,
            "medvec.vector_id": published.vector_id,
            "medvec.n_train": str(published.n_train),
            "medvec.store_uri": f"{published.store}/{published.key}",
        }
        if published.privacy:  # DP-SGD: what the accountant reported, searchable and in the description
            dp = published.privacy
            mlflow.log_params(flat_params("privacy.", dp))
            mlflow.log_metric("dp_epsilon", float(dp["epsilon"]))
            tags["medvec.dp_epsilon"] = f"{dp['epsilon']:.6g}"
            tags["medvec.dp"] = (
                f"ε={dp['epsilon']:.3f} δ={dp['delta']:.2g} {dp['accountant']} σ={dp['noise_multiplier']:.3f} "
                f"C={dp['max_grad_norm']:g} q={dp['sample_rate']:.4g} steps={dp['steps']}"
            )
        mlflow.log_artifact(str(published.file), artifact_path="vector")
        tags["medvec.vector_artifact"] = f"vector/{published.file.name}"
        mlflow.set_tags(tags)
        for split, data in training.data.items():
            _log_local_data(mlflow, published.hospital, split, data)
        mlflow.set_tag(NOTE, fit_note(_hospital_note(tags, metrics, []), RUN_NOTE_LIMIT))
        return run.info.run_id


class _Where(DatasetSource):
    """A dataset source described by a few fields, not a path: a hospital and a split, or a URI."""

    def __init__(self, fields: dict[str, Any]):
        self._fields = dict(fields)

    @staticmethod
    def _get_source_type() -> str:
        return "medvec"

    def load(self, **kwargs):
        raise NotImplementedError("medvec logs datasets by identity only; the data stays where it is")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "_Where":
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dict(self._fields)

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "_Where":
        return cls(source_dict)


class _Identity(MetaDataset):
    """A dataset logged by identity and aggregates only: name, digest, source and a small profile, no rows."""

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _log_local_data(mlflow, hospital: str, split: str, data: dict) -> None:
    """A hospital's local split as a dataset input: digest, size and label counts (no path, nothing per image)."""
    counts = [int(c) for c in data["label_counts"]]
    profile = {"num_rows": int(data["size"]), "label_counts": {str(c): n for c, n in enumerate(counts)}}
    dataset = _Identity(
        _Where({"hospital": hospital, "split": split}),
        name=f"{hospital} local {split}",
        digest=data["sha256"][:DIGEST_CHARS],
        profile=profile,
    )
    context = "training" if split == "train" else "validation"
    mlflow.log_input(dataset, context=context, tags={"medvec.sha256": data["sha256"]})


def _eval_source(source: str) -> DatasetSource:
    """MLflow's own source for the evaluation set's location (a local path, s3://…), else a plain URI."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # MLflow warns that a local path resolves to one source class "in two ways"
        warnings.simplefilter("ignore", UserWarning)
        try:
            return resolve_dataset_source(source)
        except MlflowException:
            return _Where({"uri": source})


def log_eval_set(mlflow, record: MergeRecord) -> None:
    """The coordinator's evaluation set (the one that chose λ and the gate scores on) as a dataset input."""
    ev = record.eval_set
    dataset = _Identity(
        _eval_source(ev.source),
        name=f"{Path(ev.source).name or ev.source} {ev.split}",
        digest=ev.sha256[:DIGEST_CHARS],
        profile={"num_rows": ev.size, "split": ev.split, "sha256": ev.sha256},
    )
    mlflow.log_input(dataset, context="validation", tags={"medvec.sha256": ev.sha256, "medvec.size": str(ev.size)})


def _hospital_note(tags: dict[str, str], metrics: dict[str, float], merges: list[str]) -> str:
    """A fine-tune run's description: the vector it published and the merges that vector went into."""
    lines = [
        f"### Fine-tune at hospital {md_inert(tags.get('medvec.hospital'))}",
        "",
        f"- vector `{tags.get('medvec.vector_id')}`, content sha256 `{tags.get('medvec.content_sha256', '')[:12]}…`",
        f"- base θ_pre sha256 `{tags.get('medvec.base_sha256', '')[:12]}…`",
        f"- {tags.get('medvec.n_train')} training images; the local data set (digest, size, label counts)"
        " is under *Datasets*",
    ]
    if tags.get("medvec.dp"):
        lines.append(f"- trained with DP-SGD (Opacus): {tags['medvec.dp']}")
    if "finetune_seconds" in metrics:
        lines.append(f"- fine-tune wall time {metrics['finetune_seconds']:.1f} s (metric `finetune_seconds`)")
    if tags.get("medvec.vector_artifact"):
        lines.append(f"- the vector file: artifact `{tags['medvec.vector_artifact']}`")
    else:
        lines.append(f"- the vector file: in the store at `{tags.get('medvec.store_uri')}`")
    lines += ["", "**Merges this vector went into** (newest first)", ""]
    lines += [f"- {m}" for m in merges] or ["- none yet"]
    return "\n".join(lines)


def find_hospital_run(vector_id: str, hospital: str) -> str | None:
    """The fine-tune run of ``hospital`` that logged vector ``vector_id`` (the first found); None when there is none."""
    mlflow = connect()
    exp = mlflow.get_experiment_by_name(hospital_experiment(hospital))
    if exp is None:
        return None
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`medvec.vector_id` = '{vector_id}'", output_format="list"
    )
    return runs[0].info.run_id if runs else None


def update_hospital_note(client, merge_exp: str, hospital_run: str) -> None:
    """Rewrite a fine-tune run's description with every merge run whose inputs name its vector."""
    run = client.get_run(hospital_run)
    vid = run.data.tags.get("medvec.vector_id")
    if not vid:
        return
    found = client.search_runs(
        [merge_exp],
        filter_string=f"tags.`medvec.inputs` LIKE '%{vid}%'",
        order_by=["attributes.start_time DESC"],  # newest first: a cut drops the oldest
        max_results=200,
    )
    merges = []
    for m in found:
        tags = m.data.tags
        if vid not in {i[0] for i in json.loads(tags.get("medvec.inputs", "[]"))}:
            continue
        entry = f"[`{tags.get('medvec.merge_id', m.info.run_id)}`]({run_link(merge_exp, m.info.run_id)})"
        for mv in client.search_model_versions(f"run_id = '{m.info.run_id}'"):
            entry += f": [`{mv.name}` v{mv.version}]({version_link(mv.name, mv.version)})"
            entry += f", {mv.tags.get('medvec.gate', 'gate pending')}"
            break
        else:
            entry += f": no registered version (run {m.info.status.lower()})"
        merges.append(entry)
    client.set_tag(
        hospital_run, NOTE, fit_note(_hospital_note(run.data.tags, run.data.metrics, merges), RUN_NOTE_LIMIT)
    )


def log_monitor(report: DriftReport, data_name: str) -> str:
    """Log the report to the hospital's own MLflow experiment as a ``<hospital>-monitor`` run (PSI per feature as
    metrics, the bins as ``drift.json``); returns the run id. No per-image value is logged."""
    mlflow = connect()
    with mlflow.start_run(
        experiment_id=experiment_id(hospital_experiment(report.hospital)), run_name=f"{report.hospital}-monitor"
    ) as run:
        mlflow.set_tags({"medvec.kind": "monitor", "medvec.model": report.model, "medvec.monitored": data_name})
        mlflow.log_metrics({"n_reference": report.n_reference, "n_new": report.n_new})
        mlflow.log_metrics({f"psi.{f.name.replace(' ', '_')}": f.psi for f in report.features})
        mlflow.log_dict(report.to_json(), "drift.json")
        return run.info.run_id
