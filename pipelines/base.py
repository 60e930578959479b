"""DVC stage ``base``: build θ_pre from the ``model`` section and write ``work/base.safetensors``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvec.config import Params, load_params
from medvec.data.images import DataSpec
from medvec.data.sources import load_split
from medvec.models import Base, base_from_config, save_base


def build_base(params: Params) -> Base:
    """θ_pre with a head sized to the data's classes (seeded by ``model.seed``)."""
    classes = load_split(params.coordinator.held_out(), "val", DataSpec.of(params)).classes
    return base_from_config(params.model, len(classes), classes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="work/base.safetensors")
    args = ap.parse_args(argv)
    base = build_base(load_params(args.params))
    save_base(base, args.out)
    Path("work/base.json").write_text(json.dumps({"sha256": base.sha256, "spec": base.spec.to_dict()}, indent=2))


if __name__ == "__main__":
    main()
