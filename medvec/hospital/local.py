"""A hospital's own data: its training split and local validation split, read from its folder, file or manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medvec.data.images import DataSpec, ImageSet
from medvec.data.sources import has_split, is_manifest, load_split
from medvec.data.split import draw_local_val


@dataclass
class LocalData:
    """A hospital's local splits: ``train``, and ``val`` (None when it has no local validation split)."""

    train: ImageSet
    val: ImageSet | None

    def __post_init__(self) -> None:
        for split in (self.train, self.val):
            if split is not None:
                split.private = True  # a hospital's own images: tune_on_public refuses them

    @classmethod
    def load(
        cls, folder: str | Path, spec: DataSpec | None = None, local_val_fraction: float = 0.1, seed: int = 0
    ) -> "LocalData":
        """A hospital's train and local val splits; a manifest without a split column gets its val split drawn
        by :func:`medvec.data.split.draw_local_val` (``split.local_val_fraction``, ``split.seed``)."""
        train = load_split(folder, "train", spec)
        val = load_split(folder, "val", spec) if has_split(folder, "val") else None
        return cls.of_splits(train, val, is_manifest(Path(folder)), local_val_fraction, seed)

    @classmethod
    def of_splits(
        cls, train: ImageSet, val: ImageSet | None, draw_val: bool, local_val_fraction: float, seed: int
    ) -> "LocalData":
        """The local splits: ``val`` when the source has one, else drawn from ``train`` when ``draw_val``."""
        if val is None and draw_val and local_val_fraction > 0:
            keep, held = draw_local_val(len(train), local_val_fraction, seed, train.groups())  # a patient on one side
            return cls(train.subset(keep), train.subset(held))
        return cls(train, val)

    @classmethod
    def of(cls, folder: str | Path, params) -> "LocalData":
        """:meth:`load` with the label space and local split rule of ``params``."""
        return cls.load(folder, DataSpec.of(params), params.split.local_val_fraction, params.split.seed)

    def describe(self) -> dict[str, dict]:
        """Per split: a sha256 of the pixels and labels, the size and the label counts (no path, nothing per
        image): what the hospital's MLflow run logs as its data sets."""
        splits = {"train": self.train, "val": self.val}
        return {
            split: {"sha256": s.sha256(), "size": len(s), "label_counts": s.label_counts()}
            for split, s in splits.items()
            if s is not None and len(s)
        }
