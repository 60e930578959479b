"""MLflow tracking, registry and lineage (the only module that imports MLflow).

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else the embedded default
``sqlite:///.medvec/mlflow.db`` in the working directory, with artifacts in
``.medvec/mlartifacts`` beside it.

* hospital fine-tune run (experiment ``medvec-hospitals``): settings as params,
  loss and local validation per epoch as metrics, tags ``medvec.hospital``,
  ``medvec.base_sha256``, ``medvec.content_sha256``, ``medvec.n_train``,
  ``medvec.vector_id``, and the vector file (or its store URI) as artifact;
* merge run (experiment ``medvec-merges``): method, λ, BN strategy and source, the input
  vectors (ids, hospitals, content hashes, fine-tune run ids) as tags and
  ``inputs.json``, metrics, plots, and the merged model registered as a new
  version of ``registry.model_name`` (a pyfunc returning class probabilities and the
  label at the validation-chosen threshold; safetensors weights, signature, input example);
* descriptions people can follow in the MLflow UI (``mlflow.note.content`` on runs, the
  model version's description): a merge run links each input vector's fine-tune run, a
  fine-tune run links the merges its vector went into, a version links its merge run;
* datasets (``mlflow.log_input``): the coordinator's validation set on every merge run, the
  hospital's local data on its fine-tune run (digest, size and label counts only);
* the base model: registered once as ``<model_name>-base`` with its sha256;
* the champion gate: alias ``champion`` moves only when the new version beats the
  current champion's validation score by ``registry.champion_margin`` on the same
  validation set (by content hash; a champion scored on another set is re-scored);
  otherwise the version is tagged ``rejected`` with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.pyfunc import PythonModel

from medvec.errors import LineageError, UserError
from medvec.evaluate import md_inert
from medvec.faults import failpoint
from medvec.record import GateDecision, MergeRecord
from medvec.timing import timed

HOSPITAL_EXPERIMENT = "medvec-hospitals"
MERGE_EXPERIMENT = "medvec-merges"
DEFAULT_DIR = ".medvec"
NOTE = "mlflow.note.content"  # a run's description, rendered as markdown by the MLflow UI
RUN_NOTE_LIMIT = 8000  # MLflow's longest tag value
VERSION_NOTE_LIMIT = 5000  # MLflow's longest model version description
DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest: the first 32 hex digits of the sha256


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = Path(DEFAULT_DIR).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _experiment(name: str) -> str:
    mlflow = _mlflow()
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


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(key + ".", v))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else json.dumps(v)
    return out


@timed("tracking")
def log_hospital_run(
    summary: dict,
    settings: dict,
    history: list[dict],
    vector_file: str | Path | None = None,
    finetune_seconds: float | None = None,
    local_data: dict[str, dict] | None = None,
) -> str:
    """Record one hospital fine-tune; returns the MLflow run id.

    ``finetune_seconds`` is the wall time measured around training (logged as the metric
    ``finetune_seconds``); ``local_data`` maps a split (``train``, ``val``) to its ``sha256``,
    ``size`` and ``label_counts``, logged as the run's datasets (no path, no per-image value).
    """
    mlflow = _mlflow()
    exp = _experiment(HOSPITAL_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp, run_name=f"{summary['hospital']}-finetune") as run:
        mlflow.log_params(_flat("finetune.", settings))
        for entry in history:
            step = int(entry.get("epoch", 0))
            mlflow.log_metrics(
                {k: float(v) for k, v in entry.items() if k not in ("epoch",) and isinstance(v, (int, float))},
                step=step,
            )
        metrics = {}
        if finetune_seconds is not None:
            metrics["finetune_seconds"] = float(finetune_seconds)
            mlflow.log_metric("finetune_seconds", metrics["finetune_seconds"])
        tags = {
            "medvec.kind": "hospital-finetune",
            "medvec.hospital": summary["hospital"],
            "medvec.base_sha256": summary["base_sha256"],
            "medvec.content_sha256": summary["content_sha256"],
            "medvec.vector_id": summary["vector_id"],
            "medvec.n_train": str(summary["n_train"]),
            "medvec.store_uri": f"{summary.get('store', '')}/{summary.get('key', '')}",
        }
        if summary.get("privacy"):  # DP-SGD: what the accountant reported, searchable and in the description
            dp = summary["privacy"]
            mlflow.log_params(_flat("privacy.", dp))
            mlflow.log_metric("dp_epsilon", float(dp["epsilon"]))
            tags["medvec.dp_epsilon"] = f"{dp['epsilon']:.6g}"
            tags["medvec.dp"] = (
                f"ε={dp['epsilon']:.3f} δ={dp['delta']:.2g} {dp['accountant']} σ={dp['noise_multiplier']:.3f} "
                f"C={dp['max_grad_norm']:g} q={dp['sample_rate']:.4g} steps={dp['steps']}"
            )
        if vector_file is not None and Path(vector_file).exists():
            mlflow.log_artifact(str(vector_file), artifact_path="vector")
            tags["medvec.vector_artifact"] = f"vector/{Path(vector_file).name}"
        mlflow.set_tags(tags)
        for split, data in (local_data or {}).items():
            _log_local_data(mlflow, summary["hospital"], split, data)
        mlflow.set_tag(NOTE, _fit(_hospital_note(tags, metrics, []), RUN_NOTE_LIMIT))
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


def _log_eval_set(mlflow, record: MergeRecord) -> None:
    """The coordinator's evaluation set (the one that chose λ and the gate scores on) as a dataset input."""
    ev = record.eval_set
    dataset = _Identity(
        _eval_source(ev.source),
        name=f"{Path(ev.source).name or ev.source} {ev.split}",
        digest=ev.sha256[:DIGEST_CHARS],
        profile={"num_rows": ev.size, "split": ev.split, "sha256": ev.sha256},
    )
    mlflow.log_input(dataset, context="validation", tags={"medvec.sha256": ev.sha256, "medvec.size": str(ev.size)})


