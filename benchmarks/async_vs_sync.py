"""Asynchronous refinement against synchronous FedAvg, FedAvgM and FedAdam, at equal compute and under real
availability.

For every seed (which changes the hospital split *and* training) on PneumoniaMNIST with 4 Dirichlet-0.5
hospitals, with the same split, θ_pre, training loop and evaluation:

* **single hospitals and the one-shot merge** (``finetune.epochs`` each; every method × BN strategy, λ and the
  pair chosen on validation, as ``make quality`` does);
* **synchronous peers**: R rounds × 1 local epoch, aggregated by Flower's own strategy code
  (``flwr.server.strategy`` FedAvg, FedAvgM with momentum 0.9, FedAdam with Flower's defaults; ``make peers``
  installs flwr); "sync best" is the one with the best final *validation* AUC.  A round waits for every
  hospital, or (``quorum``) ends when all but one have reported, the last one's update dropped, as Flower's
  ``min_fit_clients`` with a round timeout does;
* **asynchronous refinement**, each protocol of :data:`PROTOCOLS` through the product's own intake and step
  (:func:`medvec.demo.simulate.simulate`) on a simulated clock, in three regimes (:data:`REGIMES`): equal
  compute (C = R landings per hospital), a 4× straggler, and random absences (nightly windows, each missed
  with probability 0.3).  Under the straggler and absences async runs until sync's final time (at most
  ``3·C`` landings per hospital) and the benchmark reports when each protocol first reached the final test
  AUC of sync best;
* an **EMA of the accepted versions** of every async run, its decay chosen on validation;
* **centralized** training on the pooled images: the same 2 epochs as each hospital (equal compute) and to
  convergence (epochs chosen by early stopping on validation);
* a **half-time ceiling** under the straggler and absences: pooled training on every image-epoch the hospitals
  could have finished, back to back in their windows, by half the time sync best took to reach its final AUC
  (at most ``3·C`` each, as async). Where it falls short of that AUC, the images trained by then are the limit,
  not the protocol (pooled SGD is no strict bound: async can pass it by a few thousandths).

Every model is scored by test AUC and by balanced accuracy, sensitivity and specificity at the operating point
chosen on validation (Youden's J).  Every (seed, protocol, regime) result is kept in
``benchmarks/results/async_runs/`` as it finishes, named by a hash of what it ran; a rerun skips what exists,
so the benchmark can be resumed across sessions (``--only-stored`` reports without running).

    python benchmarks/async_vs_sync.py                                   # the headline: demo configuration
    python benchmarks/async_vs_sync.py --ablations -S model.image_size=32   # every protocol, equal compute
    python benchmarks/async_vs_sync.py --ablations --protocols fresh fresh_screen_off --seeds 0 1 2 3 4 5 6 \
        -S model.image_size=32                                           # two protocols (and FedAsync), 7 seeds
    python benchmarks/async_vs_sync.py --seeds 0 -S model.name=tiny_cnn  # a quick look

Writes ``benchmarks/results/async_vs_sync.json`` and ``.md`` (``async_ablations.*`` with ``--ablations``,
``async_ablations-<protocols>.*`` with ``--protocols``). An equal-compute run that ends with vectors still
buffered (no last step) is an error: the simulation's clock has a bug, and its result is not stored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, ci95, machine

from medvec.config import Params, load_params
from medvec.coordinator import compare, scoring
from medvec.coordinator.server_opt import ema_update
from medvec.data.images import ImageSet
from medvec.data.split import split_from_config
from medvec.demo.baselines import train_to_convergence
from medvec.demo.simulate import Clock, simulate
from medvec.evaluate import evaluate_model, operating_point
from medvec.hospital.finetune import finetune_vector, live_moments
from medvec.hospital.local import LocalData
from medvec.hospital.train import finetune
from medvec.models import Base, base_from_config
from medvec.runtime import set_threads
from medvec.store import LocalStore

DATA = ROOT / "data" / "pneumoniamnist.npz"
RUNS = RESULTS / "async_runs"
WORK = ROOT / ".medvec" / "async_vs_sync"
TIMEOUT = 3.0  # a fresh buffer's timeout, simulated units: about the longest ordinary run (1,950 images at 1.25×)
FRESH = ["refine.fresh=true", "refine.weighting=network", f"refine.timeout={TIMEOUT}"]
B1 = ["refine.fresh=false"]  # B-vector steps (refine.buffer, 1 in params.yaml)
# name: (what it changes, overrides). Each names the step rule it is, whatever params.yaml's refine defaults are:
# "fedasync" once had none, and ran as the fresh buffer when that became the default
PROTOCOLS: dict[str, tuple[str, list[str]]] = {
    "fedasync": ("B = 1, weight n_i / Σ buffer (FedAsync)", [*B1, "refine.weighting=buffer"]),
    "fedasync_carry": (
        "FedAsync, and a step the gate kept out carries its vectors to the next (refine.carry)",
        [*B1, "refine.weighting=buffer", "refine.carry=true"],
    ),
    "network": ("B = 1, weight n_i / N of the network", [*B1, "refine.weighting=network"]),
    "network_cap": (
        "B = 1, network share, FADAS cap at staleness 1",
        [*B1, "refine.weighting=network", "refine.staleness_cap=1"],
    ),
    "fresh": ("fresh buffer (every hospital or a timeout), network share", FRESH),
    "fresh_fedavgm": ("fresh buffer + server momentum 0.9 (FedAvgM)", [*FRESH, "refine.server_optimizer=fedavgm"]),
    "fresh_fedadam": ("fresh buffer + FedAdam, Flower's defaults", [*FRESH, "refine.server_optimizer=fedadam"]),
    "fresh_fedadam_tau": (
        "fresh buffer + FedAdam, η 0.01, τ 1e-3",
        [*FRESH, "refine.server_optimizer=fedadam", "refine.server_lr=0.01", "refine.server_tau=0.001"],
    ),
    "fresh_cap": ("fresh buffer + FADAS cap at staleness 1", [*FRESH, "refine.staleness_cap=1"]),
    "fresh_quorum": ("fresh buffer that steps at 3 of 4 hospitals (quorum 0.75)", [*FRESH, "refine.quorum=0.75"]),
    "fresh_oneshot": ("fresh buffer, first step the one-shot merge", [*FRESH, "refine.first_step=oneshot"]),
    "fresh_bn_average": (
        "fresh buffer, BN running statistics the sample-weighted mean of the hospitals' (as FedAvg)",
        [*FRESH, "batchnorm.strategy=average"],
    ),
    "fresh_eta1": ("fresh buffer, η = 1 (FedAvg's step) instead of chosen on validation", [*FRESH, "refine.eta=1.0"]),
    "fresh_screen_off": ("fresh buffer, no outlier screen (intake.defence off)", [*FRESH, "intake.defence=off"]),
}
SYNC = {  # Flower strategies and their settings
    "fedavg": {},
    "fedavgm": {"server_momentum": 0.9},
    "fedadam": {},  # Flower's defaults: eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-9
    "fedadam_tau": {"eta": 0.01, "tau": 1e-3},  # a smaller step and τ (Reddi et al. tune τ from 1e-3)
}
REGIMES = {"equal": {}, "straggler": {"straggler": 4.0}, "absences": {"absences": 0.3}}
EMA_DECAYS = (0.5, 0.75, 0.9)
# the protocols that also run under the straggler and absences
HEADLINE_ASYNC = ("fedasync", "fedasync_carry", "fresh_quorum", "fresh")
# params.yaml's step rule is the one of these with the best validation AUC over the three regimes (:func:`choose`).
# Not fedasync_carry, decided before its regime runs: on the class-balanced folder (async_balanced.py, the product's
# gate) its champion's validation read +0.039 over the fresh buffer's and its test −0.025: a kept-out buffer is
# tested again until noise clears the gate, so the validation the choice reads is biased most for it
CANDIDATES = ("fedasync", "fresh_quorum", "fresh")
PRE = "fresh"  # a fresh buffer does not step at its first landing: its first event scores θ_pre


# ----------------------------------------------------------------------------- one seed's setting
@dataclass
class Setting:
    """One seed: its params, hospitals, θ_pre and evaluation sets."""

    seed: int
    params: Params
    data: dict[str, LocalData]
    base: Base
    evalsets: scoring.EvalSets
    overrides: list[str]

    @classmethod
    def load(cls, seed: int, overrides: list[str]) -> Setting:
        p = load_params(ROOT / "params.yaml", _base_overrides(seed, overrides))
        set_threads(p.finetune.threads)
        work = WORK / f"seed{seed}"
        split = split_from_config(DATA, work / "hospitals", p.split)
        data = {h: LocalData.load(work / "hospitals" / h) for h in split["hospitals"]}
        return cls(seed, p, data, base_from_config(p.model, 2), scoring.EvalSets.load(DATA), overrides)

    @property
    def hospitals(self) -> list[str]:
        return list(self.data)

    @property
    def n(self) -> dict[str, int]:
        return {h: len(d.train) for h, d in self.data.items()}

    def clock(self, regime: str) -> Clock:
        return Clock.seeded(self.hospitals, self.seed, **REGIMES[regime])

    def score(self, model: torch.nn.Module) -> dict:
        """Validation and test AUC, and the validation-chosen operating point on test."""
        ev, bs, spec = self.evalsets, self.params.evaluate.batch_size, self.base.spec
        assert ev.val is not None and ev.test is not None, "the benchmark's data has val and test splits"
        v, t = evaluate_model(model, ev.val, spec, bs), evaluate_model(model, ev.test, spec, bs)
        op = operating_point((v["labels"], v["scores"]), (t["labels"], t["scores"]))
        return {"val_auc": v["auc"], "auc": t["auc"], "op": op}

    def model(self, state: dict) -> torch.nn.Module:
        m = self.base.fresh()
        m.load_state_dict(state)
        return m


def _base_overrides(seed: int, overrides: list[str]) -> list[str]:
    """The demo's params for ``seed`` (split and training), as every protocol of the seed starts from."""
    return [
        f"split.seed={seed}",
        f"finetune.seed={seed}",
        f"merge.seed={seed}",
        "split.hospitals=4",
        "split.names=null",
        "contribution.method=off",  # scores change no model (intake.harmful is off); they cost K merges a step
        "refine.mode=async",
        *overrides,
    ]


