"""Tasks of the embedded demo: thin wrappers over :mod:`medvec.demo` (the baselines and the async simulation)."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvec.config import Params
from medvec.coordinator.engine import BnPlan, MomentsFn
from medvec.coordinator.scoring import EvalSets
from medvec.demo.baselines import centralized_row, control_row, converged_row
from medvec.demo.simulate import Clock, simulate
from medvec.hospital.local import LocalData
from medvec.models import Base
from medvec.store import VectorStore
from medvec.vectors.vector import VectorLike


@task(cache_policy=NO_CACHE)
def control(
    base: Base,
    vectors: Sequence[VectorLike],
    evalsets: EvalSets,
    params: Params,
    bn: BnPlan,
    moments_fn: MomentsFn | None,
) -> dict:
    """The paper's random control: random vectors with each hospital's per-tensor norms, summed."""
    return control_row(base, vectors, evalsets, params, bn, moments_fn)


@task(cache_policy=NO_CACHE)
def centralized(base: Base, local: list[LocalData], evalsets: EvalSets, params: Params, progress: bool) -> dict:
    """The equal-compute reference: θ_pre fine-tuned on every hospital's training data pooled."""
    return centralized_row(base, local, evalsets, params, progress)


@task(cache_policy=NO_CACHE)
def centralized_converged(base: Base, local: list[LocalData], evalsets: EvalSets, params: Params) -> dict:
    """The reference trained to convergence on the pooled data, its epochs chosen by early stopping."""
    return converged_row(base, local, evalsets, params)


@task(cache_policy=NO_CACHE)
def simulate_async(
    store: VectorStore,
    base: Base,
    local: dict[str, LocalData],
    params: Params,
    evalsets: EvalSets,
    landings_per_hospital: int,
    clock: Clock,
    progress: bool,
    moments_fn: MomentsFn | None = None,
) -> list[dict]:
    """Every hospital lands ``landings_per_hospital`` vectors into an async champion on a simulated clock."""
    epochs = params.refine.local_epochs
    return simulate(
        store, base, local, params, evalsets, landings_per_hospital, clock, epochs, progress, moments_fn=moments_fn
    )