def run_link(experiment_id: str, run_id: str) -> str:
    """A link the MLflow UI follows from a run or model version description."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def version_link(name: str, version: str | int) -> str:
    return f"#/models/{name}/versions/{version}"


def ui_url(configured: str | None = None) -> str:
    """The MLflow UI's address: ``configured``, else the tracking server's, else ``make ui``'s."""
    uri = tracking_uri()
    if configured:
        return configured.rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(run_id: str, configured_ui: str | None = None) -> str:
    """An absolute link to an MLflow run page, for pages outside MLflow (Prefect artifacts)."""
    run = _mlflow().MlflowClient().get_run(run_id)
    return f"{ui_url(configured_ui)}/{run_link(run.info.experiment_id, run_id)}"


def version_url(name: str, version: str | int, configured_ui: str | None = None) -> str:
    return f"{ui_url(configured_ui)}/{version_link(name, version)}"


def _fit(text: str, limit: int) -> str:
    """``text`` cut at a line end to MLflow's length limit, saying so."""
    if len(text) <= limit:
        return text
    tail = "\n\n… (cut to fit MLflow's length limit; the full lists are in the run's tags and `inputs.json`)"
    return text[: limit - len(tail)].rsplit("\n", 1)[0] + tail


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


def find_hospital_run(vector_id: str) -> str | None:
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(HOSPITAL_EXPERIMENT)
    if exp is None:
        return None
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`medvec.vector_id` = '{vector_id}'", output_format="list"
    )
    return runs[0].info.run_id if runs else None


class Classifier(PythonModel):
    """The registered model's pyfunc: class probabilities and the label at the registered threshold.

    ``predict(x)`` takes model-ready images (N, C, H, W float32, as :func:`medvec.data.to_tensor`
    makes them) and returns a DataFrame with ``p_0 … p_{k-1}`` and ``label``.  A binary
    model's label is ``p_1 >= threshold`` (the operating point chosen on validation);
    without a threshold, and for more classes, it is the argmax.  A multi-label model's
    ``p_c`` are independent sigmoids and its labels are ``label_c = p_c >= 0.5``.
    """

    threshold: float | None = None
    model: torch.nn.Module | None = None
    task: str = "multiclass"

    def load_context(self, context) -> None:
        from medvec.models import load_base

        self.threshold = (context.model_config or {}).get("threshold")
        base = load_base(context.artifacts["weights"])
        self.model, self.task = base.model.eval(), base.task

    def predict(self, context, model_input, params=None):
        return label_frame(self.model, np.asarray(model_input, dtype=np.float32), self.threshold, self.task)