def cached(name: str, key: dict, run) -> dict:
    """The stored result of ``key`` (``RUNS/<name>-<hash>.json``), or run it now and store it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = RUNS / f"{name}-{digest}.json"
    if path.exists():
        return json.loads(path.read_text())["result"]
    t0 = time.perf_counter()
    result = run()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    RUNS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": result}, indent=1, default=float))
    print(f"  {name}: {result['seconds']:.0f} s", flush=True)
    return result


# ----------------------------------------------------------------------------- protocols
def run_oneshot(s: Setting) -> dict:
    """Single hospitals and the one-shot merge (every method × BN strategy, chosen on validation)."""
    p = s.params
    vectors = [finetune_vector(s.base, h, d, p.finetune, progress=False)[0] for h, d in s.data.items()]
    singles = [{"hospital": h, **s.score(m)} for h, m, _ in (compare.single_model(s.base, v) for v in vectors)]
    moments = live_moments(s.base, s.data, p.batchnorm)
    best = compare.evaluate_merges(s.base, vectors, s.evalsets, p, moments, progress=False).selected
    return {"singles": singles, "oneshot": s.score(best.model) | {"method": best.method, "bn": best.bn.strategy}}


def _flower(strategy: str, initial: list[np.ndarray]):
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAdam, FedAvg, FedAvgM

    cls = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedadam_tau": FedAdam}[strategy]
    return cls(initial_parameters=ndarrays_to_parameters(initial), **SYNC[strategy])


def _fit_res(arrays: list[np.ndarray], n: int):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {})


def run_sync(s: Setting, strategy: str, rounds: int, regime: str | None) -> dict:
    """R rounds of 1 local epoch; trained parameters aggregated by the Flower strategy, BN statistics by
    FedAvg's sample-weighted mean. ``regime`` None: every hospital every round (the model does not depend on
    the clock); else a quorum of all but one, the last hospital to finish on that clock dropped."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate

    model = s.base.fresh()
    names = [k for k, _ in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flower = _flower(strategy, [state[k].numpy() for k in names])
    cfg = s.params.finetune.model_copy(update={"epochs": 1})
    clock = s.clock(regime or "equal")
    out, now = [], 0.0
    for r in range(rounds):
        ends = {h: clock.run_end(h, n, 1, now) for h, n in s.n.items()}
        taking = sorted(ends, key=lambda h: ends[h])[: len(ends) - 1] if regime else list(ends)
        results, buffers = [], []
        for i, h in enumerate(s.hospitals):
            if h not in taking:
                continue
            local = s.model(state)
            finetune(
                local,
                s.data[h].train,
                s.base.spec,
                cfg.model_copy(update={"seed": cfg.seed + 100 * r + i}),
                progress=False,
            )
            trained = local.state_dict()
            results.append(_fit_res([trained[k].numpy() for k in names], s.n[h]))
            buffers.append(([trained[k].numpy() for k in state if k not in names], s.n[h]))
        params, _ = flower.aggregate_fit(r + 1, results, [])
        averaged = dict(zip(names, parameters_to_ndarrays(params)))
        averaged |= dict(zip([k for k in state if k not in names], aggregate(buffers)))
        state = {k: torch.as_tensor(np.asarray(averaged[k])).to(v.dtype) for k, v in state.items()}
        now = max(ends[h] for h in taking)
        out.append({"round": r + 1, "time": now, "hospitals": taking, **s.score(s.model(state))})
        print(f"  sync {strategy} {regime or 'all'} round {r + 1}: test AUC {out[-1]['auc']:.4f}", flush=True)
    return {"rounds": out}


def sync_times(s: Setting, rounds: int, regime: str) -> list[float]:
    """When each round of full participation ends on ``regime``'s clock (every round waits for everyone)."""
    clock, now, out = s.clock(regime), 0.0, []
    for _ in range(rounds):
        now = max(clock.run_end(h, n, 1, now) for h, n in s.n.items())
        out.append(now)
    return out


def run_async(s: Setting, protocol: str, regime: str, landings: int, until: float | None) -> dict:
    """The product's asynchronous refinement on ``regime``'s clock; every event's champion scored, and the EMA of
    the accepted versions for every decay of :data:`EMA_DECAYS`."""
    p = load_params(ROOT / "params.yaml", [*_base_overrides(s.seed, s.overrides), *PROTOCOLS[protocol][1]])
    p = p.model_copy(update={"refine": p.refine.model_copy(update={"network": tuple(s.hospitals)})})
    store_dir = WORK / f"seed{s.seed}" / f"{protocol}-{regime}"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = LocalStore(store_dir)
    store.put_base(s.base)
    moments = live_moments(s.base, s.data, p.batchnorm) if p.batchnorm.strategy == "recompute" else None
    rows = simulate(store, s.base, s.data, p, s.evalsets, landings, s.clock(regime), 1, False, None, moments, until)
    if until is None and rows[-1]["step"].startswith("waiting for"):  # every landing done, and vectors still buffered
        raise RuntimeError(
            f"seed {s.seed} {protocol} {regime}: the run ended with vectors buffered: {rows[-1]['step']}"
        )
    versions = [0] + [pt.version for pt in store.start_points(s.base.sha256)[1:]]
    scored = {0: s.score(s.base.model)}
    emas: dict[float, dict[int, dict]] = {d: {0: scored[0]} for d in EMA_DECAYS}
    running: dict[float, dict | None] = {d: None for d in EMA_DECAYS}
    for v in versions[1:]:
        state = store.get_start(s.base.sha256, v).model.state_dict()
        scored[v] = s.score(s.model(state))
        for d in EMA_DECAYS:
            averaged = running[d] = ema_update(running[d], state, d)
            emas[d][v] = s.score(s.model(averaged))
    events = [
        {
            "landings": r["landings"],
            "sim_time": r["sim_time"],
            "version": r["version"],
            "event": r["event"],
            "step": r["step"],
            **scored[r["version"]],
            "ema": {str(d): emas[d][r["version"]] for d in EMA_DECAYS},
        }
        for r in rows
    ]
    last = events[-1]
    print(
        f"  async {protocol} {regime}: {len(events)} events, v{last['version']}, test AUC {last['auc']:.4f}", flush=True
    )
    shutil.rmtree(store_dir, ignore_errors=True)
    return {"events": events}


def run_ceiling(s: Setting, regime: str, horizon: float, cap: int) -> dict:
    """Pooled training on each hospital's images as many times as it could have trained them by ``horizon`` on
    ``regime``'s clock (:meth:`~medvec.demo.simulate.Clock.runs_by`), shuffled into one stream and trained in
    passes of the pooled size (one pass sees each available image once on average), the best pass on validation
    kept. θ_pre's score where no hospital could finish a run."""
    clock, ev = s.clock(regime), s.evalsets
    epochs = {h: clock.runs_by(h, n, 1, horizon, cap) for h, n in s.n.items()}
    available = [s.data[h].train for h in s.hospitals if epochs[h]]
    if not available:
        return {"epochs": epochs, "passes": 0, "val_curve": [], **s.score(s.base.model)}
    stream = ImageSet.concat([s.data[h].train for h in s.hospitals for _ in range(epochs[h])])
    order = np.random.default_rng(s.seed).permutation(len(stream))
    size = sum(len(d) for d in available)
    model, curve, best = s.base.fresh(), [], None
    assert ev.val is not None
    for i in range(math.ceil(len(stream) / size)):
        cfg = s.params.finetune.model_copy(update={"epochs": 1, "seed": s.params.finetune.seed + i})
        finetune(model, stream.subset(order[i * size : (i + 1) * size]), s.base.spec, cfg, progress=False)
        curve.append(evaluate_model(model, ev.val, s.base.spec, s.params.evaluate.batch_size)["auc"])
        if best is None or curve[-1] > max(curve[:-1]):
            best = {k: v.clone() for k, v in model.state_dict().items()}
    assert best is not None
    return {"epochs": epochs, "passes": len(curve), "val_curve": curve, **s.score(s.model(best))}


def run_central(s: Setting, converged: bool) -> dict:
    """The pooled images: ``finetune.epochs`` epochs (equal compute), or to convergence (epochs chosen by early
    stopping on validation: :func:`medvec.demo.baselines.train_to_convergence`, at most 20)."""
    pooled, model = ImageSet.concat([d.train for d in s.data.values()]), s.base.fresh()
    if not converged:
        finetune(model, pooled, s.base.spec, s.params.finetune, progress=False)
        return {"epochs": s.params.finetune.epochs, **s.score(model)}
    assert s.evalsets.val is not None
    done = train_to_convergence(s.base, pooled, s.evalsets.val, s.params, max_epochs=20)
    return {"epochs": done.epochs, "val_curve": done.curve, **s.score(done.model)}


# ----------------------------------------------------------------------------- one seed
def seed_results(
    seed: int, rounds: int, overrides: list[str], ablations: bool, only_stored: bool, only: list[str] | None = None
) -> dict | None:
    """Every protocol of one seed (with ``ablations``, those in ``only`` and FedAsync, the reference, if given),
    from the store where it ran before."""
    key = {"seed": seed, "rounds": rounds, "overrides": sorted(overrides), "version": 2}
    setting: list[Setting] = []

    def s() -> Setting:
        if not setting:
            setting.append(Setting.load(seed, overrides))
        return setting[0]

    def get(name: str, extra: dict, run) -> dict | None:
        k = key | {"run": name, **extra}
        digest = hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:12]
        if only_stored and not (RUNS / f"{name}-{digest}.json").exists():
            return None
        return cached(name, k, lambda: run(s()))

    out: dict = {"seed": seed}
    out["oneshot"] = get("oneshot", {}, run_oneshot)
    out["sync"] = {
        st: get(f"sync-{st}", {"flower": SYNC[st]}, lambda x, st=st: run_sync(x, st, rounds, None)) for st in SYNC
    }
    out["central"] = {
        "equal": get("central-equal", {}, lambda x: run_central(x, False)),
        "converged": get("central-converged", {}, lambda x: run_central(x, True)),
    }
    protocols = list(HEADLINE_ASYNC)
    if ablations:
        protocols = [pr for pr in PROTOCOLS if only is None or pr in only or pr == "fedasync"]

    def run(pr: str, regime: str, landings: int, until: float | None) -> dict | None:
        extra = {"protocol": PROTOCOLS[pr][1], "landings": landings, "until": until}
        return get(f"async-{pr}-{regime}", extra, lambda x: run_async(x, pr, regime, landings, until))

    out["async"] = {pr: {"equal": run(pr, "equal", rounds, None)} for pr in protocols}
    best = sync_best(out)
    if ablations or best is None:
        return out if _complete(out) else None
    out["sync_best"], out["sync_times"], out["quorum"], out["ceiling"] = best, {}, {}, {}
    for regime in ("straggler", "absences"):
        times = get(f"times-{regime}", {}, lambda x, r=regime: {"times": sync_times(x, rounds, r)})
        if times is None:
            return None
        out["sync_times"][regime] = times
        for pr in HEADLINE_ASYNC:  # until sync's final time, at most 3·C landings per hospital
            out["async"][pr][regime] = run(pr, regime, 3 * rounds, times["times"][-1])
        quorum = {"flower": SYNC[best]}
        out["quorum"][regime] = get(
            f"sync-{best}-quorum-{regime}", quorum, lambda x, r=regime: run_sync(x, best, rounds, r)
        )
        half = sync_reaches(out, regime) / 2
        out["ceiling"][regime] = get(
            f"ceiling-{regime}",
            {"horizon": half, "cap": 3 * rounds},
            lambda x, r=regime, h=half: run_ceiling(x, r, h, 3 * rounds),
        )
    return out if _complete(out) else None


