"""``merge-and-evaluate``: the coordinator's flow, fired whenever a vector lands.

Deployed with a trigger on ``medvec.vector.landed`` and an hourly reconciling
schedule (``medvec coordinator up``).  Runs are serialized by the deployment's
concurrency limit (one at a time, the rest queued), and a run whose inputs equal
the last merge's does nothing, so N vectors landing at once end in one merge that
contains all N.  A lost event only delays a merge: the schedule finds vectors
newer than the last merge and merges them.
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from medvec import coordinator as core
from medvec.config import Params
from medvec.data import has_split, load_split
from medvec.evaluate import bar_chart, results_frame
from medvec.models import Base, save_base, state_sha256
from medvec.store import open_store
from medvec.train import set_threads
from medvec.vectors import utcnow
from tasks.coordinator import gather_latest, screen_outliers, single_rows
from tasks.hospital import fetch_base

MERGE_FLOW = "merge-and-evaluate"


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def last_merge(store_url: str, base_sha256: str) -> dict | None:
    """The newest merge record for this base."""
    return open_store(store_url).latest_merge(base_sha256)


@task(cache_policy=NO_CACHE)
def merge_task(base: Base, vectors: list, params: Params, evalsets: core.EvalSets, calibration) -> core.MergeOutcome:
    """Merge with the configured method and λ, restore BN, evaluate on the held-out set."""
    return core.merge_once(base, vectors, params, evalsets, calibration)


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def publish_merge(store_url: str, base: Base, outcome: core.MergeOutcome, record: dict) -> dict:
    """Write the merged weights and the record; ``latest.json`` is moved only after registration."""
    merged = Base(outcome.model, base.spec, base.num_classes, state_sha256(outcome.model.state_dict()))
    record["merged_sha256"] = merged.sha256
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "merged.safetensors"
        save_base(merged, path)
        return open_store(store_url).put_merge(record, path, latest=False)


@task(retries=2, retry_delay_seconds=[2, 8], cache_policy=NO_CACHE)
def record_in_dvc(record: dict, vectors: list, params: Params) -> str:
    """Commit the merge's input vectors to the DVC registry and push; returns the commit."""
    from medvec.dvc_registry import record_merge

    r = params.registry
    return record_merge(r.dvc_repo, r.dvc_remote, record, {v.meta.vector_id: v.path for v in vectors}, r.dvc_endpoint_url)


@task(retries=2, retry_delay_seconds=[2, 8], cache_policy=NO_CACHE)
def register_merge(record: dict, outcome: core.MergeOutcome, base: Base, evalsets: core.EvalSets, params: Params) -> dict:
    """Log the merge run to MLflow, register the model and apply the champion gate."""
    from medvec import tracking
    from medvec.data import to_tensor
    from medvec.evaluate import confusion_plot, lambda_curve

    example = to_tensor(evalsets.val.images[:2], base.spec).numpy()
    tracking.register_base(params.registry.model_name, base.model, base.sha256, base.spec.to_dict(), example)
    with tempfile.TemporaryDirectory() as tmp:
        plots = {"lambda": lambda_curve({outcome.method: outcome.curve}, Path(tmp) / "lambda.png")}
        conf = (outcome.test or outcome.val).get("confusion")
        if conf:
            plots["confusion"] = confusion_plot(conf, evalsets.val.classes, Path(tmp) / "confusion.png", record["merge_id"])
        return tracking.log_merge(record, outcome.model, example, params.registry.model_name, params.registry.champion_margin, params.evaluate.select_metric, plots)


def _artifact(record: dict, rows: list[dict]) -> None:
    df = results_frame(rows)
    cols = [c for c in ("name", "kind", "lambda", "n_train", "val_auc", "test_auc", "test_balanced_accuracy", "test_accuracy") if c in df]
    create_table_artifact(key="merge-metrics", table=df[cols].round(4).fillna("").to_dict(orient="records"), description=f"merge {record['merge_id']}")
    lines = [f"### Merge `{record['merge_id']}`", "", f"method `{record['method']}`, λ = {record['lambda']}, BN from `{record['bn_source']}`, {len(record['inputs'])} vectors", ""]
    lines += ["| model | kind | val AUC | test AUC | test bal. acc |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['val'].get('auc', float('nan')):.3f} | {r['test'].get('auc', float('nan')):.3f} | {r['test'].get('balanced_accuracy', float('nan')):.3f} |")
    if record.get("screened"):
        lines += ["", "**Outlier defence**", ""] + [f"- {s['hospital']} `{s['vector_id']}`: {s['action']} — {s['reason']}" for s in record["screened"]]
    if record.get("quarantined"):
        lines += ["", "**Quarantined vectors (kept, not merged)**", "", "| hospital claimed | check | problem | time |", "|---|---|---|---|"]
        lines += [f"| {q['hospital_claimed']} | {q['check']} | {q['problem']} | {q['time']} |" for q in record["quarantined"]]
    lines += ["", "| vector | hospital | content sha256 |", "|---|---|---|"]
    lines += [f"| {v['vector_id']} | {v['hospital']} | `{v['content_sha256'][:16]}…` |" for v in record["inputs"]]
    with tempfile.TemporaryDirectory() as tmp:
        png = bar_chart(df, Path(tmp) / "chart.png", "test_auc" if "test_auc" in df else "val_auc", "per-hospital vs merged")
        lines += ["", f"![per-hospital vs merged](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"]
    create_markdown_artifact(key="merge-report", markdown="\n".join(lines), description=f"merge {record['merge_id']}")