MODEL_CODE = """from mlflow.models import set_model

from medvec.tracking import Classifier

set_model(Classifier())
"""


def label_frame(model: torch.nn.Module, x: np.ndarray, threshold: float | None, task: str = "multiclass"):
    """Probabilities and thresholded labels of ``model`` on ``x`` as a DataFrame (what the pyfunc returns)."""
    import pandas as pd

    from medvec.evaluate import probabilities

    with torch.no_grad():
        p = probabilities(model(torch.as_tensor(x)), task).numpy()
    if task == "multilabel":
        labels = {f"label_{c}": (p[:, c] >= 0.5).astype(np.int64) for c in range(p.shape[1])}
        return pd.DataFrame({**{f"p_{c}": p[:, c] for c in range(p.shape[1])}, **labels})
    if threshold is not None and p.shape[1] == 2:
        label = (p[:, 1] >= threshold).astype(np.int64)
    else:
        label = p.argmax(1).astype(np.int64)
    return pd.DataFrame({**{f"p_{c}": p[:, c] for c in range(p.shape[1])}, "label": label})


def _log_model(weights, example: np.ndarray, registered_name: str, threshold: float | None = None) -> str:
    """Log ``weights`` (a :class:`medvec.models.Base`) as a :class:`Classifier` pyfunc, then register it.

    The model carries its safetensors weights and spec, the medvec code, a signature and
    an input example; it is logged as a model from code (no pickled object), the threshold
    in its ``model_config``.  Registration is a separate last step, so a process killed while
    the model is being logged leaves no registered version.
    """
    import copy
    import tempfile

    import mlflow
    from mlflow.models import infer_signature

    from medvec.models import save_base

    model = copy.deepcopy(weights.model).cpu().eval()  # the caller's model stays where it is
    weights = weights.with_model(model, weights.sha256)
    example = np.zeros_like(example)  # the shape only: no coordinator image is stored with the model
    with tempfile.TemporaryDirectory() as tmp:
        path, code = Path(tmp) / "weights.safetensors", Path(tmp) / "classifier.py"
        save_base(weights, path)
        code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            model_config={"threshold": threshold},
            artifacts={"weights": str(path)},
            signature=infer_signature(example, label_frame(model, example, threshold, weights.task)),
            input_example=example,
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "torchvision",
                "efficientnet-lite-pytorch",
                "safetensors",
                "numpy",
                "pandas",
            ],
        )
    failpoint("registry-before-register")
    return str(mlflow.register_model(info.model_uri, registered_name, await_registration_for=60).version)


@timed("tracking")
def register_base(name: str, base, example: np.ndarray) -> str:
    """Register θ_pre (a :class:`medvec.models.Base`) once as ``<name>-base`` (idempotent by sha256).

    Returns the version.
    """
    from mlflow import MlflowClient

    sha256 = base.sha256

    mlflow = _mlflow()
    client = MlflowClient()
    model_name = f"{name}-base"
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        if mv.tags.get("medvec.base_sha256") == sha256:
            return str(mv.version)
    exp = _experiment(MERGE_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp, run_name=f"base-{sha256[:12]}"):
        mlflow.set_tags({"medvec.kind": "base", "medvec.base_sha256": sha256})
        mlflow.log_params(_flat("spec.", base.spec.to_dict()))
        version = _log_model(base, example, model_name)
    client.set_model_version_tag(model_name, version, "medvec.base_sha256", sha256)
    return version


def _score(metrics: dict, metric: str) -> float:
    v = metrics.get(metric)
    return float("-inf") if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