def _complete(x) -> bool:
    if isinstance(x, dict):
        return all(_complete(v) for v in x.values())
    return x is not None


def sync_best(r: dict) -> str | None:
    """The synchronous strategy with the best final validation AUC (never test)."""
    finals = {st: res["rounds"][-1]["val_auc"] for st, res in r["sync"].items() if res}
    return max(finals, key=lambda st: finals[st]) if len(finals) == len(SYNC) else None


# ----------------------------------------------------------------------------- report
def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def ema_decay(seeds: list[dict], protocol: str) -> float:
    """The EMA decay with the best mean final validation AUC over seeds, at equal compute."""
    return max(
        EMA_DECAYS,
        key=lambda d: mean([r["async"][protocol]["equal"]["events"][-1]["ema"][str(d)]["val_auc"] for r in seeds]),
    )


def final(r: dict, protocol: str, regime: str = "equal") -> dict:
    return r["async"][protocol][regime]["events"][-1]


def first_time(points: list[tuple[float, float]], target: float) -> float | None:
    """The first simulated time at which the test AUC reaches ``target`` (None: never)."""
    return next((t for t, auc in points if auc >= target), None)


def sync_final(r: dict) -> dict:
    """Sync best's last round (its final model's scores): the target the regimes measure time to."""
    return r["sync"][r["sync_best"]]["rounds"][-1]


