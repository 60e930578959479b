"""A simulated clock for asynchronous refinement: hospitals contribute at their own speeds.

Every hospital lands ``C`` vectors (``medvec demo --landings-per-hospital C``).  Its first run starts at a seeded random
offset; each run trains from the champion current at its start, takes
``n_train × slowness × epochs`` time units (one hospital optionally a
straggler, ``straggler``× slower), and lands when it ends.  Landings are
processed in the order of the simulated clock, each through the same intake and
step as the distributed path (:func:`medvec.coordinator.intake.admit`,
:func:`medvec.coordinator.refine.compute_step`, :func:`medvec.tracking.finish.finish_merge`), so staleness arises as it would between real
hospitals.  Synchronous FedAvg on the same clock waits for the slowest hospital
every round.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from medvec.config import Params
from medvec.coordinator.compare import Candidate
from medvec.coordinator.engine import MomentsFn
from medvec.coordinator.intake import admit
from medvec.coordinator.refine import ALL_VOTED_OUT
from medvec.coordinator.scoring import EvalSets, evaluate_on, op_rule
from medvec.hospital.finetune import finetune_vector, for_upload
from medvec.hospital.local import LocalData
from medvec.models import Base
from medvec.store import VectorStore
from medvec.tracking.finish import finish_step
from medvec.vectors.vector import DataVector


@dataclass(frozen=True)
class Clock:
    """Each hospital's slowness and first start time, seeded."""

    slowness: dict[str, float]
    offset: dict[str, float]

    @classmethod
    def seeded(cls, hospitals: list[str], seed: int, straggler: float | None = None) -> "Clock":
        """A clock drawn from ``seed``: slowness in [0.75, 1.25] and a first start in [0, 0.5] per hospital;
        with ``straggler``, the last hospital is that many times slower."""
        rng = random.Random(seed)
        slowness = {h: rng.uniform(0.75, 1.25) for h in hospitals}
        if straggler:
            slow = hospitals[-1]  # the last hospital turns straggler
            slowness[slow] *= straggler
        return cls(slowness, {h: rng.uniform(0.0, 0.5) for h in hospitals})

    def duration(self, hospital: str, n_train: int, epochs: int) -> float:
        """Simulated time of one run: proportional to sample count × slowness × epochs (units: 1000 images)."""
        return n_train * self.slowness[hospital] * epochs / 1000.0

    def sync_round(self, n_train: dict[str, int], epochs: int) -> float:
        """A synchronous round ends when its slowest hospital ends."""
        return max(self.duration(h, n, epochs) for h, n in n_train.items())


@dataclass(order=True)
class _Run:
    time: float
    order: int
    hospital: str = field(compare=False)
    number: int = field(compare=False)
    vector: DataVector | None = field(compare=False, default=None)


def simulate(
    store: VectorStore,
    base: Base,
    local: dict[str, LocalData],
    params: Params,
    evalsets: EvalSets,
    landings_per_hospital: int,
    clock: Clock,
    epochs: int = 1,
    progress: bool = True,
    on_landing: Callable[[dict], None] | None = None,
    moments_fn: MomentsFn | None = None,
) -> list[dict]:
    """Run the simulation; returns one ``async`` row per landing (the champion after it), the last marked final.

    Steps are stored in ``store`` like the flow's (:func:`~medvec.tracking.finish.finish_merge`), but registered
    nowhere and committed to no DVC registry: the simulation is a comparison, not the network's champion.
    """
    registry = params.registry.model_copy(update={"enabled": False, "dvc_repo": None})
    params = params.model_copy(update={"registry": registry})
    cfg = params.finetune.model_copy(update={"epochs": epochs})
    queue = [_Run(clock.offset[h], i, h, 1) for i, h in enumerate(local)]
    heapq.heapify(queue)
    rows: list[dict] = []
    landings, order = 0, len(queue)
    total = landings_per_hospital * len(local)
    bar = tqdm(total=total, desc="async landings", disable=not progress, leave=False)
    while queue:
        run = heapq.heappop(queue)
        if run.vector is None:  # the run starts now: train from the champion of this moment
            point = store.champion(base.sha256)
            start = store.get_start(base.sha256, point.version) if point.version else base
            seeded = cfg.model_copy(update={"seed": cfg.seed + 1000 * run.number + run.order})
            vector, _ = finetune_vector(base, run.hospital, local[run.hospital], seeded, False, start, point.version)
            end = run.time + clock.duration(run.hospital, len(local[run.hospital].train), epochs)
            heapq.heappush(queue, _Run(end, run.order, run.hospital, run.number, vector))
            continue
        store.put(for_upload(run.vector, params.vectors))
        landings += 1
        bar.update(1)
        rows.append(_land(store, base, params, evalsets, landings, run.time, moments_fn))
        if on_landing is not None:
            on_landing(rows[-1])
        if run.number < landings_per_hospital:
            order += 1
            heapq.heappush(queue, _Run(run.time, order, run.hospital, run.number + 1))
    bar.close()
    if rows:
        rows[-1]["final"] = True
    return rows


def _land(
    store: VectorStore,
    base: Base,
    params: Params,
    evalsets: EvalSets,
    landings: int,
    now: float,
    moments_fn: MomentsFn | None = None,
) -> dict:
    """Intake and, once the buffer is full, one step; the row describes the champion afterwards."""
    admission = admit(store, base, params.intake, params.refine)
    note = f"buffer {len(admission.admitted)} of {params.refine.buffer}"
    if len(admission.admitted) >= params.refine.buffer:
        step_sets = evalsets.fresh()  # the step's record lists its own rounds only
        done = finish_step(store, base, admission, params, step_sets, moments_fn=moments_fn)
        note = done.verdict if done is not None else f"no step: {ALL_VOTED_OUT}"
    point = store.champion(base.sha256)
    champion = store.get_start(base.sha256, point.version) if point.version else base
    val, test = evaluate_on(champion.model, evalsets, base.spec, params.evaluate.batch_size, *op_rule(params))
    n = sum(r.n_train for r in store.merges(base.sha256) if r.version is not None)  # samples behind the chain
    row = Candidate(
        name=f"async v{point.version} after {landings} landings",
        kind="async",
        method="async",
        bn=params.batchnorm.strategy,
        val=val,
        test=test,
        n_train=n,
    ).row()
    return row | {
        "landings": landings,
        "sim_time": round(now, 4),
        "version": point.version,
        "step": note,
        "final": False,
    }
