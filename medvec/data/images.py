"""Image sets and how files become them: ImageSet (multi-class or multi-label), DataSpec (the task and the shared class list), decoding PNG, JPEG and DICOM by content."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from medvec.errors import UserError

if TYPE_CHECKING:
    from PIL import Image


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


MAX_BAD_FRACTION = 0.1  # an image folder may hold this share of unreadable files; they are skipped with a warning


SPLITS = ("train", "val", "test")


class DataError(UserError, ValueError):
    """A data source that cannot be read as medvec expects."""


class DataWarning(UserWarning):
    """A part of a data source that was skipped (the rest is used)."""


TASKS = ("multiclass", "multilabel")


def classes_sha256(classes: list[str]) -> str:
    """The hash of a class list that vectors record and intake compares (order matters: it is the label index)."""
    return hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()


@dataclass(frozen=True)
class DataSpec:
    """How data is read: the task and, when configured, the shared class list (``model.task``, ``model.classes``),
    and the share of unreadable files a split may hold (``data.max_bad_fraction``).

    ``DataSpec()`` expects nothing: self-describing sources (``.npz``, folders) load as they are, and a
    manifest reads as multiclass with its own sorted class names.
    """

    task: str | None = None
    classes: tuple[str, ...] | None = None
    max_bad_fraction: float = MAX_BAD_FRACTION
    decode_size: int | None = None  # data.decode_size: decoded files shrunk to fit (None: kept at full size)
    resize: str = "stretch"  # data.resize: how a non-square file is made square as it is decoded
    cache: str | None = None  # data.cache: the folder of decoded files (None: decode every time)
    workers: int = 1  # data.workers: processes that decode files

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}: valid are {', '.join(TASKS)}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise DataError(f"the class list {list(self.classes)} names a class twice")
        if self.resize not in RESIZE_MODES:
            raise DataError(f"unknown data.resize {self.resize!r}: valid are {', '.join(RESIZE_MODES)}")

    @classmethod
    def of(cls, params) -> "DataSpec":
        """What :class:`medvec.config.Params` say: ``model.task``, ``model.classes``, ``data.max_bad_fraction``."""
        model = params.model
        return cls(
            model.task,
            tuple(model.classes) if model.classes else None,
            params.data.max_bad_fraction,
            params.data.decode_size,
            params.data.resize,
            params.data.cache,
            params.data.workers,
        )

    def check(self, data: "ImageSet", where: object) -> "ImageSet":
        """``data`` when it has this task and class list; a DataError naming ``where`` when not."""
        if self.task is not None and data.task != self.task:
            raise DataError(f"{where}: holds {data.task} labels but model.task is {self.task}")
        if self.classes is not None and list(self.classes) != data.classes:
            raise DataError(f"{where}: classes {data.classes} differ from model.classes {list(self.classes)}")
        return data


@dataclass
class ImageSet:
    """Images (uint8, N×H×W or N×H×W×C) with labels and class names.

    Multi-class labels are integers (N); multi-label labels are a 0/1 matrix (N×L, L ≥ 2 names in ``classes``).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)
    # the patient of each image, where the source says (a manifest's patient column, DICOM PatientID); None: one
    # patient per image. It stays at the hospital: splits keep a patient on one side, and nothing logs it.
    patients: np.ndarray | None = None
    # a hospital's own split (medvec.hospital.local.LocalData marks it): what may not tune DP settings
    private: bool = False

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim == 2 and labels.shape[1] > 1:
            if not np.isin(labels, (0, 1)).all():
                raise DataError("multi-label labels must be 0 or 1")
            self.labels = labels.astype(np.uint8)
        else:
            self.labels = labels.reshape(-1).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if not self.classes:
            n = self.labels.shape[1] if self.multilabel else int(self.labels.max()) + 1 if len(self.labels) else 0
            self.classes = [str(i) for i in range(n)]
        if self.multilabel and self.labels.shape[1] != len(self.classes):
            raise DataError(f"{self.labels.shape[1]} label columns but {len(self.classes)} class names")
        if self.patients is not None:
            self.patients = np.asarray(self.patients, dtype=str)
            if len(self.patients) != len(self.labels):
                raise DataError(f"{len(self.labels)} images but {len(self.patients)} patient ids")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        """Whether the labels are a 0/1 matrix (N×L) rather than one class index per image."""
        return self.labels.ndim == 2

    @property
    def task(self) -> str:
        """``multilabel`` or ``multiclass``, by the labels' shape."""
        return "multilabel" if self.multilabel else "multiclass"

    @property
    def num_classes(self) -> int:
        """The number of class names (label columns, for multi-label)."""
        return len(self.classes)

    def label_counts(self) -> list[int]:
        """Images per class; for multi-label, images with each label (a row may count towards several)."""
        if self.multilabel:
            return self.labels.sum(0).astype(int).tolist()
        return np.bincount(self.labels, minlength=self.num_classes).astype(int).tolist()

    def strata(self) -> np.ndarray:
        """One integer per image to stratify splits by: the class, or for multi-label the label combination."""
        if not self.multilabel:
            return self.labels
        return np.unique(self.labels, axis=0, return_inverse=True)[1].reshape(-1)

    def sha256(self) -> str:
        """A hash of the pixels and labels (with their dtypes and shapes): the set's identity, which records and
        MLflow carry instead of the data."""
        h = hashlib.sha256()
        for array in (self.images, self.labels):
            h.update(str((array.dtype.str, array.shape)).encode())
            h.update(array.tobytes())
        return h.hexdigest()

    def subset(self, index: np.ndarray) -> "ImageSet":
        """The images and labels at ``index`` (indices or a boolean mask), with the same class names."""
        patients = self.patients[index] if self.patients is not None else None
        return ImageSet(self.images[index], self.labels[index], list(self.classes), patients, self.private)

    def groups(self) -> np.ndarray:
        """One group per image for splitting: its patient where known, else the image itself (its own group)."""
        if self.patients is None:
            return np.arange(len(self)).astype(str)
        own = np.char.add("image:", np.arange(len(self)).astype(str))
        return np.where(self.patients == "", own, np.char.add("patient:", self.patients))

    @staticmethod
    def concat(sets: list["ImageSet"]) -> "ImageSet":
        """The sets one after another, with the longest class list among them (the others are not compared with it)."""
        classes = max((s.classes for s in sets), key=len)
        known = any(s.patients is not None for s in sets)
        patients = (
            np.concatenate([s.patients if s.patients is not None else np.full(len(s), "") for s in sets])
            if known
            else None
        )
        images, labels = np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets])
        return ImageSet(images, labels, list(classes), patients, any(s.private for s in sets))