def sync_reaches(r: dict, regime: str) -> float:
    """When sync best (every hospital) first reaches its own final test AUC on ``regime``'s clock."""
    rounds = r["sync"][r["sync_best"]]["rounds"]
    reached = first_time(list(zip(r["sync_times"][regime]["times"], (x["auc"] for x in rounds))), sync_final(r)["auc"])
    assert reached is not None, "the final round reaches its own AUC"
    return reached


def pre_auc(r: dict, score: str = "auc") -> float:
    """θ_pre's test AUC (``score`` "val_auc": its validation AUC): a fresh buffer's champion before its first step."""
    first = r["async"][PRE]["equal"]["events"][0]
    assert first["version"] == 0, "a fresh buffer does not step at its first landing"
    return first[score]


def at_time(r: dict, protocol: str, regime: str, t: float, score: str = "auc") -> float:
    """The test AUC (or ``score``) of ``protocol``'s champion at simulated time ``t`` (θ_pre's before its first
    event)."""
    events = [e for e in r["async"][protocol][regime]["events"] if e["sim_time"] <= t]
    return events[-1][score] if events else pre_auc(r, score)


def validation_by_regime(r: dict, protocol: str) -> dict[str, float]:
    """``protocol``'s champion's validation AUC at the end of each regime: after its last landing at equal compute,
    at sync's final time under the straggler and absences."""
    out = {"equal": final(r, protocol)["val_auc"]}
    for g in ("straggler", "absences"):
        out[g] = at_time(r, protocol, g, r["sync_times"][g]["times"][-1], "val_auc")
    return out


