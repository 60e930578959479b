"""Outlier defence on breastmnist: one hospital sends a vector scaled ×50 or sign-flipped.

Reports the merged model's test AUC without the defence, with quarantine and with
norm clipping, as mean ± std over seeds (λ chosen on validation, as in production).

    python benchmarks/robustness.py [--seeds 0 1 2] [-S key=value ...]

Writes ``benchmarks/results/robustness.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvec.config import load_params  # noqa: E402
from medvec.coordinator import EvalSets, merge_once  # noqa: E402
from medvec.data import write_hospital_shards  # noqa: E402
from medvec.defence import screen  # noqa: E402
from medvec.hospital import LocalData, finetune_vector  # noqa: E402
from medvec.models import base_from_config  # noqa: E402
from medvec.train import set_threads  # noqa: E402
from medvec.vectors import DataVector  # noqa: E402

DATA = ROOT / "data" / "breastmnist.npz"
ATTACKS = {"none": None, "scaled ×50": lambda t: 50 * t, "sign-flipped": lambda t: -t}
DEFENCES = ("off", "quarantine", "clip")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    base_overrides = [
        "split.hospitals=4",
        "split.names=null",
        "batchnorm.strategy=average",
        f"coordinator.eval_data={DATA}",
        "finetune.epochs=3",
    ]
    rows: dict[tuple[str, str], list[float]] = {}
    flagged: dict[tuple[str, str], list[int]] = {}
    t0 = time.perf_counter()
    evalsets = EvalSets.load(DATA)
    tmp = ROOT / ".medvec" / "robustness"
    for seed in args.seeds:
        p = load_params(ROOT / "params.yaml", base_overrides + [f"finetune.seed={seed}"] + args.overrides)
        set_threads(p.finetune.threads)
        split = write_hospital_shards(DATA, tmp / f"seed{seed}", 4, "dirichlet", p.split.alpha, p.split.seed, 0.1, 16)
        base = base_from_config(p.model, 2)
        vectors = [
            finetune_vector(base, h, LocalData.load(tmp / f"seed{seed}" / h), p.finetune, progress=False)[0]
            for h in split["hospitals"]
        ]
        for attack, fn in ATTACKS.items():
            vs = list(vectors)
            if fn is not None:  # the last hospital turns malicious
                v = vs[-1]
                vs[-1] = DataVector({k: fn(t) for k, t in v.deltas.items()}, v.meta, v.running, v.moments)
            for defence in DEFENCES:
                s = screen(vs, defence, p.intake.mad_k)
                out = merge_once(base, s.kept, p, evalsets)
                rows.setdefault((attack, defence), []).append(out.test["auc"])
                flagged.setdefault((attack, defence), []).append(len(s.flagged))
                print(
                    f"seed {seed} {attack:13s} {defence:10s} test AUC {out.test['auc']:.3f} flagged {len(s.flagged)}",
                    flush=True,
                )
    result = {
        "command": "python benchmarks/robustness.py "
        + " ".join(["--seeds", *map(str, args.seeds)] + [f"-S {o}" for o in args.overrides]),
        "data": "breastmnist (4 hospitals, Dirichlet α=0.5), the last hospital malicious",
        "model": p.model.name,
        "merge": p.merge.method,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": [
            {
                "attack": a,
                "defence": d,
                "test_auc_mean": statistics.fmean(v),
                "test_auc_std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "values": v,
                "flagged": flagged[(a, d)],
            }
            for (a, d), v in rows.items()
        ],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Merged test AUC with one malicious hospital of four, mean ± std over seeds {args.seeds} (`{result['command']}`, {p.model.name}, merge `{p.merge.method}`):",
        "",
        "| attack | no defence | quarantine | clipping |",
        "|---|---|---|---|",
    ]
    for a in ATTACKS:
        cells = []
        for d in DEFENCES:
            r = next(x for x in result["results"] if x["attack"] == a and x["defence"] == d)
            cells.append(
                f"{r['test_auc_mean']:.3f} ± {r['test_auc_std']:.3f} (flagged {sum(r['flagged'])}/{len(r['flagged'])})"
            )
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / "robustness.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
