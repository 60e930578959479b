"""The hospital split simulator and the local validation rule.

A hospital's share written by :func:`write_hospital_shards` is a folder holding its own ``data.npz`` (splits
``train`` and ``val``) and ``meta.json``, so the code running at a hospital reads only that hospital's folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medvec.config import hospital_names
from medvec.data.images import DataError, DataSpec, ImageSet
from medvec.data.sources import load_split

if TYPE_CHECKING:
    pass


def draw_local_val(
    n: int, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded rule that holds out a hospital's local validation split: (train indices, val indices), sorted.

    With ``groups`` (one per image: its patient, :meth:`~medvec.data.images.ImageSet.groups`), whole groups are
    held out, in a seeded order, until the split is as close to ``fraction`` of the images as whole groups allow:
    no patient is on both sides. Without ``groups`` each image is its own group (the draw it has always been).
    """
    rng = np.random.default_rng(seed + 1)
    return hold_out_groups(np.arange(n) if groups is None else np.asarray(groups), round(n * fraction), rng)


def hold_out_groups(groups: np.ndarray, target: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) image indices, sorted: whole groups held out in ``rng``'s order until as close to ``target``
    images as whole groups allow."""
    names, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(names))  # groups numbered by first appearance
    group = rank[inverse.reshape(-1)]
    order = rng.permutation(len(names))
    reached = np.cumsum(np.bincount(group, minlength=len(names))[order])
    take = int(np.argmin(np.abs(reached - target))) + 1 if target > 0 else 0
    held_groups = np.zeros(len(names), dtype=bool)
    held_groups[order[:take]] = True
    held = held_groups[group]
    return np.flatnonzero(~held), np.flatnonzero(held)


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


def _hospital_parts(
    train: ImageSet, hospitals: int, scheme: str, alpha: float, seed: int, min_samples: int
) -> list[np.ndarray]:
    """Each simulated hospital's image indices, sorted: by image, or where patients are known by patient (each
    patient's images to one hospital, the patient's first image's class standing for it in the label skew)."""
    if train.patients is None:
        return split_indices(train.strata(), hospitals, scheme, alpha, seed, min_samples)
    _, first, inverse = np.unique(train.groups(), return_index=True, return_inverse=True)
    parts = split_indices(train.strata()[first], hospitals, scheme, alpha, seed, min_samples)
    return [np.flatnonzero(np.isin(inverse.reshape(-1), part)) for part in parts]


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
    groups = train.groups()  # a patient's images stay together; without patients, each image is its own group
    parts = _hospital_parts(train, hospitals, scheme, alpha, seed, min_samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)  # one stream for all hospitals; draw_local_val is its first draw
    shares: dict[str, dict] = {}
    summary = {
        "source": str(source),
        "scheme": scheme,
        "alpha": alpha,
        "seed": seed,
        "classes": train.classes,
        "hospitals": shares,
    }
    for name, idx in zip(names or hospital_names(hospitals), parts, strict=True):
        keep, held = hold_out_groups(groups[idx], round(len(idx) * local_val_fraction), rng)  # whole patients
        tr, va = train.subset(idx[keep]), train.subset(idx[held])
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
        shares[name] = meta
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
