"""``medvec hospital check``: what a hospital's data holds, read locally, before it joins.

It reads nothing but the local data source (an ``.npz``, a hospital folder, image folders or a CSV manifest) and
reports the images found, read and failed (with reasons), counts per class or label and per split, image sizes and
kinds (PNG, JPEG, DICOM with its modality), duplicates by pixel hash, and the exact data fields a vector trained
on it would publish (:func:`medvec.hospital.finetune.published_data_fields`).  The report stays at the hospital: it names
local files, which never go into a vector, its metadata, MLflow or the store.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medvec.data.images import (
    SPLITS,
    DataError,
    DataSpec,
    Decoded,
    ImageSet,
    Listing,
    decode_files,
    failed_share,
    too_many_failed,
)
from medvec.data.sources import _npz_path, check_source, folder_listing, has_split, is_manifest, load_npz


@dataclass
class SplitReport:
    """One split: files found, read and failed (with reasons), and counts per class."""

    found: int
    read: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    patients: int | None = None  # distinct patients, where the source names them (a count; no identifier)


@dataclass
class DataReport:
    """What ``medvec hospital check`` prints; ``problems`` make the data unusable for joining."""

    source: str
    layout: str
    task: str
    classes: list[str] = field(default_factory=list)
    splits: dict[str, SplitReport] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    duplicates: list[list[str]] = field(default_factory=list)
    published: dict = field(default_factory=dict)
    local_val: str = ""
    cache: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """Whether the data can join: no ``problems`` were found."""
        return not self.problems

    def to_dict(self) -> dict:
        """The report as JSON-ready data, with ``usable``."""
        return asdict(self) | {"usable": self.usable}

    def text(self) -> str:
        """The report as ``medvec hospital check`` prints it."""
        return "\n".join(_lines(self))


def _layout(path: Path) -> str:
    if is_manifest(path):
        return "CSV manifest"
    if _npz_path(path) is not None:
        return "hospital folder (data.npz)" if path.is_dir() else ".npz file"
    return "image folders (<split>/<class>/)"


def _listing(path: Path, split: str, spec: DataSpec) -> Listing:
    if is_manifest(path):
        from medvec.data.manifest import manifest_listing

        return manifest_listing(path, split, spec)
    return folder_listing(path, split, spec.classes)


def _pixel_hash(image) -> str:
    a = np.asarray(image)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()


def _read_split(path: Path, split: str, spec: DataSpec, report: DataReport, hashes: dict) -> ImageSet | None:
    """Decode one split of a file-based source into ``report``; the ImageSet, or None when nothing was read."""
    listing = _listing(path, split, spec)
    decoded: Decoded = decode_files(listing.files, spec.decode_size, spec.resize, spec.cache, spec.workers)
    failed = [(_name(f, path), reason) for f, reason in decoded.failed]
    report.splits[split] = SplitReport(len(listing.files), len(decoded.kept), failed)
    for i, image, kind, native in zip(decoded.kept, decoded.images, decoded.kinds, decoded.native, strict=True):
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        size = f"{native[0]}×{native[1]}"
        report.sizes[size] = report.sizes.get(size, 0) + 1
        hashes.setdefault(_pixel_hash(image), []).append(f"{split}:{_name(listing.files[i], path)}")
    if too_many_failed(decoded, spec.max_bad_fraction):
        report.problems.append(f"{split}: {failed_share(decoded, spec.max_bad_fraction)}")
    return listing.assemble(decoded) if decoded.kept else None


def _read_npz(path: Path, split: str, report: DataReport, hashes: dict) -> ImageSet:
    npz = _npz_path(path)
    assert npz is not None, "called for an .npz source only"
    data = load_npz(npz, split)
    report.splits[split] = SplitReport(len(data), len(data))
    shape = data.images.shape
    report.kinds["npz uint8"] = report.kinds.get("npz uint8", 0) + len(data)
    report.sizes[f"{shape[2]}×{shape[1]}"] = report.sizes.get(f"{shape[2]}×{shape[1]}", 0) + len(data)
    for i, image in enumerate(data.images):
        hashes.setdefault(_pixel_hash(image), []).append(f"{split}:#{i}")
    return data


def _name(file: Path, root: Path) -> str:
    base = root.parent if root.is_file() else root
    try:
        return str(file.relative_to(base))
    except ValueError:
        return str(file)


def check_data(
    source: str | Path, spec: DataSpec | None = None, local_val_fraction: float = 0.1, seed: int = 0
) -> DataReport:
    """Read every split of ``source`` and report on it; problems are recorded, not raised (except a missing source)."""
    from medvec.hospital.finetune import published_data_fields
    from medvec.hospital.local import LocalData

    path, spec = Path(source), spec or DataSpec()
    report = DataReport(str(source), "unknown", spec.task or "multiclass")
    try:
        check_source(path, ("train",))
        report.layout = _layout(path)
        sets, hashes = _read_splits(path, spec, report)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    train = sets.get("train")
    if train is None or not len(train):
        report.problems.append("no readable training images")
        return report
    try:
        spec.check(train, "train split")
    except DataError as exc:
        report.problems.append(str(exc))
    report.classes, report.task = list(train.classes), train.task
    for split, data in sets.items():
        report.splits[split].label_counts = dict(zip(data.classes, data.label_counts(), strict=True))
        if data.patients is not None:
            report.splits[split].patients = len(set(data.groups()))
    _patient_overlaps(report, sets)
    local = LocalData.of_splits(train, sets.get("val"), is_manifest(path), local_val_fraction, seed)
    report.local_val = _local_val_note(local, "val" in sets)
    report.published = published_data_fields(local.train) | {"num_classes": len(local.train.classes)}
    report.duplicates = [names for names in hashes.values() if len(names) > 1]
    report.cache = _cache_note(spec)
    _notes(report, local.train)
    return report


def _cache_note(spec: DataSpec) -> str:
    """The decoded-file cache's size (``data.cache``), or "" without one."""
    if not spec.cache:
        return ""
    from medvec.data.cache import DecodeCache

    entries, size = DecodeCache(Path(spec.cache)).size()
    mb = size / 2**20
    return f"{entries} decoded file(s), {mb:.1f} MB in {spec.cache} (patient images: it stays on this machine)"


