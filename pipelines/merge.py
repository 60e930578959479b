"""DVC stage ``merge``: merge the hospitals' vectors (``merge``, ``batchnorm``), λ chosen on validation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvec.config import Params, load_params
from medvec.coordinator import EvalSets, MergeOutcome, merge_once
from medvec.data import load_split
from medvec.models import Base, load_base, save_base, state_sha256
from medvec.train import set_threads
from medvec.vectors import load_vector


def merge(params: Params, base_path: str | Path, vector_paths: list[Path]) -> tuple[Base, list, MergeOutcome]:
    """The same core call as the ``merge-and-evaluate`` flow (validation only; test is the next stage)."""
    set_threads(params.finetune.threads)
    base = load_base(base_path)
    vectors = [load_vector(p, base=base.model.state_dict(), base_sha256=base.sha256) for p in vector_paths]
    evalsets = EvalSets(load_split(params.coordinator.eval_data, "val"), None)
    calibration = load_split(params.coordinator.calibration_data, "train") if params.coordinator.calibration_data else None
    return base, vectors, merge_once(base, vectors, params, evalsets, calibration)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    paths = [Path(f"work/vectors/{h}.safetensors") for h in params.split.hospital_names()]
    base, vectors, outcome = merge(params, "work/base.safetensors", paths)
    merged = Base(outcome.model, base.spec, base.num_classes, state_sha256(outcome.model.state_dict()))
    save_base(merged, "work/merged.safetensors")
    record = {
        "method": outcome.method,
        "lambda": outcome.lam,
        "bn_source": outcome.bn,
        "merged_sha256": merged.sha256,
        "base_sha256": base.sha256,
        "inputs": [{"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "content_sha256": v.content_sha256} for v in vectors],
        "val": {k: v for k, v in outcome.val.items() if isinstance(v, float)},
    }
    Path("work/merge.json").write_text(json.dumps(record, indent=2))
    Path("work/plots").mkdir(parents=True, exist_ok=True)
    Path("work/plots/lambda.json").write_text(json.dumps([{"lambda": l, "val_auc": a} for l, a in outcome.curve], indent=2))


if __name__ == "__main__":
    main()