@timed("tracking")
def log_merge(
    record: MergeRecord,
    merged,
    example: np.ndarray,
    rescore: Callable[[MergeRecord], dict],
    plots: dict[str, Path] | None = None,
    decided: tuple[bool, str] | None = None,
) -> GateDecision:
    """Record a merge, register its model and apply the champion gate.

    ``merged`` is the merged model as a :class:`medvec.models.Base` (weights, spec and
    sha256); it is registered as a :class:`Classifier` pyfunc with the record's threshold.

    ``rescore(champion_record)`` evaluates the champion's merged weights on the
    current validation set: the gate uses it when the champion was scored on a
    different set.  ``decided`` (promote, reason) is an async step's own gate,
    taken against the champion start point.  If anything fails before the gate, no alias moves.
    """
    from mlflow import MlflowClient

    mlflow = _mlflow()
    client = MlflowClient()
    reg, metric = record.params.registry, record.params.evaluate.select_metric
    exp = _experiment(MERGE_EXPERIMENT)
    runs = {i.vector_id: find_hospital_run(i.vector_id) for i in record.inputs}
    hospital_exp = mlflow.get_experiment_by_name(HOSPITAL_EXPERIMENT)
    links = {vid: run_link(hospital_exp.experiment_id, r) for vid, r in runs.items() if r and hospital_exp}
    with mlflow.start_run(experiment_id=exp, run_name=record.merge_id) as run:
        _log_merge_run(mlflow, record, runs, metric, plots or {})
        mlflow.set_tag(NOTE, _fit(_merge_note(record, links, metric, None), RUN_NOTE_LIMIT))
        version = _log_model(merged, example, reg.model_name, record.operating_point.get("threshold"))
        run_id = run.info.run_id
    tags = {
        "medvec.merge_run": run_id,
        "medvec.merged_sha256": record.merged_sha256,
        f"val_{metric}": str(record.val.get(metric)),
        "medvec.eval_sha256": record.eval_set.sha256,
        "medvec.eval_size": str(record.eval_set.size),
        "medvec.eval_source": record.eval_set.source,
        "medvec.mode": record.mode,
        "medvec.threshold": str(record.operating_point.get("threshold", "")),
        "medvec.parent_version": str(record.parent_version),
        "medvec.task": merged.task,
        "medvec.classes_sha256": merged.classes_sha256 or "",
    }
    if record.version is not None:
        tags["medvec.version"] = str(record.version)
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, value)
    champion, reason = decided or _gate(client, record, rescore, tags)
    verdict = "champion" if champion else "rejected"
    if champion:
        client.set_registered_model_alias(reg.model_name, "champion", version)
    else:
        client.set_model_version_tag(reg.model_name, version, "rejected", reason)
    client.set_model_version_tag(reg.model_name, version, "medvec.gate", verdict)
    client.set_model_version_tag(reg.model_name, version, "medvec.gate_reason", reason)
    _describe(client, record, exp, run_id, str(version), verdict, reason, links, runs)
    return GateDecision(run_id=run_id, version=str(version), champion=champion, reason=reason)


def _describe(
    client,
    record: MergeRecord,
    exp: str,
    run_id: str,
    version: str,
    verdict: str,
    reason: str,
    links: dict[str, str],
    runs: dict[str, str | None],
) -> None:
    """After the gate: the merge run's and the version's descriptions, and each input's fine-tune run's merge list.

    The alias has already moved (or not) by now, so an MLflow error here is logged and
    left: retrying the registration would register the merge a second time.
    """
    import logging

    name, metric = record.params.registry.model_name, record.params.evaluate.select_metric
    try:
        gate = (name, version, verdict, reason)
        client.set_tag(run_id, NOTE, _fit(_merge_note(record, links, metric, gate), RUN_NOTE_LIMIT))
        note = _version_note(client, record, run_link(exp, run_id), verdict, reason)
        client.update_model_version(name, version, description=_fit(note, VERSION_NOTE_LIMIT))
        for hospital_run in {r for r in runs.values() if r}:
            _update_hospital_note(client, exp, hospital_run)
    except Exception as exc:  # descriptions are for people; nothing downstream reads them
        logging.getLogger(__name__).warning("merge %s: descriptions not updated: %s", record.merge_id, exc)


def _scale_name(record: MergeRecord) -> str:
    """What ``record.lam`` scales: η, the server step of an async step, or λ of a one-shot merge."""
    return "η" if record.mode == "async" else "λ"


