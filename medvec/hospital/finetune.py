"""What runs inside a hospital: fine-tune θ_pre on local images and build τ_h.

Only the vector and aggregate metadata (sample count, label counts, settings,
local validation metrics, BN running statistics or moment sums, and with DP-SGD the
accounted (ε, δ)) leave this module; images and per-sample values never do.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from medvec.batchnorm import MomentSums, RunningStats, moment_sums
from medvec.config import BatchNormConfig, FinetuneConfig, PrivacyConfig, VectorsConfig
from medvec.data.images import DataError, ImageSet, classes_sha256
from medvec.hospital.local import LocalData
from medvec.hospital.train import TrainResult, finetune
from medvec.models import Base
from medvec.preprocess import batches
from medvec.timing import timed
from medvec.vectors.encoding import FP32, encoding_of
from medvec.vectors.vector import DataVector


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


@dataclass(frozen=True)
class Training:
    """What a hospital's fine-tune run records beside its vector (all aggregate: nothing per image)."""

    history: list[dict]  # per epoch: loss and local validation metrics
    seconds: float  # wall time measured around training
    data: dict[str, dict]  # per local split: sha256, size, label counts (LocalData.describe)

    @classmethod
    def of(cls, result: TrainResult, data: LocalData) -> Training:
        """The record of ``result`` on ``data``: its per-epoch history, wall time and the local splits' descriptions."""
        return cls(result.history, result.seconds, data.describe())


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
    With ``privacy.enabled`` the fine-tune is DP-SGD (:mod:`medvec.hospital.privacy`) and the metadata
    carries the (ε, δ) Opacus accounted.
    """
    start = start or base
    check_label_space(base, data.train, hospital)
    model = start.fresh()
    spent = None
    if privacy is not None and privacy.enabled:
        from medvec.hospital.privacy import dp_finetune

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
    encoding = encoding_of(cfg)
    return vector if encoding == FP32 else vector.encoded(encoding)


@timed("bn_restore")
def local_moment_sums(model: nn.Module, base: Base, data: ImageSet, cfg: BatchNormConfig, seed: int = 0) -> MomentSums:
    """Per-layer (count, Σx, Σx²) of the BN inputs under ``model`` on up to ``cfg.max_samples`` local images."""
    return moment_sums(model, batches(data, base.spec, cfg.batch_size, seed=seed, limit=cfg.max_samples))


def with_moments(vector: DataVector, merged: Base, base: Base, data: LocalData, cfg: BatchNormConfig) -> DataVector:
    """``vector`` carrying moment sums of the local training data under ``merged`` (the current merged model),
    for the coordinator's ``recompute``."""
    sums = local_moment_sums(merged.model, base, data.train, cfg)
    meta = vector.meta.model_copy(update={"moments_model_sha256": merged.sha256})
    return DataVector(vector.deltas, meta, vector.running, sums)


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
        """Every hospital's moment sums under ``model``, each on up to ``cfg.max_samples`` of its training images,
        added up."""
        return MomentSums.combine(local_moment_sums(model, self.base, d, self.cfg, seed=s) for _, d, s in self.local)

    def only(self, hospitals: list[str]) -> "LiveMoments":
        """This source restricted to ``hospitals``; ValueError naming any it holds no data for."""
        wanted, known = set(hospitals), {h for h, _, _ in self.local}
        if not wanted <= known:
            raise ValueError(
                f"no local data for hospital(s) {sorted(wanted - known)}: this moments source has {sorted(known)}"
            )
        return LiveMoments(self.base, self.cfg, [h for h in self.local if h[0] in wanted])


def live_moments(base: Base, local: dict[str, LocalData], cfg: BatchNormConfig) -> LiveMoments:
    """:class:`LiveMoments` of the hospitals whose local data ``local`` holds (by name; seeds by position)."""
    return LiveMoments(base, cfg, [(h, d.train, i) for i, (h, d) in enumerate(local.items())])
