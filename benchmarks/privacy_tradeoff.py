"""The privacy–accuracy trade-off of DP-SGD at the hospitals, by what DP trains, and a membership-inference attack
that can succeed.

On the demo configuration (PneumoniaMNIST, 4 hospitals, Dirichlet α = 0.5, EfficientNet-Lite0 at 64 px), for each
``privacy.trainable`` mode (``head``, ``bn_affine``, ``all``), each target ε (∞: the same recipe without noise,
gradients still clipped) and each seed (the seed changes the hospital split and the training):

* every hospital runs DP-SGD from θ_pre with the mode's recipe (:data:`RECIPES`: epochs, Poisson batch, EMA;
  the learning rate and clipping norm chosen on **public** data, BreastMNIST, by ``--tune``:
  :func:`medvec.hospital.privacy.tune_on_public`, written to ``privacy_tuning.json`` and read from there);
* the vectors go through medvec's own file format (a partial vector carries only its trained tensors, and reads
  as zero elsewhere) and are merged (``merge.method``, λ chosen on validation, BN ``average``); the merge and each
  hospital's own model are scored on the official test split, the merge also at the operating point chosen on
  validation (balanced accuracy);
* the reference is the demo's ordinary fine-tune without DP (mode ``none``).

The attack (``--attack``) runs in a setting built to leak: a small hospital (``--attack-members`` images of hospital
1) trained for ``--attack-epochs`` epochs (default :data:`ATTACK_EPOCHS`, per mode), at ε = 3 and ∞. Members are its images; non-members as many images of the
other hospitals with the same label counts. Three scores: the loss threshold, the loss drop from θ_pre, and offline
LiRA (Carlini et al. 2022) with ``--shadows`` shadow models trained the same way on population images that are
neither: the target's logit-scaled confidence in the true label against the shadows' (one Gaussian per image,
one variance for all, as the paper advises with few shadows).

    python benchmarks/privacy_tradeoff.py --tune                       # the public tuning (BreastMNIST), at ε = 3
    python benchmarks/privacy_tradeoff.py --tune --modes head --epsilons 1 8   # ε 1 and 8 their own lr and C
    python benchmarks/privacy_tradeoff.py --modes head --tuned-at-each-epsilon   # ... trained with them
    python benchmarks/privacy_tradeoff.py --tune --modes head --epsilons 3 8 1 --weight-decays 0.3 1 3
    python benchmarks/privacy_tradeoff.py --modes head --tuned-weight-decay   # ... and each ε's weight decay
    python benchmarks/privacy_tradeoff.py --tune --modes head --epsilons 3 8 1 --epochs-grid 10 60 100
    python benchmarks/privacy_tradeoff.py --modes head --tuned-epochs   # ... each ε's lr, C and epochs
    python benchmarks/privacy_tradeoff.py                              # modes × ε 1 3 8 ∞ × seeds 0 1 2, attack
    python benchmarks/privacy_tradeoff.py --modes head --epsilons 3 inf --seeds 0
    python benchmarks/privacy_tradeoff.py --modes head --augmentations 8   # K = 8 views an example

Resumable: each (mode, ε, seed) result is written to ``benchmarks/results/privacy_runs/`` when it finishes, named by
a hash of its settings, and a rerun skips what exists. Writes ``benchmarks/results/privacy_tradeoff.{json,md,png}``
from every stored result of the current settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvec.config import Params, PrivacyConfig, load_params  # noqa: E402
from medvec.coordinator import compare, engine, scoring  # noqa: E402
from medvec.data.images import ImageSet  # noqa: E402
from medvec.data.split import write_hospital_shards  # noqa: E402
from medvec.evaluate import evaluate_model, log_odds, predict_logits  # noqa: E402
from medvec.hospital.finetune import finetune_vector  # noqa: E402
from medvec.hospital.local import LocalData  # noqa: E402
from medvec.models import create_base  # noqa: E402
from medvec.runtime import set_threads  # noqa: E402

INF = math.inf


def true_log_odds(model, data: ImageSet, spec) -> np.ndarray:
    """log(p / (1 − p)) of each image's true label, from the logits (medvec.evaluate.log_odds: no saturation):
    LiRA's statistic, and the loss attacks' through :func:`per_sample_loss`."""
    return log_odds(predict_logits(model, data, spec), data.task)[np.arange(len(data)), data.labels]


def per_sample_loss(model, data: ImageSet, spec) -> np.ndarray:
    """Cross-entropy of each image under ``model``, −log p = log(1 + e^(−log-odds)) (computed here, never leaves
    this benchmark)."""
    return np.logaddexp(0.0, -true_log_odds(model, data, spec))


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


MODES = ("head", "bn_affine", "all")
# The DP recipe of each mode (privacy.*): epochs and the Poisson batch set so that each hospital takes many steps
# (head and bn_affine: ~4 logical steps an epoch at ~1,000 images); lr and max_grad_norm as tuned on BreastMNIST
# (--tune), these values until a tuning file exists.
# head: its inputs centred by BreastMNIST's features (privacy.centre; public here, as for the tuning).
RECIPES: dict[str, dict] = {
    "head": {
        "epochs": 30,
        "batch_size": 256,
        "lr": 0.003,
        "max_grad_norm": 1.0,
        "ema": 0.99,
        "centre": "data/breastmnist.npz",
        "augmentations": 8,  # privacy.views' default for head
    },
    "bn_affine": {"epochs": 10, "batch_size": 256, "lr": 0.003, "max_grad_norm": 1.0, "ema": 0.99, "augmentations": 1},
    "all": {"epochs": 1, "batch_size": 64, "lr": 0.001, "max_grad_norm": 1.0, "ema": None, "augmentations": 1},
}
# Runs stored before DP-SGD's per-example loss (medvec.hospital.privacy.per_example_loss) have recipes without
# "augmentations": their names differ, so they are never read as runs of today's training.
# The leaking setting's epochs: the head, trained on features computed once, memorises 100 images only in
# hundreds of steps (10 epochs: LiRA 0.556 without noise; 100: 0.606); the network modes cost 10 epochs already.
ATTACK_EPOCHS = {"head": 100, "bn_affine": 10, "all": 10, "none": 10}
DEFAULT_EPSILONS = [1.0, 3.0, 8.0, INF]
DEFAULT_TUNING_EPSILON = 3.0  # the recipes' lr and clipping norm at every ε, unless --tuned-at-each-epsilon
TUNED_AT_EACH_EPSILON = False  # --tuned-at-each-epsilon: an ε tuned on its own (--tune --epsilons) takes its lr and C
TUNED_WEIGHT_DECAY = False  # --tuned-weight-decay: each ε's lr and C, and the weight decay --tune --weight-decays chose
TUNED_EPOCHS = False  # --tuned-epochs: each ε's lr and C, and the epochs --tune --epochs-grid chose
NO_NOISE = 1e-6  # ε = ∞: the same recipe with a negligible noise multiplier (clipping kept)
# What the AUCs and the attacks rank by (medvec.evaluate.log_odds), and the operating point's probabilities
# (float64): part of every run's name, so the runs scored on float32 probabilities before, which tie at 1 once a
# margin passes ~17 (the merged DP heads' reach 90), are not read as today's.
AUC_OF = "log-odds; float64 probabilities"
RUNS = ROOT / "benchmarks" / "results" / "privacy_runs"
TUNING = ROOT / "benchmarks" / "results" / "privacy_tuning.json"


def recipe(mode: str, epsilon: float | None = None) -> dict:
    """The mode's recipe, with the learning rate and clipping norm the public tuning chose where it ran: at ε = 3
    (``best``), or with ``--tuned-at-each-epsilon`` at ``epsilon`` where it was tuned there (``by_epsilon``); with
    ``--tuned-weight-decay`` also the weight decay chosen at ``epsilon`` (``weight_decay``; a recipe without the key
    keeps ``finetune.weight_decay``, so the runs stored before it keep their names); with ``--tuned-epochs`` the
    epochs chosen at ``epsilon`` instead of the recipe's (``epochs``)."""
    out = dict(RECIPES[mode])
    if TUNING.is_file():
        doc = json.loads(TUNING.read_text())
        each = (TUNED_AT_EACH_EPSILON or TUNED_WEIGHT_DECAY or TUNED_EPOCHS) and epsilon is not None
        tuned = doc.get("by_epsilon", {}).get(eps_name(epsilon), {}) if each else {}
        best = tuned.get("best", {}).get(mode) or doc["best"].get(mode)
        if best:
            out.update(lr=best["lr"], max_grad_norm=best["max_grad_norm"])
        for axis, on in (("weight_decay", TUNED_WEIGHT_DECAY), ("epochs", TUNED_EPOCHS)):
            chosen = doc.get(axis, {}).get(eps_name(epsilon), {}).get("best", {}).get(mode)
            if on and chosen and chosen[axis] is not None:
                out[axis] = chosen[axis]
    return out


