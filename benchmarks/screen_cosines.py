"""What the outlier screen's direction test sees: leave-one-out cosines of honest and sign-flipped vectors, from
θ_pre and from a merged champion.

For each seed (which changes the split and the training), PneumoniaMNIST is split into 4 Dirichlet-0.5 hospitals as
``make robustness`` splits it. Each hospital fine-tunes θ_pre (``finetune.epochs``), and then, once more, the one-shot
merge of those vectors (``merge.method``, λ on validation, as a champion is made) for one epoch, as an asynchronous
refinement does. For both starts, :func:`medvec.coordinator.defence.vector_stats` gives every vector's cosine with
the mean of the others, over all tensors, the head's only and the rest ("body"), with no attack and with the last
hospital's vector sign-flipped (−τ); :func:`medvec.coordinator.defence.screen` says which vectors it flags at its
defaults.

    python benchmarks/screen_cosines.py -S model.image_size=32    # ~3 min on 2 cores
    python benchmarks/screen_cosines.py                           # 64 px, ~6 min

Writes ``benchmarks/results/screen_cosines.{json,md}`` (``screen_cosines-<size>px`` for a size of its own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, table, write
from robustness import attacked

from medvec.config import Params, load_params
from medvec.coordinator import engine, scoring
from medvec.coordinator.defence import screen, vector_stats
from medvec.data.split import write_hospital_shards
from medvec.hospital.finetune import finetune_vector
from medvec.hospital.local import LocalData
from medvec.models import base_from_config, head_keys
from medvec.runtime import set_threads
from medvec.vectors.vector import DataVector

DATA = ROOT / "data" / "pneumoniamnist.npz"


class Part:
    """A vector read through only some of its tensors (what :func:`vector_stats` reads: keys and tensors)."""

    def __init__(self, vector: DataVector, keys: list[str]):
        self.vector, self._keys = vector, keys

    def keys(self) -> list[str]:
        return self._keys

    def tensor(self, key: str):
        return self.vector.deltas[key]


def cosines(vectors: list[DataVector]) -> dict[str, list[float]]:
    """Each vector's leave-one-out cosine over all tensors, the head's and the rest's."""
    keys = sorted(vectors[0].deltas)
    head = set(head_keys(vectors[0].deltas))
    parts = {"all": keys, "head": [k for k in keys if k in head], "body": [k for k in keys if k not in head]}
    return {name: [round(c, 4) for c in vector_stats([Part(v, ks) for v in vectors])[1]] for name, ks in parts.items()}


def rows_of(seed: int, start: str, vectors: list[DataVector], counts: list[list[int]]) -> list[dict]:
    """One row a (start, attack): the cosines and what the screen flags."""
    out = []
    for attack in ("none", "sign_flip"):  # make robustness's sign flip: the last vector sent as −τ
        vs = attacked(vectors, attack, {})
        flagged = {v.meta.hospital for v, _ in screen(vs, "quarantine").flagged}
        out.append({"seed": seed, "start": start, "attack": attack, "counts": counts, **cosines(vs),
                    "last": vectors[-1].meta.hospital, "flagged": sorted(flagged)})  # fmt: skip
        print(out[-1], flush=True)
    return out


def run_seed(params: Params, seed: int, work: Path) -> list[dict]:
    """The seed's hospitals fine-tune from θ_pre, then from the one-shot merge; the rows of both starts."""
    p = params.model_copy(update={"finetune": params.finetune.model_copy(update={"seed": seed})})
    folder = work / f"seed{seed}"
    split = write_hospital_shards(DATA, folder, 4, "dirichlet", p.split.alpha, seed, 0.1, 16)
    base = base_from_config(p.model, 2)
    local = {h: LocalData.load(folder / h) for h in split["hospitals"]}
    counts = [np.bincount(np.asarray(d.train.labels).ravel(), minlength=2).tolist() for d in local.values()]
    first = [finetune_vector(base, h, d, p.finetune, progress=False)[0] for h, d in local.items()]
    merged = engine.merge_once(base, first, p, scoring.EvalSets.load(DATA))
    champion = base.with_model(merged.model, "one-shot")
    again = p.finetune.model_copy(update={"epochs": 1})
    second = [finetune_vector(base, h, d, again, progress=False, start=champion)[0] for h, d in local.items()]
    return rows_of(seed, "θ_pre", first, counts) + rows_of(seed, "one-shot merge", second, counts)


def markdown(rows: list[dict], command: str) -> str:
    """The table: per (start, attack), the honest hospitals' cosines and the last one's, and the screen's flags."""
    lines = []
    for r in rows:
        honest = r["all"] if r["attack"] == "none" else r["all"][:-1]
        last = r["all"][-1]
        lines.append({
            "seed": r["seed"], "start": r["start"], "attack": r["attack"],
            "honest cosines (all)": ", ".join(f"{c:.3f}" for c in honest),
            "last hospital's": f"{last:.3f}", "head's cosines": ", ".join(f"{c:.2f}" for c in r["head"]),
            "flagged": ", ".join(r["flagged"]) or "—",
        })  # fmt: skip
    cols = ["seed", "start", "attack", "honest cosines (all)", "last hospital's", "head's cosines", "flagged"]
    return (
        table(lines, cols)
        + "\n\nLeave-one-out cosines with the others' mean (medvec.coordinator.defence.vector_stats); the last"
        + " hospital's vector is −τ under sign_flip; flagged: the screen at its defaults (quarantine, 5 MAD, cosine"
        + f" below 0). Label counts (normal, pneumonia) of each hospital are in the JSON. Made by `{command}`."
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    params = load_params(ROOT / "params.yaml", ["batchnorm.strategy=average", *args.overrides])
    set_threads(params.finetune.threads)
    started = time.perf_counter()
    work = ROOT / ".medvec" / "screen_cosines" / f"{params.model.image_size}px"
    rows = [r for seed in args.seeds for r in run_seed(params, seed, work)]

    def spread(start: str, attack: str, honest: bool) -> list[float]:
        got = [r["all"] for r in rows if r["start"] == start and r["attack"] == attack]
        return [c for cs in got for c in (cs if attack == "none" else (cs[:-1] if honest else cs[-1:]))]

    headline = {
        start: {
            "honest_min": min(spread(start, "none", True)),
            "honest_median": statistics.median(spread(start, "none", True)),
            "sign_flipped_max": max(spread(start, "sign_flip", False)),
            "honest_flagged": sum(len(r["flagged"]) for r in rows if r["start"] == start and r["attack"] == "none"),
            "attacker_flagged": sum(
                r["last"] in r["flagged"] for r in rows if r["start"] == start and r["attack"] == "sign_flip"
            ),
            "seeds": len(args.seeds),
        }
        for start in ("θ_pre", "one-shot merge")
    }
    command = "python benchmarks/screen_cosines.py " + " ".join(sys.argv[1:] if argv is None else argv)
    size = params.model.image_size
    name = "screen_cosines" if size == 32 else f"screen_cosines-{size}px"
    payload = {"command": command.strip(), "seconds": round(time.perf_counter() - started, 1),
               "image_size": size, "headline": headline, "rows": rows}  # fmt: skip
    write(name, payload, markdown(rows, command.strip()), RESULTS)


if __name__ == "__main__":
    main()
