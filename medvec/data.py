"""Image loaders, preprocessing and the hospital split simulator.

Two on-disk layouts are read:

* MedMNIST ``.npz``: keys ``<split>_images`` (uint8, N×H×W or N×H×W×C) and
  ``<split>_labels`` (shape N or N×1).
* image folders: ``<root>/<split>/<class>/*.png|jpg|jpeg``.

A hospital's share written by :func:`write_hospital_shards` is a folder holding
its own ``data.npz`` (splits ``train`` and ``val``) and ``meta.json``, so the code
running at a hospital reads only that hospital's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from medvec.errors import UserError
from medvec.models import ModelSpec

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
MAX_BAD_FRACTION = 0.1  # an image folder may hold this share of unreadable files; they are skipped with a warning
SPLITS = ("train", "val", "test")

# MedMNIST's label names (its INFO["<dataset>"]["label"]), which its .npz files do not carry
MEDMNIST_CLASSES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
}


def medmnist_classes(path: Path, n: int) -> list[str]:
    """Class names for a MedMNIST file (``pneumoniamnist.npz``, ``breastmnist_224.npz``), else ``0..n-1``."""
    names = MEDMNIST_CLASSES.get(path.stem.split("_")[0].lower(), [])
    return list(names) if len(names) >= n else [str(i) for i in range(n)]


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

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}: valid are {', '.join(TASKS)}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise DataError(f"the class list {list(self.classes)} names a class twice")

    @classmethod
    def of(cls, params) -> "DataSpec":
        """What :class:`medvec.config.Params` say: ``model.task``, ``model.classes``, ``data.max_bad_fraction``."""
        model = params.model
        return cls(model.task, tuple(model.classes) if model.classes else None, params.data.max_bad_fraction)

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

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"

    @property
    def num_classes(self) -> int:
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

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], list(self.classes))

    @staticmethod
    def concat(sets: list["ImageSet"]) -> "ImageSet":
        classes = max((s.classes for s in sets), key=len)
        return ImageSet(
            np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]), list(classes)
        )


def _npz_path(source: Path) -> Path | None:
    if source.is_file() and source.suffix == ".npz":
        return source
    if source.is_dir() and (source / "data.npz").is_file():
        return source / "data.npz"
    return None


def _npz_keys(path: Path) -> list[str]:
    """The arrays an ``.npz`` holds; DataError naming it when it is not a readable ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc


def load_npz(path: str | Path, split: str, classes: tuple[str, ...] | list[str] | None = None) -> ImageSet:
    """Load one split of a MedMNIST-layout ``.npz`` (labels N or N×1; N×L 0/1 for multi-label).

    Class names come from the file's ``classes`` array; a file without one takes ``classes`` (``model.classes``:
    label index i is ``classes[i]``) when given, else MedMNIST's names by file name, else ``0..K-1``.
    """
    path = Path(path)
    _npz_keys(path)
    with np.load(path, allow_pickle=False) as z:
        key_i, key_l = f"{split}_images", f"{split}_labels"
        if key_i not in z or key_l not in z:
            have = sorted({k.rsplit("_", 1)[0] for k in z.files})
            raise DataError(f"{path}: no split {split!r} (has {', '.join(have)})")
        images, labels = z[key_i], z[key_l]
        file_classes = [str(c) for c in z["classes"]] if "classes" in z else []
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key_i} must be uint8, got {images.dtype}")
    if labels.ndim > 2:
        raise DataError(f"{path}: {key_l} has shape {labels.shape}; expected N, N×1 or N×L (multi-label)")
    given = list(classes or [])
    s = ImageSet(images, labels, file_classes or given)
    if not file_classes and not given and not s.multilabel:
        s.classes = medmnist_classes(path, max(s.num_classes, 2))
    return s


def _read_image(path: Path) -> tuple[Image.Image, str]:
    """The decoded image at ``path`` and its kind (``PNG``, ``JPEG``, ``DICOM CT``...), detected by content.

    Raises OSError or ValueError when it is not a readable image.
    """
    from PIL import Image

    from medvec.dicom import is_dicom, read_dicom_image

    if is_dicom(path):
        pixels, modality = read_dicom_image(path)
        return Image.fromarray(pixels), f"DICOM {modality}"
    with Image.open(path) as im:
        im.load()
        return im, im.format or "image"


