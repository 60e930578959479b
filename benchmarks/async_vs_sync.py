"""Asynchronous refinement against synchronous FedAvg, side by side, at equal local compute.

On the demo configuration (PneumoniaMNIST, 4 Dirichlet-0.5 hospitals, the
``params.yaml`` model), for every seed (which changes the hospital split *and*
training), with the same split, θ_pre, training loop and evaluation:

* single hospitals and the one-shot merge (``finetune.epochs`` epochs each; the
  demo's choice: every method in ``merge.methods`` × every BN strategy, λ and the
  pair chosen on validation, as ``make quality`` does);
* synchronous FedAvg: R rounds × 1 local epoch, every state entry averaged by
  sample count with Flower's own ``aggregate`` (``pip install flwr``: the peer's
  arithmetic is the peer's);
* asynchronous refinement: C landings × 1 epoch per hospital in a seeded
  random order on a simulated clock (:mod:`medvec.demo.simulate`), B = ``refine.buffer``;
* the same with the last hospital a 4× straggler, and the simulated time each
  protocol needs to reach the one-shot merge's test AUC (a sync round ends when
  its slowest hospital ends);
* centralized (all hospitals pooled, ``finetune.epochs`` epochs).

Every model is scored by test AUC, balanced accuracy at the argmax, and
sensitivity / specificity / balanced accuracy at the operating point chosen on
validation (Youden's J).

    python benchmarks/async_vs_sync.py                     # seeds 0 1 2, R = C = 3
    python benchmarks/async_vs_sync.py --seeds 0 -S model.name=tiny_cnn   # a quick look

Writes ``benchmarks/results/async_vs_sync.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvec.config import Params, load_params  # noqa: E402
from medvec.coordinator import compare, scoring  # noqa: E402
from medvec.data.images import ImageSet  # noqa: E402
from medvec.data.split import split_from_config  # noqa: E402
from medvec.demo.simulate import Clock, simulate  # noqa: E402
from medvec.evaluate import metrics, operating_point, predict  # noqa: E402
from medvec.hospital.finetune import finetune_vector, live_moments  # noqa: E402
from medvec.hospital.local import LocalData  # noqa: E402
from medvec.hospital.train import finetune  # noqa: E402
from medvec.models import Base, base_from_config, state_sha256  # noqa: E402
from medvec.runtime import set_threads  # noqa: E402
from medvec.store import LocalStore  # noqa: E402

DATA = ROOT / "data" / "pneumoniamnist.npz"


def score(model: torch.nn.Module, base: Base, evalsets: scoring.EvalSets, bs: int) -> dict:
    """Test AUC, argmax balanced accuracy, and the validation-chosen operating point on test."""
    assert evalsets.val is not None and evalsets.test is not None, "the benchmark's data has val and test splits"
    pv, pt = predict(model, evalsets.val, base.spec, bs), predict(model, evalsets.test, base.spec, bs)
    val, test = metrics(evalsets.val.labels, pv), metrics(evalsets.test.labels, pt)
    op = operating_point((evalsets.val.labels, pv[:, 1]), (evalsets.test.labels, pt[:, 1]))
    return {"val_auc": val["auc"], "auc": test["auc"], "balanced_accuracy_argmax": test["balanced_accuracy"], "op": op}


def fedavg(base: Base, data: dict[str, LocalData], p: Params, rounds: int, evalsets, bs: int) -> list[dict]:
    """Synchronous FedAvg with Flower's aggregation; the score after every round."""
    from flwr.server.strategy.aggregate import aggregate

    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    cfg = p.finetune.model_copy(update={"epochs": 1})
    out = []
    for r in range(rounds):
        results = []
        for i, d in enumerate(data.values()):
            model = base.fresh()
            model.load_state_dict(state)
            finetune(model, d.train, base.spec, cfg.model_copy(update={"seed": cfg.seed + 100 * r + i}), progress=False)
            results.append(([t.detach().cpu().numpy() for t in model.state_dict().values()], len(d.train)))
        averaged = aggregate(results)
        state = {k: torch.as_tensor(np.asarray(a)).to(v.dtype) for (k, v), a in zip(state.items(), averaged)}
        model = base.fresh()
        model.load_state_dict(state)
        out.append({"round": r + 1, **score(model, base, evalsets, bs)})
        print(f"  fedavg round {r + 1}: test AUC {out[-1]['auc']:.4f}", flush=True)
    return out


