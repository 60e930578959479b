"""CSV label manifests: hospital data as a table of image paths and class names.

Columns (extra ones are ignored):

* ``path``: the image, relative to the manifest's folder (or absolute); PNG, JPEG or DICOM, told apart by content;
* ``label``: a class name; for a multi-label task, names joined by ``|`` (empty: no finding);
* ``split`` (optional): ``train``, ``val`` or ``test``.  Without it every row is ``train``, and a hospital's
  local validation split is drawn by :func:`medvec.data.split.draw_local_val`;
* ``patient`` (optional): who the image is of. Every split medvec draws keeps a patient's images on one side;
  without the column (or with an empty cell) a DICOM file's PatientID says, and otherwise each image is its own
  patient. Patient identifiers stay at the hospital: nothing logs or publishes them.

Class names map to indices through ``model.classes`` when it is set, else through the sorted distinct names of the
whole manifest; vectors record the list's hash and intake refuses a different one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvec.data.images import SPLITS, DataError, DataSpec, ImageSet, Listing

REQUIRED = ("path", "label")


@dataclass(frozen=True)
class Row:
    """One manifest row: the image file, its label names and its split."""

    line: int
    path: Path
    names: tuple[str, ...]
    split: str
    patient: str = ""


def read_manifest(path: str | Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every row, column names lower-cased and cells stripped; DataError naming the file
    when it cannot be read or a required column is missing.  Line numbers are the file's own (quoted cells may
    span lines)."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = [str(c).strip().lower() for c in reader.fieldnames or []]
            rows = [(reader.line_num, _clean(rec, columns)) for rec in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({type(exc).__name__})") from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DataError(f"{path}: manifest has no {', '.join(missing)} column (has {', '.join(columns) or 'none'})")
    if not rows:
        raise DataError(f"{path}: manifest lists no images")
    return rows


def _clean(rec: dict, columns: list[str]) -> dict[str, str]:
    values = [v for k, v in rec.items() if k is not None]  # extra cells beyond the header are ignored
    return {c: (v or "").strip() for c, v in zip(columns, values)} | {c: "" for c in columns[len(values) :]}


def _names(label: str, task: str, where: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in label.split("|") if n.strip())
    if task == "multiclass" and len(names) != 1:
        what = "no label" if not names else f"{len(names)} labels"
        raise DataError(f"{where}: {what}; a multiclass task needs exactly one class name per image")
    return names


def _split(rec: dict[str, str], where: str) -> str:
    """The row's split: ``train`` without a split column; an empty or unknown cell is an error."""
    if "split" not in rec:
        return "train"
    split = rec["split"].lower()
    if split not in SPLITS:
        raise DataError(f"{where}: split {'(empty)' if not split else repr(split)} is not one of {', '.join(SPLITS)}")
    return split


def manifest_rows(path: str | Path, task: str = "multiclass") -> list[Row]:
    """Every row of the manifest, validated: a known split, a path, the right number of label names."""
    path = Path(path)
    rows = []
    for line, rec in read_manifest(path):
        where = f"{path} line {line}"
        if not rec["path"]:
            raise DataError(f"{where}: empty path")
        file = Path(rec["path"])
        rows.append(
            Row(
                line,
                file if file.is_absolute() else path.parent / file,
                _names(rec["label"], task, where),
                _split(rec, where),
                rec.get("patient", ""),
            )
        )
    return rows


def manifest_splits(path: str | Path) -> set[str]:
    """The splits a manifest holds (``train`` alone when it has no split column)."""
    return {_split(rec, f"{path} line {line}") for line, rec in read_manifest(path)}


def class_list(rows: list[Row], spec: DataSpec, where: object) -> list[str]:
    """``model.classes`` when configured (every name must be in it), else the sorted distinct names."""
    seen = sorted({n for r in rows for n in r.names})
    if spec.classes is None:
        if len(seen) < 2 and spec.task != "multilabel":
            raise DataError(
                f"{where}: one class ({', '.join(seen)}); a classifier needs at least two: "
                "set model.classes to the list every hospital and the coordinator share"
            )
        return seen
    unknown = sorted(set(seen) - set(spec.classes))
    if unknown:
        raise DataError(f"{where}: label(s) {unknown} are not in model.classes {list(spec.classes)}")
    return list(spec.classes)


def encode(rows: list[Row], classes: list[str], task: str) -> np.ndarray:
    """Class indices (multiclass) or the 0/1 label matrix (multilabel) of ``rows``."""
    index = {c: i for i, c in enumerate(classes)}
    if task == "multiclass":
        return np.asarray([index[r.names[0]] for r in rows], dtype=np.int64)
    out = np.zeros((len(rows), len(classes)), dtype=np.uint8)
    for i, r in enumerate(rows):
        out[i, [index[n] for n in r.names]] = 1
    return out


def load_manifest(path: str | Path, split: str, spec: DataSpec | None = None) -> ImageSet:
    """One split of a manifest as an :class:`ImageSet`; unreadable images are skipped with a warning, up to
    ``spec.max_bad_fraction`` of them."""
    spec = spec or DataSpec()
    return manifest_listing(path, split, spec).load(spec, Path(path))


def manifest_listing(path: str | Path, split: str, spec: DataSpec | None = None) -> Listing:
    """The files of one split of a manifest with their encoded labels and the class list."""
    spec = spec or DataSpec()
    task = spec.task or "multiclass"
    rows = manifest_rows(path, task)
    classes = class_list(rows, spec, path)
    if task == "multilabel" and len(classes) < 2:
        raise DataError(f"{path}: a multilabel task needs at least two label names (has {classes})")
    chosen = [r for r in rows if r.split == split]
    if not chosen:
        raise DataError(f"{path}: no rows in split {split!r} (has {', '.join(sorted({r.split for r in rows}))})")
    patients = [r.patient for r in chosen] if any(r.patient for r in rows) else None
    return Listing([r.path for r in chosen], encode(chosen, classes, task), classes, patients)
