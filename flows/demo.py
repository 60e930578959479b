"""``medvec-demo``: the multi-hospital comparison of arXiv 2408.13038, end to end.

Runs in Prefect's local ephemeral mode (no server needed):

1. split the training images into N simulated hospitals (one folder each);
2. publish θ_pre to a local vector store;
3. run ``hospital-finetune`` (the same flow a hospital's worker runs) per hospital;
4. admit the latest vector per hospital and merge with every method and BN strategy,
   choosing λ and the model to promote on the validation split;
5. train the centralized references (all hospitals pooled: the same epochs, and to convergence with
   early stopping on validation) and a random-vector control of matching norms;
6. evaluate everything on the official test split, score what each vector contributed to
   the selected merge, finish it as the flows do (store, registry through the champion gate),
   and write the report once.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.hospital_finetune import hospital_finetune
from flows.ui import base_tag, demo_run_name, embedded_image, label_run
from medvec import timing
from medvec.config import Params, load_params
from medvec.coordinator.compare import Comparison
from medvec.coordinator.engine import BnPlan, MomentsFn
from medvec.coordinator.scoring import EvalSets
from medvec.data.images import DataSpec
from medvec.data.sources import dataset_name
from medvec.demo.answering import simulated_judge
from medvec.demo.report import DemoReport, draw_plots, render_table, write_report
from medvec.demo.simulate import Clock
from medvec.hospital.finetune import live_moments
from medvec.hospital.local import LocalData
from medvec.models import Base
from medvec.record import MergeRecord
from medvec.runtime import set_threads
from medvec.store import VectorStore, open_store
from medvec.timing import Started
from medvec.vectors.file import VectorFile
from tasks.coordinator import (
    admit_vectors,
    compare_merges,
    contribution_scores,
    finish,
    hospital_rows,
    publish_base,
    split_hospitals,
)
from tasks.demo import centralized, centralized_converged, control, simulate_async


@dataclass
class Network:
    """The simulated network: its hospitals' local data, θ_pre, the coordinator's held-out sets and the store."""

    params: Params
    data: str
    out: Path
    store: VectorStore
    base: Base
    evalsets: EvalSets
    split: dict
    local: dict[str, LocalData]
    progress: bool


def _network(params: Params, data: str, out: Path, progress: bool) -> Network:
    """Split the data into hospitals, load the coordinator's held-out sets, publish θ_pre."""
    for sub in ("hospitals", "vectors", "bases", "quarantine"):
        shutil.rmtree(out / sub, ignore_errors=True)
    store = open_store(str(out))
    split = split_hospitals(data, str(out / "hospitals"), params)
    evalsets = EvalSets.load(data, spec=DataSpec.of(params))
    classes = max(split["classes"], evalsets.test.classes if evalsets.test else [], key=len)
    base = publish_base(store, params, len(classes), classes)
    get_run_logger().info("base %s (%s, %d px) published", base.sha256[:12], base.spec.name, base.spec.image_size)
    label_run(tags=[base_tag(base.sha256)])
    local = {h: LocalData.load(out / "hospitals" / h) for h in split["hospitals"]}
    if params.evaluate.where == "hospitals":  # every choice from the hospitals' answers; test still reports
        evalsets.judge = simulated_judge(base, local, params)
    return Network(params, data, out, store, base, evalsets, split, local, progress)


def _rows(net: Network, vectors: list[VectorFile], moments_fn: MomentsFn) -> tuple[list[dict], Comparison, Started]:
    """Each hospital's own model, every merge candidate, and the baselines, as report rows; also when the
    comparison of merges began (the selected merge's record starts there)."""
    p, base, evalsets = net.params, net.base, net.evalsets
    rows = hospital_rows(base, vectors, evalsets, p)
    merge_started = Started.now()
    comparison = compare_merges(base, vectors, evalsets, p, moments_fn, net.progress)
    rows += [c.row() for c in comparison.candidates]
    if p.demo.control:
        bn = BnPlan.from_hospitals(p.batchnorm.strategy)
        rows.append(control(base, vectors, evalsets, p, bn, moments_fn))
    if p.demo.centralized:
        rows.append(centralized(base, list(net.local.values()), evalsets, p, net.progress))
        if p.demo.converged_max_epochs:
            rows.append(centralized_converged(base, list(net.local.values()), evalsets, p))
    return rows, comparison, merge_started


