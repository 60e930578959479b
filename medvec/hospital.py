"""What runs inside a hospital: fine-tune θ_pre on local images and build τ_h.

Only the vector and aggregate metadata (sample count, label counts, settings,
local validation metrics, BN running statistics or moment sums, and with DP-SGD the
accounted (ε, δ)) leave this module; images and per-sample values never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from medvec.batchnorm import MomentSums, RunningStats, moment_sums
from medvec.config import BatchNormConfig, FinetuneConfig, PrivacyConfig, VectorsConfig
from medvec.data import (
    DataError,
    DataSpec,
    ImageSet,
    batches,
    classes_sha256,
    draw_local_val,
    has_split,
    is_manifest,
    load_split,
)
from medvec.encoding import FP32
from medvec.models import Base
from medvec.timing import timed
from medvec.train import TrainResult, finetune
from medvec.vectors import DataVector


@dataclass
class LocalData:
    train: ImageSet
    val: ImageSet | None

    @classmethod
    def load(
        cls, folder: str | Path, spec: DataSpec | None = None, local_val_fraction: float = 0.1, seed: int = 0
    ) -> "LocalData":
        """A hospital's train and local val splits; a manifest without a split column gets its val split drawn
        by :func:`medvec.data.draw_local_val` (``split.local_val_fraction``, ``split.seed``)."""
        train = load_split(folder, "train", spec)
        val = load_split(folder, "val", spec) if has_split(folder, "val") else None
        return cls.of_splits(train, val, is_manifest(Path(folder)), local_val_fraction, seed)

    @classmethod
    def of_splits(
        cls, train: ImageSet, val: ImageSet | None, draw_val: bool, local_val_fraction: float, seed: int
    ) -> "LocalData":
        """The local splits: ``val`` when the source has one, else drawn from ``train`` when ``draw_val``."""
        if val is None and draw_val and local_val_fraction > 0:
            keep, held = draw_local_val(len(train), local_val_fraction, seed)
            return cls(train.subset(keep), train.subset(held))
        return cls(train, val)

    @classmethod
    def of(cls, folder: str | Path, params) -> "LocalData":
        """:meth:`load` with the label space and local split rule of ``params``."""
        return cls.load(folder, DataSpec.of(params), params.split.local_val_fraction, params.split.seed)


def published_data_fields(train: ImageSet) -> dict:
    """The fields of a vector's metadata that describe the hospital's data: counts and the class list's hash."""
    return {
        "n_train": len(train),
        "label_counts": train.label_counts(),
        "task": train.task,
        "classes_sha256": classes_sha256(train.classes),
    }


def check_label_space(base: Base, data: ImageSet, where: str) -> None:
    """DataError unless ``data`` has the base's task and class list (or, for an older base, fits its head)."""
    if data.task != base.task:
        raise DataError(f"{where}: the data holds {data.task} labels but the base model is {base.task}")
    if base.classes is not None and data.classes != base.classes:
        raise DataError(
            f"{where}: the data's classes {data.classes} differ from the base model's {base.classes}; "
            "set model.classes to the coordinator's list"
        )
    if data.num_classes > base.num_classes or (data.multilabel and data.num_classes != base.num_classes):
        raise DataError(f"{where}: data has {data.num_classes} classes, base model has {base.num_classes}")


def finetune_vector(
    base: Base,
    hospital: str,
    data: LocalData,
    cfg: FinetuneConfig,
    progress: bool = True,
    start: Base | None = None,
    start_version: int = 0,
    privacy: PrivacyConfig | None = None,
) -> tuple[DataVector, TrainResult]:
    """Fine-tune a fresh copy of the start point (θ_pre by default) on ``data``; returns (τ_h, training record).

    τ_h = θ_h − θ_start; the metadata names the root base θ_pre, and the start point's version and sha256.
    With ``privacy.enabled`` the fine-tune is DP-SGD (:mod:`medvec.privacy`) and the metadata
    carries the (ε, δ) Opacus accounted.
    """
    start = start or base
    check_label_space(base, data.train, hospital)
    model = start.fresh()
    spent = None
    if privacy is not None and privacy.enabled:
        from medvec.privacy import dp_finetune

        dp = dp_finetune(model, data.train, base.spec, cfg, privacy, data.val, progress, f"{hospital} DP fine-tune")
        record, spent = dp.result, dp.spent
    else:
        record = finetune(
            model, data.train, base.spec, cfg, val=data.val, progress=progress, desc=f"{hospital} fine-tune"
        )
    last = record.history[-1] if record.history else {}
    local = {k: v for k, v in last.items() if k.startswith("val_") or k == "loss"}
    settings = cfg.model_dump()
    settings.pop("threads", None)
    settings.pop("device", None)
    vector = DataVector.from_states(
        start.model.state_dict(),
        model.state_dict(),
        hospital=hospital,
        base_sha256=base.sha256,
        base_model=base.spec.name,
        num_classes=base.num_classes,
        **published_data_fields(data.train),
        finetune=settings,
        metrics=local,
        running=RunningStats.of(model, len(data.train)),
        start_version=start_version,
        start_sha256=start.sha256 if start_version else None,
        privacy=spent,
    )
    return vector, record


def for_upload(vector: DataVector, cfg: VectorsConfig) -> DataVector:
    """τ_h as ``vectors.encoding`` stores it (fp32: unchanged); the encoding goes into the signed metadata."""
    encoding = cfg.spec()
    return vector if encoding == FP32 else vector.encoded(encoding)


@timed("bn_restore")
def local_moment_sums(model: nn.Module, base: Base, data: ImageSet, cfg: BatchNormConfig, seed: int = 0) -> MomentSums:
    """Per-layer (count, Σx, Σx²) of the BN inputs under ``model`` on up to ``cfg.max_samples`` local images."""
    return moment_sums(model, batches(data, base.spec, cfg.batch_size, seed=seed, limit=cfg.max_samples))


@dataclass
class LiveMoments:
    """A ``moments_fn`` answered by each hospital on its own data under the model asked about (only sums come back).

    ``local`` holds (hospital, its training split, its sampling seed); ``only(hospitals)`` asks just those
    hospitals (the merge of a subset, for contribution scores).
    """

    base: Base
    cfg: BatchNormConfig
    local: list[tuple[str, ImageSet, int]]

    def __call__(self, model: nn.Module) -> MomentSums:
        return MomentSums.combine(local_moment_sums(model, self.base, d, self.cfg, seed=s) for _, d, s in self.local)

    def only(self, hospitals: list[str]) -> "LiveMoments":
        wanted, known = set(hospitals), {h for h, _, _ in self.local}
        if not wanted <= known:
            raise ValueError(
                f"no local data for hospital(s) {sorted(wanted - known)}: this moments source has {sorted(known)}"
            )
        return LiveMoments(self.base, self.cfg, [h for h in self.local if h[0] in wanted])


def live_moments(base: Base, folders: list[str | Path], cfg: BatchNormConfig) -> LiveMoments:
    """:class:`LiveMoments` of the hospitals whose data folders are ``folders`` (named after the hospital)."""
    return LiveMoments(base, cfg, [(Path(f).name, LocalData.load(f).train, i) for i, f in enumerate(folders)])