@dataclass
class Decoded:
    """What reading a list of files gave: the images kept (by index into the list) and each failure's reason."""

    images: list = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def decode_files(files: list[Path]) -> Decoded:
    """Decode every file (PNG, JPEG or DICOM, by content); unreadable ones are recorded, not raised."""
    from PIL import Image

    out = Decoded()
    for i, f in enumerate(files):
        try:
            image, kind = _read_image(f)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, truncated, too large
            out.failed.append((f, str(exc) or type(exc).__name__))
            continue
        out.images.append(image)
        out.kept.append(i)
        out.kinds.append(kind)
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
    mode = "L" if all(im.mode in ("L", "1", "I;16", "I") for im in images) else "RGB"
    sizes = [im.size for im in images]
    size = max(set(sizes), key=sizes.count)
    return np.stack([np.asarray(_fit(im, mode, size), dtype=np.uint8) for im in images])


@dataclass
class Listing:
    """The image files of one split with their labels (indices or 0/1 rows) and the class list."""

    files: list[Path]
    labels: np.ndarray
    classes: list[str]

    def assemble(self, decoded: Decoded) -> ImageSet:
        """The :class:`ImageSet` of the files that decoded."""
        return ImageSet(stack_images(decoded.images), self.labels[decoded.kept], self.classes)

    def load(self, max_bad_fraction: float, where: Path) -> ImageSet:
        """Decode the files, skipping unreadable ones with a DataWarning; DataError past ``max_bad_fraction``."""
        decoded = decode_files(self.files)
        for f, reason in decoded.failed:
            warnings.warn(f"skipped {f}: not a readable image ({reason})", DataWarning, stacklevel=3)
        if too_many_failed(decoded, max_bad_fraction):
            # no file name here: a failed flow run's message reaches the Prefect server
            share = failed_share(decoded, max_bad_fraction)
            raise DataError(f"{where}: {share}; the warnings name each file (medvec hospital check lists them)")
        return self.assemble(decoded)


def load_image_folder(root: str | Path, split: str, spec: DataSpec | None = None) -> ImageSet:
    """Load ``<root>/<split>/<class>/*.png|jpg|dcm`` (classes: ``spec.classes`` or the sorted folder names),
    skipping a few unreadable files (``spec.max_bad_fraction``)."""
    spec = spec or DataSpec()
    return folder_listing(root, split, spec.classes).load(spec.max_bad_fraction, Path(root) / split)