def _merge_note(record: MergeRecord, links: dict[str, str], metric: str, gate: tuple | None) -> str:
    """A merge run's description: its inputs with links to their fine-tune runs, settings, data and the gate."""
    step, scale = record.mode == "async", _scale_name(record)
    lines = [
        f"### Merge `{record.merge_id}`",
        "",
        f"Method **{record.method}**, {scale} = {record.lam:g}, batch norm **{record.bn_strategy}**"
        f" (statistics from {record.bn_source}), mode **{record.mode}**.",
    ]
    if step:
        became = f"became v{record.version}" if record.version is not None else "not promoted"
        lines.append(f"An asynchronous step into the champion: parent version v{record.parent_version}, {became}.")
    head = "| hospital | vector id | content sha256 | fine-tune run |"
    rule = "|---|---|---|---|"
    dp = any(i.epsilon is not None for i in record.inputs)
    if dp:  # merging disjoint hospitals' vectors does not add their ε: each is that hospital's own
        head, rule = head + " DP ε |", rule + "---|"
    if step:
        head, rule = head + " from version | staleness | weight |", rule + "---|---|---|"
    scored = record.contribution
    if scored is not None:
        head, rule = head + f" contribution (LOO, val {scored.metric}) |", rule + "---|"
    lines += ["", head, rule]
    for i in record.inputs:
        link = links.get(i.vector_id)
        run = f"[fine-tune run]({link})" if link else "not found in this tracking server"
        row = f"| {md_inert(i.hospital)} | `{i.vector_id}` | `{i.content_sha256[:12]}` | {run} |"
        if dp:
            row += " no DP |" if i.epsilon is None else f" {i.epsilon:.3f} |"
        if step:
            weight = "-" if i.weight is None else f"{i.weight:.4f}"
            row += f" v{i.start_version} | {i.staleness} | {weight} |"
        if scored is not None:
            score = scored.of(i.vector_id)
            row += f" {score.loo:+.4f}{' (harmful)' if score.harmful else ''} |" if score else " – |"
        lines.append(row)
    scores = ", ".join(
        f"{split} {metric} {m[metric]:.4f}" for split, m in (("val", record.val), ("test", record.test)) if metric in m
    )
    lines += ["", f"Evaluated on {record.eval_set.describe()}, listed under *Datasets*. {scores}."]
    if record.lambda_curve:
        lines.append(
            f"The {scale} sweep: in the metric `val_{metric}_by_lambda` the step is {scale}×1000"
            " (step 1000 is 1.0); the table `lambda_curve.json` has the value itself."
        )
    if gate is None:
        lines += ["", "**Gate:** pending (the model is being registered)."]
    else:
        name, version, verdict, reason = gate
        lines += [
            "",
            f"**Gate:** {verdict}: {reason}.",
            "",
            f"Registered as [`{name}` v{version}]({version_link(name, version)}).",
        ]
    return "\n".join(lines)


def _version_note(client, record: MergeRecord, merge_link: str, verdict: str, reason: str) -> str:
    """A registered version's description: its merge run, its parent champion (async) and the gate."""
    hospitals = ", ".join(sorted({md_inert(i.hospital) for i in record.inputs}))
    lines = [
        f"Merged by run [`{record.merge_id}`]({merge_link}): {record.method},"
        f" {_scale_name(record)} = {record.lam:g},"
        f" batch norm {record.bn_strategy} from {record.bn_source}; {len(record.inputs)} vectors from {hospitals}."
        " The run's description links each vector's fine-tune run.",
    ]
    if record.mode == "async":
        became = f"v{record.version}" if record.version is not None else "not promoted"
        lines += ["", f"Asynchronous step from parent champion {_parent(client, record)}; became {became}."]
    lines += ["", f"Gate: **{verdict}**: {reason}."]
    return "\n".join(lines)


def _parent(client, record: MergeRecord) -> str:
    """The parent start point of an async step, with a link to its registered version when there is one."""
    name = record.params.registry.model_name
    if record.parent_version == 0:
        for mv in client.search_model_versions(f"name = '{name}-base'"):
            if mv.tags.get("medvec.base_sha256") == record.base_sha256:
                return f"v0 (θ_pre, [`{name}-base` v{mv.version}]({version_link(f'{name}-base', mv.version)}))"
        return "v0 (θ_pre)"
    found = [
        mv
        for mv in client.search_model_versions(f"name = '{name}'")
        if mv.tags.get("medvec.version") == str(record.parent_version)
    ]
    found.sort(key=lambda mv: (mv.tags.get("medvec.gate") == "champion", int(mv.version)))
    if not found:
        return f"v{record.parent_version}"
    mv = found[-1]
    return f"v{record.parent_version} ([`{name}` v{mv.version}]({version_link(name, mv.version)}))"


def _update_hospital_note(client, merge_exp: str, hospital_run: str) -> None:
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
    client.set_tag(hospital_run, NOTE, _fit(_hospital_note(run.data.tags, run.data.metrics, merges), RUN_NOTE_LIMIT))


