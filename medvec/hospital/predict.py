"""``medvec predict``: a registered model's output for a hospital's own images, one row per image.

The model is a registered version (:class:`~medvec.serving.Registered`, read from MLflow by
:func:`medvec.tracking.registered.load_registered`): its weights and spec, and the operating point in its
model config, so the labels are the served model's. The images come from any source training reads (an ``.npz``, a hospital folder, an image-folder root,
a CSV manifest) or from any folder of PNG, JPEG or DICOM files (unlabelled). They are decoded, preprocessed
(:mod:`medvec.serving`, the pyfunc's own path) and scored a chunk at a time, so memory does not grow with the
number of files. Unreadable files are skipped with a warning naming them, by training's rule
(``data.max_bad_fraction``).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvec.data.images import (
    IMAGE_SUFFIXES,
    DataError,
    DataSpec,
    DataWarning,
    Decoded,
    ImageSet,
    decode_files,
    failed_share,
    too_many_failed,
)
from medvec.serving import Registered, class_scores, images_to_batch, label_columns

CHUNK = 256  # images decoded, preprocessed and scored at a time


@dataclass
class Chunk:
    """Some images of a source, decoded: their row names, uint8 pixels and labels (None: unlabelled)."""

    ids: list[str]
    images: list[np.ndarray]
    labels: np.ndarray | None
    seen: int  # files read, the unreadable ones too (the progress bar counts them)


@dataclass
class Source:
    """What a data source holds for prediction: its size, its class names and its images, a chunk at a time."""

    total: int
    classes: list[str]
    chunks: Iterator[Chunk]
    id_column: str
    failed: list[tuple[Path, str]] = field(default_factory=list)
    decode_size: int | None = None  # each decoded file shrunk to fit (data.decode_size, the model's own)
    resize: str = "stretch"  # and made square so (data.resize, the model's own)
    cache: str | None = None  # data.cache: decoded files read from there when unchanged
    workers: int = 1  # data.workers: processes that decode the files


def _file_chunks(files: list[Path], labels: np.ndarray | None, source: Source, chunk: int) -> Iterator[Chunk]:
    for start in range(0, len(files), chunk):
        part = files[start : start + chunk]
        decoded = decode_files(part, source.decode_size, source.resize, source.cache, source.workers)
        for f, reason in decoded.failed:
            warnings.warn(f"skipped {f}: not a readable image ({reason})", DataWarning, stacklevel=2)
        source.failed.extend(decoded.failed)
        kept = [start + i for i in decoded.kept]
        yield Chunk(
            [str(files[i]) for i in kept],
            [np.asarray(im) for im in decoded.images],  # grey or RGB uint8, as decode_files keeps them
            labels[kept] if labels is not None else None,
            len(part),
        )


def _array_chunks(images: np.ndarray, labels: np.ndarray, chunk: int) -> Iterator[Chunk]:
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        yield Chunk([str(i) for i in range(start, stop)], list(images[start:stop]), labels[start:stop], stop - start)


def _image_files(folder: Path) -> list[Path]:
    """Every PNG, JPEG or DICOM candidate below ``folder`` (DICOM exports often have no suffix), sorted."""
    wanted = set(IMAGE_SUFFIXES) | {".dicom", ""}
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in wanted
        and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )


def model_data_spec(params, model: Registered) -> DataSpec:
    """How to read images for ``model``: ``params``' task and classes, its own ``data.decode_size`` and
    ``data.resize`` where it was registered with them (so files are read as the served model reads them)."""
    from dataclasses import replace

    return replace(
        DataSpec.of(params),
        decode_size=model.decode_size or params.data.decode_size,
        resize=model.resize or params.data.resize,
    )


def open_source(path: str | Path, split: str | None, spec: DataSpec, chunk: int = CHUNK) -> Source:
    """The images of ``path`` to score: ``split`` of a source with splits (default ``test`` where there is one),
    else every image of a manifest or folder."""
    from medvec.data.manifest import manifest_listing, manifest_splits
    from medvec.data.sources import _npz_path, folder_listing, has_split, is_manifest, load_npz

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    chosen = split or ("test" if has_split(path, "test") else None)
    npz = _npz_path(path)
    if npz is not None:
        return set_source(spec.check(load_npz(npz, chosen or "test", spec.classes), path), chunk)
    if is_manifest(path):
        parts = [manifest_listing(path, one, spec) for one in ([chosen] if chosen else sorted(manifest_splits(path)))]
        files = [f for part in parts for f in part.files]
        labels = np.concatenate([part.labels for part in parts])
        return _listing_source(files, labels, parts[0].classes, chunk, spec)
    if path.is_dir() and chosen is not None and (path / chosen).is_dir():
        listing = folder_listing(path, chosen, spec.classes)
        return _listing_source(listing.files, listing.labels, listing.classes, chunk, spec)
    if split is not None:
        raise DataError(f"{path}: no split {split!r}")
    files = _image_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no PNG, JPEG or DICOM files")
    return _listing_source(files, None, list(spec.classes or []), chunk, spec)


def set_source(data: ImageSet, chunk: int = CHUNK) -> Source:
    """A split already in memory (a hospital's local validation split) as a :class:`Source`."""
    return Source(len(data), data.classes, _array_chunks(data.images, data.labels, chunk), "index")


def _listing_source(
    files: list[Path], labels: np.ndarray | None, classes: list[str], chunk: int, spec: DataSpec
) -> Source:
    source = Source(len(files), classes, iter(()), "path")
    source.decode_size, source.resize, source.cache, source.workers = (
        spec.decode_size,
        spec.resize,
        spec.cache,
        spec.workers,
    )
    source.chunks = _file_chunks(files, labels, source, chunk)
    return source


@dataclass
class Prediction:
    """What :func:`predict_source` wrote: rows, skipped files and, for labelled data, the metrics."""

    out: Path
    rows: int
    failed: list[tuple[Path, str]]
    metrics: dict | None
    metrics_path: Path | None


@dataclass
class Scored:
    """One batch of a source, scored: row names, class probabilities and their log-odds, labels (None: unlabelled),
    the uint8 images."""

    ids: list[str]
    p: np.ndarray
    log_odds: np.ndarray
    labels: np.ndarray | None
    images: list[np.ndarray]


def score(
    model: Registered,
    source: Source,
    device: torch.device,
    batch_size: int = CHUNK,
    progress: bool = True,
    desc: str = "predict",
) -> Iterator[Scored]:
    """Every image of ``source`` scored by ``model``, a batch at a time (a progress bar counts the files read)."""
    from tqdm.auto import tqdm

    net = model.model.to(device).eval()
    with tqdm(total=source.total, desc=desc, unit="image", disable=not progress) as bar:
        for chunk in source.chunks:
            for start in range(0, len(chunk.images), batch_size):
                images = chunk.images[start : start + batch_size]
                p, odds = class_scores(net, images_to_batch(images, model.spec).to(device), model.task)
                labels = chunk.labels[start : start + batch_size] if chunk.labels is not None else None
                yield Scored(chunk.ids[start : start + batch_size], p, odds, labels, images)
            bar.update(chunk.seen)


def check_unreadable(source: Source, rows: int, max_bad_fraction: float, kept: str) -> None:
    """Training's rule on what was read: a DataError when more than ``max_bad_fraction`` of the files failed."""
    decoded = Decoded(kept=list(range(rows)), failed=source.failed)
    if too_many_failed(decoded, max_bad_fraction):
        raise DataError(f"{failed_share(decoded, max_bad_fraction)}; {kept}")


def predict_source(
    model: Registered,
    source: Source,
    out: Path,
    max_bad_fraction: float,
    device: torch.device,
    batch_size: int = CHUNK,
    progress: bool = True,
) -> Prediction:
    """Score every image of ``source`` and write one CSV row per image (id, ``p_*``, label(s)); labelled data
    also gets its metrics beside the CSV (``<out stem>.metrics.json``)."""
    probs, odds, labels = [], [], []
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        for batch in score(model, source, device, batch_size, progress):
            frame = label_columns(batch.p, model.threshold, model.task)
            frame.insert(0, source.id_column, batch.ids)
            if not rows:
                writer.writerow(frame.columns)
            writer.writerows(frame.itertuples(index=False, name=None))
            probs.append(batch.p)
            odds.append(batch.log_odds)
            if batch.labels is not None:
                labels.append(batch.labels)
            rows += len(frame)
    check_unreadable(source, rows, max_bad_fraction, f"{out} holds the {rows} that could be read")
    metrics, metrics_path = None, None
    if labels and rows:
        metrics = labelled_metrics(np.concatenate(labels), np.concatenate(probs), model.threshold, np.concatenate(odds))
        metrics_path = out.with_suffix(".metrics.json")
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return Prediction(out, rows, source.failed, metrics, metrics_path)


def labelled_metrics(labels: np.ndarray, proba: np.ndarray, threshold: float | None, ranks: np.ndarray) -> dict:
    """The demo's evaluation of scored, labelled images: :func:`medvec.evaluate.metrics` (its AUC ranks by
    ``ranks``, the log-odds, as :func:`medvec.evaluate.evaluate_model`'s does), and for a binary task the
    sensitivity and specificity at the registered operating point (``op``)."""
    from medvec.evaluate import at_threshold, metrics

    out = metrics(labels, proba, proba.shape[1], ranks)
    single = np.ndim(labels) == 1 or np.shape(labels)[1] == 1
    if threshold is not None and proba.shape[1] == 2 and single:
        out["op"] = at_threshold(labels, proba[:, 1], threshold)
    return out
