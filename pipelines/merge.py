"""DVC stage ``merge``: merge the hospitals' vectors (``merge``, ``batchnorm``), λ chosen on validation (the
simulated hospitals' local splits answering, with ``evaluate.where: hospitals``; else ``coordinator.eval_data``),
each vector's contribution scored (``contribution``, ``intake.harmful``), then finished as the merge flow
finishes its merges (:func:`medvec.tracking.finish.finish_merge`) into the stage's own store ``work/store``.

The pipeline is an experiment on simulated hospitals, versioned by DVC itself: its merges go to no MLflow
registry and no DVC registry of the network (the stage finishes with ``registry.enabled`` off and no
``registry.dvc_repo``), so a ``dvc exp run`` can never become the network's champion.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvec.config import Params, load_params
from medvec.coordinator.contribution import scored_merge_once
from medvec.coordinator.engine import MergeOutcome
from medvec.coordinator.scoring import EvalSets
from medvec.data.images import DataSpec
from medvec.data.sources import load_split
from medvec.demo.answering import simulated_judge
from medvec.hospital.local import LocalData
from medvec.models import Base, load_base
from medvec.record import MergeRecord
from medvec.runtime import set_threads
from medvec.store import LocalStore
from medvec.timing import Started
from medvec.tracking.finish import finish_merge
from medvec.vectors.checks import load_vector

STORE = "work/store"  # the stage's own store of the merge: its weights, moment sums and record


def merge(params: Params, base_path: str | Path, vector_paths: list[Path]) -> tuple[Base, list, EvalSets, MergeOutcome]:
    """The same core call as the ``merge-and-evaluate`` flow (validation only; test is the next stage).

    Returns the vectors merged: a vector the harmful rule excluded stays in ``work/vectors`` and is named,
    with its reason, in the record's contribution scores."""
    set_threads(params.finetune.threads)
    base = load_base(base_path)
    vectors = [load_vector(p, base=base.model.state_dict(), base_sha256=base.sha256) for p in vector_paths]
    evalsets = EvalSets.load(params.coordinator.held_out(), with_test=False, spec=DataSpec.of(params))
    if params.evaluate.where == "hospitals":  # the simulated hospitals answer from their local validation splits
        local = {h: LocalData.of(f"work/hospitals/{h}", params) for h in params.split.hospital_names()}
        evalsets.judge = simulated_judge(base, local, params)
    calibration = (
        load_split(params.coordinator.calibration_data, "train") if params.coordinator.calibration_data else None
    )
    guarded = scored_merge_once(base, vectors, params, evalsets, calibration)
    return base, guarded.vectors, evalsets, guarded.outcome


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    paths = [Path(f"work/vectors/{h}.safetensors") for h in params.split.hospital_names()]
    started = Started.now()
    base, vectors, evalsets, outcome = merge(params, "work/base.safetensors", paths)
    store = LocalStore(STORE)
    unregistered = params.registry.model_copy(update={"enabled": False, "dvc_repo": None})
    params = params.model_copy(update={"registry": unregistered})
    record = MergeRecord.build(outcome, vectors, base.sha256, params, evalsets.ref(), store.url, started)
    record = finish_merge(store, record, outcome, base, vectors, evalsets)  # as the merge flow finishes its merges
    Path("work/merge.json").write_text(json.dumps(record.to_json(), indent=2))
    Path("work/plots").mkdir(parents=True, exist_ok=True)
    curve = [{"lambda": lam, "val_auc": auc} for lam, auc in outcome.curve]
    Path("work/plots/lambda.json").write_text(json.dumps(curve, indent=2))


if __name__ == "__main__":
    main()