def _log_merge_run(
    mlflow, record: MergeRecord, runs: dict[str, str | None], metric: str, plots: dict[str, Path]
) -> None:
    """Params, metrics, lineage tags, the record and plots of one merge run."""
    mlflow.log_params(
        {
            "method": record.method,
            "lambda": record.lam,
            "bn_strategy": record.bn_strategy,
            "bn_source": record.bn_source,
            "n_vectors": len(record.inputs),
            "eval_set": record.eval_set.describe(),
        }
    )
    for split, metrics in (("val", record.val), ("test", record.test)):
        mlflow.log_metrics({f"{split}_{k}": v for k, v in metrics.items() if not np.isnan(v)})
    for lam, val in record.lambda_curve:
        mlflow.log_metric(f"val_{metric}_by_lambda", float(val), step=round(float(lam) * 1000))
    if record.lambda_curve:  # the same sweep with λ itself as a column
        lams, vals = zip(*record.lambda_curve)
        rows = len(lams)
        table = {
            "method": [record.method] * rows,
            "bn": [record.bn_strategy] * rows,
            "lambda": [float(x) for x in lams],
        }
        mlflow.log_table({**table, f"val_{metric}": [float(v) for v in vals]}, "lambda_curve.json")
    _log_eval_set(mlflow, record)
    _log_contributions(mlflow, record)
    tags = {
        "medvec.kind": "merge",
        "medvec.base_sha256": record.base_sha256,
        "medvec.merge_id": record.merge_id,
        "medvec.merged_sha256": record.merged_sha256,
        "medvec.eval_sha256": record.eval_set.sha256,
        "medvec.inputs": json.dumps([[i.vector_id, i.hospital, i.content_sha256] for i in record.inputs]),
    }
    for n, i in enumerate(record.inputs):
        tags[f"medvec.input.{n}"] = f"{i.vector_id} {i.hospital} {i.content_sha256} run={runs[i.vector_id]}"
    if record.dvc_commit:
        tags["medvec.dvc_commit"] = record.dvc_commit
    mlflow.set_tags(tags)
    mlflow.log_dict(record.to_json(), "merge_record.json")
    mlflow.log_dict([{**i.to_json(), "run_id": runs[i.vector_id]} for i in record.inputs], "inputs.json")
    for path in plots.values():
        mlflow.log_artifact(str(path), artifact_path="plots")


def _log_contributions(mlflow, record: MergeRecord) -> None:
    """The contribution table ``contributions.json``, each vector's leave-one-out as ``contribution_loo.<n>``
    (n: its place in the inputs), and ``medvec.harmful`` naming the vectors the harmful rule fired on."""
    from medvec.contribution import table_rows

    scores = record.contribution
    if scores is None:
        return
    rows = table_rows(scores)
    mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "contributions.json")
    index = {i.vector_id: n for n, i in enumerate(record.inputs)}
    loo = {f"contribution_loo.{index[s.vector_id]}": s.loo for s in scores.scores if s.vector_id in index}
    mlflow.log_metrics(loo | {"contribution_seconds": scores.seconds})
    mlflow.log_params({"contribution_method": scores.method})
    harmful = [f"{r['vector_id']} {r['verdict']}" for r in rows if r["verdict"] != "ok"]
    if harmful:
        mlflow.set_tag("medvec.harmful", "; ".join(harmful))


