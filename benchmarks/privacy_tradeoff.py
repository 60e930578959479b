"""The privacy–accuracy trade-off of DP-SGD at the hospitals, and a membership-inference check.

On the demo configuration (PneumoniaMNIST, 4 hospitals, Dirichlet α = 0.5, EfficientNet-Lite0
at 64 px) for each target ε (∞ = ordinary fine-tuning, BN trained and recalibrated) and each
seed (the seed changes the hospital split and the training):

* every hospital fine-tunes θ_pre with DP-SGD at that ε (medvec's own path: ``privacy.enabled``);
* each hospital's own model and the merge (``merge.method``, λ chosen on validation, BN
  ``average``, since DP hospitals send no moment sums) are scored on the official test split;
* a membership-inference attack on the first hospital's own model: its training images
  (members) against as many images from the other hospitals' shares with the same label
  counts (non-members, never seen by that model). Two scores: the loss-threshold attack
  (lower loss → member) and a shadow-free reference attack (the drop in loss from θ_pre
  to the hospital's model). The attack AUC is reported; 0.5 is chance.

    python benchmarks/privacy_tradeoff.py                       # ε 1 3 8 ∞, seeds 0 1 2, 1 epoch
    python benchmarks/privacy_tradeoff.py --epsilons 3 inf --seeds 0 --epochs 2

Writes ``benchmarks/results/privacy_tradeoff.{json,md,png}``. Fine-tunes run for
``--epochs`` (default 1, not the demo's 2: DP-SGD's per-sample gradients run at about
35 images/s on 2 CPU cores, and the whole benchmark must fit in about 30 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvec.config import Params, PrivacyConfig, load_params  # noqa: E402
from medvec.coordinator import compare, engine, scoring  # noqa: E402
from medvec.data.images import ImageSet  # noqa: E402
from medvec.data.split import write_hospital_shards  # noqa: E402
from medvec.evaluate import evaluate_model, predict  # noqa: E402
from medvec.hospital.finetune import finetune_vector  # noqa: E402
from medvec.hospital.local import LocalData  # noqa: E402
from medvec.models import create_base  # noqa: E402
from medvec.runtime import set_threads  # noqa: E402

INF = math.inf


def per_sample_loss(model, data: ImageSet, spec) -> np.ndarray:
    """Cross-entropy of each image under ``model`` (computed here, never leaves this benchmark)."""
    p = predict(model, data, spec)
    return -np.log(np.clip(p[np.arange(len(data)), data.labels], 1e-12, 1.0))


def non_members(member: ImageSet, others: list[ImageSet], seed: int) -> ImageSet:
    """Images from the other hospitals' shares with the members' label counts (as far as they have them)."""
    pool = ImageSet.concat(others)
    rng = np.random.default_rng(seed)
    picked = []
    for label, count in enumerate(member.label_counts()):
        idx = np.flatnonzero(pool.labels == label)
        picked.extend(rng.choice(idx, size=min(count, len(idx)), replace=False).tolist())
    return pool.subset(np.sort(np.asarray(picked, dtype=int)))


def attack_aucs(model, base, members: ImageSet, outsiders: ImageSet) -> dict:
    """Loss-threshold and reference (θ_pre-calibrated) membership-inference AUCs."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(members)), np.zeros(len(outsiders))]
    loss = np.r_[per_sample_loss(model, members, base.spec), per_sample_loss(model, outsiders, base.spec)]
    ref = np.r_[per_sample_loss(base.model, members, base.spec), per_sample_loss(base.model, outsiders, base.spec)]
    return {"loss": float(roc_auc_score(y, -loss)), "reference": float(roc_auc_score(y, ref - loss))}


