"""Two runs of ``privacy_tradeoff.py`` that differ in one setting, paired by (mode, ε, seed).

Each seed changes the hospital split and the training, and moves the merged test AUC by more than most recipe
changes do; so a change is judged by its paired differences (B − A on the same seed and ε), not by two means.
Reads the ``privacy_tradeoff.json`` of each ``--out`` folder (their ``runs``: nothing is trained here) and writes
``<out>.json`` (a ``headline`` per mode and ε: both means, the paired differences, their mean and a 95 % t
interval) and ``<out>.md``.

    python benchmarks/privacy_pairs.py benchmarks/results/privacy_head_k1 benchmarks/results/privacy_head_k8 \\
        --names "K = 1" "K = 8" --out benchmarks/results/privacy_multiplicity
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import ci95


def merged(folder: Path) -> dict[tuple[str, str, int], dict]:
    """(mode, ε as written, seed) → the run's merged-model record, from a privacy_tradeoff.py output folder."""
    doc = json.loads((folder / "privacy_tradeoff.json").read_text())
    out = {}
    for r in doc["runs"]:
        eps = "inf" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        out[(r["mode"], eps, r["seed"])] = r["merged"]
    return out


def pair(a: dict, b: dict) -> dict[str, dict[str, dict]]:
    """Per mode and ε: the seeds both ran, their means and paired differences (test AUC and balanced accuracy)."""
    out: dict[str, dict[str, dict]] = {}
    for mode, eps, seed in sorted(set(a) & set(b)):
        out.setdefault(mode, {}).setdefault(eps, {"seeds": []})["seeds"].append(seed)
    for mode, by_eps in out.items():
        for eps, entry in by_eps.items():
            runs = [(a[(mode, eps, s)], b[(mode, eps, s)]) for s in entry["seeds"]]
            for metric in ("test_auc", "test_balanced_accuracy_at_op"):
                diffs = [y[metric] - x[metric] for x, y in runs]
                entry[metric] = {
                    "a": statistics.fmean(x[metric] for x, _ in runs),
                    "b": statistics.fmean(y[metric] for _, y in runs),
                    "paired_differences": diffs,
                    "mean_difference": statistics.fmean(diffs),
                    "ci95": ci95(diffs),
                }
    return out


def table(pairs: dict, names: tuple[str, str]) -> str:
    a, b = names
    lines = [
        f"| trains | target ε | merged test AUC, {a} | {b} | paired differences ({b} − {a}) | mean (95 % CI)"
        f" | bal. acc. at op, {a} | {b} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, by_eps in pairs.items():
        for eps in sorted(by_eps, key=float):
            auc, acc = by_eps[eps]["test_auc"], by_eps[eps]["test_balanced_accuracy_at_op"]
            diffs = ", ".join(f"{d:+.3f}" for d in auc["paired_differences"])
            lo, hi = auc["ci95"]
            lines.append(
                f"| {mode} | {'∞' if eps == 'inf' else eps} | {auc['a']:.3f} | {auc['b']:.3f} | {diffs}"
                f" | {auc['mean_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {acc['a']:.3f} | {acc['b']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="privacy_tradeoff.py's --out folder of the reference")
    ap.add_argument("b", type=Path, help="… of the change")
    ap.add_argument("--names", nargs=2, default=["A", "B"])
    ap.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    pairs = pair(merged(args.a), merged(args.b))
    if not pairs:
        raise SystemExit(f"no (mode, ε, seed) was run in both {args.a} and {args.b}")
    names = (args.names[0], args.names[1])
    doc = {"a": {"name": names[0], "folder": str(args.a)}, "b": {"name": names[1], "folder": str(args.b)}}
    doc["headline"] = pairs
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    command = f"`python benchmarks/privacy_pairs.py {args.a} {args.b} --names {' '.join(repr(n) for n in names)} --out {args.out}`"
    md = table(pairs, names) + f"\n\nPaired by seed (each changes the split and the training). Made by {command}.\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
