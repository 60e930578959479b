"""Tasks of the embedded demo: the paper's random control and the centralized upper bound."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec import coordinator as core
from medvec.config import Params
from medvec.data import ImageSet
from medvec.hospital import LocalData
from medvec.models import Base
from medvec.train import finetune


@task(cache_policy=NO_CACHE)
def control_row(
    base: Base, vectors: list, evalsets: core.EvalSets, params: Params, bn: core.BnPlan, moments_fn
) -> dict:
    """Random vectors with each hospital's per-tensor norms, summed (the paper's control)."""
    control = core.random_control(vectors, seed=params.merge.seed)
    model, _ = core.realize(base, control, "sum", 1.0, bn, params, moments_fn)
    val, test = core.evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size, *core.op_rule(params))
    n = sum(v.meta.n_train for v in vectors)
    return core.Candidate(f"random control (bn={bn.strategy})", "control", "sum", 1.0, bn.strategy, val, test, n).row()


@task(cache_policy=NO_CACHE)
def centralized_row(
    base: Base, hospital_dirs: list[str], evalsets: core.EvalSets, params: Params, progress: bool
) -> dict:
    """Upper bound: fine-tune θ_pre on all hospitals' data pooled, same settings."""
    pooled = ImageSet.concat([LocalData.load(d).train for d in hospital_dirs])
    model = base.fresh()
    finetune(model, pooled, base.spec, params.finetune, progress=progress, desc="centralized")
    val, test = core.evaluate_on(model, evalsets, base.spec, params.evaluate.batch_size, *core.op_rule(params))
    return core.Candidate("centralized (pooled)", "centralized", None, None, "own", val, test, len(pooled)).row()


@task(cache_policy=NO_CACHE)
def simulate_async(
    store_url: str,
    base: Base,
    folders: dict[str, str],
    params: Params,
    evalsets: core.EvalSets,
    contributions: int,
    straggler: float | None,
    progress: bool,
    moments_fn=None,
) -> list[dict]:
    """Every hospital contributes ``contributions`` times on a simulated clock; a row per landing."""
    from medvec.simulate import Clock, simulate
    from medvec.store import open_store

    store = open_store(store_url)
    store.put_base(base)
    clock = Clock.seeded(list(folders), params.split.seed + params.finetune.seed, straggler)
    epochs = params.refine.local_epochs
    return simulate(
        store, base, folders, params, evalsets, contributions, clock, epochs, progress, moments_fn=moments_fn
    )
