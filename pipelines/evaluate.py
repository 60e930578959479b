"""DVC stage ``evaluate``: score the merged model on the coordinator's test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvec.config import Params, load_params
from medvec.data.images import DataSpec
from medvec.data.sources import load_split
from medvec.evaluate import confusion_figure, evaluate_model
from medvec.record import MergeRecord
from medvec.store import open_store


def test_split(params: Params):
    return load_split(params.coordinator.held_out(), "test", DataSpec.of(params))


def evaluate(params: Params, record_path: str | Path) -> dict:
    """The merge the ``merge`` stage recorded (its stored weights, hash-checked) on the test split."""
    record = MergeRecord.model_validate_json(Path(record_path).read_text())
    merged = open_store(record.store_url).merged_model(record)
    return evaluate_model(merged.model, test_split(params), merged.spec, params.evaluate.batch_size)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    m = evaluate(params, "work/merge.json")
    keys = ("auc", "balanced_accuracy", "accuracy", "recall", "auc_by_label")
    Path("work/metrics.json").write_text(json.dumps({k: m[k] for k in keys if k in m}, indent=2))
    Path("work/plots").mkdir(parents=True, exist_ok=True)
    confusion_figure(m, test_split(params).classes, "work/plots/confusion.png", "merged model: test split")


if __name__ == "__main__":
    main()
