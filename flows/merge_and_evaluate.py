"""``merge-and-evaluate``: the coordinator's flow, fired whenever a vector lands.

Deployed with a trigger on ``medvec.vector.landed`` and an hourly reconciling
schedule (``medvec coordinator up``).  Runs are serialized by the deployment's
concurrency limit (one at a time, the rest queued), and a run whose inputs equal
the last merge's does nothing, so N vectors landing at once end in one merge that
contains all N.  A run that has stored its merge cancels the queued runs fired by
vectors it already listed (``supersede_queued``), so a burst of landings does not
leave a queue of runs that would each start a process to find nothing new.  A lost
event only delays a merge: the schedule finds vectors
newer than the last merge and merges them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.ui import base_tag, embedded_image, label_run, merge_run_name
from medvec import contribution
from medvec import coordinator as core
from medvec.config import Params
from medvec.data import DataSpec, load_split
from medvec.evaluate import bar_chart, confusion_figure, contribution_plot, lambda_curve, results_frame
from medvec.record import MergeRecord
from medvec.store import open_store
from medvec.train import set_threads
from medvec.vectors import utcnow
from tasks.coordinator import (
    admit_vectors,
    last_merge,
    merge_task,
    publish_merge,
    quarantine_excluded,
    record_in_dvc,
    refine_task,
    register_merge,
    single_rows,
    supersede_queued,
)
from tasks.hospital import fetch_base

MERGE_FLOW = "merge-and-evaluate"


def _summary(record: MergeRecord, skipped: bool = False, reason: str | None = None) -> dict:
    """What a flow run returns: the merge id, its inputs, metrics and the gate's decision."""
    out = {"skipped": skipped, "merge_id": record.merge_id, "inputs": [i.to_json() for i in record.inputs]}
    if reason:
        return out | {"reason": reason}
    return out | {
        "val": record.val,
        "test": record.test,
        "registry": record.registry.to_json() if record.registry else None,
    }


def _plots(record: MergeRecord, outcome: core.MergeOutcome, evalsets: core.EvalSets, folder: Path) -> dict[str, Path]:
    """λ curve and confusion matrix of one merge, as PNG files in ``folder``."""
    title = f"merge {record.merge_id}: validation AUC against λ (validation split)"
    curve = {outcome.method: outcome.curve}
    chosen = {outcome.method: outcome.lam}
    plots = {"lambda": lambda_curve(curve, folder / "lambda.png", chosen=chosen, selected=outcome.method, title=title)}
    if outcome.scores is not None:
        title = f"merge {record.merge_id}: each input's contribution (validation split)"
        plots["contribution"] = contribution_plot(outcome.scores, folder / "contributions.png", title)
    split, metrics = ("test", outcome.test) if outcome.test else ("validation", outcome.val)
    conf = confusion_figure(
        metrics, evalsets.val.classes, folder / "confusion.png", f"merge {record.merge_id}: {split} split"
    )
    if conf is not None:
        plots["confusion"] = conf
    return plots


def _merged_row(record: MergeRecord, outcome, name: str | None = None) -> dict:
    """The report row of the merged model (a one-shot merge or an async step)."""
    name = name or f"merged ({outcome.method}, λ={outcome.lam:g})"
    test = outcome.test or {}
    return core.Candidate(
        name, "merged", outcome.method, outcome.lam, outcome.bn.strategy, outcome.val, test, record.n_train
    ).row()


