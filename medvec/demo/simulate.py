"""A simulated clock for asynchronous refinement: hospitals contribute at their own speeds and hours.

Every hospital lands ``C`` vectors (``medvec demo --landings-per-hospital C``).  Its first run starts at a seeded
random offset; each run trains from the champion current at its start, takes ``n_train × slowness × epochs`` time
units (one hospital optionally a straggler, ``straggler``× slower), and lands when it ends.  With an
:class:`Availability`, a hospital starts runs only inside its nightly windows, some of them missed.  Landings are
processed in the order of the simulated clock, each through the same intake, readiness rule and step as the
distributed path (:func:`medvec.coordinator.intake.admit`, :func:`medvec.coordinator.refine.step_ready`,
:func:`medvec.tracking.finish.finish_step`), so staleness arises as it would between real hospitals; a
``refine.timeout`` becomes an event of its own.  Under a fresh buffer a hospital whose vector waits in the buffer
trains again only after the step (else it would train from the same champion twice).  Synchronous FedAvg on the
same clock waits for the slowest hospital every round.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from tqdm.auto import tqdm

from medvec.config import Params
from medvec.coordinator.compare import Candidate
from medvec.coordinator.engine import MomentsFn
from medvec.coordinator.intake import admit, screened_out
from medvec.coordinator.refine import ALL_VOTED_OUT, step_ready
from medvec.coordinator.scoring import EvalSets, evaluate_on, op_rule
from medvec.hospital.finetune import finetune_vector, for_upload
from medvec.hospital.local import LocalData
from medvec.models import Base
from medvec.store import VectorStore
from medvec.tracking.finish import finish_step, network_counts
from medvec.vectors.vector import DataVector


@dataclass(frozen=True)
class Availability:
    """When hospitals may start a run: a window of ``window`` time units every ``period`` (their nights), each
    window missed with probability ``miss`` (a night the GPU is busy), drawn per hospital and window from
    ``seed``; each hospital's windows start at its own ``phase``."""

    period: float = 3.0
    window: float = 1.0
    miss: float = 0.3
    seed: int = 0
    phase: dict[str, float] = field(default_factory=dict)

    def missed(self, hospital: str, k: int) -> bool:
        """Whether the hospital misses its ``k``-th window (seeded, so every protocol sees the same nights)."""
        return random.Random(f"{self.seed}:{hospital}:{k}").random() < self.miss

    def next_start(self, hospital: str, t: float) -> float:
        """The first moment at or after ``t`` inside one of the hospital's windows that is not missed."""
        phase = self.phase.get(hospital, 0.0)
        k = math.floor((t - phase) / self.period)
        while True:
            opens = phase + k * self.period
            if not self.missed(hospital, k) and t < opens + self.window:
                return max(t, opens)
            k += 1


@dataclass(frozen=True)
class Clock:
    """Each hospital's slowness and first start time, seeded; optionally the windows it may train in."""

    slowness: dict[str, float]
    offset: dict[str, float]
    availability: Availability | None = None

    @classmethod
    def seeded(
        cls, hospitals: list[str], seed: int, straggler: float | None = None, absences: float | None = None
    ) -> "Clock":
        """A clock drawn from ``seed``: slowness in [0.75, 1.25] and a first start in [0, 0.5] per hospital;
        with ``straggler``, the last hospital is that many times slower; with ``absences``, hospitals train
        in nightly windows (:class:`Availability`, a phase in [0, 1) each) and miss each with that probability."""
        rng = random.Random(seed)
        slowness = {h: rng.uniform(0.75, 1.25) for h in hospitals}
        if straggler:
            slow = hospitals[-1]  # the last hospital turns straggler
            slowness[slow] *= straggler
        offset = {h: rng.uniform(0.0, 0.5) for h in hospitals}
        windows = None
        if absences is not None:
            phases = {h: rng.uniform(0.0, 1.0) for h in hospitals}
            windows = Availability(miss=absences, seed=seed, phase=phases)
        return cls(slowness, offset, windows)

    def duration(self, hospital: str, n_train: int, epochs: int) -> float:
        """Simulated time of one run: proportional to sample count × slowness × epochs (units: 1000 images)."""
        return n_train * self.slowness[hospital] * epochs / 1000.0

    def start(self, hospital: str, t: float) -> float:
        """When a hospital that wants to train at ``t`` can start."""
        return t if self.availability is None else self.availability.next_start(hospital, t)

    def run_end(self, hospital: str, n_train: int, epochs: int, t: float) -> float:
        """When a run the hospital wants to start at ``t`` ends."""
        return self.start(hospital, t) + self.duration(hospital, n_train, epochs)

    def runs_by(self, hospital: str, n_train: int, epochs: int, horizon: float, cap: int) -> int:
        """How many runs the hospital can finish by ``horizon``, back to back from its first start (each at its next
        window), at most ``cap``: what it could have trained by then had it never waited for a step."""
        t, done = self.offset[hospital], 0
        while done < cap:
            t = self.run_end(hospital, n_train, epochs, t)
            if t > horizon:
                break
            done += 1
        return done

    def sync_round(self, n_train: dict[str, int], epochs: int, t: float = 0.0) -> float:
        """A synchronous round from ``t`` ends when its slowest hospital ends (its length)."""
        return max(self.run_end(h, n, epochs, t) for h, n in n_train.items()) - t