def run_one(seed: int, epsilon: float, params: Params, data: str, work: Path, evalsets: scoring.EvalSets) -> dict:
    """One (seed, ε): four hospitals fine-tune, then singles, the merge and the attack are scored."""
    started = time.perf_counter()
    folder = work / f"seed{seed}"
    if not folder.exists():
        write_hospital_shards(data, folder, params.split.hospitals, "dirichlet", params.split.alpha, seed)
    hospitals = sorted(p.name for p in folder.iterdir() if p.is_dir())
    base = create_base(
        params.model.name, 2, pretrained=params.model.pretrained, seed=0, image_size=params.model.image_size
    )
    dp = PrivacyConfig(enabled=not math.isinf(epsilon), target_epsilon=epsilon if not math.isinf(epsilon) else 8.0)
    cfg = params.finetune.model_copy(update={"seed": seed})
    local = {h: LocalData.load(folder / h) for h in hospitals}
    vectors = [finetune_vector(base, h, local[h], cfg, progress=False, privacy=dp)[0] for h in hospitals]
    singles = [compare.single_model(base, v) for v in vectors]
    assert evalsets.test is not None, "the benchmark's data has a test split"
    single_auc = [evaluate_model(m, evalsets.test, base.spec)["auc"] for _, m, _ in singles]
    merged = engine.merge_once(base, vectors, params, evalsets)
    merged_test = merged.test or {}
    first = local[hospitals[0]].train
    outsiders = non_members(first, [local[h].train for h in hospitals[1:]], seed)
    spent = [v.meta.privacy.epsilon if v.meta.privacy else None for v in vectors]
    return {
        "seed": seed,
        "target_epsilon": None if math.isinf(epsilon) else epsilon,
        "spent_epsilon": spent,
        "noise_multiplier": vectors[0].meta.privacy.noise_multiplier if vectors[0].meta.privacy else 0.0,
        "single_test_auc": single_auc,
        "mean_single_test_auc": statistics.fmean(single_auc),
        "merged": {
            "lambda": merged.lam,
            "val_auc": merged.val["auc"],
            "test_auc": merged_test["auc"],
            "test_balanced_accuracy": merged_test["balanced_accuracy"],
        },
        "attack": attack_aucs(singles[0][1], base, first, outsiders)
        | {"members": len(first), "non_members": len(outsiders)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def mean_std(xs: list[float]) -> list[float]:
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def summarise(runs: list[dict], epsilons: list[float]) -> list[dict]:
    rows = []
    for eps in epsilons:
        hits = [r for r in runs if (r["target_epsilon"] or INF) == eps]
        rows.append(
            {
                "epsilon": "inf" if math.isinf(eps) else eps,
                "seeds": len(hits),
                "spent_epsilon_max": max((e for r in hits for e in r["spent_epsilon"] if e is not None), default=None),
                "mean_single_test_auc": mean_std([r["mean_single_test_auc"] for r in hits]),
                "merged_test_auc": mean_std([r["merged"]["test_auc"] for r in hits]),
                "merged_test_balanced_accuracy": mean_std([r["merged"]["test_balanced_accuracy"] for r in hits]),
                "attack_auc_loss": mean_std([r["attack"]["loss"] for r in hits]),
                "attack_auc_reference": mean_std([r["attack"]["reference"] for r in hits]),
            }
        )
    return rows


def fmt(ms: list[float]) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def markdown(rows: list[dict], command: str, seconds: float, epochs: int) -> str:
    lines = [
        "| target ε | spent ε (max) | mean single test AUC | merged test AUC | merged test bal. acc | "
        "attack AUC (loss) | attack AUC (reference) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spent = "—" if r["spent_epsilon_max"] is None else f"{r['spent_epsilon_max']:.2f}"
        eps = "∞ (no DP)" if r["epsilon"] == "inf" else f"{r['epsilon']:g}"
        lines.append(
            f"| {eps} | {spent} | {fmt(r['mean_single_test_auc'])} | {fmt(r['merged_test_auc'])} | "
            f"{fmt(r['merged_test_balanced_accuracy'])} | {fmt(r['attack_auc_loss'])} | {fmt(r['attack_auc_reference'])} |"
        )
    lines += [
        "",
        f"Mean ± std over {rows[0]['seeds']} seeds (each seed changes the hospital split and the training); "
        f"{epochs} epoch(s) per fine-tune; δ = 1/(10·n) per hospital; {seconds / 60:.0f} min. Made by `{command}`.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    from medvec.evaluate import _plt

    plt = _plt()
    xs = [40.0 if r["epsilon"] == "inf" else float(r["epsilon"]) for r in rows]
    labels = ["∞" if r["epsilon"] == "inf" else f"{r['epsilon']:g}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, name in (("merged_test_auc", "merged"), ("mean_single_test_auc", "mean single hospital")):
        axes[0].errorbar(
            xs, [r[key][0] for r in rows], yerr=[r[key][1] for r in rows], marker="o", capsize=3, label=name
        )
    for key, name in (("attack_auc_loss", "loss threshold"), ("attack_auc_reference", "reference (θ_pre)")):
        axes[1].errorbar(
            xs, [r[key][0] for r in rows], yerr=[r[key][1] for r in rows], marker="o", capsize=3, label=name
        )
    axes[1].axhline(0.5, color="#555", linestyle="--", linewidth=1, label="chance")
    for ax, title in ((axes[0], "AUC on the test split"), (axes[1], "membership-inference attack AUC (hospital 1)")):
        ax.set_xscale("log")
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.set_xlabel("target ε (∞: no DP)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle("DP-SGD at the hospitals: privacy against accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, INF])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    set_threads(args.threads)
    overrides = [f"finetune.epochs={args.epochs}", f"finetune.threads={args.threads}", "batchnorm.strategy=average"]
    params = load_params(ROOT / "params.yaml", overrides + args.overrides)
    data = str(ROOT / params.demo.data)
    evalsets = scoring.EvalSets.load(data)
    started, runs = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(s, e) for s in args.seeds for e in args.epsilons]
        for seed, eps in tqdm(jobs, desc="privacy trade-off", unit="run"):
            runs.append(run_one(seed, eps, params, data, Path(tmp), evalsets))
            tqdm.write(
                json.dumps(
                    {k: runs[-1][k] for k in ("seed", "target_epsilon", "mean_single_test_auc", "merged", "attack")}
                )
            )
    seconds = time.perf_counter() - started
    rows = summarise(runs, args.epsilons)
    command = "python benchmarks/privacy_tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    by_eps = {str(r["epsilon"]): r for r in rows}
    headline = {
        "merged_test_auc_by_epsilon": {k: round(r["merged_test_auc"][0], 4) for k, r in by_eps.items()},
        "attack_auc_loss_by_epsilon": {k: round(r["attack_auc_loss"][0], 4) for k, r in by_eps.items()},
    }
    doc = {"command": command.strip(), "seconds": round(seconds, 1), "epochs": args.epochs, "params": params.model_dump(mode="json"),
           "headline": headline, "summary": rows, "runs": runs}  # fmt: skip
    (out / "privacy_tradeoff.json").write_text(json.dumps(doc, indent=2))
    table = markdown(rows, command.strip(), seconds, args.epochs)
    (out / "privacy_tradeoff.md").write_text(table + "\n\n![privacy trade-off](privacy_tradeoff.png)\n")
    plot(rows, out / "privacy_tradeoff.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