def _gate(client, record: MergeRecord, rescore: Callable[[MergeRecord], dict], tags: dict) -> tuple[bool, str]:
    """Does the new version beat the champion on the same validation set?  Returns (promote, reason).

    When the champion was scored on another set (by content hash), its merged
    weights are re-scored on this record's set, and the reason says so.  A champion for another
    task or class list, or one whose weights cannot be re-scored, is not compared: the new version
    is not promoted, and the reason says why.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    reg, metric = record.params.registry, record.params.evaluate.select_metric
    new, margin = _score(record.val, metric), reg.champion_margin
    try:
        champ = client.get_model_version_by_alias(reg.model_name, "champion")
    except MlflowException:  # no champion yet
        return True, "first version"
    champ_score = float(champ.tags.get(f"val_{metric}", "-inf"))
    where = f"on {record.eval_set.describe()}"
    other = _other_task(champ.tags, tags)
    if other:
        return False, f"champion v{champ.version} {other}: not comparable; use another registry.model_name per task"
    if champ.tags.get("medvec.eval_sha256") != record.eval_set.sha256:
        old = f"{champ_score:.4f} on {champ.tags.get('medvec.eval_source', '?')} ({champ.tags.get('medvec.eval_size', '?')} images)"
        champ_record = MergeRecord.model_validate(mlflow.artifacts.load_dict(f"runs:/{champ.run_id}/merge_record.json"))
        try:
            champ_score = _score(rescore(champ_record), metric)
        except (UserError, OSError, RuntimeError) as exc:  # its store is gone, or its head does not fit this data
            return False, f"champion v{champ.version} could not be re-scored on {record.eval_set.describe()}: {exc}"
        where = f"re-scored on the current validation set {record.eval_set.describe()} (it scored {old})"
    verdict = "beats" if new > champ_score + margin else "does not beat"
    reason = f"val {metric} {new:.4f} {verdict} champion v{champ.version} {champ_score:.4f} + margin {margin}, {where}"
    return new > champ_score + margin, reason


def _other_task(champion: dict, new: dict) -> str:
    """Why the champion (its version tags) answers another question than the new version, or ''."""
    for key, what in (("medvec.task", "is a {} model"), ("medvec.classes_sha256", "has class list {}")):
        theirs = champion.get(key)
        if theirs and new[key] and theirs != new[key]:
            return what.format(theirs[:12])
    return ""


def resolve(ref: str):
    """``NAME@ALIAS`` or ``NAME/VERSION`` -> ModelVersion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _mlflow()
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        fetch = lambda: client.get_model_version_by_alias(name, alias)  # noqa: E731
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        fetch = lambda: client.get_model_version(name, version)  # noqa: E731
    else:
        raise LineageError(f"{ref!r}: expected NAME@ALIAS (e.g. medvec@champion) or NAME/VERSION")
    try:
        return fetch()
    except MlflowException as exc:
        raise LineageError(f"{ref}: {_missing_reason(client, name)} at {tracking_uri()}") from exc


def _missing_reason(client, name: str) -> str:
    """Why a model reference does not resolve: the model is unknown, or which aliases and versions exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return f"no registered model {name!r}"
    aliases = ", ".join(sorted(model.aliases)) or "none"
    latest = max((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), default=0)
    versions = f"versions 1..{latest}" if latest else "no versions"
    return f"model {name!r} has no such alias or version (aliases: {aliases}; {versions})"


def lineage(ref: str) -> dict:
    """model version → merge run → vectors (id, hospital, content sha256) → fine-tune runs → base."""
    from mlflow import MlflowClient

    _mlflow()
    client = MlflowClient()
    mv = resolve(ref)
    merge_run = client.get_run(mv.run_id)
    tags = merge_run.data.tags
    vectors = []
    for i in json.loads(tags.get("medvec.inputs", "[]")):
        vid, hospital, content = i
        run_id = find_hospital_run(vid)
        entry: dict[str, Any] = {
            "vector_id": vid,
            "hospital": hospital,
            "content_sha256": content,
            "finetune_run": None,
        }
        if run_id:
            hr = client.get_run(run_id)
            entry["finetune_run"] = {
                "run_id": run_id,
                "params": dict(hr.data.params),
                "metrics": dict(hr.data.metrics),
                "content_sha256": hr.data.tags.get("medvec.content_sha256"),
            }
            entry["dp_epsilon"] = hr.data.metrics.get("dp_epsilon")
        vectors.append(entry)
    base_sha = tags.get("medvec.base_sha256")
    base_versions = [
        str(v.version)
        for v in client.search_model_versions(f"name = '{mv.name}-base'")
        if v.tags.get("medvec.base_sha256") == base_sha
    ]
    aliases = list(getattr(mv, "aliases", []) or [])
    return {
        "model": {"name": mv.name, "version": mv.version, "aliases": aliases, "tags": dict(mv.tags)},
        "merge_run": {
            "run_id": mv.run_id,
            "params": dict(merge_run.data.params),
            "metrics": dict(merge_run.data.metrics),
            "merge_id": tags.get("medvec.merge_id"),
            "merged_sha256": tags.get("medvec.merged_sha256"),
            "dvc_commit": tags.get("medvec.dvc_commit"),
        },
        "vectors": vectors,
        "base": {"sha256": base_sha, "registered_as": f"{mv.name}-base", "versions": base_versions},
    }


def add_contributions(tree: dict, record: MergeRecord) -> dict:
    """Each lineage vector's contribution score from the merge record, and the vectors excluded as harmful."""
    scores = record.contribution
    if scores is None:
        return tree
    for v in tree["vectors"]:
        s = scores.of(v["vector_id"])
        v["contribution"] = s.model_dump(mode="json") if s else None
    summary = scores.model_dump(mode="json", exclude={"scores"})
    tree["contribution"] = summary
    return tree


