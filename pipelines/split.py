"""DVC stage ``split``: simulate hospitals from ``demo.data`` into ``work/hospitals/<name>/``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvec.config import Params, load_params
from medvec.data.images import DataSpec
from medvec.data.split import split_from_config


def split(params: Params, source: str, out: str | Path) -> dict:
    """Write one folder per hospital (``split.names``) from the source's training images."""
    return split_from_config(source, out, params.split, DataSpec.of(params))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="work/hospitals")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    summary = split(params, params.demo.data, args.out)
    counts = {h: {"n_train": m["n_train"], "labels": m["train_label_counts"]} for h, m in summary["hospitals"].items()}
    Path("work/split.json").write_text(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
