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
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.names import EVALUATE_FLOW, MERGE_FLOW
from flows.ui import base_tag, embedded_image, label_run, merge_run_name
from medvec.config import ConfigError, Params
from medvec.coordinator.compare import Candidate
from medvec.coordinator.contribution import markdown
from medvec.coordinator.intake import Admission, quarantine_voted
from medvec.coordinator.judge import hospitals_judge, voted_out
from medvec.coordinator.refine import ALL_VOTED_OUT
from medvec.coordinator.scoring import EvalSets
from medvec.data.images import DataSpec, ImageSet
from medvec.data.sources import load_split
from medvec.evaluate import bar_chart, contribution_plot, results_frame
from medvec.keys import coordinator_keys
from medvec.models import Base
from medvec.record import MergeRecord
from medvec.runtime import set_threads
from medvec.store import VectorStore, open_store
from medvec.timing import Started
from medvec.tracking.finish import buffer_ready
from tasks.common import fetch_base
from tasks.coordinator import (
    admit_vectors,
    async_step,
    finish,
    hospital_rows,
    last_merge,
    merge_task,
    quarantine_excluded,
    supersede_queued,
)


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


def _merged_row(record: MergeRecord, outcome, name: str | None = None) -> dict:
    """The report row of the merged model (a one-shot merge or an async step)."""
    name = name or f"merged ({outcome.method}, λ={outcome.lam:g})"
    test = outcome.test or {}
    return Candidate(
        name=name,
        kind="merged",
        method=outcome.method,
        lam=outcome.lam,
        bn=outcome.bn.strategy,
        val=outcome.val,
        test=test,
        n_train=record.n_train,
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
        lines += ["", "**What each input contributed**", "", *markdown(record.contribution)]
    if record.evaluation.flagged:
        lines += ["", "**Below-chance vote (the hospitals' cross-site scores)**", ""]
        lines += [f"- {h}: {why}" for h, why in sorted(record.evaluation.flagged.items())]
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


def _supersede(admission: Admission, reason: str) -> None:
    """Cancel the queued runs this run answers; a failure costs only those runs' time, never this merge."""
    listed = [v.meta.vector_id for v in admission.admitted] + [s.vector_id for s in admission.screened]
    try:
        n = supersede_queued(listed, reason)
    except Exception as exc:  # the merge is stored; queued runs will find nothing new on their own
        get_run_logger().warning("could not cancel queued runs (%s): %s", type(exc).__name__, exc)
        return
    if n:
        get_run_logger().info("cancelled %d queued run(s) this run answers (%s)", n, reason)


@dataclass
class Run:
    """What one run of the flow works with: its settings, its one open store, the base, and when it began."""

    params: Params
    store: VectorStore
    base: Base
    eval_data: str | None
    calibration_data: str | None
    trigger: dict[str, str]
    started: Started

    def evalsets(self, admission: Admission) -> EvalSets:
        """The coordinator's set (``eval_data``, where given: with the hospitals scoring, its test split only
        reports) and, with ``evaluate.where: hospitals``, the hospitals as the judge."""
        spec = DataSpec.of(self.params)
        found = EvalSets.load(self.eval_data, spec=spec) if self.eval_data else EvalSets(None, None)
        if self.params.evaluate.where == "hospitals":
            found.judge = hospitals_judge(self.store, self.base, self.params, admission, start_evaluations)
        elif found.val is None:
            raise ConfigError(
                "no coordinator.eval_data: give one, or let the hospitals score (evaluate.where: hospitals)"
            )
        return found

    def calibration(self) -> ImageSet | None:
        return load_split(self.calibration_data, "train") if self.calibration_data else None


def _step(run: Run, admission: Admission) -> dict:
    """Async mode: once the buffer holds B vectors, one step into the champion (promoted if better)."""
    logger = get_run_logger()
    ready, why = buffer_ready(run.store, run.base, admission, run.params)
    if not ready:
        logger.info("no step yet: %s", why)
        return {"skipped": True, "reason": why, "inputs": [v.meta.vector_id for v in admission.admitted]}
    evalsets = run.evalsets(admission)
    done = async_step(run.store, run.base, admission, run.params, evalsets, run.calibration(), run.trigger)
    if done is None:
        logger.info("no step: %s", ALL_VOTED_OUT)
        return {"skipped": True, "reason": ALL_VOTED_OUT, "inputs": []}
    record = done.record
    label_run(f"{record.merge_id} (async step)", [f"merge:{record.merge_id}"])
    name = f"step v{record.parent_version} → {f'v{record.version}' if record.version else 'not promoted'}"
    _artifact(record, [_merged_row(record, done.step.outcome, name)])
    logger.info("step %s: %s", record.merge_id, done.verdict)
    return _summary(record) | {"promoted": done.promoted, "version": record.version, "reason": done.verdict}


def _oneshot(run: Run, admission: Admission, force: bool) -> dict:
    """One-shot mode: merge every hospital's newest admitted vector, unless the last merge holds them all."""
    logger, vectors = get_run_logger(), admission.admitted
    if not vectors:
        logger.info("no vectors for base %s yet", run.base.sha256[:12])
        return {"skipped": True, "reason": "no vectors", "inputs": []}
    last = last_merge(run.store, run.base.sha256)
    if not force and last is not None and last.input_ids() == sorted(v.meta.vector_id for v in vectors):
        logger.info("nothing new since merge %s", last.merge_id)
        _supersede(admission, f"merge {last.merge_id} already holds every vector listed")
        return _summary(last, skipped=True, reason="no new vectors")
    evalsets = run.evalsets(admission)
    rows: list[dict] = []
    voted: list = []
    if evalsets.judge is not None:  # the cross-site matrix first: the vote may keep vectors out of the merge
        from medvec.tracking.registry import champion_weights  # here: its pyfunc class warns on import, per command

        champion = champion_weights(run.params.registry.model_name, run.store, run.base)
        if champion is not None:  # scored beside the scan's candidates: the gate reads those answers
            evalsets.beside_scan("champion", champion)
        rows = hospital_rows(run.base, vectors, evalsets, run.params, run.store)
        vectors, out = voted_out(vectors, evalsets.evaluation().flagged, run.params.intake.vote)
        voted = quarantine_voted(run.store, out)
        if not vectors:
            return {"skipped": True, "reason": ALL_VOTED_OUT, "inputs": []}
    guarded = merge_task(run.base, vectors, run.params, evalsets, run.calibration())
    outcome, vectors = guarded.outcome, guarded.vectors
    harmful = quarantine_excluded(run.store, guarded.excluded) if guarded.excluded else []
    if evalsets.judge is None:
        rows = hospital_rows(run.base, vectors, evalsets, run.params, run.store)
    record = MergeRecord.build(
        outcome,
        vectors,
        run.base.sha256,
        run.params,
        evalsets.ref(),
        run.store.url,
        run.started,
        screened=tuple(admission.screened),
        quarantined=(*admission.rejected, *voted, *harmful),
        trigger=run.trigger,
        evaluation=evalsets.evaluation(),
    )
    label_run(record.merge_id, [f"merge:{record.merge_id}"])  # merge ids read "merge-<time>-<hex>"
    record = finish(run.store, record, outcome, run.base, vectors, evalsets)
    _supersede(admission, f"merge {record.merge_id} holds every vector listed")
    _artifact(record, [*rows, _merged_row(record, outcome)])
    logger.info(
        "merge %s: %d vectors, val AUC %.3f", record.merge_id, len(record.inputs), record.val.get("auc", float("nan"))
    )
    return _summary(record)


def start_evaluations(request_id: str, hospitals: list[str]) -> None:
    """Start each hospital's ``hospital-evaluate`` run for ``request_id`` and return at once; a hospital whose
    deployment cannot be started is logged and counts as absent."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    for hospital in hospitals:
        try:
            run_deployment(f"{EVALUATE_FLOW}/{hospital}", parameters={"request": request_id}, timeout=0)
        except Exception as exc:  # one hospital's deployment never stops the others' requests
            logger.warning("could not ask hospital %s (%s): %s", hospital, type(exc).__name__, exc)


@flow(name=MERGE_FLOW, flow_run_name=merge_run_name, log_prints=True)
def merge_and_evaluate(
    store_url: str,
    eval_data: str | None = None,
    params: Params | None = None,
    calibration_data: str | None = None,
    force: bool = False,
    trigger: dict[str, str] | None = None,
) -> dict:
    """Merge the latest admitted vector of every hospital for the current base and evaluate it.

    ``trigger`` carries the landed event (id, vector) when an automation started the run.
    """
    p = params or Params()
    set_threads(p.finetune.threads)
    started = Started.now()
    # once for the run: every task below takes it; with a coordinator key it signs what it publishes and
    # trusts only what it signed (a current-base pointer it did not sign stops the run with the reason)
    store = open_store(store_url).trusting(*coordinator_keys(p.coordinator.key))
    base_sha = store.current_base()
    label_run(tags=["medvec", "coordinator", f"mode:{p.refine.mode}", base_tag(base_sha)])
    run = Run(p, store, fetch_base(store, base_sha), eval_data, calibration_data, trigger or {}, started)
    admission = admit_vectors(store, run.base, p.intake, p.refine)
    if p.refine.mode == "async":
        return _step(run, admission)
    return _oneshot(run, admission, force)