@dataclass(order=True)
class _Run:
    time: float
    order: int
    hospital: str = field(compare=False)
    number: int = field(compare=False)
    vector: DataVector | None = field(compare=False, default=None)
    started: bool = field(compare=False, default=False)


TIMER = ""  # the hospital name of a timeout event


@dataclass
class _Sim:
    """The simulation's moving parts: the store, the run queue, when each buffered vector landed (simulated
    time), the hospitals waiting for a step, and the rows so far."""

    store: VectorStore
    base: Base
    params: Params
    evalsets: EvalSets
    moments_fn: MomentsFn | None
    queue: list[_Run]
    landed: dict[str, float] = field(default_factory=dict)
    waiting: list[tuple[str, int]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    landings: int = 0
    order: int = 0
    timer: float | None = None

    def push(self, time: float, hospital: str, number: int, vector: DataVector | None = None, started=False):
        """Queue a run event (or, with hospital ``TIMER``, a timeout), after every event queued before it at ``time``."""
        self.order += 1
        heapq.heappush(self.queue, _Run(time, self.order, hospital, number, vector, started))

    def waits(self, version: int) -> bool:
        """Whether a hospital whose vector is still buffered waits for the step before it trains again (a fresh
        buffer, and the one-shot first step): it would otherwise train from the same champion twice."""
        r = self.params.refine
        return r.fresh or (r.first_step == "oneshot" and version == 0)


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
    until: float | None = None,
) -> list[dict]:
    """Run the simulation; returns one ``async`` row per landing (the champion after it) and per timeout step,
    the last marked final.

    Steps are stored in ``store`` like the flow's (:func:`~medvec.tracking.finish.finish_merge`), but registered
    nowhere and committed to no DVC registry: the simulation is a comparison, not the network's champion.
    ``refine.timeout`` is in simulated time units here.  With ``until``, no run starts after that time (each
    hospital lands at most ``landings_per_hospital`` vectors either way).
    """
    registry = params.registry.model_copy(update={"enabled": False, "dvc_repo": None})
    params = params.model_copy(update={"registry": registry})
    cfg = params.finetune.model_copy(update={"epochs": epochs})
    sim = _Sim(store, base, params, evalsets, moments_fn, [])
    for h in local:
        sim.push(clock.offset[h], h, 1)
    bar = tqdm(total=landings_per_hospital * len(local), desc="async landings", disable=not progress, leave=False)
    while sim.queue:
        run = heapq.heappop(sim.queue)
        if run.hospital == TIMER:
            _event(sim, run.time, None, on_landing)
        elif not run.started:  # the hospital wants to train: at its next window, from the champion of that moment
            begin = clock.start(run.hospital, run.time)
            if until is not None and begin > until:
                continue
            if begin > run.time:
                sim.push(begin, run.hospital, run.number)
                continue
            point = store.champion(base.sha256)
            start = store.get_start(base.sha256, point.version) if point.version else base
            seeded = cfg.model_copy(update={"seed": cfg.seed + 1000 * run.number + run.order})
            vector, _ = finetune_vector(base, run.hospital, local[run.hospital], seeded, False, start, point.version)
            end = run.time + clock.duration(run.hospital, len(local[run.hospital].train), epochs)
            sim.push(end, run.hospital, run.number, vector, started=True)
        else:
            assert run.vector is not None
            store.put(for_upload(run.vector, params.vectors))
            sim.landed[run.vector.meta.vector_id] = run.time
            sim.landings += 1
            bar.update(1)
            version = store.champion(base.sha256).version
            stepped = _event(sim, run.time, run.hospital, on_landing)
            if run.number < landings_per_hospital:
                if stepped or not sim.waits(version):
                    sim.push(run.time, run.hospital, run.number + 1)
                else:
                    sim.waiting.append((run.hospital, run.number + 1))
    bar.close()
    if sim.rows:
        sim.rows[-1]["final"] = True
    return sim.rows


