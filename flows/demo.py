"""``medvec-demo``: the multi-hospital comparison of arXiv 2408.13038, end to end.

Runs in Prefect's local ephemeral mode (no server needed):

1. split the training images into N simulated hospitals (one folder each);
2. publish θ_pre to a local vector store;
3. run ``hospital-finetune`` (the same flow a hospital's worker runs) per hospital;
4. admit the latest vector per hospital and merge with every method and BN strategy,
   choosing λ and the model to promote on the validation split;
5. train the centralized upper bound (all hospitals pooled, same epochs) and a
   random-vector control of matching norms;
6. evaluate everything on the official test split, write the report, and record
   and register the selected merge through the same champion gate as the flows.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.hospital_finetune import hospital_finetune
from flows.ui import base_tag, demo_run_name, embedded_image, label_run
from medvec import coordinator as core
from medvec import timing
from medvec.config import Params, load_params
from medvec.data import DataSpec, dataset_name
from medvec.hospital import live_moments
from medvec.record import MergeRecord
from medvec.report import render_table, write_report
from medvec.store import open_store
from medvec.train import set_threads
from medvec.vectors import utcnow
from tasks.coordinator import (
    admit_vectors,
    contribution_scores,
    evaluate_merges,
    publish_base,
    publish_merge,
    register_merge,
    single_rows,
    split_hospitals,
)
from tasks.demo import centralized_row, control_row, simulate_async


def demo_params(
    params_file: str | None, overrides: list[str] | None, hospitals: int | None, seed: int | None
) -> Params:
    """``params.yaml`` with the command line's overrides and the demo's shortcuts applied."""
    extra = list(overrides or [])
    if hospitals is not None:
        extra += [f"split.hospitals={hospitals}", "split.names=null"]
    if seed is not None:
        extra += [f"finetune.seed={seed}", f"merge.seed={seed}"]
    return load_params(params_file, extra)


def registry_lines(doc: dict, params: Params) -> list[str]:
    """What the registry did with the selected merge, with links to its MLflow pages."""
    decision = doc.get("registry")
    if not decision:
        return ["Registry: off (`registry.enabled=false`); nothing was registered."]
    from medvec import tracking

    name, version = params.registry.model_name, decision["version"]
    verdict = "promoted to **champion**" if decision["champion"] else "registered, **not promoted**"
    run = tracking.run_url(decision["run_id"], params.registry.ui_url)
    page = tracking.version_url(name, version, params.registry.ui_url)
    return [
        f"Registry: merge `{doc['merge_id']}` became [`{name}` version {version}]({page}), {verdict}: "
        f"{decision['reason']}.",
        "",
        f"[Its merge run in MLflow]({run}) links every hospital's fine-tune run and vector. "
        "Open the MLflow UI on this store with `make ui`.",
    ]


def artifact_markdown(doc: dict, paths: dict[str, Path], params: Params) -> str:
    """The demo's Prefect artifact: the registry's decision with MLflow links, the charts inline, then the report."""
    report = [line for line in paths["md"].read_text().splitlines() if not line.startswith("![")]
    charts = {
        "bars": "AUC by model (test split)",
        "lambda": "validation AUC against λ",
        "async": "async champion",
        "contribution": "what each hospital contributed",
    }
    lines = [report[0], "", "## Registry", ""] + registry_lines(doc, params) + ["", "## Charts", ""]
    lines += [embedded_image(paths[key], alt) for key, alt in charts.items() if key in paths]
    return "\n".join(lines + ["", "## All models", ""] + report[1:])


@flow(name="medvec-demo", flow_run_name=demo_run_name, log_prints=True)
def demo(
    data: str | None = None,
    out: str | None = None,
    hospitals: int | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    params_file: str | None = "params.yaml",
    progress: bool = True,
    contributions: int | None = None,
    straggler: float | None = None,
) -> dict:
    """Run the multi-hospital comparison and write ``out/results.{json,md,png}``.

    With ``contributions`` C, every hospital then contributes C more times to an
    asynchronous champion on a simulated clock (``straggler``: the last hospital
    that many times slower), one ``async`` row per landing.
    """
    logger = get_run_logger()
    params = demo_params(params_file, overrides, hospitals, seed)
    data = data or params.demo.data
    out_dir = Path(out or params.demo.out).resolve()
    set_threads(params.finetune.threads)
    started = time.perf_counter()
    timing.reset()
    name = dataset_name(data)
    label_run(f"demo {name} seed {params.finetune.seed}", ["medvec", "demo", f"data:{name}"])
    for sub in ("hospitals", "vectors", "bases", "quarantine"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    store_url = str(out_dir)

    split = split_hospitals(data, str(out_dir / "hospitals"), params)
    evalsets = core.EvalSets.load(data, spec=DataSpec.of(params))
    classes = max(split["classes"], evalsets.test.classes, key=len)
    base = publish_base(store_url, params, len(classes), classes)
    logger.info("base %s (%s, %d px) published", base.sha256[:12], base.spec.name, base.spec.image_size)
    label_run(tags=[base_tag(base.sha256)])

    dirs = [str(out_dir / "hospitals" / h) for h in split["hospitals"]]
    for hospital, folder in zip(split["hospitals"], dirs):
        hospital_finetune(hospital, folder, store_url, base.sha256, params, emit=True, progress=progress)

    # the demo is a comparison: every hospital is merged, no outlier screen
    admission = admit_vectors(store_url, base, params.intake.model_copy(update={"defence": "off"}))
    vectors = admission.admitted
    moments_fn = live_moments(base, dirs, params.batchnorm)
    rows = single_rows(base, vectors, evalsets, params)
    merge_started, merge_clock = utcnow(), time.perf_counter()
    candidates = evaluate_merges(base, vectors, evalsets, params, moments_fn, progress)
    rows += [c.row() for c in candidates]
    if params.demo.control:
        rows.append(
            control_row(
                base, vectors, evalsets, params, core.BnPlan.from_hospitals(params.batchnorm.strategy), moments_fn
            )
        )
    if params.demo.centralized:
        rows.append(centralized_row(base, dirs, evalsets, params, progress))
    if contributions:
        shutil.rmtree(out_dir / "async", ignore_errors=True)
        refine = params.model_copy(update={"refine": params.refine.model_copy(update={"mode": "async"})})
        folders = dict(zip(split["hospitals"], dirs))
        rows += simulate_async(
            str(out_dir / "async"), base, folders, refine, evalsets, contributions, straggler, progress, moments_fn
        )

    doc = {
        "dataset": name,
        "data": str(data),
        "model": base.spec.name,
        "base_sha256": base.sha256,
        "image_size": base.spec.image_size,
        "split": {k: split[k] for k in ("scheme", "alpha", "seed")} | {"hospitals": split["hospitals"]},
        "params": params.model_dump(mode="json"),
        "vectors": [
            {
                "vector_id": v.meta.vector_id,
                "hospital": v.meta.hospital,
                "content_sha256": v.content_sha256,
                "path": str(v.path),
            }
            for v in vectors
        ],
        "seconds": round(time.perf_counter() - started, 1),
        "async": {
            "contributions": contributions,
            "straggler": straggler,
            "refine": params.refine.model_dump(mode="json"),
        }
        if contributions
        else None,
        "results": rows,
    }
    # every method under the configured BN strategy, and the selected candidate whatever its strategy
    curves = {c.name: c.curve for c in candidates if c.bn == params.batchnorm.strategy or c.selected}
    classes = split["classes"]
    record = None
    if params.registry.enabled:  # the selected merge, scored and stored, for the registry
        selected = next(c for c in candidates if c.selected)
        outcome = core.outcome_of(
            base, vectors, selected, core.BnPlan.from_hospitals(selected.bn), params, moments_fn, evalsets
        )
        outcome.scores = contribution_scores(base, vectors, outcome, params, evalsets, moments_fn, progress)
        record = MergeRecord.build(
            outcome, vectors, base.sha256, params, evalsets.ref(), store_url, merge_started, merge_clock, data=str(data)
        )
        record = publish_merge(store_url, record, outcome, base)
        doc["contribution"] = outcome.scores.to_json() if outcome.scores else None
    doc["phases"] = timing.snapshot()
    paths = write_report(out_dir, doc, curves, classes)
    if record is not None:
        plots = {k: paths[k] for k in ("bars", "lambda", "confusion", "contribution") if k in paths}
        decision = register_merge(record, outcome.model, base, evalsets, plots)
        open_store(store_url).put_merge(record.model_copy(update={"registry": decision}))  # with the gate's verdict
        doc["merge_id"] = record.merge_id
        label_run(tags=[f"merge:{record.merge_id}"])
        doc["registry"] = decision.to_json()
        doc["phases"] = timing.snapshot()  # the registry's own model scoring included
        paths = write_report(out_dir, doc, curves, classes)  # again, now naming the registered version
    text = render_table(doc)
    logger.info("\n%s", text)
    create_markdown_artifact(
        key="medvec-demo", markdown=artifact_markdown(doc, paths, params), description="per-hospital vs merged metrics"
    )
    logger.info("report written to %s in %.0f s", out_dir, doc["seconds"])
    return {"results": str(paths["json"]), "table": text}