def _contribution_text(c: dict | None, metric: str) -> str:
    from medvec.contribution import score_text

    return f"  contribution (val {metric}) {score_text(c, reasons=False)}" if c else ""


def lineage_text(tree: dict) -> str:
    m, r, b = tree["model"], tree["merge_run"], tree["base"]
    alias = f" @{','.join(m['aliases'])}" if m["aliases"] else ""
    lines = [f"{m['name']} v{m['version']}{alias}  merged sha256 {r.get('merged_sha256') or '?'}"]
    lines.append(
        f"└─ merge run {r['run_id']} ({r.get('merge_id')})  method={r['params'].get('method')} λ={r['params'].get('lambda')} bn={r['params'].get('bn_strategy')} from {r['params'].get('bn_source')}  val_auc={r['metrics'].get('val_auc', float('nan')):.4f}"
    )
    if r.get("dvc_commit"):
        lines.append(f"   ├─ DVC registry commit {r['dvc_commit']}")
    for n, v in enumerate(tree["vectors"]):
        last = n == len(tree["vectors"]) - 1
        lines.append(
            f"   {'└' if last else '├'}─ vector {v['vector_id']}  hospital={v['hospital']}  content sha256 {v['content_sha256']}"
            + (f"  DP ε={v['dp_epsilon']:.3f}" if v.get("dp_epsilon") is not None else "")
            + _contribution_text(v.get("contribution"), (tree.get("contribution") or {}).get("metric", ""))
        )
        fr = v["finetune_run"]
        pad = "      " if last else "   │  "
        if fr:
            p = fr["params"]
            lines.append(
                f"{pad}└─ fine-tune run {fr['run_id']}  epochs={p.get('finetune.epochs')} lr={p.get('finetune.lr')} seed={p.get('finetune.seed')}"
            )
        else:
            lines.append(f"{pad}└─ fine-tune run: not found in this tracking server")
    lines.append(f"   └─ base {b['sha256']}  registered as {b['registered_as']} v{','.join(b['versions']) or '?'}")
    for e in (tree.get("contribution") or {}).get("excluded", []):
        lines.append(f"   excluded as harmful: {e['vector_id']} ({e['hospital']}): {e['harmful']}")
    lines += _chain_text(tree.get("chain", []))
    return "\n".join(lines)


def _chain_text(chain: list[dict]) -> list[str]:
    """The async version chain back to θ_pre: each step with its vectors, staleness and weights."""
    if not chain:
        return []
    lines = ["version chain (θ_pre is v0):"]
    for step in chain:
        version = f"v{step['version']}" if step["version"] is not None else "not promoted"
        val = step["val"].get("auc", float("nan"))
        lines.append(
            f"  {version} ← v{step['parent_version']}  {step['merge_id']}  η={step['eta']:g}  bn={step['bn']}  val_auc={val:.4f}"
        )
        for v in step["vectors"]:
            weight = "-" if v["weight"] is None else f"{v['weight']:.4f}"
            lines.append(
                f"     {v['hospital']:>8}  {v['vector_id']}  from v{v['start_version']}  staleness {v['staleness']}  weight {weight}"
            )
    return lines


def merge_record(ref: str) -> MergeRecord:
    """The :class:`~medvec.record.MergeRecord` logged with a model version."""
    import mlflow
    from pydantic import ValidationError

    _mlflow()
    mv = resolve(ref)
    doc = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/merge_record.json")
    try:
        return MergeRecord.model_validate(doc)
    except ValidationError as exc:
        raise LineageError(f"{ref}: its merge record (run {mv.run_id}) is not a medvec merge record: {exc}") from exc