def _event(sim: _Sim, now: float, hospital: str | None, on_landing: Callable[[dict], None] | None) -> bool:
    """A landing (``hospital``) or a timeout: intake, a step if the buffer is ready, a row; then the hospitals
    that waited for the step train again, and a timeout is set for what stays buffered. Whether it stepped."""
    admission = admit(sim.store, sim.base, sim.params.intake, sim.params.refine)
    buffered = [sim.landed.get(v.meta.vector_id, now) for v in admission.admitted]
    oldest = min(buffered, default=now)
    waited = waited_for(oldest, now, sim.params.refine.timeout)
    network = set(network_counts(sim.store, sim.base, admission.admitted))  # the coordinator's verified network
    champion = sim.store.champion(sim.base.sha256)
    screened = partial(screened_out, sim.store, champion.promoted_at)
    ready, note = step_ready(admission.admitted, champion.version, sim.params.refine, network, waited, screened)
    if ready:
        step_sets = sim.evalsets.fresh()  # the step's record lists its own rounds only
        done = finish_step(sim.store, sim.base, admission, sim.params, step_sets, moments_fn=sim.moments_fn)
        note = done.verdict if done is not None else f"no step: {ALL_VOTED_OUT}"
    for r in admission.rejected:  # why a vector left the buffer, kept in the row (the store is the run's own)
        note += f"; rejected {r.hospital_claimed}'s vector ({r.check}: {r.problem})"
    if hospital is not None or ready:
        row = _row(sim, now, note, "landing" if hospital is not None else "timeout")
        sim.rows.append(row)
        if on_landing is not None:
            on_landing(row)
    if ready:
        for h, number in sim.waiting:
            sim.push(now, h, number)
        sim.waiting.clear()
        sim.timer = None
    elif admission.admitted and sim.params.refine.timeout is not None:
        due = oldest + sim.params.refine.timeout
        if rearm(sim.timer, now, due):
            sim.timer = due
            sim.push(due, TIMER, 0)
    return ready


def waited_for(oldest: float, now: float, timeout: float | None) -> float:
    """How long the oldest buffered vector (landed at ``oldest``) has waited at ``now``. A timeout queued at
    ``oldest + timeout`` has waited the full timeout when it fires: ``(oldest + timeout) − oldest`` can round below
    ``timeout`` (1.1 + 3.0 − 1.1 is 2.9999999999999996), and the timeout then re-queued itself at the same time
    for ever."""
    if timeout is not None and oldest + timeout <= now:
        return max(now - oldest, timeout)
    return now - oldest


def rearm(timer: float | None, now: float, due: float) -> bool:
    """Whether a buffer whose oldest vector times out at ``due`` needs a timeout queued: none is (``timer`` None),
    the queued one has fired (at ``now`` or before), or it is later than ``due``. A timeout that fires at its own
    time without a step (the vector it was set for left the buffer since, and the oldest now is younger) must queue
    the next one: with ``timer < now`` it did not, and a fresh buffer then waited for ever."""
    return timer is None or timer <= now or timer > due


def _row(sim: _Sim, now: float, note: str, event: str) -> dict:
    """The champion now (the EMA champion with ``refine.ema``), scored, as a results row."""
    store, base, params = sim.store, sim.base, sim.params
    point = store.champion(base.sha256)
    champion = store.get_start(base.sha256, point.version) if point.version else base
    ema = store.get_chain_state(base.sha256, point.version, "ema") if params.refine.ema is not None else None
    model = champion.model
    if ema is not None:
        model = base.fresh()
        model.load_state_dict(ema)
    val, test = evaluate_on(model, sim.evalsets, base.spec, params.evaluate.batch_size, *op_rule(params))
    n = sum(r.n_train for r in store.merges(base.sha256) if r.version is not None)  # samples behind the chain
    row = Candidate(
        name=f"async v{point.version} after {sim.landings} landings",
        kind="async",
        method="async",
        bn=params.batchnorm.strategy,
        val=val,
        test=test,
        n_train=n,
    ).row()
    return row | {
        "landings": sim.landings,
        "sim_time": round(now, 4),
        "version": point.version,
        "step": note,
        "event": event,
        "final": False,
    }
