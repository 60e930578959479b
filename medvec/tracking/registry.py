"""The registered model: a pyfunc over the merged weights, merge runs, and the champion alias behind the gate."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from medvec.config import DataConfig
from medvec.coordinator.engine import MergeOutcome
from medvec.coordinator.scoring import EvalSets, beats, score
from medvec.errors import UserError
from medvec.evaluate import confusion_figure, contribution_plot, lambda_curve, md_inert
from medvec.faults import failpoint
from medvec.keys import DocumentSigner
from medvec.models import Base, ModelSpec, load_base
from medvec.record import GateDecision, MergeRecord
from medvec.store import VectorStore, open_store
from medvec.timing import timed
from medvec.tracking.runs import find_hospital_run, log_eval_set, update_hospital_note
from medvec.tracking.server import (
    MERGE_EXPERIMENT,
    NOTE,
    RUN_NOTE_LIMIT,
    VERSION_NOTE_LIMIT,
    connect,
    experiment_id,
    fit_note,
    flat_params,
    run_link,
    version_link,
)


class Classifier(PythonModel):
    """The registered model's pyfunc: class probabilities and the label at the registered threshold.

    ``predict(frame)`` takes one image per row, as base64 PNG/JPEG/DICOM bytes (``image``), a raw pixel array of
    any size (``pixels``) or a model-ready array (``tensor``), and applies medvec's own preprocessing for the
    model's spec (:mod:`medvec.serving`). It returns a DataFrame with ``p_0 … p_{k-1}`` and ``label``: a binary
    model's label is ``p_1 >= threshold`` (the operating point chosen on validation); without a threshold, and
    for more classes, it is the argmax. A multi-label model's ``p_c`` are independent sigmoids and its labels
    are ``label_c = p_c >= 0.5``. A request it cannot read is refused with one line naming the row (HTTP 400).
    """

    threshold: float | None = None
    model: torch.nn.Module | None = None
    task: str = "multiclass"
    spec: ModelSpec | None = None
    decode_size: int | None = None
    resize: str | None = None

    def load_context(self, context) -> None:
        """Load the logged weights (artifact ``weights``) with their task and spec, and the threshold from the
        model config."""

        config = context.model_config or {}
        self.threshold, self.decode_size = config.get("threshold"), config.get("decode_size")
        self.resize = config.get("resize")
        base = load_base(context.artifacts["weights"])
        self.model, self.task, self.spec = base.model.eval(), base.task, base.spec

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Probabilities and labels of the request's images (see the class docstring)."""
        from medvec.serving import InputError, frame_to_batch, label_frame

        assert self.model is not None and self.spec is not None, "load_context first"
        try:
            batch = frame_to_batch(model_input, self.spec, self.decode_size, self.resize)
        except InputError as exc:
            raise BadRequest(str(exc)) from None
        return label_frame(self.model, batch, self.threshold, self.task)


class BadRequest(MlflowException):
    """HTTP 400 with medvec's one-line reason only. MLflow's scoring server rewrites the message of every
    MlflowException from ``predict`` to start with the repr of the whole request ("Failed to predict data
    '[[[0, 12, …'"), which for pixel arrays is a dump of the array; this message ignores that rewrite."""

    def __init__(self, reason: str):
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        """The one-line reason."""
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        """The scoring server's prefixed message is dropped (see the class docstring)."""


def request_schema():
    """The pyfunc's input schema: one image per row in exactly one of ``image``, ``pixels`` or ``tensor``."""
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return Schema(
        [
            ColSpec("string", "image", required=False),
            ColSpec(AnyType(), "pixels", required=False),
            ColSpec(AnyType(), "tensor", required=False),
        ]
    )


def answer_schema(num_classes: int, task: str):
    """The pyfunc's output schema: ``p_0 … p_{k-1}`` and ``label`` (multi-label: ``label_0 …``), as
    :func:`medvec.serving.label_columns` returns them."""
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    labels = [f"label_{c}" for c in range(num_classes)] if task == "multilabel" else ["label"]
    columns: list[ColSpec | TensorSpec] = [ColSpec("float", f"p_{c}") for c in range(num_classes)]
    return Schema(columns + [ColSpec("long", name) for name in labels])


CODE_BUNDLE = "medvec-code.zip"

MODEL_CODE = f"""import sys
from pathlib import Path

from mlflow.models import set_model

# medvec's code travels with the model as one zip ({CODE_BUNDLE}, in the code folder MLflow put on the path):
# it goes first, as the code folder does
sys.path[:0] = [str(p / "{CODE_BUNDLE}") for p in map(Path, sys.path) if (p / "{CODE_BUNDLE}").is_file()][:1]

from medvec.tracking.registry import Classifier

set_model(Classifier())
"""


