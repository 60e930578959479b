"""Defences against one malicious hospital of four, on breastmnist and pneumoniamnist.

Attacks (the last hospital turns malicious): ``sign_flip`` (it sends −τ), ``scale``
(50·τ), ``label_shuffle`` (it fine-tunes on its own images with shuffled labels: a model that learns
nothing, its label counts unchanged) and ``label_flip`` (it fine-tunes with every label swapped for the other
class: a model that ranks patients backwards).  Defences: ``none``, ``mad`` (the norm and
direction screen, ``intake.defence=quarantine``), ``contribution`` (leave-one-out
on the coordinator's validation split, ``intake.harmful=exclude``), ``both``
(the screen, then the contribution rule on what it kept) and ``vote`` (issue 25: every input's own model
scored at every hospital's local validation split, from their answers alone; one below chance at most other
sites is kept out, ``intake.vote=exclude``).

For each dataset and seed (the seed moves the hospital split and the training),
it reports whether the attacker was caught, the honest vectors excluded, and the
merged model's test AUC (λ chosen on validation, as in production); and every
honest hospital's leave-one-out score next to its sample count and label skew.

    python benchmarks/robustness.py [--seeds 0 1 2] [--datasets breastmnist pneumoniamnist] [-S key=value ...]

Writes ``benchmarks/results/robustness.json`` (with a ``headline`` for ``both``), ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvec.config import load_params  # noqa: E402
from medvec.coordinator.compare import single_rows  # noqa: E402
from medvec.coordinator.contribution import scored_merge_once  # noqa: E402
from medvec.coordinator.defence import screen  # noqa: E402
from medvec.coordinator.judge import voted_out  # noqa: E402
from medvec.coordinator.scoring import EvalSets  # noqa: E402
from medvec.data.images import ImageSet  # noqa: E402
from medvec.data.split import write_hospital_shards  # noqa: E402
from medvec.demo.answering import simulated_judge  # noqa: E402
from medvec.hospital.finetune import finetune_vector  # noqa: E402
from medvec.hospital.local import LocalData  # noqa: E402
from medvec.models import base_from_config  # noqa: E402
from medvec.runtime import set_threads  # noqa: E402
from medvec.vectors.vector import DataVector  # noqa: E402

ATTACKS = ("none", "sign_flip", "scale", "label_shuffle", "label_flip")
DEFENCES = ("none", "mad", "contribution", "both", "vote")
SETTINGS = {  # defence → (intake.defence, intake.harmful); the vote excludes before the merge
    "none": ("off", "off"),
    "mad": ("quarantine", "off"),
    "contribution": ("off", "exclude"),
    "both": ("quarantine", "exclude"),
    "vote": ("off", "off"),
}


def shuffled(data: LocalData, seed: int) -> LocalData:
    """The same images with their labels shuffled (the label counts stay the same)."""
    rng = np.random.default_rng(seed)
    train = data.train
    return LocalData(ImageSet(train.images, rng.permutation(train.labels), train.classes), data.val)


def flipped(data: LocalData) -> LocalData:
    """The same images with every label swapped for the next class (two classes: the other one)."""
    train = data.train
    labels = (np.asarray(train.labels) + 1) % len(train.classes)
    return LocalData(ImageSet(train.images, labels, train.classes), data.val)


def attacked(vectors: list, attack: str, retrained: dict[str, DataVector]) -> list:
    """The four vectors with the last one replaced by the attacker's (``retrained``: the label attacks' vectors)."""
    if attack == "none":
        return list(vectors)
    v = vectors[-1]
    if attack in retrained:
        return [*vectors[:-1], retrained[attack]]
    fn = {"sign_flip": lambda t: -t, "scale": lambda t: 50 * t}[attack]
    return [*vectors[:-1], DataVector({k: fn(t) for k, t in v.deltas.items()}, v.meta, v.running, v.moments)]


def defend(base, vectors: list, p, evalsets: EvalSets, defence: str):
    """Screen, then merge (and score, and exclude the harmful) as the coordinator would."""
    mad, harmful = SETTINGS[defence]
    intake = p.intake.model_copy(update={"defence": mad, "harmful": harmful})
    pp = p.model_copy(update={"intake": intake})
    return scored_merge_once(base, screen(vectors, mad, p.intake.mad_k).kept, pp, evalsets)


def voted(base, vectors: list, p, local: dict[str, LocalData]) -> tuple[list, dict[str, float]]:
    """The vectors the below-chance vote keeps: each input's own model scored at every hospital's validation
    split (the cross-site matrix, from the hospitals' answers only), below chance at most other sites: out; and
    the last hospital's row of the matrix (its own model's AUC at each site)."""
    judge = simulated_judge(base, local, p)
    single_rows(base, vectors, EvalSets(None, None, judge=judge), p)
    evaluation = judge.evaluation()
    kept = voted_out(vectors, evaluation.flagged, "exclude")[0]
    return kept, evaluation.matrix.get(vectors[-1].meta.hospital, {})


def label_skew(counts: list[int], overall: list[int]) -> float:
    """Total variation distance between a hospital's label distribution and the pooled one."""
    a, b = np.asarray(counts, float), np.asarray(overall, float)
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def run_dataset(name: str, seed: int, args, bar) -> tuple[list[dict], list[dict]]:
    data = ROOT / "data" / f"{name}.npz"
    overrides = [
        "split.hospitals=4",
        "split.names=null",
        f"split.seed={seed}",
        "batchnorm.strategy=average",
        f"coordinator.eval_data={data}",
        f"finetune.seed={seed}",
        "contribution.method=loo",
    ]
    p = load_params(ROOT / "params.yaml", overrides + args.overrides)
    set_threads(p.finetune.threads)
    evalsets = EvalSets.load(data)
    folder = ROOT / ".medvec" / "robustness" / f"{name}-seed{seed}"
    split = write_hospital_shards(data, folder, 4, "dirichlet", p.split.alpha, seed, 0.1, 16)
    base = base_from_config(p.model, 2)
    names = list(split["hospitals"])
    local = {h: LocalData.load(folder / h) for h in names}
    honest = []
    for h in names:
        honest.append(finetune_vector(base, h, local[h], p.finetune, progress=False)[0])
        bar.update(1)
    last = names[-1]
    retrained = {}
    for attack, own in (("label_shuffle", shuffled(local[last], seed)), ("label_flip", flipped(local[last]))):
        retrained[attack] = finetune_vector(base, last, own, p.finetune, progress=False)[0]
        bar.update(1)
    rows, honest_rows = [], []
    for attack in ATTACKS:
        vectors = attacked(honest, attack, retrained)
        attacker = vectors[-1].meta.vector_id if attack != "none" else None
        submitted = vectors[:-1] if attacker else vectors  # the honest ones among them
        kept, last_row = voted(base, vectors, p, local)
        for defence in DEFENCES:
            g = defend(base, kept if defence == "vote" else vectors, p, evalsets, defence)
            final = {v.meta.vector_id for v in g.vectors}
            first = {s.vector_id: s for s in (*g.outcome.scores.scores, *g.outcome.scores.excluded)}
            rows.append(
                {
                    "dataset": name,
                    "seed": seed,
                    "attack": attack,
                    "defence": defence,
                    "caught": attacker is not None and attacker not in final,
                    "honest_excluded": sum(v.meta.vector_id not in final for v in submitted),
                    "test_auc": g.outcome.test["auc"],
                    "lambda": g.outcome.lam,
                    "contribution_seconds": g.outcome.scores.seconds,
                    "attacker_loo": first[attacker].loo if attacker in first else None,
                    "last_hospital_matrix_row": last_row,  # its own model's AUC at each site, as the vote read it
                    "attacker_loo_se": first[attacker].loo_se if attacker in first else None,
                    "scores": [  # what the rule saw: excluded vectors first-pass, kept ones from the final merge
                        {"hospital": s.hospital, "loo": s.loo, "loo_se": s.loo_se, "attacker": k == attacker}
                        for k, s in first.items()
                    ],
                }
            )
            print(
                f"{name} seed {seed} {attack:10s} {defence:12s} test AUC {rows[-1]['test_auc']:.3f}"
                f" caught {rows[-1]['caught']} honest excluded {rows[-1]['honest_excluded']}",
                flush=True,
            )
            if attack == "none" and defence == "none":
                overall = np.sum([v.meta.label_counts for v in honest], axis=0).tolist()
                for v in honest:
                    s = first[v.meta.vector_id]
                    honest_rows.append(
                        {
                            "dataset": name,
                            "seed": seed,
                            "hospital": v.meta.hospital,
                            "n_train": int(v.meta.n_train),
                            "label_counts": list(v.meta.label_counts),
                            "label_skew": label_skew(v.meta.label_counts, overall),
                            "loo": s.loo,
                            "loo_se": s.loo_se,
                        }
                    )
        bar.update(1)
    return rows, honest_rows