def _simulate_async(net: Network, landings: int, straggler: float | None, moments_fn: MomentsFn) -> list[dict]:
    """Every hospital lands ``landings`` more vectors into an asynchronous champion on a simulated clock."""
    shutil.rmtree(net.out / "async", ignore_errors=True)
    p = net.params
    network = p.refine.network or tuple(net.local)  # a fresh buffer waits for the demo's hospitals
    simulated = {"mode": "async", "network": network, "timeout": p.demo.timeout}  # the timeout in simulated units
    refine = p.model_copy(update={"refine": p.refine.model_copy(update=simulated)})
    store = open_store(str(net.out / "async"))
    store.put_base(net.base)
    clock = Clock.seeded(list(net.local), p.split.seed + p.finetune.seed, straggler)
    evalsets = net.evalsets.fresh()  # the one-shot merge's record keeps its own rounds only
    return simulate_async(store, net.base, net.local, refine, evalsets, landings, clock, net.progress, moments_fn)


def _report(net: Network, vectors: list[VectorFile], rows: list[dict], seconds: float, asynchrony: dict | None):
    """The report's contents before the selected merge is finished (no registry decision yet)."""
    split = {k: net.split[k] for k in ("scheme", "alpha", "seed")} | {"hospitals": net.split["hospitals"]}
    inputs = [
        {"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "content_sha256": v.content_sha256, "path": str(v.path)}
        for v in vectors
    ]  # fmt: skip
    return DemoReport(
        dataset=dataset_name(net.data),
        data=str(net.data),
        model=net.base.spec.name,
        base_sha256=net.base.sha256,
        image_size=net.base.spec.image_size,
        split=split,
        params=net.params.model_dump(mode="json"),
        vectors=inputs,
        seconds=seconds,
        async_=asynchrony,
        results=rows,
    )


def _finish_selected(
    net: Network,
    vectors: list[VectorFile],
    comparison: Comparison,
    started: Started,
    moments_fn: MomentsFn,
    report: DemoReport,
    curves: dict,
) -> tuple[DemoReport, dict[str, Path]]:
    """Score and finish the selected merge as the flows do; returns the report with the registry's decision.

    The demo's vectors are simulated: its merge goes to no DVC registry of the network (``registry.dvc_repo``).
    """
    p, outcome = net.params, comparison.selected
    p = p.model_copy(update={"registry": p.registry.model_copy(update={"dvc_repo": None})})
    outcome.scores = contribution_scores(net.base, vectors, outcome, p, net.evalsets, moments_fn, net.progress)
    report.contribution = outcome.scores.to_json() if outcome.scores else None
    plots = draw_plots(net.out, report, curves, net.split["classes"])
    record = MergeRecord.build(outcome, vectors, net.base.sha256, p, net.evalsets.ref(), net.store.url, started,
                               data=str(net.data), evaluation=net.evalsets.evaluation())  # fmt: skip
    shown: dict[str, Path] = {k: plots[k] for k in ("bars", "lambda", "confusion", "contribution") if k in plots}
    record = finish(net.store, record, outcome, net.base, vectors, net.evalsets, shown)
    label_run(tags=[f"merge:{record.merge_id}"])
    report.merge_id = record.merge_id
    report.registry = record.registry.to_json() if record.registry else None
    return report, plots


@flow(name="medvec-demo", flow_run_name=demo_run_name, log_prints=True)
def demo(
    params: Params | None = None,
    data: str | None = None,
    out: str | None = None,
    progress: bool = True,
    landings_per_hospital: int | None = None,
    straggler: float | None = None,
) -> dict:
    """Run the multi-hospital comparison and write ``out/results.{json,md,png}``.

    With ``landings_per_hospital`` C, every hospital then lands C more vectors into an
    asynchronous champion on a simulated clock (``straggler``: the last hospital that
    many times slower), one ``async`` row per landing.
    """
    logger, started = get_run_logger(), time.perf_counter()
    p = params or load_params("params.yaml")  # the command line passes the params it read
    data = data or p.demo.data
    set_threads(p.finetune.threads)
    timing.reset()
    label_run(f"demo {dataset_name(data)} seed {p.finetune.seed}", ["medvec", "demo", f"data:{dataset_name(data)}"])
    net = _network(p, data, Path(out or p.demo.out).resolve(), progress)
    for hospital in net.local:
        folder = str(net.out / "hospitals" / hospital)
        hospital_finetune(hospital, folder, net.store.url, net.base.sha256, p, emit=True, progress=progress)
    # the demo is a comparison: every hospital is merged, no outlier screen
    vectors = admit_vectors(net.store, net.base, p.intake.model_copy(update={"defence": "off"})).admitted
    moments_fn = live_moments(net.base, net.local, p.batchnorm)
    rows, comparison, merge_started = _rows(net, vectors, moments_fn)
    asynchrony = None
    if landings_per_hospital:
        rows += _simulate_async(net, landings_per_hospital, straggler, moments_fn)
        refine = p.refine.model_dump(mode="json")
        asynchrony = {"landings_per_hospital": landings_per_hospital, "straggler": straggler, "refine": refine}
    report = _report(net, vectors, rows, round(time.perf_counter() - started, 1), asynchrony)
    # every method under the configured BN strategy, and the selected candidate whatever its strategy
    curves = {c.name: c.curve for c in comparison.candidates if c.bn == p.batchnorm.strategy or c.selected}
    if p.registry.enabled:  # the selected merge, scored and finished as the flows finish theirs
        report, plots = _finish_selected(net, vectors, comparison, merge_started, moments_fn, report, curves)
    else:
        plots = draw_plots(net.out, report, curves, net.split["classes"])
    report.phases = timing.snapshot()
    paths = write_report(net.out, report, plots)
    text = render_table(report.to_json())
    logger.info("\n%s", text)
    create_markdown_artifact(
        key="medvec-demo", markdown=artifact_markdown(report, paths, p), description="per-hospital vs merged metrics"
    )
    logger.info("report written to %s in %.0f s", net.out, report.seconds)
    return {"results": str(paths["json"]), "table": text}


def registry_lines(report: DemoReport, params: Params) -> list[str]:
    """What the registry did with the selected merge, with links to its MLflow pages."""
    decision = report.registry
    if not decision:
        return ["Registry: off (`registry.enabled=false`); nothing was registered."]
    from medvec.tracking.server import run_url, version_url

    name, version = params.registry.model_name, decision["version"]
    verdict = "promoted to **champion**" if decision["champion"] else "registered, **not promoted**"
    run = run_url(decision["run_id"], params.registry.ui_url)
    page = version_url(name, version, params.registry.ui_url)
    return [
        f"Registry: merge `{report.merge_id}` became [`{name}` version {version}]({page}), {verdict}: "
        f"{decision['reason']}.",
        "",
        f"[Its merge run in MLflow]({run}) links every hospital's fine-tune run and vector. "
        "Open the MLflow UI on this store with `make ui`.",
    ]


def artifact_markdown(report: DemoReport, paths: dict[str, Path], params: Params) -> str:
    """The demo's Prefect artifact: the registry's decision with MLflow links, the charts inline, then the report."""
    text = [line for line in paths["md"].read_text().splitlines() if not line.startswith("![")]
    charts = {
        "bars": "AUC by model (test split)",
        "lambda": "validation AUC against λ",
        "async": "async champion",
        "contribution": "what each hospital contributed",
    }
    lines = [text[0], "", "## Registry", ""] + registry_lines(report, params) + ["", "## Charts", ""]
    lines += [embedded_image(paths[key], alt) for key, alt in charts.items() if key in paths]
    return "\n".join(lines + ["", "## All models", ""] + text[1:])
