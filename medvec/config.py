"""Typed, frozen configuration loaded from ``params.yaml``.

One section per stage (``split``, ``model``, ``finetune``, ``vectors``, ``merge``,
``batchnorm``, ``evaluate``, ``store``, ``coordinator``, ``registry``, ``demo``).  Every key can
be overridden with ``-S section.key=value``; values are parsed as YAML, so
``-S merge.lambdas=[0.5,1.0]`` and ``-S finetune.epochs=2`` both work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medvec.errors import UserError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def hospital_names(n: int) -> list[str]:
    """The default names of ``n`` simulated hospitals: ``h1`` … ``hn``."""
    return [f"h{i + 1}" for i in range(n)]


class SplitConfig(_Frozen):
    """How the simulator shares one training split among hospitals."""

    hospitals: int = Field(4, ge=1)
    scheme: Literal["iid", "dirichlet", "quantity"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (label or quantity skew)")
    local_val_fraction: float = Field(0.1, ge=0, lt=1)
    min_samples: int = Field(16, ge=1)
    seed: int = 0
    names: tuple[str, ...] | None = Field(None, description="hospital names (DVC's foreach); must number `hospitals`")

    @model_validator(mode="after")
    def _names_match(self) -> "SplitConfig":
        if self.names is not None and len(self.names) != self.hospitals:
            raise ValueError(f"split.names has {len(self.names)} names but split.hospitals is {self.hospitals}")
        return self

    def hospital_names(self) -> list[str]:
        """The hospitals' names: ``names`` when given, else ``h1`` … ``hn``."""
        return list(self.names) if self.names else hospital_names(self.hospitals)


class ModelConfig(_Frozen):
    """Which base model the coordinator publishes."""

    name: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int | None = Field(None, ge=8, description="override the model's native input size")
    seed: int = 0
    task: Literal["multiclass", "multilabel"] = "multiclass"
    classes: list[str] | None = Field(None, description="class names in label order; null: from the data")

    @field_validator("classes")
    @classmethod
    def _class_list(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        names = [str(c).strip() for c in value]
        if len(names) < 2 or "" in names or len(set(names)) != len(names):
            raise ValueError(f"needs at least two distinct, non-empty class names, got {value}")
        return names


NATIVE_DECODE_SIZE = 256  # data.decode_size for a model at its native input size (224 for most ImageNet models)


class DataConfig(_Frozen):
    """How image files are read (image folders and CSV manifests)."""

    max_bad_fraction: float = Field(0.1, ge=0, le=1, description="share of a split's files that may be unreadable")
    decode_size: int | None = Field(
        None,
        ge=16,
        description="a decoded file larger than this on its longer side is shrunk to fit, aspect kept (null: the "
        "model's input size, model.image_size, or 256 for a model at its native size)",
    )
    workers: int = Field(1, ge=1, description="processes that decode image files (one: in the reading process)")
    cache: str | None = Field(
        ".medvec/cache/decoded",
        description="the hospital's cache of decoded files (null: none); patient data, kept local",
    )
    resize: Literal["stretch", "pad", "center_crop"] = Field(
        "stretch",
        description="a non-square file made square: stretched on the way in, padded, or cropped at the centre",
    )


class VectorsConfig(_Frozen):
    """How a hospital stores the vector it uploads (:mod:`medvec.vectors.encoding`); intake decodes any of them."""

    encoding: Literal["fp32", "fp16", "bf16", "int8", "int8_channel", "int4", "topk"] = Field(
        "fp32", description="fp32 | fp16 | bf16 | int8 (one scale per tensor) | int8_channel | int4 | topk"
    )
    group_size: int = Field(64, ge=2, description="int4: consecutive entries that share one scale (even)")
    density: float = Field(0.1, gt=0, le=1, description="topk: share of each tensor's entries kept (largest |·|)")

    @field_validator("group_size")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"group_size must be even (two 4-bit values per byte), not {value}")
        return value