def code_bundle(folder: Path) -> Path:
    """medvec's own code (its ``.py`` files) as one zip, imported from where it lies (:data:`MODEL_CODE`). A copy
    of the package was one upload per file, each an authenticated request: 0.44 s on MLflow's basic-auth server
    here, 40 s a model."""
    package = Path(__file__).resolve().parents[1]
    bundle = folder / CODE_BUNDLE
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as z:
        for file in sorted(package.rglob("*.py")):
            z.write(file, file.relative_to(package.parent).as_posix())
    return bundle


def _log_model(weights, registered_name: str, threshold: float | None = None, data: DataConfig | None = None) -> str:
    """Log ``weights`` (a :class:`medvec.models.Base`) as a :class:`Classifier` pyfunc, then register it.

    The model carries its safetensors weights and spec, the medvec code, a signature and
    an input example; it is logged as a model from code (no pickled object), the threshold
    in its ``model_config``.  Registration is a separate last step, so a process killed while
    the model is being logged leaves no registered version.
    """
    import copy
    import tempfile

    import mlflow
    from mlflow.models import ModelSignature

    from medvec.models import save_base

    model = copy.deepcopy(weights.model).cpu().eval()  # the caller's model stays where it is
    weights = weights.with_model(model, weights.sha256)
    # a raw 8 × 8 black image: the request form, with no coordinator image stored with the model
    request = pd.DataFrame({"pixels": [np.zeros((8, 8), dtype=np.uint8).tolist()]})
    with tempfile.TemporaryDirectory() as tmp:
        path, code = Path(tmp) / "weights.safetensors", Path(tmp) / "classifier.py"
        save_base(weights, path)
        code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            model_config={
                "threshold": threshold,
                "decode_size": data.decode_size if data else None,
                "resize": data.resize if data else None,
            },
            artifacts={"weights": str(path)},
            signature=ModelSignature(inputs=request_schema(), outputs=answer_schema(weights.num_classes, weights.task)),
            input_example=request,
            code_paths=[str(code_bundle(Path(tmp)))],  # the whole medvec package, one file
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "torchvision",
                "efficientnet-lite-pytorch",
                "safetensors",
                "numpy",
                "pandas",
                "pillow",
                "pydicom",
                "pylibjpeg",
                "pylibjpeg-openjpeg",
            ],
        )
    failpoint("registry-before-register")
    return str(mlflow.register_model(info.model_uri, registered_name, await_registration_for=60).version)


def merge_plots(record: MergeRecord, outcome: MergeOutcome, classes: list[str], folder: Path) -> dict[str, Path]:
    """What a merge run shows besides its numbers: the λ curve, each input's contribution and the confusion
    matrix, as PNG files in ``folder``."""
    title = f"merge {record.merge_id}: validation AUC against λ (validation split)"
    curve = {outcome.method: outcome.curve}
    chosen = {outcome.method: outcome.lam}
    plots = {"lambda": lambda_curve(curve, folder / "lambda.png", chosen=chosen, selected=outcome.method, title=title)}
    if outcome.scores is not None:
        title = f"merge {record.merge_id}: each input's contribution (validation split)"
        plots["contribution"] = contribution_plot(outcome.scores, folder / "contributions.png", title)
    split, metrics = ("test", outcome.test) if outcome.test else ("validation", outcome.val)
    conf = confusion_figure(metrics, classes, folder / "confusion.png", f"merge {record.merge_id}: {split} split")
    if conf is not None:
        plots["confusion"] = conf
    return plots


def register_merge(
    record: MergeRecord,
    merged: Base,
    root: Base,
    evalsets: EvalSets,
    store: VectorStore,
    plots: dict[str, Path] | None = None,
    decided: tuple[bool, str] | None = None,
) -> GateDecision:
    """Register θ_pre once, then log the merge run, register the merged model and apply the champion gate on
    the same validation set (a champion scored on another set is re-scored from its stored weights)."""
    batch_size = record.params.evaluate.batch_size
    register_base(record.params.registry.model_name, root, record.params.data)

    def rescore(champion: MergeRecord) -> dict:
        """The champion's stored merged weights, scored on this merge's validation set."""
        found = merged_weights(champion, store)
        return evalsets.validate_one(found.model, found.spec, batch_size, "gate")

    judge = evalsets.judge
    compare = None
    if judge is not None:  # the hospitals score the merge and the champion in one request

        def compare(champion: MergeRecord, name: str) -> tuple[bool, str]:
            return judge.gate(merged.model, merged_weights(champion, store).model, name)

    signature = weights_statement(store.signer, record) if store.signer is not None else None
    named = evalsets.val.classes if evalsets.val is not None else None  # the coordinator's set, where it has one
    return log_merge(record, merged, rescore, plots, decided, signature, compare, named)


