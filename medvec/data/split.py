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
from medvec.data.images import DataError, DataSpec
from medvec.data.sources import load_split

if TYPE_CHECKING:
    pass


def draw_local_val(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded rule that holds out a hospital's local validation split: (train indices, val indices), sorted."""
    idx = np.random.default_rng(seed + 1).permutation(n)
    n_val = round(n * fraction)
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


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