def async_run(base, local, p, evalsets, landings, clock, store_dir: Path, bs: int) -> list[dict]:
    """Asynchronous refinement on the simulated clock; the champion's score after every landing."""
    shutil.rmtree(store_dir, ignore_errors=True)
    store = LocalStore(store_dir)
    store.put_base(base)
    moments = live_moments(base, local, p.batchnorm) if p.batchnorm.strategy == "recompute" else None
    rows = simulate(store, base, local, p, evalsets, landings, clock, 1, progress=False, moments_fn=moments)
    out, cache = [], {}
    for row in rows:
        v = row["version"]
        if v not in cache:
            champion = store.get_start(base.sha256, v) if v else base
            cache[v] = score(champion.model, base, evalsets, bs)
        out.append({"landings": row["landings"], "sim_time": row["sim_time"], "version": v, **cache[v]})
    print(f"  async: {len(rows)} landings, final v{rows[-1]['version']}, test AUC {out[-1]['auc']:.4f}", flush=True)
    return out


def first_time(points: list[tuple[float, float]], target: float) -> float | None:
    """The first simulated time at which the test AUC reaches ``target`` (None: never)."""
    return next((t for t, auc in points if auc >= target), None)


def run_seed(seed: int, rounds: int, overrides: list[str]) -> dict:
    p = load_params(
        ROOT / "params.yaml",
        [
            f"split.seed={seed}",
            f"finetune.seed={seed}",
            f"merge.seed={seed}",
            "split.hospitals=4",
            "split.names=null",
            *overrides,
        ],
    )
    set_threads(p.finetune.threads)
    bs = p.evaluate.batch_size
    work = ROOT / ".medvec" / "async_vs_sync" / f"seed{seed}"
    split = split_from_config(DATA, work / "hospitals", p.split)
    folders = {h: str(work / "hospitals" / h) for h in split["hospitals"]}
    data = {h: LocalData.load(f) for h, f in folders.items()}
    evalsets = scoring.EvalSets.load(DATA)
    base = base_from_config(p.model, 2)
    t0 = time.perf_counter()
    vectors = [finetune_vector(base, h, d, p.finetune, progress=False)[0] for h, d in data.items()]
    singles = [
        {"hospital": h, **score(m, base, evalsets, bs)} for h, m, _ in (compare.single_model(base, v) for v in vectors)
    ]
    moments = live_moments(base, data, p.batchnorm)
    comparison = compare.evaluate_merges(base, vectors, evalsets, p, moments, progress=False)
    best = comparison.selected
    oneshot = score(best.model, base, evalsets, bs)
    print(f"seed {seed}: one-shot test AUC {oneshot['auc']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    sync = fedavg(base, data, p, rounds, evalsets, bs)
    refine = p.model_copy(update={"refine": p.refine.model_copy(update={"mode": "async"})})
    hospitals = list(folders)
    plain = async_run(base, data, refine, evalsets, rounds, Clock.seeded(hospitals, seed), work / "async", bs)
    slow = Clock.seeded(hospitals, seed, straggler=4.0)
    straggled = async_run(base, data, refine, evalsets, rounds, slow, work / "async-straggler", bs)
    pooled = base.fresh()
    finetune(pooled, ImageSet.concat([d.train for d in data.values()]), base.spec, p.finetune, progress=False)
    central = score(pooled, base, evalsets, bs)
    n = {h: len(d.train) for h, d in data.items()}
    round_time = slow.sync_round(n, 1)
    k = len(hospitals)
    return {
        "seed": seed,
        "hospitals": {h: n[h] for h in hospitals},
        "base_sha256": state_sha256(base.model.state_dict()),
        "singles": singles,
        "oneshot": oneshot | {"method": best.method, "lambda": best.lam, "bn": best.bn.strategy},
        "fedavg": sync,
        "async": plain,
        "async_at": {str(c): plain[c * k - 1] for c in range(1, rounds + 1)},
        "async_straggler": straggled,
        "centralized": central,
        "straggler": {
            "slowness": slow.slowness,
            "sync_round_time": round_time,
            "sync_time_to_oneshot": first_time([(r["round"] * round_time, r["auc"]) for r in sync], oneshot["auc"]),
            "async_time_to_oneshot": first_time([(r["sim_time"], r["auc"]) for r in straggled], oneshot["auc"]),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }


def mean(xs: list[float | None]) -> float | None:
    kept = [x for x in xs if x is not None]
    return statistics.fmean(kept) if kept else None


def headline(seeds: list[dict], rounds: int) -> dict:
    """Means over seeds of the figures the issue asks for."""

    def pick(key: str) -> dict:
        metric = (lambda r: r[key]) if key == "auc" else (lambda r: r["op"][key])
        return {
            "single_mean": mean([statistics.fmean(metric(s) for s in r["singles"]) for r in seeds]),
            "oneshot": mean([metric(r["oneshot"]) for r in seeds]),
            f"fedavg_r{rounds}": mean([metric(r["fedavg"][rounds - 1]) for r in seeds]),
            f"async_c{rounds}": mean([metric(r["async_at"][str(rounds)]) for r in seeds]),
            "centralized": mean([metric(r["centralized"]) for r in seeds]),
        }

    return {
        "seeds": [r["seed"] for r in seeds],
        "auc": pick("auc"),
        "balanced_accuracy": pick("balanced_accuracy"),
        "straggler_time_to_oneshot_auc": {
            "sync": mean([r["straggler"]["sync_time_to_oneshot"] for r in seeds]),
            "async": mean([r["straggler"]["async_time_to_oneshot"] for r in seeds]),
            "reached": {
                "sync": sum(r["straggler"]["sync_time_to_oneshot"] is not None for r in seeds),
                "async": sum(r["straggler"]["async_time_to_oneshot"] is not None for r in seeds),
            },
            "per_seed": {  # None: not reached within R rounds / C landings
                "sync": [r["straggler"]["sync_time_to_oneshot"] for r in seeds],
                "async": [r["straggler"]["async_time_to_oneshot"] for r in seeds],
            },
        },
    }


def table(seeds: list[dict], rounds: int) -> str:
    """Mean ± std over seeds, one line per protocol (test split; operating point chosen on validation)."""

    def row(name: str, get) -> str:
        auc = [get(r)["auc"] for r in seeds]
        ba = [get(r)["op"]["balanced_accuracy"] for r in seeds]
        se = [get(r)["op"]["sensitivity"] for r in seeds]
        sp = [get(r)["op"]["specificity"] for r in seeds]

        def ms(x):
            return f"{statistics.fmean(x):.3f} ± {statistics.pstdev(x):.3f}" if len(x) > 1 else f"{x[0]:.3f}"

        return f"| {name} | {ms(auc)} | {ms(ba)} | {ms(se)} | {ms(sp)} |"

    k = len(seeds[0]["hospitals"])
    lines = ["| protocol | test AUC | bal. acc @ op | sensitivity @ op | specificity @ op |", "|---|---|---|---|---|"]
    lines.append(row("single hospital (mean)", lambda r: _mean_single(r)))
    lines.append(row("one-shot merge", lambda r: r["oneshot"]))
    for c in range(2, rounds + 1):
        lines.append(row(f"sync FedAvg, R = {c}", lambda r, c=c: r["fedavg"][c - 1]))
        lines.append(row(f"async, C = {c} ({c * k} landings)", lambda r, c=c: r["async_at"][str(c)]))
    lines.append(row("centralized", lambda r: r["centralized"]))
    return "\n".join(lines)


def _mean_single(r: dict) -> dict:
    s = r["singles"]
    op = {k: statistics.fmean(x["op"][k] for x in s) for k in ("balanced_accuracy", "sensitivity", "specificity")}
    return {"auc": statistics.fmean(x["auc"] for x in s), "op": op}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="R = C: FedAvg rounds and async landings per hospital")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    seeds = [run_seed(s, args.rounds, args.overrides) for s in args.seeds]
    command = "python benchmarks/async_vs_sync.py " + " ".join(
        ["--seeds", *map(str, args.seeds), "--rounds", str(args.rounds)] + [f"-S {o}" for o in args.overrides]
    )
    doc = {
        "command": command,
        "data": "pneumoniamnist, 4 hospitals, Dirichlet α=0.5; each seed changes the split and training",
        "machine": f"{torch.get_num_threads()} torch threads, CPU",
        "seconds": round(time.perf_counter() - t0, 1),
        "headline": headline(seeds, args.rounds),
        "per_seed": seeds,
    }
    write(doc, seeds, args.rounds, Path(args.out))


def write(doc: dict, seeds: list[dict], rounds: int, out: Path) -> None:
    """``async_vs_sync.json`` and ``.md`` (the table, then the straggler's times per seed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "async_vs_sync.json").write_text(json.dumps(doc, indent=2))
    md = [
        f"# Async refinement vs synchronous FedAvg\n\n`{doc['command']}` ({doc['seconds']:.0f} s, {doc['machine']})\n",
        "Mean ± std over seeds; test split; the operating point (threshold) is chosen on validation.\n",
        table(seeds, rounds),
    ]
    h = doc["headline"]["straggler_time_to_oneshot_auc"]

    def times(xs: list) -> str:
        return ", ".join("not reached" if x is None else f"{x:.2f}" for x in xs)

    md.append(
        "\nWith the last hospital a 4× straggler, simulated time to reach each seed's one-shot test AUC"
        f" (seeds {', '.join(str(r['seed']) for r in seeds)}; a time unit is one hospital fine-tuning"
        f" 1000 images for one epoch at speed 1): sync {times(h['per_seed']['sync'])}; async {times(h['per_seed']['async'])}.\n"
    )
    (out / "async_vs_sync.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