def run_record(mlflow, run_id: str | None) -> MergeRecord:
    """The merge record a registered version's run logged (``merge_record.json``)."""
    return MergeRecord.model_validate(mlflow.artifacts.load_dict(f"runs:/{run_id}/merge_record.json"))


def merged_weights(record: MergeRecord, store: VectorStore) -> Base:
    """A merge's stored weights: from ``store``, or from the store it was made in."""
    where = store if record.store_url == store.url else open_store(record.store_url)
    return where.merged_model(record)


def champion_weights(model_name: str, store: VectorStore, like: Base) -> torch.nn.Module | None:
    """The registered champion's merged weights, read before a merge so the hospitals score them beside the
    scan's candidates (the gate then needs no request of its own); None without a champion, where its weights
    cannot be read, or where they do not fit ``like``'s architecture (the gate then asks, or says why not)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow = connect()
    try:
        champ = MlflowClient().get_model_version_by_alias(model_name, "champion")
        model = merged_weights(run_record(mlflow, champ.run_id), store).model
    except (MlflowException, UserError, OSError, RuntimeError, ValueError):
        return None
    ours, theirs = like.model.state_dict(), model.state_dict()
    fits = ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    return model if fits else None


def weights_statement(signer: DocumentSigner, record: MergeRecord) -> dict:
    """The coordinator's signed statement that its registered model holds the weights of ``record``
    (by their sha256); verify it with :meth:`~medvec.keys.DocumentVerifier.open` at ``models/<sha256>``."""
    return signer.sign(f"models/{record.merged_sha256}", {"merge_id": record.merge_id, "sha256": record.merged_sha256})


@timed("tracking")
def register_base(name: str, base, data: DataConfig | None = None) -> str:
    """Register θ_pre (a :class:`medvec.models.Base`) once as ``<name>-base`` (idempotent by sha256).

    Returns the version.
    """
    from mlflow import MlflowClient

    sha256 = base.sha256

    mlflow = connect()
    client = MlflowClient()
    model_name = f"{name}-base"
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        if mv.tags.get("medvec.base_sha256") == sha256:
            return str(mv.version)
    exp = experiment_id(MERGE_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp, run_name=f"base-{sha256[:12]}"):
        mlflow.set_tags({"medvec.kind": "base", "medvec.base_sha256": sha256})
        mlflow.log_params(flat_params("spec.", base.spec.to_dict()))
        version = _log_model(base, model_name, None, data)
    client.set_model_version_tag(model_name, version, "medvec.base_sha256", sha256)
    return version


@timed("tracking")
def log_merge(
    record: MergeRecord,
    merged,
    rescore: Callable[[MergeRecord], dict],
    plots: dict[str, Path] | None = None,
    decided: tuple[bool, str] | None = None,
    signature: dict | None = None,
    compare: Callable[[MergeRecord, str], tuple[bool, str]] | None = None,
    classes: list[str] | None = None,
) -> GateDecision:
    """Record a merge, register its model and apply the champion gate.

    ``classes``: the class names for the model card where neither the weights nor ``model.classes`` record them.

    ``signature``: the coordinator's signed statement of the merged weights' sha256
    (:func:`weights_statement`), kept as the version's ``medvec.signature`` tag with its key's fingerprint.

    ``merged`` is the merged model as a :class:`medvec.models.Base` (weights, spec and
    sha256); it is registered as a :class:`Classifier` pyfunc with the record's threshold.

    ``rescore(champion_record)`` evaluates the champion's merged weights on the
    current validation set: the gate uses it when the champion was scored on a
    different set.  ``decided`` (promote, reason) is an async step's own gate,
    taken against the champion start point.  ``compare(champion_record, name)``, where the hospitals score
    (``evaluate.where: hospitals``), is the gate instead: the merge and the champion scored by the same sites.
    If anything fails before the gate, no alias moves.
    """
    from mlflow import MlflowClient

    mlflow = connect()
    client = MlflowClient()
    reg, metric = record.params.registry, record.params.evaluate.select_metric
    exp = experiment_id(MERGE_EXPERIMENT)
    runs = {i.vector_id: find_hospital_run(i.vector_id, i.hospital) for i in record.inputs}
    links = {vid: run_link(client.get_run(r).info.experiment_id, r) for vid, r in runs.items() if r}
    with mlflow.start_run(experiment_id=exp, run_name=record.merge_id) as run:
        _log_merge_run(mlflow, record, runs, metric, plots or {})
        mlflow.set_tag(NOTE, fit_note(_merge_note(record, links, metric, None), RUN_NOTE_LIMIT))
        threshold = record.operating_point.get("threshold")
        version = _log_model(merged, reg.model_name, threshold, record.params.data)
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
        "medvec.classes": json.dumps(list(merged.classes or record.params.model.classes or classes or [])),
        "medvec.input_shape": f"{merged.spec.in_chans}x{merged.spec.image_size}x{merged.spec.image_size}",
        "medvec.classes_sha256": merged.classes_sha256 or "",
        **(
            {"medvec.signed_by": signature["medvec_signed"]["key"], "medvec.signature": json.dumps(signature)}
            if signature
            else {}
        ),
    }
    if record.version is not None:
        tags["medvec.version"] = str(record.version)
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, value)
    champion, reason = decided or _gate(client, record, rescore, tags, compare)
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
        client.set_tag(run_id, NOTE, fit_note(_merge_note(record, links, metric, gate), RUN_NOTE_LIMIT))
        note = version_description(client, record, name, version, run_link(exp, run_id))
        client.update_model_version(name, version, description=fit_note(note, VERSION_NOTE_LIMIT))
        for hospital_run in {r for r in runs.values() if r}:
            update_hospital_note(client, exp, hospital_run)
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


def version_description(client, record: MergeRecord, name: str, version: str, merge_link: str) -> str:
    """A registered version's description: its model card (:mod:`medvec.tracking.card`, from the record and the
    version's tags) and its lineage (:func:`_version_note`)."""
    from medvec.tracking.card import Registration, model_card

    reg = Registration.of(name, version, client.get_model_version(name, version).tags)
    return model_card(record, reg) + "\n## Lineage\n\n" + _version_note(client, record, merge_link) + "\n"