class FinetuneConfig(_Frozen):
    """How a hospital fine-tunes its start point: AdamW with warm-up and cosine decay, class weights, augmentation."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(0, ge=0)
    class_weighting: bool = True
    augment: bool = True
    bn_recalibrate: bool = Field(
        True, description="re-estimate BN running stats on the training data after fine-tuning"
    )
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores")
    device: str = "auto"


HEAD_VIEWS = 8  # privacy.augmentations' default under trainable: head


class PrivacyConfig(_Frozen):
    """DP-SGD at a hospital (Opacus): off by default, set per hospital in its own params."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0, description="ε to reach over the planned epochs (noise solved for it)")
    delta: float | None = Field(None, gt=0, lt=1, description="δ; None: 1/(10·n) for n local training images")
    noise_multiplier: float | None = Field(
        None, gt=0, description="a fixed noise multiplier σ instead of solving for target_epsilon"
    )
    max_grad_norm: float = Field(0.5, gt=0, description="per-sample gradient clipping norm C")
    trainable: Literal["all", "bn_affine", "head"] = Field(
        "head",
        description="what DP-SGD trains: all (but batch norm), bn_affine (BN scales and shifts and the head) or head;"
        " a partial vector carries only those tensors",
    )
    epochs: int | None = Field(30, ge=1, description="DP-SGD epochs (null: finetune.epochs)")
    batch_size: int | None = Field(
        256, ge=2, description="the logical batch, Poisson-sampled (null: finetune.batch_size, the physical batch)"
    )
    lr: float | None = Field(0.01, gt=0, description="DP-SGD's learning rate (null: finetune.lr)")
    weight_decay: float | None = Field(
        None, ge=0, description="DP-SGD's decoupled (AdamW) weight decay (null: finetune.weight_decay)"
    )
    ema: float | None = Field(
        0.99, gt=0, lt=1, description="keep an exponential moving average of the weights with this decay (null: off)"
    )
    augmentations: int | None = Field(
        None,
        ge=1,
        description="augmentation multiplicity K: each example's gradient is the mean over K views before clipping"
        " (De et al. 2022), at the same ε; head: the plain image and K − 1 augmented ones, features computed once;"
        " 1: off; null: 8 for head, 1 for bn_affine and all (K times their training)",
    )
    centre: str | None = Field(
        None,
        description="trainable head only: public images (.npz, folder or manifest; never the hospital's own) whose"
        " mean feature centres the head's inputs during DP-SGD; the head is mapped back exactly (null: off)",
    )
    accountant: Literal["rdp", "prv"] = "rdp"
    lifetime_epsilon: float | None = Field(
        None, gt=0, description="the hospital's total budget over all its vectors; None: no cap"
    )
    ledger: str | None = Field(
        None, description="the hospital's local privacy ledger; None: privacy-ledger.json in its data folder"
    )

    @property
    def views(self) -> int:
        """K, the views an example's gradient averages: ``augmentations``, or by default 8 under ``head`` (K passes
        of the start model, once: ``benchmarks/privacy_pairs.py``, +0.006 merged AUC at ε = 3) and 1 otherwise."""
        return self.augmentations or (HEAD_VIEWS if self.trainable == "head" else 1)

    @model_validator(mode="after")
    def _centre_needs_head(self) -> PrivacyConfig:
        if self.centre is not None and self.trainable != "head":
            raise ValueError(
                f"privacy.centre applies to trainable: head only (the features below a trained {self.trainable!r}"
                " change as it trains)"
            )
        return self


MethodName = Literal["sum", "task_arithmetic", "mean", "weighted", "ties", "dare", "median"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)  # the registry in medvec.coordinator.methods, in its order