def read_image(path: Path | BinaryIO) -> tuple[Image.Image, str, str]:
    """The decoded image at ``path`` (or in a file's bytes), its kind (``PNG``, ``JPEG``, ``DICOM CT``...), detected by content, and its
    patient (DICOM PatientID; "" when the file does not say).

    Raises OSError or ValueError when it is not a readable image.
    """
    from PIL import Image

    from medvec.data.dicom import is_dicom, read_dicom_file

    if is_dicom(path):
        found = read_dicom_file(path)
        return Image.fromarray(found.pixels), f"DICOM {found.modality}", found.patient
    with Image.open(path) as im:
        im.load()
        return im, im.format or "image", ""


@dataclass
class Decoded:
    """What reading a list of files gave: the images kept (by index into the list) and each failure's reason."""

    images: list = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)  # each kept image's DICOM PatientID ("" when none)
    native: list[tuple[int, int]] = field(default_factory=list)  # each kept image's size as stored (W, H)


GRAY_MODES = ("L", "1", "I;16", "I")  # PIL modes read as grayscale; any other image makes a set RGB


RESIZE_MODES = ("stretch", "pad", "center_crop")


def square(image: Image.Image, resize: str) -> Image.Image:
    """``image`` made square by ``resize`` (``data.resize``): ``stretch`` leaves it (the model's resize stretches it),
    ``pad`` centres it on a black square of its longer side, ``center_crop`` keeps the centred square of its shorter
    side; no resampling either way."""
    from PIL import Image as PILImage

    w, h = image.size
    if resize == "stretch" or w == h:
        return image
    if resize == "pad":
        side = max(w, h)
        out = PILImage.new(image.mode, (side, side))
        out.paste(image, ((side - w) // 2, (side - h) // 2))
        return out
    if resize == "center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side))
    raise DataError(f"unknown data.resize {resize!r}: valid are {', '.join(RESIZE_MODES)}")


def as_read(image: Image.Image) -> Image.Image:
    """``image`` in the mode training reads it: grey (:data:`GRAY_MODES`) or RGB."""
    return image.convert("L" if image.mode in GRAY_MODES else "RGB")


def fit(image: Image.Image, max_side: int | None, resize: str) -> Image.Image:
    """A decoded image as training keeps it: made square by ``resize``, grey or RGB (a new image), and shrunk to
    fit in ``max_side`` × ``max_side`` when its longer side is larger: its aspect kept (Pillow's ``thumbnail``), but
    for ``stretch``, which stretches it to a square anyway, each side capped at ``max_side`` on its own.
    Files (:func:`decode_files`) and a served model's raw images (:mod:`medvec.serving`) both go through it."""
    image = as_read(square(image, resize))  # convert copies: the caller's image is never changed
    w, h = image.size
    if max_side is None or max(w, h) <= max_side:
        return image
    if resize == "stretch" and w != h:  # stretched anyway: each side shrunk on its own, none below the model's
        from PIL import Image as PILImage

        return image.resize((min(w, max_side), min(h, max_side)), PILImage.Resampling.BICUBIC, reducing_gap=2.0)
    image.thumbnail((max_side, max_side))
    return image


def _decode_one(path: Path, max_side: int | None, resize: str) -> tuple[Image.Image, str, tuple[int, int], str]:
    """One file decoded and :func:`fit`: (image, kind, the size as stored, patient)."""
    image, kind, patient = read_image(path)
    return fit(image, max_side, resize), kind, image.size, patient


@dataclass(frozen=True)
class _How:
    """How files are decoded (``data.decode_size``, ``data.resize``, ``data.cache``): sent to worker processes."""

    max_side: int | None
    resize: str
    cache: str | None


def _decode_entry(path: Path, how: _How):
    """One file as a cache :class:`~medvec.data.cache.Entry` (from the cache when there), or the reason it could not
    be read."""
    from PIL import Image

    from medvec.data.cache import DecodeCache, Entry

    store = DecodeCache(Path(how.cache)) if how.cache else None
    try:
        key = store.content_key(Path(path), how.max_side, how.resize) if store else ""
        hit = store.get(key) if store else None
        if hit is not None:
            return hit
        image, kind, native, patient = _decode_one(path, how.max_side, how.resize)
        entry = Entry(np.asarray(image), kind, native, patient)
        if store:
            store.put(key, entry)
        return entry
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, truncated, too large
        return str(exc) or type(exc).__name__


PARALLEL_MIN = 16  # files per worker process below which starting the processes costs more than they save
PROGRESS_MIN = 500  # files from which decoding shows a progress bar (on stderr)


def _decode_all(files: list[Path], how: _How, workers: int) -> list:
    """:func:`_decode_entry` of every file, in order: in this process, or in ``workers`` processes; with a progress
    bar from :data:`PROGRESS_MIN` files."""
    from tqdm import tqdm

    bar = tqdm(total=len(files), desc="decode", unit="file", disable=len(files) < PROGRESS_MIN, leave=False)
    with bar:
        if workers <= 1 or len(files) < PARALLEL_MIN * workers:
            return [_counted(_decode_entry(f, how), bar) for f in files]
        import itertools
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("forkserver")  # not fork: the parent may hold torch's threads
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(_decode_entry, files, itertools.repeat(how), chunksize=4)
            return [_counted(got, bar) for got in results]


def _counted(result, bar):
    """``result``, one more file on ``bar``."""
    bar.update()
    return result


def decode_files(
    files: list[Path],
    max_side: int | None = None,
    resize: str = "stretch",
    cache: str | Path | None = None,
    workers: int = 1,
) -> Decoded:
    """Decode every file (PNG, JPEG or DICOM, by content), each :func:`fit` at once (made square by ``resize``,
    shrunk to ``max_side``, ``data.decode_size``) so that no full-size image is kept; unreadable ones are recorded. With ``cache`` (``data.cache``), a file decoded before with the same bytes
    and settings is read from there (:mod:`medvec.data.cache`); with ``workers`` > 1 (``data.workers``), files are
    decoded in that many processes, in order."""
    from PIL import Image

    out = Decoded()
    results = _decode_all(list(files), _How(max_side, resize, str(cache) if cache else None), workers)
    for i, (f, got) in enumerate(zip(files, results, strict=True)):
        if isinstance(got, str):
            out.failed.append((f, got))
            continue
        out.native.append(got.native)
        out.images.append(Image.fromarray(got.pixels))
        out.kept.append(i)
        out.kinds.append(got.kind)
        out.patients.append(got.patient)
    return out


def too_many_failed(decoded: Decoded, limit: float) -> bool:
    """The rule for a split: unusable when nothing decoded, or more than ``limit`` of its files failed."""
    total = len(decoded.kept) + len(decoded.failed)
    return bool(decoded.failed) and (not decoded.kept or len(decoded.failed) > limit * total)


def failed_share(decoded: Decoded, limit: float) -> str:
    """How many files failed, for an error (no file name: names can identify patients)."""
    total = len(decoded.kept) + len(decoded.failed)
    return f"{len(decoded.failed)} of {total} images could not be read (more than {limit:.0%})"


def stack_images(images: list[Image.Image]) -> np.ndarray:
    """One uint8 array of decoded images: grayscale unless any is colour, at the most common size."""
    mode = "L" if all(im.mode in GRAY_MODES for im in images) else "RGB"
    sizes = [im.size for im in images]
    size = max(set(sizes), key=sizes.count)
    return np.stack([np.asarray(_fit(im, mode, size), dtype=np.uint8) for im in images])


@dataclass
class Listing:
    """The image files of one split with their labels (indices or 0/1 rows) and the class list."""

    files: list[Path]
    labels: np.ndarray
    classes: list[str]
    patients: list[str] | None = None  # a manifest's patient column ("" where a row leaves it empty)

    def assemble(self, decoded: Decoded) -> ImageSet:
        """The :class:`ImageSet` of the files that decoded, each with its patient: the listing's, else the file's
        DICOM PatientID; None when no image names one."""
        given = [self.patients[i] for i in decoded.kept] if self.patients is not None else [""] * len(decoded.kept)
        patients = [p or own for p, own in zip(given, decoded.patients, strict=True)]
        known = np.asarray(patients) if any(patients) else None
        return ImageSet(stack_images(decoded.images), self.labels[decoded.kept], self.classes, known)

    def load(self, spec: DataSpec, where: Path) -> ImageSet:
        """Decode the files as ``spec`` says (``decode_size``, ``resize``), skipping unreadable ones with a
        DataWarning; DataError past ``spec.max_bad_fraction``."""
        decoded = decode_files(self.files, spec.decode_size, spec.resize, spec.cache, spec.workers)
        max_bad_fraction = spec.max_bad_fraction
        for f, reason in decoded.failed:
            warnings.warn(f"skipped {f}: not a readable image ({reason})", DataWarning, stacklevel=3)
        if too_many_failed(decoded, max_bad_fraction):
            # no file name here: a failed flow run's message reaches the Prefect server
            share = failed_share(decoded, max_bad_fraction)
            raise DataError(f"{where}: {share}; the warnings name each file (medvec hospital check lists them)")
        return self.assemble(decoded)


def _fit(im: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """``im`` in ``mode`` at ``size``."""
    im = im.convert(mode)
    return im.resize(size) if im.size != size else im
