"""Tasks that run on the coordinator's worker."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec import coordinator as core
from medvec.config import Params
from medvec.data import split_from_config
from medvec.models import Base, base_from_config
from medvec.store import open_store
from medvec.vectors import VectorFile


@task(cache_policy=NO_CACHE)
def split_hospitals(source: str, out_dir: str, params: Params) -> dict:
    """Simulate hospitals: one folder per hospital with its own share."""
    return split_from_config(source, out_dir, params.split)


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def publish_base(store_url: str, params: Params, num_classes: int) -> Base:
    """Build θ_pre from the model section and publish it to the store."""
    base = base_from_config(params.model, num_classes)
    open_store(store_url).put_base(base)
    return base


def intake_policy(params: Params | None):
    from medvec.intake import IntakePolicy
    from medvec.signing import Keyring

    if params is None:
        return IntakePolicy()
    i = params.intake
    return IntakePolicy(
        keyring=Keyring.load(i.keyring) if i.keyring else None,
        max_bytes=int(i.max_vector_mb * 1024 * 1024),
        max_metadata_bytes=int(i.max_metadata_kb * 1024),
    )


@task(cache_policy=NO_CACHE)
def single_rows(base: Base, vectors: list, evalsets: core.EvalSets, params: Params) -> list[dict]:
    """Each hospital's own model θ_pre + τ_h (its BN statistics) on the coordinator's held-out set."""
    rows = []
    for hospital, model, n in core.single_models(base, vectors):
        val, test = core.evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size)
        rows.append(core.Candidate(hospital, "single", None, None, "own", val, test, n).row())
    return rows


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE)
def gather_latest(store_url: str, base: Base, params: Params | None = None) -> list[VectorFile]:
    """The newest valid vector of every hospital for this base (invalid ones quarantined)."""
    return open_store(store_url).latest(base.sha256, base=base.model.state_dict(), policy=intake_policy(params))


@task(cache_policy=NO_CACHE)
def screen_outliers(store_url: str, vectors: list, params: Params) -> tuple[list, list[dict]]:
    """Norm/direction outlier defence; quarantined or clipped vectors are reported."""
    from medvec.defence import screen

    result = screen(vectors, params.intake.defence, params.intake.mad_k)
    store = open_store(store_url)
    report = []
    for v, reason in result.flagged:
        stats = result.stats.get(v.meta.vector_id, {})
        if params.intake.defence == "quarantine":
            key = f"vectors/{v.meta.base_sha256}/{v.meta.hospital}/{v.meta.vector_id}.safetensors"
            store.quarantine(key, "outlier", reason, v.meta.hospital)
        report.append({"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "action": params.intake.defence, "scale": result.scales.get(v.meta.vector_id), "reason": reason, **stats})
    return result.kept, report


@task(cache_policy=NO_CACHE)
def evaluate_merges(base: Base, vectors: list, evalsets: core.EvalSets, params: Params, moments_fn=None, progress: bool = True) -> list[core.Candidate]:
    """Every merge method × BN strategy, λ chosen on validation, scored on test."""
    return core.evaluate_merges(base, vectors, evalsets, params, moments_fn, progress=progress)


@task(retries=2, retry_delay_seconds=[2, 8], cache_policy=NO_CACHE)
def register_selected(base: Base, vectors: list, selected: core.Candidate, evalsets: core.EvalSets, params: Params, moments_fn, plots: dict, store_url: str) -> dict:
    """Register the demo's selected merge through the same champion gate as the flows."""
    from medvec import tracking
    from medvec.data import to_tensor
    from medvec.models import state_sha256
    from medvec.vectors import utcnow

    model = core.merged_model(base, vectors, selected.method, selected.lam, selected.bn, params, moments_fn)
    record = {
        "merge_id": f"demo-{utcnow()}",
        "store_url": store_url,
        "base_sha256": base.sha256,
        "method": selected.method,
        "lambda": selected.lam,
        "bn_source": selected.bn,
        "inputs": [{"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "content_sha256": v.content_sha256, "n_train": v.meta.n_train} for v in vectors],
        "val": {k: v for k, v in selected.val.items() if isinstance(v, float)},
        "test": {k: v for k, v in (selected.test or {}).items() if isinstance(v, float)},
        "lambda_curve": selected.curve,
        "params": params.model_dump(mode="json"),
        "merged_sha256": state_sha256(model.state_dict()),
    }
    example = to_tensor(evalsets.val.images[:2], base.spec).numpy()
    tracking.register_base(params.registry.model_name, base.model, base.sha256, base.spec.to_dict(), example)
    return tracking.log_merge(record, model, example, params.registry.model_name, params.registry.champion_margin, params.evaluate.select_metric, plots)