def summarize(rows: list[dict], seeds: list[int]) -> list[dict]:
    out = []
    keys = sorted({(r["dataset"], r["attack"], r["defence"]) for r in rows}, key=lambda k: (k[0], *map(_order, k[1:])))
    for dataset, attack, defence in keys:
        rs = [r for r in rows if (r["dataset"], r["attack"], r["defence"]) == (dataset, attack, defence)]
        aucs = [r["test_auc"] for r in rs]
        out.append(
            {
                "dataset": dataset,
                "attack": attack,
                "defence": defence,
                "caught": sum(r["caught"] for r in rs),
                "honest_excluded": sum(r["honest_excluded"] for r in rs),
                "test_auc_mean": statistics.fmean(aucs),
                "test_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "seeds": len(rs),
            }
        )
    return out


def _order(name: str) -> int:
    return (ATTACKS + DEFENCES).index(name)


def headline(summary: list[dict], seeds: list[int]) -> dict:
    both = [s for s in summary if s["defence"] == "both"]
    vote = [s for s in summary if s["defence"] == "vote"]
    return {
        "caught": {f"{s['attack']}/{s['dataset']}": s["caught"] for s in both if s["attack"] != "none"},
        "seeds": len(seeds),
        "honest_excluded": sum(s["honest_excluded"] for s in both),
        "vote": {  # the data-free vote on the hospitals' cross-site matrix (issue 25)
            "caught": {f"{s['attack']}/{s['dataset']}": s["caught"] for s in vote if s["attack"] != "none"},
            "honest_excluded": sum(s["honest_excluded"] for s in vote),
        },
    }


