"""``medvec-demo``: the multi-hospital comparison of arXiv 2408.13038, end to end.

Runs in Prefect's local ephemeral mode (no server needed):

1. split the training images into N simulated hospitals (one folder each);
2. publish θ_pre to a local vector store;
3. run ``hospital-finetune`` (the same flow a hospital's worker runs) per hospital;
4. gather the latest vector per hospital and merge with every method and BN strategy,
   choosing λ and the model to promote on the validation split;
5. train the centralized upper bound (all hospitals pooled, same epochs) and a
   random-vector control of matching norms;
6. evaluate everything on the official test split and write the report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.hospital_finetune import hospital_finetune
from medvec import coordinator as core
from medvec.batchnorm import MomentSums
from medvec.config import Params, load_params
from medvec.data import ImageSet, load_split
from medvec.hospital import LocalData, local_moment_sums
from medvec.models import Base
from medvec.report import render_table, write_report
from medvec.train import finetune, set_threads
from tasks.coordinator import evaluate_merges, gather_latest, publish_base, register_selected, single_rows, split_hospitals


@task(cache_policy=NO_CACHE)
def control_row(base: Base, vectors: list, evalsets: core.EvalSets, params: Params, moments_fn) -> dict:
    """Random vectors with each hospital's per-tensor norms, summed (the paper's control)."""
    control = core.random_control(vectors, seed=params.merge.seed)
    strategy = params.batchnorm.strategy
    model = core.merged_model(base, control, "sum", 1.0, strategy, params, moments_fn)
    val, test = core.evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size)
    n = sum(v.meta.n_train for v in vectors)
    return core.Candidate(f"random control (bn={strategy})", "control", "sum", 1.0, strategy, val, test, n).row()


@task(cache_policy=NO_CACHE)
def centralized_row(base: Base, hospital_dirs: list[str], evalsets: core.EvalSets, params: Params, progress: bool) -> dict:
    """Upper bound: fine-tune θ_pre on all hospitals' data pooled, same settings."""
    pooled = ImageSet.concat([LocalData.load(d).train for d in hospital_dirs])
    model = base.fresh()
    finetune(model, pooled, base.spec, params.finetune, progress=progress, desc="centralized")
    val, test = core.evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size)
    return core.Candidate("centralized (pooled)", "centralized", None, None, "own", val, test, len(pooled)).row()


def hospital_moments(base: Base, hospital_dirs: list[str], params: Params):
    """``moments_fn`` answered by each hospital on its own data (only sums come back)."""
    local = [LocalData.load(d).train for d in hospital_dirs]

    def moments_fn(model):
        return MomentSums.combine(local_moment_sums(model, base, data, params.batchnorm, seed=i) for i, data in enumerate(local))

    return moments_fn


@flow(name="medvec-demo", log_prints=True)
def demo(
    data: str | None = None,
    out: str | None = None,
    hospitals: int | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    params_file: str | None = "params.yaml",
    progress: bool = True,
) -> dict:
    """Run the multi-hospital comparison and write ``out/results.{json,md,png}``."""
    logger = get_run_logger()
    extra = list(overrides or [])
    if hospitals is not None:
        extra += [f"split.hospitals={hospitals}", "split.names=null"]
    if seed is not None:
        extra += [f"finetune.seed={seed}", f"merge.seed={seed}"]
    params = load_params(params_file, extra)
    data = data or params.demo.data
    out_dir = Path(out or params.demo.out)
    set_threads(params.finetune.threads)
    started = time.perf_counter()
    for sub in ("hospitals", "vectors", "bases", "quarantine"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    store_url = str(out_dir)

    split = split_hospitals(data, str(out_dir / "hospitals"), params)
    evalsets = core.EvalSets(load_split(data, "val"), load_split(data, "test"))
    num_classes = max(len(split["classes"]), evalsets.test.num_classes)
    base = publish_base(store_url, params, num_classes)
    logger.info("base %s (%s, %d px) published", base.sha256[:12], base.spec.name, base.spec.image_size)

    dirs = [str(out_dir / "hospitals" / h) for h in split["hospitals"]]
    for hospital, folder in zip(split["hospitals"], dirs):
        hospital_finetune(hospital, folder, store_url, base.sha256, params.model_dump(mode="json"), emit=True, progress=progress)

    vectors = gather_latest(store_url, base)
    moments_fn = hospital_moments(base, dirs, params)
    rows = single_rows(base, vectors, evalsets, params)
    candidates = evaluate_merges(base, vectors, evalsets, params, moments_fn, progress)
    rows += [c.row() for c in candidates]
    if params.demo.control:
        rows.append(control_row(base, vectors, evalsets, params, moments_fn))
    if params.demo.centralized:
        rows.append(centralized_row(base, dirs, evalsets, params, progress))

    doc = {
        "dataset": Path(data).stem,
        "model": base.spec.name,
        "base_sha256": base.sha256,
        "image_size": base.spec.image_size,
        "split": {k: split[k] for k in ("scheme", "alpha", "seed")} | {"hospitals": split["hospitals"]},
        "params": params.model_dump(mode="json"),
        "vectors": [{"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "content_sha256": v.content_sha256, "path": str(v.path)} for v in vectors],
        "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    curves = {c.name: c.curve for c in candidates if c.bn == params.batchnorm.strategy}
    classes = split["classes"]
    paths = write_report(out_dir, doc, curves, classes)
    if params.registry.enabled:
        selected = next(c for c in candidates if c.selected)
        plots = {k: paths[k] for k in ("bars", "lambda", "confusion") if k in paths}
        doc["registry"] = register_selected(base, vectors, selected, evalsets, params, moments_fn, plots, store_url)
        paths = write_report(out_dir, doc, curves, classes)  # again, now naming the registered version
    text = render_table(doc)
    logger.info("\n%s", text)
    create_markdown_artifact(key="medvec-demo", markdown=paths["md"].read_text(), description="per-hospital vs merged metrics")
    logger.info("report written to %s in %.0f s", out_dir, doc["seconds"])
    return {"results": str(paths["json"]), "table": text}