class MergeConfig(_Frozen):
    """Which merge methods the coordinator tries and promotes, and their settings (medvec.coordinator.methods)."""

    methods: tuple[MethodName, ...] = METHOD_NAMES  # type: ignore[assignment]
    method: MethodName = "task_arithmetic"
    lam: float | None = Field(None, description="fixed lambda; None selects it on the validation split")
    lambdas: tuple[float, ...] | None = Field(
        None, description="λ grid for every method; None uses each method's own grid"
    )
    ties_density: float = Field(0.2, gt=0, le=1)
    dare_drop: float = Field(0.5, ge=0, lt=1)
    seed: int = 0

    @field_validator("methods", "method", mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        """An unknown name is refused with the list of valid ones (as the registry says it)."""
        names = [value] if isinstance(value, str) else list(value or [])
        unknown = [n for n in names if n not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown merge method {unknown[0]!r}: valid methods are {', '.join(METHOD_NAMES)}")
        return value


class BatchNormConfig(_Frozen):
    """BN statistics of merged models (:mod:`medvec.batchnorm`): ``strategy`` for production merges and steps,
    ``strategies`` for the comparison, and how many local samples feed a hospital's moment sums."""

    strategy: Literal["none", "average", "recompute"] = "recompute"
    strategies: tuple[Literal["none", "average", "recompute"], ...] = ("none", "average", "recompute")
    max_samples: int = Field(256, ge=1, description="samples per hospital for moment sums")
    batch_size: int = Field(64, ge=1)


class EvaluateConfig(_Frozen):
    """How models are scored on the held-out set: batch size, the metric that selects, and the threshold rule."""

    batch_size: int = Field(64, ge=1, description="64 is ~3x faster than 256 on CPU (cache)")
    select_metric: Literal["auc", "balanced_accuracy", "accuracy"] = "auc"
    threshold: Literal["youden", "sensitivity"] = Field(
        "youden", description="operating point chosen on validation: Youden's J, or the target sensitivity"
    )
    target_sensitivity: float = Field(0.9, gt=0, le=1, description="with threshold: sensitivity")
    where: Literal["coordinator", "hospitals"] = Field(
        "hospitals",
        description="who scores candidates: the hospitals' own validation splits, or the coordinator's eval_data",
    )
    quorum: float = Field(0.5, gt=0, le=1, description="where: hospitals: the share that must answer")
    quorum_by: Literal["sites", "samples"] = Field("sites", description="quorum as a share of sites or of images")
    timeout_s: float = Field(600.0, gt=0, description="where: hospitals: how long a request waits for answers")
    gate_z: float = Field(
        1.0, ge=0, description="where: hospitals: promote when pooled AUC beats the champion's by z standard errors"
    )
    min_count: int = Field(5, ge=1, description="where: hospitals: the fewest images a reported histogram cell counts")
    bins: int = Field(
        100000, ge=100, description="where: hospitals: score-histogram bins over logits in [-16, 16] (sparse JSON)"
    )
    reading: Literal["ends", "maxent", "even"] = Field(
        "ends",
        description="where: hospitals: the pooled figures (selection, threshold, gate) read a group of bins at its "
        "two ends by its mean, as the most-entropy spread with its mean bin, or spread evenly",
    )
    site_reading: Literal["maxent", "ends", "even"] = Field(
        "maxent",
        description="where: hospitals: how each site's own AUC (the matrix, the vote, its report) reads a group",
    )

    @model_validator(mode="after")
    def _hospitals_select_by_auc(self) -> "EvaluateConfig":
        if self.where == "hospitals" and self.select_metric != "auc":
            raise ValueError(
                f"evaluate.where: hospitals selects by auc (histograms of scores), not {self.select_metric}"
            )
        return self


class StoreConfig(_Frozen):
    """Where the vector store is (:func:`medvec.store.open_store`): a local folder or an S3 URL."""

    url: str = Field(".medvec/store", description="local folder or s3://bucket/prefix[?endpoint_url=...]")


class CoordinatorConfig(_Frozen):
    """The coordinator's held-out evaluation data, optional BN calibration images, and its reconcile interval."""

    eval_data: str | None = Field(
        "data/pneumoniamnist.npz",
        description="the coordinator's held-out set (val chooses, test reports); None: the hospitals score "
        "(evaluate.where: hospitals) and nothing at the coordinator needs patient images",
    )
    calibration_data: str | None = Field(None, description="optional BN calibration images (train split) for recompute")
    reconcile_seconds: float = Field(3600, gt=0, description="reconciling schedule of merge-and-evaluate")
    key: str | None = Field(
        None,
        description="the coordinator's private key (medvec coordinator keygen): every base, start point and merge "
        "record it publishes is signed, and it trusts only what it signed; None: nothing is signed",
    )

    def held_out(self) -> str:
        """``eval_data``, for the steps that read the coordinator's own held-out set (the DVC pipeline)."""
        if not self.eval_data:
            raise ConfigError("coordinator.eval_data is not set: this step reads the coordinator's held-out set")
        return self.eval_data


class IntakeConfig(_Frozen):
    """What a vector must pass before it is merged."""

    keyring: str | None = Field(None, description="JSON keyring of allowed hospitals; set: signatures required")
    max_vector_mb: float = Field(2048, gt=0)
    max_metadata_kb: float = Field(64, gt=0)
    defence: Literal["off", "quarantine", "clip"] = "quarantine"
    mad_k: float = Field(5.0, gt=0, description="outlier threshold in median absolute deviations")
    harmful: Literal["off", "flag", "exclude"] = Field(
        "off", description="vectors whose leave-one-out contribution is significantly negative: flagged or excluded"
    )
    harm_z: float = Field(2.0, ge=0, description="harmful: LOO below −harm_z × its paired-bootstrap standard error")
    harm_min: float = Field(0.01, ge=0, description="harmful: and LOO below −harm_min (the metric's units)")
    vote: Literal["off", "flag", "exclude"] = Field(
        "flag",
        description="evaluate.where: hospitals: a vector whose own model scores below chance at most other sites: "
        "listed in the record (flag) or also kept out of the merge, in quarantine (exclude)",
    )
    vote_z: float = Field(
        1.0, ge=0, description="vote: below chance at a site means AUC + vote_z × its Hanley–McNeil SE < 0.5"
    )

    @property
    def max_bytes(self) -> int:
        """``max_vector_mb`` in bytes: the largest vector file intake reads."""
        return int(self.max_vector_mb * 1024 * 1024)

    @property
    def max_metadata_bytes(self) -> int:
        """``max_metadata_kb`` in bytes: the largest metadata a vector may carry."""
        return int(self.max_metadata_kb * 1024)

    @field_validator("defence", "harmful", "vote", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` (``-S intake.defence=off``) as false."""
        return "off" if value is False else value


class ContributionConfig(_Frozen):
    """What each vector contributed to a merge: leave-one-out and Shapley values on the validation split."""

    method: Literal["off", "loo", "shapley"] = Field(
        "loo", description="off | loo (K extra merges) | shapley (also Shapley values for K ≤ max_vectors)"
    )
    budget: int = Field(64, ge=1, description="Shapley: extra merges beyond leave-one-out's, per merge")
    max_vectors: int = Field(8, ge=2, le=8, description="Shapley only up to this many vectors (at most 8); LOO beyond")
    seed: int = Field(0, description="seeds the permutation sample and the bootstrap")
    bootstrap: int = Field(200, ge=0, description="paired bootstrap resamples of the validation split (LOO's error)")
    share: bool = Field(False, description="medvec hospital report also shows other hospitals' scores")

    @field_validator("method", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value


class RegistryConfig(_Frozen):
    """MLflow tracking and the registry's champion gate, and the optional git+DVC registry of merged vectors."""

    enabled: bool = Field(True, description="log runs and register merged models in MLflow")
    model_name: str = "medvec"
    champion_margin: float = Field(
        0.0, ge=0, description="a new version must beat the champion's validation score by this much"
    )
    dvc_repo: str | None = Field(
        None, description="git+DVC registry of merged vectors (one commit per merge); None: off"
    )
    dvc_remote: str | None = Field(None, description="its DVC remote: a folder or s3://bucket/prefix")
    dvc_endpoint_url: str | None = Field(None, description="S3 endpoint for that remote")
    ui_url: str | None = Field(
        None,
        description="the MLflow UI that links outside MLflow point at; None: the tracking server when it is "
        "http(s), else http://127.0.0.1:5000 (where `make ui` serves the embedded store)",
    )


class HospitalConfig(_Frozen):
    """What a hospital's run starts from."""

    start_from: Literal["champion", "base"] = Field(
        "champion", description="fine-tune the current champion start point (async refinement) or θ_pre"
    )
    coordinator_key: str | None = Field(
        None,
        description="the coordinator's public key, pinned at join: the hospital trains only from a base and start "
        "point it signed; None: unsigned documents are trusted",
    )


class RefineConfig(_Frozen):
    """How landed vectors move the champion: one-shot merging (the paper) or asynchronous steps."""

    mode: Literal["oneshot", "async"] = Field(
        "oneshot", description="oneshot: merge every hospital's latest; async: buffered steps"
    )
    buffer: int = Field(1, ge=1, description="B: vectors per step (1 = FedAsync, more = FedBuff)")
    eta: float | None = Field(None, gt=0, description="server learning rate η; None chooses it on validation")
    etas: tuple[float, ...] = Field((0.5, 1.0, 1.5, 2.0), description="η grid when eta is None")
    staleness: Literal["polynomial", "hinge"] = "polynomial"
    staleness_a: float = Field(0.5, gt=0, description="polynomial exponent a, or the hinge slope")
    staleness_b: int = Field(4, ge=0, description="the hinge's knee: no discount up to b versions")
    max_staleness: int = Field(8, ge=0, description="vectors staler than this are kept aside, not merged")
    staleness_cap: int | None = Field(
        None, ge=1, description="FADAS: a step whose stalest vector is s > cap versions old is scaled by cap/s"
    )
    weighting: Literal["buffer", "network"] = Field(
        "buffer", description="a vector's weight: its share of the buffer's samples, or of the network's"
    )
    fresh: bool = Field(
        False,
        description="step when every hospital of the network has a vector in the buffer (or `timeout` passed), "
        "instead of at B vectors; with no staleness the step is FedAvg's",
    )
    quorum: float = Field(
        1.0,
        gt=0,
        le=1,
        description="fresh: step once this share of the network's hospitals (rounded up) has a vector in the buffer; "
        "1: every hospital",
    )
    network: tuple[str, ...] = Field(
        (), description="fresh: the hospitals a step waits for; empty: every hospital with a vector on this base"
    )
    timeout: float | None = Field(
        86400.0,
        gt=0,
        description="fresh: step anyway once the oldest buffered vector has waited this long (seconds; None: wait for "
        "every hospital)",
    )
    server_optimizer: Literal["none", "fedavgm", "fedadam"] = Field(
        "none", description="how a step's delta moves the champion: as is, with server momentum, or by Adam"
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: β (Flower's FedAvgM default is 0)")
    server_lr: float = Field(0.1, gt=0, description="fedadam: η (Flower's FedAdam default)")
    server_betas: tuple[float, float] = Field((0.9, 0.99), description="fedadam: β1, β2 (Flower's defaults)")
    server_tau: float = Field(1e-9, gt=0, description="fedadam: τ, the adaptivity (Flower's default)")
    ema: float | None = Field(
        None, gt=0, lt=1, description="the champion served is an EMA of the promoted versions with this decay"
    )
    first_step: Literal["buffer", "oneshot"] = Field(
        "buffer",
        description="the step from θ_pre: by the buffer rule, or the one-shot merge of every hospital's vector",
    )
    carry: bool = Field(
        False,
        description="a step the gate did not promote leaves its vectors in the buffer for the next step from the same "
        "champion (a hospital's vectors then share its weight), instead of spending them",
    )
    local_epochs: int = Field(1, ge=1, description="epochs per contribution in the demo's simulation")


class DemoConfig(_Frozen):
    """``medvec demo``: its data, its output folder, and whether it adds the random-vector control and the
    centralized upper bound."""

    data: str = "data/pneumoniamnist.npz"
    out: str = "reports/demo"
    control: bool = True
    centralized: bool = True
    converged_max_epochs: int = Field(
        8,
        ge=0,
        description="the centralized reference trained to convergence: at most this many epochs (0: off); "
        "make quality and make async-bench use 20",
    )
    timeout: float = Field(
        3.0,
        gt=0,
        description="the simulation's refine.timeout, in simulated time units (1,000 images, one epoch, speed 1); "
        "refine.timeout itself is seconds on the coordinator's clock",
    )


class Params(_Frozen):
    """All of ``params.yaml``, one section per stage; a section left out takes its defaults."""

    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    vectors: VectorsConfig = VectorsConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    merge: MergeConfig = MergeConfig()
    batchnorm: BatchNormConfig = BatchNormConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    store: StoreConfig = StoreConfig()
    coordinator: CoordinatorConfig = CoordinatorConfig()
    intake: IntakeConfig = IntakeConfig()
    contribution: ContributionConfig = ContributionConfig()
    registry: RegistryConfig = RegistryConfig()
    hospital: HospitalConfig = HospitalConfig()
    refine: RefineConfig = RefineConfig()
    demo: DemoConfig = DemoConfig()

    @model_validator(mode="before")
    @classmethod
    def _decode_at_model_size(cls, values: Any) -> Any:
        """``data.decode_size`` left null becomes the model's input size (:data:`NATIVE_DECODE_SIZE` when the model
        keeps its native size), here once, so the hospital, the record and the served model all hold the number."""
        if not isinstance(values, dict):
            return values
        data, model = values.get("data") or {}, values.get("model") or {}
        data = data.model_dump() if isinstance(data, BaseModel) else dict(data)
        if data.get("decode_size") is None:
            size = getattr(model, "image_size", None) if isinstance(model, BaseModel) else dict(model).get("image_size")
            data["decode_size"] = size or NATIVE_DECODE_SIZE
        return {**values, "data": data}

    def with_absolute_paths(self, base: Path | None = None) -> Params:
        """These params with every local file or folder they name made absolute against ``base`` (the working
        directory): what a worker that runs elsewhere (in the checkout) must be handed.  URLs stay as they are."""
        here = Path(base or Path.cwd())

        def absolute(value: str | None) -> str | None:
            return value if value is None or "://" in value else str((here / value).resolve())

        changes = {
            "store": {"url": absolute(self.store.url)},
            "coordinator": {
                "eval_data": absolute(self.coordinator.eval_data),
                "calibration_data": absolute(self.coordinator.calibration_data),
                "key": absolute(self.coordinator.key),
            },
            "intake": {"keyring": absolute(self.intake.keyring)},
            "privacy": {"ledger": absolute(self.privacy.ledger)},
            "registry": {
                "dvc_repo": absolute(self.registry.dvc_repo),
                "dvc_remote": absolute(self.registry.dvc_remote),
            },
            "hospital": {"coordinator_key": absolute(self.hospital.coordinator_key)},
        }
        return self.model_copy(
            update={name: getattr(self, name).model_copy(update=fields) for name, fields in changes.items()}
        )


class ConfigError(UserError, ValueError):
    """A params file or an override that does not fit the schema."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} names no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Return a copy of ``data`` with every ``key=value`` override applied."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Load ``params.yaml`` (missing file: defaults) and apply ``-S`` overrides."""
    data: dict = {}
    if path is not None and Path(path).exists():
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid parameters ({path}): {exc}") from exc