def markdown(result: dict) -> str:
    lines = [
        f"One malicious hospital of four, {len(result['seeds'])} seeds (`{result['command']}`, "
        f"{result['model']}, merge `{result['merge']}`, {result['seconds'] / 60:.0f} min). "
        "Each cell: merged test AUC mean ± std; attacker caught on k of the seeds; honest vectors excluded "
        "(summed over seeds).",
        "",
        "| dataset | attack | " + " | ".join(DEFENCES) + " |",
        "|---|---|" + "---|" * len(DEFENCES),
    ]
    for dataset in result["datasets"]:
        for attack in ATTACKS:
            cells = []
            for d in DEFENCES:
                s = next(
                    x for x in result["summary"] if (x["dataset"], x["attack"], x["defence"]) == (dataset, attack, d)
                )
                caught = f"caught {s['caught']}/{s['seeds']}, " if attack != "none" else ""
                cells.append(
                    f"{s['test_auc_mean']:.3f} ± {s['test_auc_std']:.3f} ({caught}honest out {s['honest_excluded']})"
                )
            lines.append(f"| {dataset} | {attack} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Honest hospitals' leave-one-out contribution (validation AUC), no attack, no defence:",
        "",
        "| dataset | seed | hospital | n_train | label counts | label skew (TV) | LOO ± SE |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in result["honest"]:
        se = f" ± {h['loo_se']:.4f}" if h["loo_se"] is not None else ""
        lines.append(
            f"| {h['dataset']} | {h['seed']} | {h['hospital']} | {h['n_train']} | {h['label_counts']} "
            f"| {h['label_skew']:.2f} | {h['loo']:+.4f}{se} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Honest hospitals' leave-one-out score (± SE) against their sample count and their label skew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for dataset, colour in zip(result["datasets"], ("#d95f02", "#2f6fdd", "#1b9e77")):
        rows = [h for h in result["honest"] if h["dataset"] == dataset]
        loo = [h["loo"] for h in rows]
        err = [h["loo_se"] or 0.0 for h in rows]
        for ax, key in zip(axes, ("n_train", "label_skew")):
            x = [h[key] for h in rows]
            ax.errorbar(x, loo, yerr=err, fmt="o", color=colour, ecolor=colour, alpha=0.8, capsize=2, label=dataset)
    for ax, label in zip(
        axes, ("training images at the hospital", "label skew (total variation from the pooled labels)")
    ):
        ax.axhline(0.0, color="#555", linewidth=1)
        ax.set_xlabel(label)
    axes[0].set_xscale("log")
    axes[0].set_ylabel("leave-one-out contribution (validation AUC)")
    axes[1].legend(fontsize=8, frameon=False)
    fig.suptitle(f"Honest hospitals' contributions, no attack ({len(result['seeds'])} seeds, ± paired-bootstrap SE)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, honest = [], []
    jobs = len(args.datasets) * len(args.seeds) * (6 + len(ATTACKS))  # 4 honest, 2 label attacks
    with tqdm(total=jobs, desc="robustness (fine-tunes and attacks)") as bar:
        for name in args.datasets:
            for seed in args.seeds:
                r, h = run_dataset(name, seed, args, bar)
                rows += r
                honest += h
    p = load_params(ROOT / "params.yaml", args.overrides)
    summary = summarize(rows, args.seeds)
    result = {
        "command": "python benchmarks/robustness.py "
        + " ".join(
            ["--seeds", *map(str, args.seeds), "--datasets", *args.datasets] + [f"-S {o}" for o in args.overrides]
        ),
        "datasets": args.datasets,
        "seeds": args.seeds,
        "model": p.model.name,
        "merge": p.merge.method,
        "rule": {"harm_min": p.intake.harm_min, "harm_z": p.intake.harm_z, "mad_k": p.intake.mad_k},
        "seconds": round(time.perf_counter() - t0, 1),
        "headline": headline(summary, args.seeds),
        "summary": summary,
        "honest": honest,
        "runs": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    plot(result, out / "robustness.png")
    md += "\n![honest contributions against sample count and label skew](robustness.png)\n"
    (out / "robustness.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