def _artifact(record: MergeRecord, rows: list[dict]) -> None:
    df = results_frame(rows)
    cols = [
        c
        for c in ("name", "kind", "lambda", "n_train", "val_auc", "test_auc", "test_balanced_accuracy", "test_accuracy")
        if c in df
    ]
    create_table_artifact(
        key="merge-metrics",
        table=df[cols].round(4).fillna("").to_dict(orient="records"),
        description=f"merge {record.merge_id}",
    )
    bn = f"BN {record.bn_strategy} from `{record.bn_source}`"
    lines = [
        f"### Merge `{record.merge_id}`",
        "",
        f"method `{record.method}`, λ = {record.lam}, {bn}, {len(record.inputs)} vectors",
        "",
    ]
    lines += ["| model | kind | val AUC | test AUC | test bal. acc |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['val'].get('auc', float('nan')):.3f} | {r['test'].get('auc', float('nan')):.3f} | {r['test'].get('balanced_accuracy', float('nan')):.3f} |"
        )
    if record.contribution is not None:
        lines += ["", "**What each input contributed**", "", *contribution.markdown(record.contribution)]
    if record.screened:
        lines += ["", "**Outlier defence**", ""] + [
            f"- {s.hospital} `{s.vector_id}`: {s.action} — {s.reason}" for s in record.screened
        ]
    if record.quarantined:
        lines += [
            "",
            "**Quarantined vectors (kept, not merged)**",
            "",
            "| hospital claimed | check | problem | time |",
            "|---|---|---|---|",
        ]
        lines += [f"| {q.hospital_claimed} | {q.check} | {q.problem} | {q.time} |" for q in record.quarantined]
    lines += ["", "| vector | hospital | content sha256 |", "|---|---|---|"]
    lines += [f"| {v.vector_id} | {v.hospital} | `{v.content_sha256[:16]}…` |" for v in record.inputs]
    with tempfile.TemporaryDirectory() as tmp:
        metric = "test_auc" if "test_auc" in df else "val_auc"
        png = bar_chart(df, Path(tmp) / "chart.png", metric)
        lines += ["", embedded_image(png, "per-hospital vs merged")]
        if record.contribution is not None:
            title = f"merge {record.merge_id}: each input's contribution (validation split)"
            png = contribution_plot(record.contribution, Path(tmp) / "contributions.png", title)
            lines += ["", embedded_image(png, "contributions")]
    create_markdown_artifact(key="merge-report", markdown="\n".join(lines), description=f"merge {record.merge_id}")


def _finish(
    store_url: str, record: MergeRecord, outcome, base, evalsets, vectors, p: Params, decided=None
) -> MergeRecord:
    """DVC registry commit, MLflow registration and gate, then ``latest.json`` moves (last)."""
    if p.registry.dvc_repo:
        if not p.registry.dvc_remote:
            raise ValueError("registry.dvc_repo is set but registry.dvc_remote is not")
        record = record.model_copy(update={"dvc_commit": record_in_dvc(record, vectors, p)})
    if p.registry.enabled:
        with tempfile.TemporaryDirectory() as tmp:
            plots = _plots(record, outcome, evalsets, Path(tmp))
            decision = register_merge(record, outcome.model, base, evalsets, plots, decided)
            record = record.model_copy(update={"registry": decision})
    open_store(store_url).put_merge(record)  # a crash before here leaves the merge to be redone
    return record


def _supersede(admission, reason: str) -> None:
    """Cancel the queued runs this run answers; a failure costs only those runs' time, never this merge."""
    listed = [v.meta.vector_id for v in admission.admitted] + [s.vector_id for s in admission.screened]
    try:
        n = supersede_queued(listed, reason)
    except Exception as exc:  # the merge is stored; queued runs will find nothing new on their own
        get_run_logger().warning("could not cancel queued runs (%s): %s", type(exc).__name__, exc)
        return
    if n:
        get_run_logger().info("cancelled %d queued run(s) this run answers (%s)", n, reason)


