"""How much the gate's standard error costs small sites: every asynchronous step of the stored class-balanced runs
(``benchmarks/async_balanced.py``) rescored against its champion with an unpaired and a paired standard error.

The product's gate (:func:`medvec.coordinator.pooled.gate`) promotes a step when its pooled validation AUC beats
the champion's by z = 1 Hanley–McNeil standard errors of the *champion's* AUC. A step and its champion are scored
on the same images, so the standard error of their *difference* is smaller. For each stored step this reads the
candidate's weights and its champion's from the run's store, scores both on the hospitals' pooled local validation
images (what the gate read; raw scores here, the gate reads their histograms) and on the folder's test split, and
asks which steps each rule would promote and whether those steps raised test AUC. The paired SE is
:func:`medvec.coordinator.contribution.paired_se` (a paired bootstrap over the same images): what the hospitals
could each compute on their own images and answer as an aggregate, which they do not today.

Retrospective: every step is judged against the champion it was recorded against; a run gated by the paired rule
would have taken other steps. No model is trained.

    python benchmarks/async_balanced.py --seeds 0 1 2 3 4      # the runs this reads (about 4 min each)
    python benchmarks/gate_paired_se.py                        # about 6 min

Writes ``benchmarks/results/gate_paired_se.json`` (``headline``) and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from common import ROOT, table, write
from safetensors.torch import load_file

from medvec.coordinator.contribution import paired_se
from medvec.coordinator.scoring import EvalSets
from medvec.data.images import ImageSet
from medvec.evaluate import evaluate_model, metric_value
from medvec.histograms import hanley_mcneil_se
from medvec.hospital.local import LocalData
from medvec.runtime import set_threads
from medvec.store import LocalStore

RESAMPLES = 2000


def pooled(sets: list[ImageSet], model: torch.nn.Module, spec) -> dict:
    """The model's evaluation on the hospitals' validation images, pooled (labels, proba, log_odds, auc)."""
    parts = [evaluate_model(model, s, spec, 64) for s in sets]
    out: dict = {k: np.concatenate([p[k] for p in parts]) for k in ("labels", "proba", "log_odds")}
    out["auc"] = metric_value(out["labels"], out["proba"], "auc", out["log_odds"])  # ranked by log-odds, as the gate
    return out


def steps(run: Path, test: ImageSet) -> list[dict]:
    """Every asynchronous step of one stored run: Δ validation AUC, both standard errors, Δ test AUC."""
    store = LocalStore(run / "async")
    root = store.current_base()
    base = store.get_base(root)
    local = [LocalData.load(h).val for h in sorted(p for p in (run / "hospitals").iterdir() if p.is_dir())]
    vals = [s for s in local if s is not None]
    champions: dict[int, tuple[dict, float]] = {}  # per version: its pooled validation and its test AUC, once

    def scored(model: torch.nn.Module) -> tuple[dict, float]:
        return pooled(vals, model, base.spec), evaluate_model(model, test, base.spec, 64)["auc"]

    rows = []
    for rec in store.merges(root):
        if rec.mode != "async":
            continue
        parent = rec.parent_version
        if parent not in champions:
            champions[parent] = scored(base.model if parent == 0 else store.get_start(root, parent).model)
        candidate = base.fresh()
        candidate.load_state_dict(load_file(str(store.local_file(store.model_key(root, rec.merge_id)))))
        (new, t_new), (old, t_old) = scored(candidate), champions[parent]
        y = np.asarray(old["labels"]).ravel()
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        rows.append(
            {
                "run": run.name,
                "parent": parent,
                "promoted": rec.version is not None,
                "val_images": len(y),
                "d_val": new["auc"] - old["auc"],
                "unpaired_se": hanley_mcneil_se(old["auc"], n_pos, n_neg),
                "paired_se": paired_se(new, old, "auc", RESAMPLES, 0),
                "d_test": t_new - t_old,
            }
        )
    return rows


def rule(rows: list[dict], se: str) -> dict:
    """The steps a 1-SE gate with this standard error promotes, and how many of them raised test AUC."""
    up = [r for r in rows if r[se] is not None and r["d_val"] > r[se]]
    return {"promotes": len(up), "raise_test": sum(r["d_test"] > 0 for r in up), "of": len(rows)}


def summary(rows: list[dict]) -> dict:
    out: dict = {}
    for pr in sorted({r["run"].split("-")[1] for r in rows}):
        got = [r for r in rows if r["run"].split("-")[1] == pr]
        only = [r for r in got if r["paired_se"] is not None and r["unpaired_se"] >= r["d_val"] > r["paired_se"]]
        later = [r["paired_se"] / r["unpaired_se"] for r in got if r["parent"] > 0 and r["paired_se"]]
        out[pr] = {
            "unpaired": rule(got, "unpaired_se"),
            "paired": rule(got, "paired_se"),
            "only_paired": {
                "steps": len(only),
                "raise_test": sum(r["d_test"] > 0 for r in only),
                "mean_d_test": statistics.fmean(r["d_test"] for r in only) if only else None,
            },
            "median_paired_over_unpaired_se": statistics.median(later) if later else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / ".medvec" / "async_balanced"))
    work = Path(ap.parse_args().work)
    set_threads(2)
    runs = sorted(p for p in work.glob("out-*-*") if p.is_dir() and (p / "async").is_dir())
    if not runs:
        raise SystemExit(f"no stored runs in {work}: run python benchmarks/async_balanced.py first")
    test = EvalSets.load(work / "data").test
    assert test is not None, "the folder has a test split"
    rows = [r for run in runs for r in steps(run, test)]
    head = summary(rows)
    lines = [
        "# The gate's standard error, unpaired against paired (`python benchmarks/gate_paired_se.py`)",
        "",
        "Every async step of the stored class-balanced runs, against the champion it was recorded against: a 1-SE",
        "gate with the champion's Hanley–McNeil SE (the product's) or the paired bootstrap SE of the difference.",
        "Retrospective: a run gated by the paired rule would have taken other steps.",
        "",
        "| step rule | steps | unpaired gate promotes (raise test) | paired gate promotes (raise test) |"
        " only the paired gate: steps, raise test, mean Δ test | median paired / unpaired SE (after v0) |",
        "|---|---|---|---|---|---|",
    ]
    for pr, s in head.items():
        u, p, o = s["unpaired"], s["paired"], s["only_paired"]
        mean = f"{o['mean_d_test']:+.3f}" if o["mean_d_test"] is not None else "—"
        ratio = s["median_paired_over_unpaired_se"]
        lines.append(
            f"| {pr} | {u['of']} | {u['promotes']} ({u['raise_test']}) | {p['promotes']} ({p['raise_test']}) | "
            f"{o['steps']}, {o['raise_test']}, {mean} | {ratio:.2f} |"
        )
    lines += ["", table(rows, list(rows[0]))]
    write("gate_paired_se", {"headline": head, "rows": rows, "resamples": RESAMPLES}, "\n".join(lines))


if __name__ == "__main__":
    main()