def attack_epochs(mode: str, args) -> int:
    """The epochs of the leaking setting for ``mode``: ``--attack-epochs``, else :data:`ATTACK_EPOCHS`."""
    return args.attack_epochs or ATTACK_EPOCHS[mode]


def privacy_for(mode: str, epsilon: float, n: int | None = None) -> PrivacyConfig:
    """``privacy.*`` of one run; ``n``: a hospital this small gets a batch of at most n/4."""
    r = recipe(mode, epsilon)
    batch = min(r["batch_size"], max(2, n // 4)) if n else r["batch_size"]
    common = {"enabled": True, "trainable": mode, "epochs": r["epochs"], "batch_size": batch, "lr": r["lr"]}
    views = r.get("augmentations", 1)  # a recipe from before privacy.augmentations trained one view an image
    common |= {"max_grad_norm": r["max_grad_norm"], "ema": r["ema"], "augmentations": views}
    common["weight_decay"] = r.get("weight_decay")  # None: finetune.weight_decay
    if r.get("centre"):
        common["centre"] = str(ROOT / r["centre"])
    if math.isinf(epsilon):
        return PrivacyConfig(**common, noise_multiplier=NO_NOISE)
    return PrivacyConfig(**common, target_epsilon=epsilon)


def train_vectors(base, hospitals, local, cfg, mode: str, epsilon: float, work: Path) -> list:
    """Each hospital's vector (DP as ``mode`` and ε say; ``none``: the ordinary fine-tune), through medvec's file
    format and intake's check against the base, as the coordinator reads them."""
    from medvec.vectors.checks import load_vector

    privacy = None if mode == "none" else privacy_for(mode, epsilon)
    state, out = base.model.state_dict(), []
    for h in hospitals:
        vector, _ = finetune_vector(base, h, local[h], cfg, progress=False, privacy=privacy)
        out.append(load_vector(vector.save(work / f"{h}.safetensors"), base=state, base_sha256=base.sha256))
    return out


def shards(params: Params, data: str, work: Path, seed: int) -> tuple[Path, list[str]]:
    """The seed's simulated hospitals (written once per seed): their folder and names."""
    folder = work / f"seed{seed}"
    if not folder.exists():
        write_hospital_shards(data, folder, params.split.hospitals, "dirichlet", params.split.alpha, seed)
    return folder, sorted(p.name for p in folder.iterdir() if p.is_dir())


def demo_base(params: Params):
    """θ_pre of the demo configuration."""
    return create_base(
        params.model.name, 2, pretrained=params.model.pretrained, seed=0, image_size=params.model.image_size
    )


def run_one(mode: str, seed: int, epsilon: float, params: Params, data: str, work: Path, evalsets) -> dict:
    """One (mode, seed, ε): four hospitals fine-tune, then singles and the merge are scored."""
    started = time.perf_counter()
    folder, hospitals = shards(params, data, work, seed)
    base = demo_base(params)
    cfg = params.finetune.model_copy(update={"seed": seed})
    local = {h: LocalData.load(folder / h) for h in hospitals}
    (work / "vectors").mkdir(exist_ok=True)
    vectors = train_vectors(base, hospitals, local, cfg, mode, epsilon, work / "vectors")
    singles = [compare.single_model(base, v) for v in vectors]
    assert evalsets.test is not None, "the benchmark's data has a test split"
    single_auc = [evaluate_model(m, evalsets.test, base.spec)["auc"] for _, m, _ in singles]
    merged = engine.merge_once(base, vectors, params, evalsets)
    merged_test = merged.test or {}
    spent = [v.meta.privacy.epsilon if v.meta.privacy else None for v in vectors]
    return {
        "mode": mode,
        "seed": seed,
        "target_epsilon": None if math.isinf(epsilon) else epsilon,
        "spent_epsilon": [None if e is None or math.isinf(e) or e > 1e6 else e for e in spent],
        "noise_multiplier": vectors[0].meta.privacy.noise_multiplier if vectors[0].meta.privacy else 0.0,
        "vector_mb": vectors[0].path.stat().st_size / 2**20,
        "single_test_auc": single_auc,
        "mean_single_test_auc": statistics.fmean(single_auc),
        "merged": {
            "method": merged.method,
            "lambda": merged.lam,
            "val_auc": merged.val["auc"],
            "test_auc": merged_test["auc"],
            "test_balanced_accuracy_at_op": merged_test["op"]["balanced_accuracy"],
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def leak_model(base, train: ImageSet, cfg, mode: str, epsilon: float, epochs: int):
    """A model of ``mode`` trained on ``train`` for ``epochs`` (DP at ε; ∞: no noise) — target or shadow."""
    from medvec.hospital.privacy import dp_finetune
    from medvec.hospital.train import finetune

    model = base.fresh()
    if mode == "none":  # the ordinary fine-tune: no clipping, no noise, BN trained
        finetune(model, train, base.spec, cfg.model_copy(update={"epochs": epochs}), progress=False)
        return model
    privacy = privacy_for(mode, epsilon, len(train)).model_copy(update={"epochs": epochs})
    dp_finetune(model, train, base.spec, cfg, privacy, progress=False)
    return model


def run_attack(mode: str, seed: int, epsilon: float, params: Params, data: str, work: Path, args) -> dict:
    """The leaking setting: a small hospital's model, attacked by loss, by the loss drop from θ_pre and by LiRA."""
    from sklearn.metrics import roc_auc_score

    started = time.perf_counter()
    folder, hospitals = shards(params, data, work, seed)
    local = [LocalData.load(folder / h).train for h in hospitals]
    rng = np.random.default_rng(seed)
    members = local[0].subset(np.sort(rng.choice(len(local[0]), args.attack_members, replace=False)))
    outsiders = non_members(members, local[1:], seed)
    pool = ImageSet.concat(local[1:])
    taken = {(img.tobytes()) for img in outsiders.images}
    free = np.asarray([i for i in range(len(pool)) if pool.images[i].tobytes() not in taken])
    base = demo_base(params)
    cfg = params.finetune.model_copy(update={"seed": seed})
    epochs = attack_epochs(mode, args)
    target = leak_model(base, members, cfg, mode, epsilon, epochs)
    test = scoring.EvalSets.load(data).test
    assert test is not None, "the benchmark's data has a test split"
    both = ImageSet.concat([members, outsiders])
    y = np.r_[np.ones(len(members)), np.zeros(len(outsiders))]
    shadows = []
    for k in range(args.shadows):
        pick = np.sort(rng.choice(free, args.attack_members, replace=False))
        shadow_cfg = cfg.model_copy(update={"seed": seed * 100 + k + 1})
        shadows.append(
            true_log_odds(leak_model(base, pool.subset(pick), shadow_cfg, mode, epsilon, epochs), both, base.spec)
        )
    out_conf = np.stack(shadows)  # shadows × images: every image is out of every shadow
    mu, sd = out_conf.mean(0), max(float(out_conf.std(0, ddof=1).mean()), 1e-6)
    lira = (true_log_odds(target, both, base.spec) - mu) / sd
    losses = attack_aucs(target, base, members, outsiders)
    return {
        "mode": mode,
        "seed": seed,
        "target_epsilon": None if math.isinf(epsilon) else epsilon,
        "members": len(members),
        "non_members": len(outsiders),
        "epochs": epochs,
        "attack_auc": {"loss": losses["loss"], "reference": losses["reference"], "lira": float(roc_auc_score(y, lira))},
        "member_test_auc": float(evaluate_model(target, test, base.spec)["auc"]),
        "seconds": round(time.perf_counter() - started, 1),
    }


# refine.* as the stored runs were named (params.yaml's from 2026-12-06 to 12-07, the fresh buffer's): no run here
# takes an asynchronous step, so a run's name no longer follows params.yaml's refine (a new async default renamed
# every stored run once)
NAMED_REFINE: dict[str, Any] = {
    "mode": "oneshot", "buffer": 1, "eta": None, "etas": [0.5, 1.0, 1.5, 2.0], "staleness": "polynomial",
    "staleness_a": 0.5, "staleness_b": 4, "max_staleness": 8, "staleness_cap": None, "weighting": "network",
    "fresh": True, "quorum": 1.0, "network": [], "timeout": 86400.0, "server_optimizer": "none",
    "server_momentum": 0.9, "server_lr": 0.1, "server_betas": [0.9, 0.99], "server_tau": 1e-09, "ema": None,
    "first_step": "buffer", "local_epochs": 1,
}  # fmt: skip


def run_settings(params: Params, data: str) -> dict[str, Any]:
    """What names every run of ``params`` on ``data`` (its recipe and ε are added per run): the params but
    ``privacy.*`` (each run's own), ``finetune.threads`` (which changes the time, not the result) and ``refine.*``
    (:data:`NAMED_REFINE` instead), and the data's path relative to the checkout, so that a clone elsewhere, or
    ``--threads`` of its own, finds the stored runs."""
    path = Path(data).resolve()
    named = params.model_dump(mode="json", exclude={"privacy": True, "finetune": {"threads"}})
    return {
        "params": named | {"refine": NAMED_REFINE},
        "data": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
    }


def run_key(kind: str, mode: str, seed: int, epsilon: float, settings: dict) -> Path:
    """Where one result is kept: named by what it ran and a hash of the settings it ran with."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    eps = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    return RUNS / f"{kind}-{mode}-eps{eps}-seed{seed}-{digest}.json"


def cached(path: Path, compute, *args) -> dict:
    """The stored result at ``path``, or ``compute(*args)``'s, written there when it finishes."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def mean_std(xs: list[float]) -> list[float]:
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def eps_name(eps: float | None) -> str:
    return "inf" if eps is None or math.isinf(eps) else f"{eps:g}"


def summarise(runs: list[dict], attacks: list[dict]) -> list[dict]:
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        for eps in dict.fromkeys(eps_name(r["target_epsilon"]) for r in runs if r["mode"] == mode):
            hits = [r for r in runs if r["mode"] == mode and eps_name(r["target_epsilon"]) == eps]
            hit_attacks = [a for a in attacks if a["mode"] == mode and eps_name(a["target_epsilon"]) == eps]
            row = {
                "mode": mode,
                "epsilon": eps,
                "seeds": len(hits),
                "vector_mb": hits[0]["vector_mb"],
                "spent_epsilon_max": max((e for r in hits for e in r["spent_epsilon"] if e is not None), default=None),
                "mean_single_test_auc": mean_std([r["mean_single_test_auc"] for r in hits]),
                "merged_test_auc": mean_std([r["merged"]["test_auc"] for r in hits]),
                "merged_balanced_accuracy_at_op": mean_std([r["merged"]["test_balanced_accuracy_at_op"] for r in hits]),
            }
            for name in ("loss", "reference", "lira"):
                if hit_attacks:
                    row[f"attack_auc_{name}"] = mean_std([a["attack_auc"][name] for a in hit_attacks])
            rows.append(row)
    return rows


def fmt(ms: list[float] | None) -> str:
    return "—" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "| trains | target ε | spent ε (max) | vector | mean single test AUC | merged test AUC | merged bal. acc. at op "
        "| attack AUC: loss | loss drop from θ_pre | LiRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spent = "—" if r["spent_epsilon_max"] is None else f"{r['spent_epsilon_max']:.2f}"
        eps = {"inf": "∞ (no noise)"}.get(r["epsilon"], r["epsilon"])
        if r["mode"] == "none":
            eps = "no DP"
        lines.append(
            f"| {r['mode']} | {eps} | {spent} | {r['vector_mb']:.2f} MB | {fmt(r['mean_single_test_auc'])} | "
            f"{fmt(r['merged_test_auc'])} | {fmt(r['merged_balanced_accuracy_at_op'])} | "
            f"{fmt(r.get('attack_auc_loss'))} | {fmt(r.get('attack_auc_reference'))} | {fmt(r.get('attack_auc_lira'))} |"
        )
    lines += [
        "",
        f"Mean ± std over the seeds (each changes the hospital split and the training); δ = 1/(10·n) per hospital. "
        f"Made by `{command}`.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    from medvec.evaluate import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows if r["mode"] != "none"):
        mine = [r for r in rows if r["mode"] == mode]
        xs = [40.0 if r["epsilon"] == "inf" else float(r["epsilon"]) for r in mine]
        for ax, key in ((axes[0], "merged_test_auc"), (axes[1], "merged_balanced_accuracy_at_op")):
            ax.errorbar(
                xs, [r[key][0] for r in mine], yerr=[r[key][1] for r in mine], marker="o", capsize=3, label=mode
            )
    for r in rows:
        if r["mode"] == "none":
            axes[0].axhline(r["merged_test_auc"][0], color="#555", linestyle="--", linewidth=1, label="no DP (all)")
            axes[1].axhline(
                r["merged_balanced_accuracy_at_op"][0], color="#555", linestyle="--", linewidth=1, label="no DP (all)"
            )
    for ax, title in ((axes[0], "merged model: test AUC"), (axes[1], "merged model: balanced accuracy at the op")):
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8, 40], ["1", "3", "8", "∞"])
        ax.minorticks_off()
        ax.set_xlabel("target ε (∞: no noise)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", frameon=False)
    fig.suptitle("DP-SGD at the hospitals by what it trains (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tune(
    params: Params,
    modes: list[str],
    epsilon: float,
    weight_decays: list[float] | None = None,
    epochs: list[int] | None = None,
) -> dict:
    """The learning rate and clipping norm of each mode chosen on BreastMNIST (public for this task) at ε: at
    ε = 3 the recipe's default (``best``), at another ε that ε's own (``by_epsilon``). With ``weight_decays``, the
    weight decay instead, at that ε's lr and C (``weight_decay``; the recipe's own finetune.weight_decay is in the
    grid as None); with ``epochs``, the epochs, at that ε's lr and C and the recipe's decay (``epochs``; the recipe's
    own epochs are in the grid as None)."""
    from medvec.data.sources import load_split
    from medvec.hospital.privacy import tune_on_public

    public = load_split(ROOT / "data" / "breastmnist.npz", "train")
    base = demo_base(params)
    doc: dict[str, Any] = (
        json.loads(TUNING.read_text())
        if TUNING.is_file()
        else {"public": "breastmnist train", "epsilon": epsilon, "grid": {}, "best": {}}
    )
    doc["splits"] = "val_auc: the mean of val_aucs, one per seeded public split; an entry without val_aucs: one split"
    for mode in modes:
        started = time.perf_counter()
        privacy = privacy_for(mode, epsilon, len(public))
        lr, norm = privacy.lr or params.finetune.lr, privacy.max_grad_norm
        if weight_decays:  # None in the grid: finetune.weight_decay, as every recipe before
            privacy = privacy.model_copy(update={"weight_decay": None})
            decays = (None, *weight_decays)
            grid = tune_on_public(public, base, params.finetune, privacy, (lr,), (norm,), weight_decays=decays)
        elif epochs:  # None in the grid: the recipe's epochs
            grid = tune_on_public(public, base, params.finetune, privacy, (lr,), (norm,), epochs=(None, *epochs))
        else:
            grid = tune_on_public(public, base, params.finetune, privacy)
        at = doc
        if weight_decays or epochs:
            axis = "weight_decay" if weight_decays else "epochs"
            at = doc.setdefault(axis, {}).setdefault(eps_name(epsilon), {"grid": {}, "best": {}})
        elif epsilon != DEFAULT_TUNING_EPSILON:
            at = doc.setdefault("by_epsilon", {}).setdefault(eps_name(epsilon), {"grid": {}, "best": {}})
        at["grid"][mode] = [vars(g) for g in grid]
        at["best"][mode] = vars(grid[0]) | {"seconds": round(time.perf_counter() - started, 1)}
        TUNING.write_text(json.dumps(doc, indent=2))
        print(mode, eps_name(epsilon), at["best"][mode], flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=[*MODES, "none"], choices=[*MODES, "none"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epsilons", type=float, nargs="+", help="default: 1 3 8 ∞ (with --tune: 3)")
    ap.add_argument("--attack-epsilons", type=float, nargs="+", default=[3.0, INF])
    ap.add_argument("--attack-members", type=int, default=100)
    ap.add_argument("--attack-epochs", type=int, help="the leaking setting's epochs (default: ATTACK_EPOCHS)")
    ap.add_argument("--shadows", type=int, default=4)
    ap.add_argument("--no-attack", action="store_true")
    ap.add_argument("--only-stored", action="store_true", help="report the stored results; run nothing new")
    ap.add_argument("--tune", action="store_true", help="choose lr and max_grad_norm on BreastMNIST, then stop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tuned-at-each-epsilon", action="store_true", help="an ε tuned on its own (--tune --epsilons) uses its lr, C"
    )
    ap.add_argument("--weight-decays", type=float, nargs="+", help="with --tune: tune the weight decay over these")
    ap.add_argument(
        "--tuned-weight-decay", action="store_true", help="each ε's lr and C and the weight decay tuned at it"
    )
    ap.add_argument("--epochs-grid", type=int, nargs="+", help="with --tune: tune the epochs over these")
    ap.add_argument("--tuned-epochs", action="store_true", help="each ε's lr and C and the epochs tuned at it")
    ap.add_argument("--augmentations", type=int, help="privacy.augmentations K of the DP modes run (default: RECIPES)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    set_threads(args.threads)
    global TUNED_AT_EACH_EPSILON, TUNED_WEIGHT_DECAY, TUNED_EPOCHS
    TUNED_AT_EACH_EPSILON = args.tuned_at_each_epsilon
    TUNED_WEIGHT_DECAY = args.tuned_weight_decay or bool(args.weight_decays)  # tuning wd runs at each ε's lr and C
    TUNED_EPOCHS = args.tuned_epochs
    if args.epochs_grid:  # tuning the epochs runs at each ε's lr and C, and the recipe's weight decay
        TUNED_AT_EACH_EPSILON = True
    for mode in MODES if args.augmentations else ():
        RECIPES[mode]["augmentations"] = args.augmentations  # part of each run's recipe, so of its name
    overrides = [f"finetune.threads={args.threads}", "batchnorm.strategy=average"]
    params = load_params(ROOT / "params.yaml", overrides + args.overrides)
    if args.tune:
        for eps in args.epsilons or [DEFAULT_TUNING_EPSILON]:
            tune(params, [m for m in args.modes if m != "none"], eps, args.weight_decays, args.epochs_grid)
        return 0
    epsilons = args.epsilons or DEFAULT_EPSILONS
    data = str(ROOT / params.demo.data)
    evalsets = scoring.EvalSets.load(data)
    started, runs, attacks = time.perf_counter(), [], []
    # privacy.* is each run's own (privacy_for), so the hospital's DP settings in params.yaml do not name a run
    base_settings = run_settings(params, data)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(m, s, e) for m in args.modes for e in (epsilons if m != "none" else [INF]) for s in args.seeds]
        for mode, seed, eps in tqdm(jobs, desc="privacy trade-off", unit="run"):
            settings = base_settings | {"recipe": recipe(mode, eps) if mode != "none" else None, "auc": AUC_OF}
            path = run_key("utility", mode, seed, eps, settings)
            if args.only_stored and not path.is_file():
                continue
            runs.append(cached(path, run_one, mode, seed, eps, params, data, Path(tmp), evalsets))
            tqdm.write(json.dumps({k: runs[-1][k] for k in ("mode", "seed", "target_epsilon", "merged", "seconds")}))
        if not args.no_attack:
            jobs = [
                (m, s, e)
                for m in args.modes
                for e in (args.attack_epsilons if m != "none" else [INF])
                for s in args.seeds
            ]
            for mode, seed, eps in tqdm(jobs, desc="attack", unit="run"):
                settings = base_settings | {
                    "recipe": recipe(mode, eps) if mode != "none" else None,
                    "attack": [args.attack_members, attack_epochs(mode, args), args.shadows],
                    "auc": AUC_OF,
                }
                path = run_key("attack", mode, seed, eps, settings)
                if args.only_stored and not path.is_file():
                    continue
                attacks.append(cached(path, run_attack, mode, seed, eps, params, data, Path(tmp), args))
                tqdm.write(
                    json.dumps({k: attacks[-1][k] for k in ("mode", "seed", "target_epsilon", "attack_auc", "seconds")})
                )
    seconds = time.perf_counter() - started
    rows = summarise(runs, attacks)
    command = "python benchmarks/privacy_tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    headline: dict[str, Any] = {"merged_auc": {}, "balanced_accuracy_at_op": {}, "attack_auc": {}}
    for r in rows:
        headline["merged_auc"].setdefault(r["mode"], {})[r["epsilon"]] = round(r["merged_test_auc"][0], 4)
        headline["balanced_accuracy_at_op"].setdefault(r["mode"], {})[r["epsilon"]] = round(
            r["merged_balanced_accuracy_at_op"][0], 4
        )
        if "attack_auc_lira" in r:
            headline["attack_auc"].setdefault(r["mode"], {})[r["epsilon"]] = round(r["attack_auc_lira"][0], 4)
    headline["seeds"] = args.seeds
    doc = {"command": command.strip(), "seconds": round(seconds, 1), "wall_seconds_of_runs": round(sum(r["seconds"] for r in runs + attacks), 1),
           "recipes": {m: recipe(m) for m in MODES},
           "recipes_by_epsilon": {m: {eps_name(e): recipe(m, e) for e in epsilons} for m in MODES},
           "params": params.model_dump(mode="json"),
           "headline": headline, "summary": rows, "runs": runs, "attacks": attacks}  # fmt: skip
    (out / "privacy_tradeoff.json").write_text(json.dumps(doc, indent=2))
    table = markdown(rows, command.strip())
    (out / "privacy_tradeoff.md").write_text(table + "\n\n![privacy trade-off](privacy_tradeoff.png)\n")
    plot(rows, out / "privacy_tradeoff.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
