"""DVC stage ``merge``: merge the hospitals' vectors (``merge``, ``batchnorm``), λ chosen on validation,
each vector's contribution scored (``contribution``, ``intake.harmful``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medvec.config import Params, load_params
from medvec.contribution import scored_merge_once
from medvec.coordinator import EvalSets, MergeOutcome
from medvec.data import DataSpec, load_split
from medvec.models import Base, load_base, save_base
from medvec.record import MergeRecord
from medvec.train import set_threads
from medvec.vectors import load_vector, utcnow


def merge(params: Params, base_path: str | Path, vector_paths: list[Path]) -> tuple[Base, list, EvalSets, MergeOutcome]:
    """The same core call as the ``merge-and-evaluate`` flow (validation only; test is the next stage).

    Returns the vectors merged: a vector the harmful rule excluded stays in ``work/vectors`` and is named,
    with its reason, in the record's contribution scores."""
    set_threads(params.finetune.threads)
    base = load_base(base_path)
    vectors = [load_vector(p, base=base.model.state_dict(), base_sha256=base.sha256) for p in vector_paths]
    evalsets = EvalSets.load(params.coordinator.eval_data, with_test=False, spec=DataSpec.of(params))
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
    started_at, clock = utcnow(), time.perf_counter()
    base, vectors, evalsets, outcome = merge(params, "work/base.safetensors", paths)
    record = MergeRecord.build(outcome, vectors, base.sha256, params, evalsets.ref(), "work", started_at, clock)
    save_base(base.with_model(outcome.model, record.merged_sha256), "work/merged.safetensors")
    Path("work/merge.json").write_text(json.dumps(record.to_json(), indent=2))
    Path("work/plots").mkdir(parents=True, exist_ok=True)
    curve = [{"lambda": lam, "val_auc": auc} for lam, auc in outcome.curve]
    Path("work/plots/lambda.json").write_text(json.dumps(curve, indent=2))


if __name__ == "__main__":
    main()