def _step(
    store_url: str, base, admission, p: Params, eval_data: str, calibration_data: str | None, trigger: dict
) -> dict:
    """Async mode: once the buffer holds B vectors, one step into the champion (promoted if better)."""
    logger = get_run_logger()
    n, need = len(admission.admitted), p.refine.buffer
    if n < need:
        logger.info("buffer holds %d of %d vectors: no step yet", n, need)
        return {
            "skipped": True,
            "reason": f"buffer holds {n} of {need}",
            "inputs": [v.meta.vector_id for v in admission.admitted],
        }
    evalsets = core.EvalSets.load(eval_data, spec=DataSpec.of(p))
    calibration = load_split(calibration_data, "train") if calibration_data else None
    step = refine_task(store_url, base, admission, p, evalsets, calibration, trigger)
    label_run(f"{step.record.merge_id} (async step)", [f"merge:{step.record.merge_id}"])
    record = _finish(
        store_url, step.record, step.outcome, base, evalsets, step.vectors, p, (step.promoted, step.reason)
    )
    name = f"step v{record.parent_version} → {f'v{record.version}' if record.version else 'not promoted'}"
    _artifact(record, [_merged_row(record, step.outcome, name)])
    logger.info("step %s: %s", record.merge_id, step.reason)
    return _summary(record) | {"promoted": step.promoted, "version": record.version, "reason": step.reason}


@flow(name=MERGE_FLOW, flow_run_name=merge_run_name, log_prints=True)
def merge_and_evaluate(
    store_url: str,
    eval_data: str,
    params: Params | None = None,
    calibration_data: str | None = None,
    force: bool = False,
    trigger: dict[str, str] | None = None,
) -> dict:
    """Merge the latest admitted vector of every hospital for the current base and evaluate it.

    ``trigger`` carries the landed event (id, vector) when an automation started the run.
    """
    logger = get_run_logger()
    p = params or Params()
    set_threads(p.finetune.threads)
    started_at, clock = utcnow(), time.perf_counter()
    store = open_store(store_url)
    base_sha = store.current_base()
    label_run(tags=["medvec", "coordinator", f"mode:{p.refine.mode}", base_tag(base_sha)])
    base = fetch_base(store_url, base_sha)
    admission = admit_vectors(store_url, base, p.intake, p.refine)
    vectors = admission.admitted
    if p.refine.mode == "async":
        return _step(store_url, base, admission, p, eval_data, calibration_data, trigger or {})
    if not vectors:
        logger.info("no vectors for base %s yet", base_sha[:12])
        return {"skipped": True, "reason": "no vectors", "inputs": []}
    last = last_merge(store_url, base_sha)
    if not force and last is not None and last.input_ids() == sorted(v.meta.vector_id for v in vectors):
        logger.info("nothing new since merge %s", last.merge_id)
        _supersede(admission, f"merge {last.merge_id} already holds every vector listed")
        return _summary(last, skipped=True, reason="no new vectors")
    evalsets = core.EvalSets.load(eval_data, spec=DataSpec.of(p))
    calibration = load_split(calibration_data, "train") if calibration_data else None
    guarded = merge_task(base, vectors, p, evalsets, calibration)
    outcome, vectors = guarded.outcome, guarded.vectors
    harmful = quarantine_excluded(store_url, guarded.excluded) if guarded.excluded else []
    record = MergeRecord.build(
        outcome,
        vectors,
        base_sha,
        p,
        evalsets.ref(),
        store_url,
        started_at,
        clock,
        screened=tuple(admission.screened),
        quarantined=(*admission.rejected, *harmful),
        trigger=trigger or {},
    )
    label_run(record.merge_id, [f"merge:{record.merge_id}"])  # merge ids read "merge-<time>-<hex>"
    record = publish_merge(store_url, record, outcome, base)
    record = _finish(store_url, record, outcome, base, evalsets, vectors, p)
    _supersede(admission, f"merge {record.merge_id} holds every vector listed")
    _artifact(record, [*single_rows(base, vectors, evalsets, p, store_url), _merged_row(record, outcome)])
    logger.info(
        "merge %s: %d vectors, val AUC %.3f", record.merge_id, len(record.inputs), record.val.get("auc", float("nan"))
    )
    return _summary(record)
