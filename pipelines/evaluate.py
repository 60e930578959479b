"""DVC stage ``evaluate``: score the merged model on the coordinator's test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvec.config import Params, load_params
from medvec.data import load_split
from medvec.evaluate import confusion_plot, evaluate_model
from medvec.models import load_base


def evaluate(params: Params, merged_path: str | Path) -> dict:
    merged = load_base(merged_path)
    return evaluate_model(
        merged.model, load_split(params.coordinator.eval_data, "test"), merged.spec, params.evaluate.batch_size
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    m = evaluate(params, "work/merged.safetensors")
    Path("work/metrics.json").write_text(
        json.dumps({k: m[k] for k in ("auc", "balanced_accuracy", "accuracy", "recall")}, indent=2)
    )
    Path("work/plots").mkdir(parents=True, exist_ok=True)
    classes = load_split(params.coordinator.eval_data, "test").classes
    confusion_plot(
        m["confusion"],
        classes,
        "work/plots/confusion.png",
        f"merged model: test split (n={sum(map(sum, m['confusion']))})",
    )


if __name__ == "__main__":
    main()
