"""Compare two ``results.json`` files of ``medvec demo`` row by row, value for value.

    python scripts/same_results.py BEFORE/results.json AFTER/results.json [--section contribution]

Rows are matched by name; every value in them must be equal (floats exactly).  ``--section`` also compares
top-level entries such as ``contribution``, apart from what changes from run to run by design: vector ids
(they carry the time they were made) and wall-clock seconds (``--ignore`` names such keys).  Prints each
difference and exits 1 when there is one: the check that a refactoring left the demo's results as they were
(same configuration and seed, same machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VOLATILE = ("vector_id", "seconds")  # a vector's id carries its creation time; seconds are wall time


def differences(a: object, b: object, where: str = "", ignore: tuple[str, ...] = ()) -> list[str]:
    """Every place where ``a`` and ``b`` differ, as ``path: a != b`` (keys in ``ignore`` skipped)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - set(ignore)
        out = [
            f"{where}.{k}: only in {'the first' if k in a else 'the second'}" for k in sorted(keys - (set(a) & set(b)))
        ]
        for k in sorted(keys & set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}.{k}", ignore)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]", ignore)]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(before: dict, after: dict, sections: list[str], ignore: tuple[str, ...] = VOLATILE) -> list[str]:
    """The rows' differences (every value), then each section's (``ignore``: keys left out of sections)."""
    rows_a = {r["name"]: r for r in before["results"]}
    rows_b = {r["name"]: r for r in after["results"]}
    out = differences(rows_a, rows_b, "results")
    if [r["name"] for r in before["results"]] != [r["name"] for r in after["results"]]:
        out.append("results: the rows come in another order")
    for section in sections:
        out += differences(before.get(section), after.get(section), section, ignore)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--section", action="append", default=[], help="a top-level entry to compare too")
    ap.add_argument("--ignore", action="append", default=list(VOLATILE), help="a key left out of the sections")
    args = ap.parse_args(argv)
    before, after = (json.loads(Path(p).read_text()) for p in (args.before, args.after))
    found = compare(before, after, args.section, tuple(args.ignore))
    for line in found:
        print(line)
    rows = len(before["results"])
    print(f"{rows} rows compared: {'identical' if not found else f'{len(found)} difference(s)'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
