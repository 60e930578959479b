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
  version of ``registry.model_name`` (PyTorch flavour, signature, input example);
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

from medvec.errors import LineageError
from medvec.faults import failpoint
from medvec.record import GateDecision, MergeRecord

HOSPITAL_EXPERIMENT = "medvec-hospitals"
MERGE_EXPERIMENT = "medvec-merges"
DEFAULT_DIR = ".medvec"


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


def log_hospital_run(summary: dict, settings: dict, history: list[dict], vector_file: str | Path | None = None) -> str:
    """Record one hospital fine-tune; returns the MLflow run id."""
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
        mlflow.set_tags(
            {
                "medvec.kind": "hospital-finetune",
                "medvec.hospital": summary["hospital"],
                "medvec.base_sha256": summary["base_sha256"],
                "medvec.content_sha256": summary["content_sha256"],
                "medvec.vector_id": summary["vector_id"],
                "medvec.n_train": str(summary["n_train"]),
                "medvec.store_uri": f"{summary.get('store', '')}/{summary.get('key', '')}",
            }
        )
        if vector_file is not None and Path(vector_file).exists():
            mlflow.log_artifact(str(vector_file), artifact_path="vector")
        return run.info.run_id


def find_hospital_run(vector_id: str) -> str | None:
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(HOSPITAL_EXPERIMENT)
    if exp is None:
        return None
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`medvec.vector_id` = '{vector_id}'", output_format="list"
    )
    return runs[0].info.run_id if runs else None


def _log_torch_model(model: torch.nn.Module, example: np.ndarray, registered_name: str) -> str:
    """Log a PyTorch model (signature, input example, medvec code), then register it; returns the version.

    Registration is a separate last step, so a process killed while the model is
    being logged leaves no registered version.
    """
    import mlflow
    from mlflow.models import infer_signature

    model = model.eval().cpu()
    with torch.no_grad():
        out = model(torch.as_tensor(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, out),
        input_example=example,
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            "efficientnet-lite-pytorch",
            "safetensors",
            "numpy",
        ],
    )
    failpoint("registry-before-register")
    return str(mlflow.register_model(info.model_uri, registered_name, await_registration_for=60).version)


def register_base(name: str, model: torch.nn.Module, sha256: str, spec: dict, example: np.ndarray) -> str:
    """Register θ_pre once as ``<name>-base`` (idempotent by sha256); returns the version."""
    from mlflow import MlflowClient

    mlflow = _mlflow()
    client = MlflowClient()
    model_name = f"{name}-base"
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        if mv.tags.get("medvec.base_sha256") == sha256:
            return str(mv.version)
    exp = _experiment(MERGE_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp, run_name=f"base-{sha256[:12]}"):
        mlflow.set_tags({"medvec.kind": "base", "medvec.base_sha256": sha256})
        mlflow.log_params(_flat("spec.", spec))
        version = _log_torch_model(model, example, model_name)
    client.set_model_version_tag(model_name, version, "medvec.base_sha256", sha256)
    return version


def _score(metrics: dict, metric: str) -> float:
    v = metrics.get(metric)
    return float("-inf") if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def log_merge(
    record: MergeRecord,
    model: torch.nn.Module,
    example: np.ndarray,
    rescore: Callable[[MergeRecord], dict],
    plots: dict[str, Path] | None = None,
    decided: tuple[bool, str] | None = None,
) -> GateDecision:
    """Record a merge, register its model and apply the champion gate.

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
    with mlflow.start_run(experiment_id=exp, run_name=record.merge_id) as run:
        _log_merge_run(mlflow, record, runs, metric, plots or {})
        version = _log_torch_model(model, example, reg.model_name)
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
    }
    if record.version is not None:
        tags["medvec.version"] = str(record.version)
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, value)
    champion, reason = decided or _gate(client, record, rescore)
    verdict = "champion" if champion else "rejected"
    if champion:
        client.set_registered_model_alias(reg.model_name, "champion", version)
    else:
        client.set_model_version_tag(reg.model_name, version, "rejected", reason)
    client.set_model_version_tag(reg.model_name, version, "medvec.gate", verdict)
    client.set_model_version_tag(reg.model_name, version, "medvec.gate_reason", reason)
    return GateDecision(run_id=run_id, version=str(version), champion=champion, reason=reason)


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


def _gate(client, record: MergeRecord, rescore: Callable[[MergeRecord], dict]) -> tuple[bool, str]:
    """Does the new version beat the champion on the same validation set?  Returns (promote, reason).

    When the champion was scored on another set (by content hash), its merged
    weights are re-scored on this record's set, and the reason says so.
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
    if champ.tags.get("medvec.eval_sha256") != record.eval_set.sha256:
        old = f"{champ_score:.4f} on {champ.tags.get('medvec.eval_source', '?')} ({champ.tags.get('medvec.eval_size', '?')} images)"
        champ_record = MergeRecord.model_validate(mlflow.artifacts.load_dict(f"runs:/{champ.run_id}/merge_record.json"))
        champ_score = _score(rescore(champ_record), metric)
        where = f"re-scored on the current validation set {record.eval_set.describe()} (it scored {old})"
    verdict = "beats" if new > champ_score + margin else "does not beat"
    reason = f"val {metric} {new:.4f} {verdict} champion v{champ.version} {champ_score:.4f} + margin {margin}, {where}"
    return new > champ_score + margin, reason


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