def against_base(report: DataReport, labels: dict | None) -> DataReport:
    """Add a problem when the data's task or class list is not the coordinator's current base's (``labels``)."""
    if not labels or not report.usable:
        return report
    if labels.get("task") and labels["task"] != report.task:
        report.problems.append(f"the data holds {report.task} labels but the coordinator's base is {labels['task']}")
    if labels.get("classes") and labels["classes"] != report.classes:
        report.problems.append(
            f"classes {report.classes} differ from the coordinator's base {labels['classes']}: "
            "set model.classes to the coordinator's list"
        )
    return report


def _read_splits(path: Path, spec: DataSpec, report: DataReport) -> tuple[dict[str, ImageSet], dict]:
    sets: dict[str, ImageSet] = {}
    hashes: dict[str, list[str]] = {}
    for split in SPLITS:
        if not has_split(path, split):
            continue
        if _npz_path(path) is not None and not is_manifest(path):
            sets[split] = _read_npz(path, split, report, hashes)
        else:
            data = _read_split(path, split, spec, report, hashes)
            if data is not None:
                sets[split] = data
    return sets, hashes


def _patient_overlaps(report: DataReport, sets: dict[str, ImageSet]) -> None:
    """A note for each pair of the source's splits that share a patient: validation or test would overstate."""
    named = {split: set(data.groups()) for split, data in sets.items() if data.patients is not None}
    splits = list(named)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            shared = len(named[a] & named[b])
            if shared:
                report.notes.append(
                    f"{shared} patient(s) have images in both {a} and {b}: {b} results would overstate accuracy;"
                    " put each patient in one split"
                )


def _local_val_note(local, from_source: bool) -> str:
    if local.val is None:
        return "none (no val split)"
    how = "the source's val split" if from_source else "drawn from train by the seeded rule (split.local_val_fraction)"
    if not from_source and local.val.patients is not None:
        how += f", whole patients ({len(set(local.val.groups()))})"
    return f"{len(local.val)} images: {how}"


def _notes(report: DataReport, train: ImageSet) -> None:
    absent = [c for c, n in zip(train.classes, train.label_counts(), strict=True) if n == 0]
    if absent:
        report.notes.append(f"no training images of {', '.join(absent)}: the vector will not learn them here")
    if report.duplicates:
        n = sum(len(g) - 1 for g in report.duplicates)
        report.notes.append(f"{n} image(s) duplicate another by pixels (listed above); duplicates across splits leak")


def _lines(r: DataReport) -> list[str]:
    out = [f"data: {r.source} ({r.layout}), task {r.task}"]
    if r.classes:
        out.append(f"classes ({len(r.classes)}, in label order): {', '.join(map(repr, r.classes))}")
    for split, s in r.splits.items():
        counts = ", ".join(f"{c!r}: {n}" for c, n in s.label_counts.items())
        patients = f", {s.patients} patients" if s.patients is not None else ""
        out.append(
            f"{split}: {s.found} found, {s.read} read, {len(s.failed)} failed{patients}"
            + (f"; {counts}" if counts else "")
        )
        out += [f"  failed {name}: {reason}" for name, reason in s.failed[:20]]
        if len(s.failed) > 20:
            out.append(f"  … and {len(s.failed) - 20} more")
    if r.sizes:
        out.append("image sizes: " + ", ".join(f"{k} ({n})" for k, n in Counter(r.sizes).most_common()))
        out.append("kinds: " + ", ".join(f"{k} ({n})" for k, n in Counter(r.kinds).most_common()))
    out.append(f"duplicates by pixel hash: {len(r.duplicates)} group(s)")
    out += [f"  {' = '.join(g[:5])}{' …' if len(g) > 5 else ''}" for g in r.duplicates[:20]]
    if r.local_val:
        out.append(f"local validation: {r.local_val}")
    if r.cache:
        out.append(f"cache: {r.cache}")
    if r.published:
        out.append("a vector from this data publishes exactly these data fields (aggregates, nothing per image):")
        out += [f"  {k}: {v}" for k, v in r.published.items()]
        out.append(
            "  besides them: the weight differences, BN aggregates, fine-tune settings and local validation metrics"
        )
    out += [f"note: {n}" for n in r.notes]
    out += [f"problem: {p}" for p in r.problems]
    out.append("usable: yes" if r.usable else "usable: NO")
    return out
