"""The ``medvec`` command.

Every command shares ``--params FILE`` and ``-S key=value`` (any ``params.yaml``
key, dotted).  ``medvec demo`` runs the Prefect demo flow; this is the only place
where the core reaches the front doors, and it imports them lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _shared(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; missing: defaults)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a params.yaml key, e.g. -S merge.method=ties")
    return p


def _offline_prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def cmd_demo(args: argparse.Namespace) -> int:
    _offline_prefect_env()
    from flows.demo import demo  # lazy: the front door, not a dependency of the core

    overrides = list(args.overrides)
    result = demo(
        data=args.data,
        out=args.out,
        hospitals=args.hospitals,
        seed=args.seed,
        overrides=overrides,
        params_file=args.params,
        progress=not args.no_progress,
    )
    print(f"results: {result['results']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from medvec.models import BaseMismatchError, create_base, load_base
    from medvec.vectors import InvalidVectorError, load_vector

    try:
        first = load_vector(args.file)  # integrity, format, values
        if args.base and Path(args.base).is_file():
            base = load_base(args.base)
        else:
            name = args.base or first.meta.base_model
            base = create_base(name, first.meta.num_classes, pretrained=True, image_size=None, seed=0)
        vf = load_vector(args.file, base=base.model.state_dict(), base_sha256=base.sha256)
    except InvalidVectorError as exc:
        print(f"rejected: {exc}", file=sys.stderr)
        return 2
    except BaseMismatchError as exc:
        print(f"rejected: base: {exc}", file=sys.stderr)
        return 2
    print("ok")
    print(json.dumps({"content_sha256": vf.content_sha256, **vf.meta.model_dump()}, indent=2))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from medvec.config import load_params
    from medvec.data import write_hospital_shards

    p = load_params(args.params, args.overrides).split
    summary = write_hospital_shards(args.data, args.out, p.hospitals, p.scheme, p.alpha, p.seed, p.local_val_fraction, p.min_samples)
    for name, meta in summary["hospitals"].items():
        print(f"{name}: n_train={meta['n_train']} labels={meta['train_label_counts']} -> {Path(args.out) / name}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from medvec.merge import get_method, method_names

    for name in method_names():
        m = get_method(name)
        print(f"{name:16s} {m.formula}   [{m.paper}]  λ grid {list(m.lambdas)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvec", description="Multi-hospital data-vector merging (arXiv 2408.13038).")
    sub = parser.add_subparsers(dest="command", required=True)

    d = _shared(sub.add_parser("demo", help="run the multi-hospital comparison (embedded Prefect, no server)"))
    d.add_argument("--data", default=None, help=".npz or image-folder root (default: params demo.data)")
    d.add_argument("--hospitals", type=int, default=None, help="number of simulated hospitals")
    d.add_argument("--out", default=None, help="output folder (default: params demo.out)")
    d.add_argument("--seed", type=int, default=None, help="training seed (fine-tune and DARE)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=cmd_demo)

    s = _shared(sub.add_parser("split", help="simulate hospitals: one folder per hospital"))
    s.add_argument("data")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_split)

    v = sub.add_parser("vectors", help="inspect data vectors")
    vsub = v.add_subparsers(dest="vectors_command", required=True)
    ver = vsub.add_parser("verify", help="validate a vector file; exit 2 on rejection")
    ver.add_argument("file")
    ver.add_argument("--base", default=None, help="base model file (.safetensors) or model name (default: the name in the vector)")
    ver.set_defaults(func=cmd_verify)

    m = sub.add_parser("methods", help="list merge methods with their formulas")
    m.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from medvec.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
