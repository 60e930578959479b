"""Data sources by layout: MedMNIST ``.npz`` files, image-folder roots, hospital folders and CSV manifests.

* MedMNIST ``.npz``: keys ``<split>_images`` (uint8, N×H×W or N×H×W×C) and ``<split>_labels`` (shape N or N×1).
* image folders: ``<root>/<split>/<class>/*.png|jpg|jpeg|dcm``.
* a hospital folder written by :func:`medvec.data.split.write_hospital_shards`: its own ``data.npz``.
* a CSV manifest (:mod:`medvec.data.manifest`)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medvec.data.images import IMAGE_SUFFIXES, DataError, DataSpec, ImageSet, Listing

if TYPE_CHECKING:
    pass


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


def load_image_folder(root: str | Path, split: str, spec: DataSpec | None = None) -> ImageSet:
    """Load ``<root>/<split>/<class>/*.png|jpg|dcm`` (classes: ``spec.classes`` or the sorted folder names),
    skipping a few unreadable files (``spec.max_bad_fraction``)."""
    spec = spec or DataSpec()
    return folder_listing(root, split, spec.classes).load(spec, Path(root) / split)


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


def is_manifest(source: Path) -> bool:
    """Whether ``source`` is a CSV or TSV manifest: an existing file with that suffix."""
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
        from medvec.data.manifest import load_manifest

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
        from medvec.data.manifest import manifest_splits

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