@flow(name=MERGE_FLOW, log_prints=True)
def merge_and_evaluate(
    store_url: str,
    eval_data: str,
    params: dict | None = None,
    calibration_data: str | None = None,
    force: bool = False,
    trigger: dict | None = None,
) -> dict:
    """Merge the latest vector of every hospital for the current base and evaluate it.

    ``trigger`` carries the landed event (id, vector) when an automation started the run.
    """
    logger = get_run_logger()
    p = Params.model_validate(params or {})
    set_threads(p.finetune.threads)
    started = time.perf_counter()
    store = open_store(store_url)
    base_sha = store.current_base()
    base = fetch_base(store_url, base_sha)
    vectors = gather_latest(store_url, base, p)
    vectors, screened = screen_outliers(store_url, vectors, p)
    inputs = [{"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "content_sha256": v.content_sha256, "n_train": v.meta.n_train} for v in vectors]
    last = last_merge(store_url, base_sha)
    if not vectors:
        logger.info("no vectors for base %s yet", base_sha[:12])
        return {"skipped": True, "reason": "no vectors", "inputs": []}
    if not force and last is not None and sorted(i["vector_id"] for i in last["inputs"]) == sorted(i["vector_id"] for i in inputs):
        logger.info("nothing new since merge %s", last["merge_id"])
        return {"skipped": True, "reason": "no new vectors", "merge_id": last["merge_id"], "inputs": inputs}
    evalsets = core.EvalSets(load_split(eval_data, "val"), load_split(eval_data, "test") if has_split(eval_data, "test") else None)
    calibration = load_split(calibration_data, "train") if calibration_data else None
    outcome = merge_task(base, vectors, p, evalsets, calibration)
    singles = single_rows(base, vectors, evalsets, p)
    record = {
        "store_url": store_url,
        "base_sha256": base_sha,
        "method": outcome.method,
        "lambda": outcome.lam,
        "bn_source": outcome.bn,
        "inputs": inputs,
        "val": {k: v for k, v in outcome.val.items() if isinstance(v, float)},
        "test": {k: v for k, v in (outcome.test or {}).items() if isinstance(v, float)},
        "lambda_curve": outcome.curve,
        "params": p.model_dump(mode="json"),
        "trigger": trigger or {},
        "screened": screened,
        "quarantined": store.quarantined(),
        "started_at": utcnow(),
    }
    record["finished_at"] = utcnow()
    record["seconds"] = round(time.perf_counter() - started, 2)
    record = publish_merge(store_url, base, outcome, record)
    if p.registry.dvc_repo:
        if not p.registry.dvc_remote:
            raise ValueError("registry.dvc_repo is set but registry.dvc_remote is not")
        record["dvc_commit"] = record_in_dvc(record, vectors, p)
    if p.registry.enabled:
        record["registry"] = register_merge(record, outcome, base, evalsets, p)
    store.put_merge(record)  # latest.json moves last: a crash before here leaves the merge to be redone
    merged_row = core.Candidate(f"merged ({outcome.method}, λ={outcome.lam:g})", "merged", outcome.method, outcome.lam, outcome.bn, outcome.val, outcome.test or {}, sum(i["n_train"] for i in inputs)).row()
    _artifact(record, singles + [merged_row])
    logger.info("merge %s: %d vectors, val AUC %.3f", record["merge_id"], len(inputs), record["val"].get("auc", float("nan")))
    return {"skipped": False, "merge_id": record["merge_id"], "inputs": inputs, "val": record["val"], "test": record["test"], "registry": record.get("registry")}