def choose(seeds: list[dict]) -> dict:
    """The default step rule, on validation only: the protocol of :data:`CANDIDATES` whose champion has the best
    validation AUC, averaged over seeds and the three regimes (each regime's mean beside it, for every protocol of
    :data:`HEADLINE_ASYNC`)."""
    by = {pr: [validation_by_regime(r, pr) for r in seeds] for pr in HEADLINE_ASYNC}
    val = {pr: {g: mean([x[g] for x in xs]) for g in REGIMES} for pr, xs in by.items()}
    overall = {pr: mean(list(v.values())) for pr, v in val.items()}
    chosen = max(CANDIDATES, key=lambda pr: overall[pr])
    return {"chosen": chosen, "candidates": list(CANDIDATES), "val_auc": val, "val_auc_mean": overall}


def sync_at_time(r: dict, regime: str, t: float) -> float:
    """The test AUC of sync best's model at simulated time ``t``: its last round ended by then (θ_pre's before)."""
    rounds = zip(r["sync_times"][regime]["times"], r["sync"][r["sync_best"]]["rounds"])
    done = [x["auc"] for end, x in rounds if end <= t]
    return done[-1] if done else pre_auc(r)


def time_to(r: dict, protocol: str, regime: str) -> dict:
    """When sync best (all hospitals; and the quorum) and async first reach sync best's final test AUC, within
    sync's final time, and async's test AUC at that time."""
    target = sync_final(r)["auc"]
    times = r["sync_times"][regime]["times"]
    quorum_pts = [(x["time"], x["auc"]) for x in r["quorum"][regime]["rounds"]]
    events = r["async"][protocol][regime]["events"]  # runs that started before sync's final time may land after it
    async_pts = [(e["sim_time"], e["auc"]) for e in events if e["sim_time"] <= times[-1]]
    return {
        "target": target,
        "sync": sync_reaches(r, regime),
        "sync_quorum": first_time(quorum_pts, target),
        "async": first_time(async_pts, target),
        "sync_final_time": times[-1],
        "async_final_auc": async_pts[-1][1] if async_pts else None,
        "async_events": len(async_pts),
    }


