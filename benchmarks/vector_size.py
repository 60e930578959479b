"""Bytes per vector encoding, and what each costs the merged model, on the demo configuration over seeds.

For each seed (which moves the simulated split too: ``split.seed``, ``finetune.seed``
and ``merge.seed``), the demo's four hospitals fine-tune EfficientNet-Lite0 on
PneumoniaMNIST once.  Each encoding then goes the production way: ``for_upload``
encodes the vectors, they are written as files, ``load_vector`` validates and decodes
them, and the coordinator merges them (``--method``, weighted by default: the demo's
selected merge), restores BN from the hospitals' moment sums (``recompute``), chooses
λ on validation and scores the test split.

    python benchmarks/vector_size.py [--seeds 0 1 2] [--method weighted] [--all] [-S key=value ...]

Writes ``benchmarks/results/vector_size.json`` (headline ``best_encoding``,
``size_ratio``, ``auc_delta``: the smallest encoding at ≤ 25 % of fp32's bytes whose
3-seed mean test AUC is within 0.005 of fp32's, or the closest one with
``target_met: false``) and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, table, write

DATA = ROOT / "data" / "pneumoniamnist.npz"
ENCODINGS = [  # (label, vectors.* overrides): every encoding at its params.yaml default
    ("fp32", {}),
    ("fp16", {"encoding": "fp16"}),
    ("bf16", {"encoding": "bf16"}),
    ("int8", {"encoding": "int8"}),
    ("int8_channel", {"encoding": "int8_channel"}),
    ("int4/g64", {"encoding": "int4", "group_size": 64}),
    ("topk/0.1", {"encoding": "topk", "density": 0.1}),
]
MORE = [  # --all: the frontier around the defaults
    ("int4/g32", {"encoding": "int4", "group_size": 32}),
    ("int4/g128", {"encoding": "int4", "group_size": 128}),
    ("topk/0.2", {"encoding": "topk", "density": 0.2}),
    ("topk/0.05", {"encoding": "topk", "density": 0.05}),
]
SIZE_TARGET, AUC_TARGET = 0.25, 0.005


def run_seed(seed: int, method_name: str, overrides: list[str], work: Path, encodings: list) -> list[dict]:
    """Fine-tune the demo's hospitals once, then merge and score every encoding of their vectors."""
    from medvec.config import VectorsConfig, load_params
    from medvec.coordinator.engine import choose_scale, lambda_grid
    from medvec.coordinator.methods import get_method, merge_delta
    from medvec.coordinator.scoring import EvalSets
    from medvec.data.split import write_hospital_shards
    from medvec.hospital.finetune import LiveMoments, finetune_vector, for_upload
    from medvec.hospital.local import LocalData
    from medvec.models import base_from_config
    from medvec.runtime import set_threads
    from medvec.vectors.checks import load_vector

    seeds = [f"split.seed={seed}", f"finetune.seed={seed}", f"merge.seed={seed}"]
    p = load_params(ROOT / "params.yaml", [*seeds, "batchnorm.strategy=recompute", *overrides])
    set_threads(p.finetune.threads)
    folder = work / f"seed{seed}"
    split = write_hospital_shards(
        DATA, folder / "hospitals", p.split.hospitals, p.split.scheme, p.split.alpha, seed, p.split.local_val_fraction
    )
    base = base_from_config(p.model, 2)
    local = {h: LocalData.load(folder / "hospitals" / h) for h in split["hospitals"]}
    t0 = time.perf_counter()
    vectors = [finetune_vector(base, h, d, p.finetune, progress=False)[0] for h, d in local.items()]
    print(f"seed {seed}: fine-tuned {len(vectors)} hospitals in {time.perf_counter() - t0:.0f} s", flush=True)
    moments = LiveMoments(base, p.batchnorm, [(h, d.train, i) for i, (h, d) in enumerate(local.items())])
    evalsets = EvalSets.load(DATA)
    method = get_method(method_name, p.merge)
    state, rows, reference = base.model.state_dict(), [], None
    for label, settings in encodings:
        t0 = time.perf_counter()
        cfg = VectorsConfig(**settings)
        paths = [
            for_upload(v, cfg).save(folder / label.replace("/", "-") / f"{v.meta.hospital}.safetensors")
            for v in vectors
        ]
        files = [load_vector(path, base=state, base_sha256=base.sha256) for path in paths]
        tau = merge_delta(files, method)
        if reference is None:
            reference = tau
        grid = lambda_grid(method, p)
        out = choose_scale(base, tau, grid, method_name, files, p, evalsets, None, moments_fn=moments)
        test = out.test or {}  # the data has a test split
        rows.append(
            {
                "seed": seed,
                "encoding": label,
                "bytes": sum(path.stat().st_size for path in paths),
                "relative_error": relative_error(tau, reference),
                "lambda": out.lam,
                "val_auc": out.val["auc"],
                "test_auc": test["auc"],
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"  {label:13s} {rows[-1]['bytes'] / 1e6:7.2f} MB  test AUC {test['auc']:.4f}", flush=True)
    return rows


def relative_error(tau, reference) -> float:
    """‖τ_m(encoded) − τ_m(fp32)‖ / ‖τ_m(fp32)‖ of the merged delta."""
    diff = sum(float((tau.tensor(k) - reference.tensor(k)).double().pow(2).sum()) for k in reference.keys())
    return (diff / max(reference.norm() ** 2, 1e-30)) ** 0.5


def summarize(rows: list[dict], encodings: list) -> list[dict]:
    fp32 = {r["seed"]: r for r in rows if r["encoding"] == "fp32"}
    out = []
    for label, _ in encodings:
        mine = [r for r in rows if r["encoding"] == label]
        aucs = [r["test_auc"] for r in mine]
        out.append(
            {
                "encoding": label,
                "mb": statistics.mean(r["bytes"] for r in mine) / 1e6,
                "size_ratio": statistics.mean(r["bytes"] / fp32[r["seed"]]["bytes"] for r in mine),
                "test_auc": statistics.mean(aucs),
                "test_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "auc_delta": statistics.mean(r["test_auc"] - fp32[r["seed"]]["test_auc"] for r in mine),
                "relative_error": statistics.mean(r["relative_error"] for r in mine),
                "lambdas": "/".join(f"{r['lambda']:g}" for r in mine),
            }
        )
    return out


def headline(summary: list[dict]) -> dict:
    small = [s for s in summary if s["size_ratio"] <= SIZE_TARGET]
    good = [s for s in small if s["auc_delta"] >= -AUC_TARGET]
    if good:
        best = min(good, key=lambda s: (s["size_ratio"], -s["auc_delta"]))
    else:
        best = max(small, key=lambda s: s["auc_delta"]) if small else min(summary, key=lambda s: s["size_ratio"])
    return {
        "best_encoding": best["encoding"],
        "size_ratio": round(best["size_ratio"], 4),
        "auc_delta": round(best["auc_delta"], 4),
        "target_met": bool(good),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--method", default="weighted")
    ap.add_argument("--all", action="store_true", help="also int4 groups of 32 and 128, top-k 0.2 and 0.05")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="params override")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args()
    t0 = time.perf_counter()
    encodings = ENCODINGS + (MORE if args.all else [])
    with tempfile.TemporaryDirectory(prefix="medvec-size-") as tmp:
        rows = [r for s in args.seeds for r in run_seed(s, args.method, args.overrides, Path(tmp), encodings)]
    summary = summarize(rows, encodings)
    head = headline(summary)
    columns = ["encoding", "mb", "size_ratio", "test_auc", "test_auc_std", "auc_delta", "relative_error", "lambdas"]
    seeds = " ".join(map(str, args.seeds))
    md = "\n".join(
        [
            f"# Vector size by encoding (demo configuration, `{args.method}` merge, BN recompute, seeds {seeds})",
            "",
            f"`python benchmarks/vector_size.py --seeds {seeds}{' --all' if args.all else ''}` — MB: the four hospitals' vector files together; "
            "size_ratio: ÷ fp32; test AUC: mean ± std over seeds; auc_delta: the paired mean difference from fp32; "
            "relative_error: ‖τ_m − τ_m(fp32)‖ / ‖τ_m(fp32)‖ of the merged delta; λ chosen on validation per seed.",
            "",
            table(summary, columns),
            "",
            f"headline: {head}",
            "",
            f"{time.perf_counter() - t0:.0f} s in all.",
        ]
    )
    payload = {"headline": head, "method": args.method, "seeds": args.seeds, "summary": summary, "rows": rows}
    write("vector_size", payload, md, args.out)


if __name__ == "__main__":
    main()