def _version_note(client, record: MergeRecord, merge_link: str) -> str:
    """A registered version's lineage: its merge run and, for an async step, its parent champion."""
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
    log_eval_set(mlflow, record)
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
    from medvec.coordinator.contribution import table_rows

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


def _gate(
    client,
    record: MergeRecord,
    rescore: Callable[[MergeRecord], dict],
    tags: dict,
    compare: Callable[[MergeRecord, str], tuple[bool, str]] | None = None,
) -> tuple[bool, str]:
    """Does the new version beat the champion on the same validation set?  Returns (promote, reason).

    When the champion was scored on another set (by content hash), its merged
    weights are re-scored on this record's set, and the reason says so.  A champion for another
    task or class list, or one whose weights cannot be re-scored, is not compared: the new version
    is not promoted, and the reason says why.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    reg, metric = record.params.registry, record.params.evaluate.select_metric
    new = score(record.val, metric)
    missed = [r for r in record.evaluation.rounds if not r.quorum_met]
    if missed:
        return (
            False,
            f"not promoted: the hospitals' {missed[0].purpose} round {missed[0].request_id}: {missed[0].quorum}",
        )
    try:
        champ = client.get_model_version_by_alias(reg.model_name, "champion")
    except MlflowException:  # no champion yet
        return True, "first version"
    champ_score = float(champ.tags.get(f"val_{metric}", "-inf"))
    where = f"on {record.eval_set.describe()}"
    other = _other_task(champ.tags, tags)
    if other:
        return False, f"champion v{champ.version} {other}: not comparable; use another registry.model_name per task"
    if compare is not None:
        champ_record = run_record(mlflow, champ.run_id)
        try:
            return compare(champ_record, f"champion v{champ.version}")
        except (UserError, OSError, RuntimeError) as exc:  # its store is gone, or the hospitals could not score it
            return False, f"champion v{champ.version} could not be scored by the hospitals: {exc}"
    if champ.tags.get("medvec.eval_sha256") != record.eval_set.sha256:
        old = f"{champ_score:.4f} on {champ.tags.get('medvec.eval_source', '?')} ({champ.tags.get('medvec.eval_size', '?')} images)"
        champ_record = run_record(mlflow, champ.run_id)
        try:
            champ_score = score(rescore(champ_record), metric)
        except (UserError, OSError, RuntimeError) as exc:  # its store is gone, or its head does not fit this data
            return False, f"champion v{champ.version} could not be re-scored on {record.eval_set.describe()}: {exc}"
        where = f"re-scored on the current validation set {record.eval_set.describe()} (it scored {old})"
    promote, verdict = beats(new, champ_score, record.params, f"champion v{champ.version}")
    return promote, f"{verdict}, {where}"


def _other_task(champion: dict, new: dict) -> str:
    """Why the champion (its version tags) answers another question than the new version, or ''."""
    for key, what in (("medvec.task", "is a {} model"), ("medvec.classes_sha256", "has class list {}")):
        theirs = champion.get(key)
        if theirs and new[key] and theirs != new[key]:
            return what.format(theirs[:12])
    return ""