def headline(seeds: list[dict], rounds: int, protocol: str, choice: dict) -> dict:
    def single(r: dict, key) -> float:
        return mean([key(x) for x in r["oneshot"]["singles"]])

    def block(key) -> dict:
        return {
            "single_mean": mean([single(r, key) for r in seeds]),
            "oneshot": mean([key(r["oneshot"]["oneshot"]) for r in seeds]),
            "sync_best": mean([key(sync_final(r)) for r in seeds]),
            f"fedavg_r{rounds}": mean([key(r["sync"]["fedavg"]["rounds"][-1]) for r in seeds]),
            f"async_c{rounds}": mean([key(final(r, protocol)) for r in seeds]),
            "centralized": mean([key(r["central"]["equal"]) for r in seeds]),
            "centralized_converged": mean([key(r["central"]["converged"]) for r in seeds]),
        }

    diffs = [final(r, protocol)["auc"] - sync_final(r)["auc"] for r in seeds]
    return {
        "seeds": [r["seed"] for r in seeds],
        "async_protocol": protocol,
        "default_on_validation": choice,
        "sync_best_per_seed": [r["sync_best"] for r in seeds],
        "auc": block(lambda x: x["auc"]),
        "balanced_accuracy": block(lambda x: x["op"]["balanced_accuracy"]),
        "paired_async_minus_sync_best": {"mean": mean(diffs), "ci95": ci95(diffs), "per_seed": diffs},
        "time_to_sync_final_auc": times_to(seeds, protocol),
        "time_to_sync_final_auc_by_protocol": {pr: times_to(seeds, pr) for pr in HEADLINE_ASYNC},
        "half_time_ceiling": ceilings(seeds),
    }


def ceilings(seeds: list[dict]) -> dict:
    """Per regime and seed: half sync best's time to its final AUC (the goal's horizon), the image-epochs each
    hospital could have finished by then, the pooled ceiling's test AUC on them against that target, and each
    async protocol's test AUC at the horizon and whether it reached the target by then."""
    out = {}
    for g in ("straggler", "absences"):
        horizon = [sync_reaches(r, g) / 2 for r in seeds]
        target = [sync_final(r)["auc"] for r in seeds]
        ceiling = [r["ceiling"][g]["auc"] for r in seeds]
        out[g] = {
            "horizon": horizon,
            "target_auc": target,
            "epochs": [r["ceiling"][g]["epochs"] for r in seeds],
            "ceiling_auc": ceiling,
            "ceiling_reaches_target": [c >= t for c, t in zip(ceiling, target)],
            "sync_auc_at_horizon": [sync_at_time(r, g, h) for r, h in zip(seeds, horizon)],
            "async_auc_at_horizon": {
                pr: [at_time(r, pr, g, h) for r, h in zip(seeds, horizon)] for pr in HEADLINE_ASYNC
            },
            "async_met": {
                pr: [(t := time_to(r, pr, g)["async"]) is not None and t <= h for r, h in zip(seeds, horizon)]
                for pr in HEADLINE_ASYNC
            },
        }
    return out


def ceiling_table(regime: str, c: dict, seeds: list[int]) -> str:
    """The half-time ceiling of one regime as a markdown table, one row per seed."""
    prs = list(c["async_auc_at_horizon"])
    lines = [
        f"| {regime}: seed | horizon | image-epochs by then (per hospital) | target | ceiling | sync best then | "
        + " | ".join(f"async {pr}" for pr in prs)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(prs),
    ]
    for i, seed in enumerate(seeds):
        epochs = ", ".join(str(k) for k in c["epochs"][i].values())
        got = [f"{c['async_auc_at_horizon'][pr][i]:.3f}" + (" (met)" if c["async_met"][pr][i] else "") for pr in prs]
        reach = "" if c["ceiling_reaches_target"][i] else " (short)"
        lines.append(
            f"| {seed} | {c['horizon'][i]:.2f} | {epochs} | {c['target_auc'][i]:.3f} | {c['ceiling_auc'][i]:.3f}{reach} | "
            f"{c['sync_auc_at_horizon'][i]:.3f} | " + " | ".join(got) + " |"
        )
    return "\n".join(lines)


