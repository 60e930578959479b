"""Hospital-style data made from the shipped MedMNIST files, for demos, tests and benchmarks.

* :func:`export_manifest` writes every image of an ``.npz`` as a PNG or a DICOM file, with a CSV manifest
  (``path,label,split``): the layout a hospital's export has.  DICOM files rotate through the encodings a PACS
  produces (MONOCHROME2; MONOCHROME1; a 16-bit rescale with a VOI window; RLE-compressed) and carry synthetic,
  clearly fake patient tags, so every run of the DICOM path is also a privacy audit.
* :func:`composite_multilabel`: a two-label task.  Each image is a chest X-ray (PneumoniaMNIST) beside a breast
  ultrasound (BreastMNIST), paired at random; its labels are ``pneumonia`` when the chest image shows pneumonia and
  ``malignant`` when the breast image is malignant, independently, so an image has none, one or both findings.
* :func:`combined_multiclass`: a four-class task, the union of both files: ``chest normal``, ``chest pneumonia``,
  ``breast malignant`` and ``breast normal or benign``.  Telling the modality apart is easy; the within-modality
  pairs are the real task.

The splits are MedMNIST's own; composites draw partners with a fixed seed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medvec.data.images import SPLITS, ImageSet
from medvec.data.sources import load_npz

PNEUMONIA, BREAST = "pneumoniamnist.npz", "breastmnist.npz"


def _png(path: Path, pixels: np.ndarray, index: int) -> Path:
    from PIL import Image

    path = path.with_suffix(".png")
    Image.fromarray(pixels).save(path)
    return path


def fake_patient(index: int) -> dict[str, str]:
    """Synthetic identifying tags (no real person): what a PACS export would carry."""
    return {
        "PatientName": f"Synthetic^Patient{index:05d}",
        "PatientID": f"MRN-SYN-{index:07d}",
        "PatientBirthDate": f"19{50 + index % 50:02d}0{1 + index % 9}1{index % 10}",
        "InstitutionName": "Synthetic General Hospital",
        "AccessionNumber": f"ACC{index:08d}",
    }


DICOM_VARIANTS: list[dict] = [
    {},
    {"monochrome1": True},
    {"rescale": (0.5, -1024.0), "window": (40.0, 400.0)},
    {"compress": "rle"},
]


def _dicom(path: Path, pixels: np.ndarray, index: int) -> Path:
    from medvec.data.dicom import write_dicom

    path = path.with_suffix(".dcm")
    variant = dict(DICOM_VARIANTS[index % len(DICOM_VARIANTS)])
    return write_dicom(path, pixels, patient=fake_patient(index), **variant)


WRITERS: dict[str, Callable[[Path, np.ndarray, int], Path]] = {"png": _png, "dicom": _dicom}


def write_manifest(sets: dict[str, ImageSet], out: str | Path, fmt: str = "png", progress: bool = True) -> Path:
    """Write each split's images as ``fmt`` files under ``out/images/<split>/`` and ``out/manifest.csv``."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown format {fmt!r}: valid are {', '.join(WRITERS)}")
    out = Path(out)
    rows, index = [], 0
    total = sum(len(s) for s in sets.values())
    with tqdm(total=total, desc=f"write {fmt}", disable=not progress, unit="img") as bar:
        for split, data in sets.items():
            folder = out / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(len(data)):
                file = WRITERS[fmt](folder / f"{i:05d}", data.images[i], index)
                rows.append({"path": str(file.relative_to(out)), "label": _label(data, i), "split": split})
                index += 1
                bar.update(1)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _label(data: ImageSet, i: int) -> str:
    if data.multilabel:
        return "|".join(c for c, on in zip(data.classes, data.labels[i], strict=True) if on)
    return data.classes[int(data.labels[i])]


def export_manifest(source: str | Path, out: str | Path, fmt: str = "png", progress: bool = True) -> Path:
    """Every split of an ``.npz`` as image files plus ``manifest.csv`` (same images, same order, same splits)."""
    return write_manifest({s: load_npz(source, s) for s in SPLITS}, out, fmt, progress)


def _side_by_side(chest: ImageSet, breast: ImageSet, rng: np.random.Generator) -> ImageSet:
    partner = rng.permutation(np.resize(np.arange(len(breast)), len(chest)))
    images = np.concatenate([chest.images, breast.images[partner]], axis=2)
    labels = np.stack([chest.labels == 1, breast.labels[partner] == 0], axis=1).astype(np.uint8)
    return ImageSet(images, labels, ["pneumonia", "malignant"])


def composite_multilabel(data_dir: str | Path = "data", seed: int = 0) -> dict[str, ImageSet]:
    """The two-label chest|breast composite task (28×56 images), per split."""
    rng = np.random.default_rng(seed)
    data_dir = Path(data_dir)
    return {s: _side_by_side(load_npz(data_dir / PNEUMONIA, s), load_npz(data_dir / BREAST, s), rng) for s in SPLITS}


def combined_multiclass(data_dir: str | Path = "data") -> dict[str, ImageSet]:
    """The four-class union of PneumoniaMNIST and BreastMNIST, per split."""
    classes = ["chest normal", "chest pneumonia", "breast malignant", "breast normal or benign"]
    data_dir = Path(data_dir)
    out = {}
    for s in SPLITS:
        chest, breast = load_npz(data_dir / PNEUMONIA, s), load_npz(data_dir / BREAST, s)
        images = np.concatenate([chest.images, breast.images])
        out[s] = ImageSet(images, np.concatenate([chest.labels, breast.labels + 2]), classes)
    return out


EXAMPLES: dict[str, Callable[..., dict[str, ImageSet]]] = {
    "multilabel": composite_multilabel,
    "multiclass": combined_multiclass,
}