def folder_listing(root: str | Path, split: str, classes: tuple[str, ...] | list[str] | None = None) -> Listing:
    """The files of ``<root>/<split>/<class>/`` with their class indices: through ``classes`` (``model.classes``;
    a folder per class need not exist) when given, else the sorted folder names."""
    base = Path(root) / split
    if not base.is_dir():
        raise DataError(f"{root}: no split folder {split!r}")
    train = Path(root) / "train"
    folders = sorted(p.name for p in (train if train.is_dir() else base).iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{base}: no class folders")
    unknown = sorted(set(folders) - set(classes or folders))
    if unknown:
        raise DataError(f"{root}: class folder(s) {unknown} are not in model.classes {list(classes or [])}")
    classes = list(classes or folders)
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((base / name).glob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(c)
    if not files:
        raise DataError(f"{base}: no {'/'.join(IMAGE_SUFFIXES)} images")
    return Listing(files, np.asarray(labels, dtype=np.int64), classes)


def _fit(im: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """``im`` in ``mode`` at ``size``."""
    im = im.convert(mode)
    return im.resize(size) if im.size != size else im


def is_manifest(source: Path) -> bool:
    return source.is_file() and source.suffix.lower() in (".csv", ".tsv")


def load_split(source: str | Path, split: str, spec: DataSpec | None = None) -> ImageSet:
    """Load a split from an ``.npz``, a hospital folder, an image-folder root or a CSV manifest.

    ``spec`` (``model.task``, ``model.classes``, ``data.max_bad_fraction``) maps a manifest's class names to
    indices and is checked against what the other layouts hold.
    """
    source = Path(source)
    spec = spec or DataSpec()
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if is_manifest(source):
        from medvec.manifest import load_manifest

        return load_manifest(source, split, spec)
    npz = _npz_path(source)
    if npz is not None:
        data = load_npz(npz, split, spec.classes)
    elif source.is_dir():
        data = load_image_folder(source, split, spec)
    else:
        raise DataError(f"{source}: not an .npz file, an image-folder root or a .csv manifest")
    return spec.check(data, source)


def has_split(source: str | Path, split: str) -> bool:
    """Whether ``source`` (an ``.npz``, hospital folder, image-folder root or manifest) holds ``split``."""
    source = Path(source)
    if is_manifest(source):
        from medvec.manifest import manifest_splits

        return split in manifest_splits(source)
    npz = _npz_path(source)
    if npz is not None:
        return f"{split}_images" in _npz_keys(npz)
    return (source / split).is_dir()


def check_source(source: str | Path, splits: tuple[str, ...] = ("train",)) -> None:
    """Raise DataError naming ``source`` unless it exists, has a known layout and holds ``splits`` (reads no images)."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    if _npz_path(path) is None and not path.is_dir() and not is_manifest(path):
        raise DataError(
            f"{source}: not an .npz file, a hospital folder (data.npz), an image-folder root or a .csv manifest"
        )
    missing = [s for s in splits if not has_split(path, s)]
    if missing:
        raise DataError(f"{source}: no split {', '.join(repr(s) for s in missing)} (needs {', '.join(splits)})")


def dataset_name(source: str | Path) -> str:
    """A short name for reports: the file's stem, or ``<folder>/<file>`` for a manifest (often manifest.csv)."""
    source = Path(source)
    return f"{source.parent.name}/{source.name}" if is_manifest(source) else source.stem


def draw_local_val(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded rule that holds out a hospital's local validation split: (train indices, val indices), sorted."""
    idx = np.random.default_rng(seed + 1).permutation(n)
    n_val = round(n * fraction)
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- preprocessing


def to_tensor(images: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """uint8 images -> float NCHW (stored channels-last), resized to the spec's size and normalised.

    Grayscale images feed RGB models by repeating the channel (keeps ImageNet
    weights usable); RGB images feed one-channel models by averaging.
    """
    x = torch.as_tensor(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    if x.shape[1] != spec.in_chans:
        if x.shape[1] == 1:
            x = x.expand(-1, spec.in_chans, -1, -1)
        elif spec.in_chans == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise DataError(f"cannot feed {x.shape[1]}-channel images to a {spec.in_chans}-channel model")
    if x.shape[-2:] != (spec.image_size, spec.image_size):
        x = F.interpolate(
            x, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(
        spec.mean[: spec.in_chans] if len(spec.mean) >= spec.in_chans else spec.mean * spec.in_chans
    ).view(1, -1, 1, 1)
    std = torch.tensor(spec.std[: spec.in_chans] if len(spec.std) >= spec.in_chans else spec.std * spec.in_chans).view(
        1, -1, 1, 1
    )
    # channels-last: the convolutions run about twice as fast on CPU (benchmarks/finetune_throughput.py)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation: random translation of up to 1/16 of the side, random horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)  # a per-image copy loop: faster here than one batched gather
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


PREDECODE_BYTES = 1024**3  # a training split this small (as float pixels) is decoded once, not every epoch


def predecode(data: ImageSet, spec: ModelSpec, budget: int = PREDECODE_BYTES) -> torch.Tensor | None:
    """Every image of ``data`` preprocessed once (:func:`to_tensor`), or None when that would pass ``budget`` bytes.

    Filled 256 images at a time, so the temporaries of resizing stay small next to the result.
    """
    size = len(data) * spec.in_chans * spec.image_size**2 * 4
    if not len(data) or size > budget:
        return None
    out = torch.empty((len(data), spec.in_chans, spec.image_size, spec.image_size)).contiguous(
        memory_format=torch.channels_last
    )
    for start in range(0, len(data), 256):
        out[start : start + 256] = to_tensor(data.images[start : start + 256], spec)
    return out


def batches(
    data: ImageSet,
    spec: ModelSpec,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment_data: bool = False,
    limit: int | None = None,
    decoded: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield preprocessed ``(x, y)`` batches (y: class indices, or float 0/1 rows for multi-label); seeded when
    shuffling or augmenting.  ``decoded`` (:func:`predecode` of ``data``) replaces the per-batch preprocessing,
    with the same values."""
    g = torch.Generator().manual_seed(seed)
    n = len(data) if limit is None else min(limit, len(data))
    order = torch.randperm(len(data), generator=g).numpy()[:n] if shuffle or limit is not None else np.arange(n)
    if limit is not None and not shuffle:
        order = np.sort(order)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if decoded is None:
            x = to_tensor(data.images[idx], spec)
        else:
            x = decoded[torch.as_tensor(idx)].contiguous(memory_format=torch.channels_last)
        if augment_data:
            x = augment(x, g)
        y = torch.as_tensor(data.labels[idx])
        yield x, y.float() if data.multilabel else y


# --------------------------------------------------------------------------- hospital split simulator


def split_indices(
    labels: np.ndarray,
    hospitals: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    min_samples: int = 16,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Share sample indices among hospitals.

    Schemes
    -------
    ``iid``: a random permutation cut into equal parts.
    ``dirichlet``: label skew; for every class c, proportions p_c ~ Dir(α·1) over hospitals.
    ``quantity``: size skew; proportions q ~ Dir(α·1), labels drawn uniformly.

    Every hospital gets at least ``min_samples``; draws are repeated (seeded) until so.
    """
    labels = np.asarray(labels).reshape(-1)
    if hospitals * min_samples > len(labels):
        raise DataError(f"{len(labels)} samples cannot give {hospitals} hospitals {min_samples} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        if scheme == "iid":
            parts = np.array_split(rng.permutation(len(labels)), hospitals)
        elif scheme == "dirichlet":
            buckets: list[list[int]] = [[] for _ in range(hospitals)]
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                p = rng.dirichlet(np.full(hospitals, alpha))
                cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
                for h, part in enumerate(np.split(idx, cuts)):
                    buckets[h].extend(part.tolist())
            parts = [np.asarray(b, dtype=np.int64) for b in buckets]
        elif scheme == "quantity":
            q = rng.dirichlet(np.full(hospitals, alpha))
            cuts = (np.cumsum(q)[:-1] * len(labels)).astype(int)
            parts = np.split(rng.permutation(len(labels)), cuts)
        else:
            raise DataError(f"unknown split scheme {scheme!r}: valid are iid, dirichlet, quantity")
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(p) for p in parts]
    raise DataError(f"no {scheme} split (alpha={alpha}) gave every hospital {min_samples} samples in {max_tries} draws")


def hospital_names(n: int) -> list[str]:
    return [f"h{i + 1}" for i in range(n)]


def write_hospital_shards(
    source: str | Path,
    out_dir: str | Path,
    hospitals: int = 4,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    local_val_fraction: float = 0.1,
    min_samples: int = 16,
    names: list[str] | None = None,
    spec: DataSpec | None = None,
) -> dict:
    """Split the ``train`` split of ``source`` into one folder per hospital.

    Each ``<out_dir>/<hospital>/`` gets ``data.npz`` (``train`` and a local ``val``
    hold-out) and ``meta.json`` with counts.  Returns the split summary.
    """
    train = load_split(source, "train", spec)
    parts = split_indices(train.strata(), hospitals, scheme, alpha, seed, min_samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)  # one stream for all hospitals; draw_local_val is its first draw
    summary = {
        "source": str(source),
        "scheme": scheme,
        "alpha": alpha,
        "seed": seed,
        "classes": train.classes,
        "hospitals": {},
    }
    for name, idx in zip(names or hospital_names(hospitals), parts, strict=True):
        idx = rng.permutation(idx)
        n_val = round(len(idx) * local_val_fraction)
        tr, va = train.subset(np.sort(idx[n_val:])), train.subset(np.sort(idx[:n_val]))
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "data.tmp.npz"
        np.savez_compressed(
            tmp,
            train_images=tr.images,
            train_labels=tr.labels,
            val_images=va.images,
            val_labels=va.labels,
            classes=np.asarray(train.classes),
        )
        os.replace(tmp, folder / "data.npz")
        meta = {
            "hospital": name,
            "n_train": len(tr),
            "n_val": len(va),
            "train_label_counts": tr.label_counts(),
            "val_label_counts": va.label_counts(),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        summary["hospitals"][name] = meta
    (out_dir / "split.json").write_text(json.dumps(summary, indent=2))
    return summary


def split_from_config(source: str | Path, out_dir: str | Path, cfg, spec: DataSpec | None = None) -> dict:
    """:func:`write_hospital_shards` with the settings of a :class:`medvec.config.SplitConfig`."""
    return write_hospital_shards(
        source,
        out_dir,
        cfg.hospitals,
        cfg.scheme,
        cfg.alpha,
        cfg.seed,
        cfg.local_val_fraction,
        cfg.min_samples,
        cfg.hospital_names(),
        spec,
    )