def times_to(seeds: list[dict], protocol: str) -> dict:
    """Per regime and seed: when sync best (every hospital; a quorum) and ``protocol`` first reach sync best's
    final test AUC, and ``protocol``'s test AUC at sync's final time."""
    out = {}
    for g in ("straggler", "absences"):
        ts = [time_to(r, protocol, g) for r in seeds]
        out[g] = {
            "sync": [t["sync"] for t in ts],
            "sync_quorum": [t["sync_quorum"] for t in ts],
            "async": [t["async"] for t in ts],
            "target_auc": [t["target"] for t in ts],
            "async_auc_at_sync_final_time": [t["async_final_auc"] for t in ts],
        }
    return out


def _ms(xs: list[float]) -> str:
    return f"{mean(xs):.3f} ± {statistics.pstdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _row(name: str, got: list[dict]) -> str:
    auc = [g["auc"] for g in got]
    op = {k: [g["op"][k] for g in got] for k in ("balanced_accuracy", "sensitivity", "specificity")}
    return f"| {name} | {_ms(auc)} | {_ms(op['balanced_accuracy'])} | {_ms(op['sensitivity'])} | {_ms(op['specificity'])} |"


HEADER = "| model | test AUC | bal. acc @ op | sensitivity @ op | specificity @ op |\n|---|---|---|---|---|"


def _singles(r: dict) -> dict:
    s = r["oneshot"]["singles"]
    op = {k: mean([x["op"][k] for x in s]) for k in ("balanced_accuracy", "sensitivity", "specificity")}
    return {"auc": mean([x["auc"] for x in s]), "op": op}


def ablation_report(seeds: list[dict], rounds: int) -> tuple[dict, str]:
    """One row per protocol at equal compute; the paired difference to FedAsync and to sync best."""
    rows: list[dict] = []
    lines = [HEADER]
    for pr, (what, _) in PROTOCOLS.items():
        if pr not in seeds[0]["async"]:  # --protocols left it out
            continue
        got = [final(r, pr) for r in seeds]
        d_sync = [final(r, pr)["auc"] - r["sync"][sync_best(r)]["rounds"][-1]["auc"] for r in seeds]
        d_fedasync = [final(r, pr)["auc"] - final(r, "fedasync")["auc"] for r in seeds]
        decay = ema_decay(seeds, pr)
        ema = [final(r, pr)["ema"][str(decay)] for r in seeds]
        rows.append(
            {
                "protocol": pr,
                "changes": what,
                "auc": mean([g["auc"] for g in got]),
                "val_auc": mean([g["val_auc"] for g in got]),
                "balanced_accuracy": mean([g["op"]["balanced_accuracy"] for g in got]),
                "minus_sync_best": {"mean": mean(d_sync), "ci95": ci95(d_sync)},
                "minus_fedasync": {"mean": mean(d_fedasync), "ci95": ci95(d_fedasync)},
                "events": mean([len(r["async"][pr]["equal"]["events"]) for r in seeds]),
                "versions": mean([final(r, pr)["version"] for r in seeds]),
                "ema": {
                    "decay": decay,
                    "auc": mean([e["auc"] for e in ema]),
                    "val_auc": mean([e["val_auc"] for e in ema]),
                },
            }
        )
        lines.append(_row(f"async {pr}: {what}", got))
        lines.append(_row(f"  … its EMA champion (decay {decay}, on validation)", ema))
    for st in SYNC:
        lines.append(_row(f"sync {st}, R = {rounds}", [r["sync"][st]["rounds"][-1] for r in seeds]))
    lines.append(_row("one-shot merge", [r["oneshot"]["oneshot"] for r in seeds]))
    diffs = [
        "| protocol | val AUC | test AUC | − FedAsync (95 % CI) | − sync best (95 % CI) |",
        "|---|---|---|---|---|",
    ]
    for x in rows:
        fa, sb = x["minus_fedasync"], x["minus_sync_best"]
        diffs.append(
            f"| {x['protocol']} | {x['val_auc']:.3f} | {x['auc']:.3f} | {fa['mean']:+.3f} [{fa['ci95'][0]:+.3f}, {fa['ci95'][1]:+.3f}]"
            f" | {sb['mean']:+.3f} [{sb['ci95'][0]:+.3f}, {sb['ci95'][1]:+.3f}] |"
        )
    best = max(rows, key=lambda x: x["val_auc"])
    head = {"seeds": [r["seed"] for r in seeds], "best_on_validation": best["protocol"], "protocols": rows}
    md = "\n".join(lines) + "\n\nPaired by seed (each seed changes the split and training):\n\n" + "\n".join(diffs)
    return head, md


def headline_report(seeds: list[dict], rounds: int) -> tuple[dict, str]:
    choice = choose(seeds)
    protocol = choice["chosen"]
    head = headline(seeds, rounds, protocol, choice)
    lines = [HEADER, _row("single hospital (mean)", [_singles(r) for r in seeds])]
    lines.append(_row("one-shot merge", [r["oneshot"]["oneshot"] for r in seeds]))
    for st in SYNC:
        lines.append(_row(f"sync {st}, R = {rounds}", [r["sync"][st]["rounds"][-1] for r in seeds]))
    lines.append(_row(f"sync best (on validation), R = {rounds}", [sync_final(r) for r in seeds]))
    for pr in HEADLINE_ASYNC:
        lines.append(_row(f"async {pr}, C = {rounds} ({PROTOCOLS[pr][0]})", [final(r, pr) for r in seeds]))
    lines.append(_row("centralized, equal compute", [r["central"]["equal"] for r in seeds]))
    lines.append(_row("centralized, converged (early stopping)", [r["central"]["converged"] for r in seeds]))
    lines.append(
        f"\nThe default, chosen on validation: **{protocol}**, the best validation AUC of its champion averaged over"
        " the three regimes (at equal compute after its last landing; under the straggler and absences at sync's"
        f" final time), of {', '.join(CANDIDATES)}:\n\n| protocol | "
        + " | ".join(REGIMES)
        + " | mean |\n|---|"
        + "---|" * (len(REGIMES) + 1)
    )
    for pr, v in choice["val_auc"].items():
        cells = " | ".join(f"{v[g]:.4f}" for g in REGIMES)
        name = pr if pr in CANDIDATES else f"{pr} (not a candidate)"
        lines.append(f"| {name} | {cells} | {choice['val_auc_mean'][pr]:.4f} |")
    p = head["paired_async_minus_sync_best"]
    lines.append(
        f"\nPaired async {protocol} − sync best (test AUC): {p['mean']:+.4f}, 95 % CI [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
        f" ({', '.join(f'{d:+.3f}' for d in p['per_seed'])})."
    )

    def fmt(xs: list, digits: int = 2) -> str:
        return ", ".join("—" if x is None else f"{x:.{digits}f}" for x in xs)

    for pr, by_regime in head["time_to_sync_final_auc_by_protocol"].items():
        for regime, t in by_regime.items():
            lines.append(
                f"\n{regime}, async {pr}: simulated time to reach sync best's final test AUC ({fmt(t['target_auc'], 3)}),"
                f" per seed — sync (all) {fmt(t['sync'])}; sync (quorum) {fmt(t['sync_quorum'])}; async {fmt(t['async'])}"
                f" (— : not within sync's time); async's test AUC at sync's final time {fmt(t['async_auc_at_sync_final_time'], 3)}."
            )
    lines.append(
        "\nThe half-time ceiling: pooled training on every image-epoch the hospitals could have finished by the horizon"
        " (half of sync best's time to its final test AUC, the target), the best pass on validation; test AUC at the"
        " horizon (sync best then: its last round ended by the horizon, θ_pre's if none); (met): async reached the"
        " target by then; (short): the ceiling does not reach it."
    )
    for regime, c in head["half_time_ceiling"].items():
        lines.append("\n" + ceiling_table(regime, c, head["seeds"]))
    return head, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=3, help="R = C: rounds, and landings per hospital")
    ap.add_argument("--ablations", action="store_true", help="every protocol, equal compute only")
    ap.add_argument("--only-stored", action="store_true", help="report the stored runs; run nothing")
    ap.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), help="--ablations: only these (and fedasync)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    only = args.protocols if args.ablations else None
    results = [seed_results(s, args.rounds, args.overrides, args.ablations, args.only_stored, only) for s in args.seeds]
    done = [r for r in results if r is not None]
    if not done:
        print("no seed complete yet")
        return
    name = "async_ablations" if args.ablations else "async_vs_sync"
    name += ("-" + "-".join(only)) if only else ""
    head, md = (ablation_report if args.ablations else headline_report)(done, args.rounds)
    command = "python benchmarks/async_vs_sync.py" + (" --ablations" if args.ablations else "")
    command += (" --protocols " + " ".join(only)) if only else ""
    command += " --seeds " + " ".join(map(str, args.seeds)) + "".join(f" -S {o}" for o in args.overrides)
    stored = sum(json.loads(f.read_text())["result"].get("seconds", 0) for f in RUNS.glob("*.json"))
    doc = {
        "command": command,
        "data": "pneumoniamnist, 4 hospitals, Dirichlet α=0.5; each seed changes the split and training",
        "seeds_complete": [r["seed"] for r in done],
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "seconds_all_stored_runs": round(stored, 1),
        "machine": machine(),
        "headline": head,
        "per_seed": done,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    title = (
        "Asynchronous protocols at equal compute (ablations)"
        if args.ablations
        else "Async refinement vs synchronous FedAvg"
    )
    text = (
        f"# {title}\n\n`{command}` (seeds complete: {', '.join(str(r['seed']) for r in done)}; "
        f"{stored / 60:.0f} min of stored runs)\n\nMean ± std over seeds; test split; the operating point is chosen on validation.\n\n{md}\n"
    )
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
