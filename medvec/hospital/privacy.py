"""Differential privacy at the hospital: DP-SGD fine-tuning with Opacus, and the hospital's privacy ledger.

DP-SGD clips each example's gradient to ``max_grad_norm`` and adds Gaussian noise of
``noise_multiplier × max_grad_norm``; batches are Poisson-sampled, as Opacus does it
(each image joins each batch with probability q = 1/⌈n/batch_size⌉, so batch sizes vary).
Opacus' accountant (RDP or PRV) turns σ, the sampling rate and the number of steps
into the (ε, δ) this module reports: medvec computes no privacy figure of its own.

Batch norm: per-sample gradients and batch statistics do not mix, so BN layers are
frozen (eval-mode running statistics; affine weights trained only under ``privacy.trainable:
bn_affine``, through :class:`FrozenStatsNorm`). Their running
statistics stay θ_start's, and the hospital sends no moment sums, so nothing in the
vector's BN aggregates depends on its images; the merge restores BN from a calibration
set, or averages the hospitals' running statistics (``coordinator.plan_bn``).

The ledger (``privacy-ledger.json``, at the hospital) lists every vector the hospital
published with its ε. Its total uses basic composition (ε and δ add up), an upper
bound; publishing a vector that would take the total past ``lifetime_epsilon`` is
refused, and the vector is kept beside the ledger.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from medvec.config import FinetuneConfig, PrivacyConfig
from medvec.data.images import ImageSet
from medvec.errors import UserError
from medvec.hospital.train import TrainResult, finish_training, lr_schedule, prepare_training, with_local_val
from medvec.models import ModelSpec, head_name
from medvec.preprocess import augment, batches, to_tensor
from medvec.timing import timed, utcnow
from medvec.vectors.vector import DataVector, PrivacySpent, bn_affine_keys, trained_keys

LEDGER_NAME = "privacy-ledger.json"


class PrivacyBudgetError(UserError):
    """Publishing a vector would spend more than the hospital's lifetime ε."""


def default_delta(n: int) -> float:
    """δ = 1/(10·n): well below the 1/n at which one record could be released outright."""
    return 1.0 / (10 * max(n, 1))


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's batch-norm layers, kept in eval mode while DP-SGD trains (frozen running statistics). Whether
    their scales and shifts train is :func:`select_trainable`'s to say."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def select_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Train only what ``privacy.trainable`` names (:func:`~medvec.vectors.vector.trained_keys`, the keys the vector
    will carry): ``all`` trains every weight but batch norm's (frozen, as ever under DP), ``bn_affine`` the BN
    scales and shifts and the head, ``head`` the head. The rest is frozen; the trained parameters are returned.

    The one place that decides what trains: every parameter's ``requires_grad`` is set here."""
    state = model.state_dict()
    keys = set(trained_keys(state, trainable))
    if trainable == "all":
        keys -= set(bn_affine_keys(state))
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in keys)
        if name in keys:
            chosen.append(p)
    return chosen


class FrozenStatsNorm(nn.Module):
    """An eval-mode batch norm as Opacus can train it: the input normalised by the layer's frozen running
    statistics, then scaled and shifted by the layer's own ``weight`` and ``bias`` (the same Parameters, trained in
    place). It holds no buffers (Opacus refuses trainable layers with buffers: batch statistics would leak), and
    its per-sample gradients are exact: Σ over positions of x̂·g for the scale, of g for the shift."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError("a batch norm without running statistics cannot be frozen")
        self.weight, self.bias = bn.weight, bn.bias
        inv = torch.rsqrt(bn.running_var.detach() + bn.eps)
        self.scale, self.shift = inv.clone(), (-bn.running_mean.detach() * inv).clone()

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * (x.ndim - 2)))

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = (x − running mean) / √(running var + eps)."""
        return x * self._view(self.scale, x) + self._view(self.shift, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x̂ · weight + bias, channel by channel."""
        return self.normalised(x) * self._view(self.weight, x) + self._view(self.bias, x)


def _frozen_norm_grad_sample(layer: FrozenStatsNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a :class:`FrozenStatsNorm`'s scale and shift (registered with Opacus)."""
    x_hat, dims = layer.normalised(activations[0]), tuple(range(2, backprops.ndim))
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (x_hat * backprops).sum(dims)
    if layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dims)
    return out


@contextmanager
def frozen_stats_norms(model: nn.Module) -> Iterator[None]:
    """While the block runs, every batch norm of ``model`` is a :class:`FrozenStatsNorm` over the same weights, and
    no activation works in place (Opacus' backward hooks on a norm's output forbid an in-place ReLU after it)."""
    from opacus.grad_sample.utils import register_grad_sampler

    register_grad_sampler(FrozenStatsNorm)(_frozen_norm_grad_sample)
    in_place: list[Any] = [m for m in model.modules() if getattr(m, "inplace", False) is True]  # nn.ReLU and kin
    for m in in_place:
        m.inplace = False
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, FrozenStatsNorm(module))
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
        for m in in_place:
            m.inplace = True


def _loader(x: torch.Tensor, train: ImageSet, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """The training inputs ``x`` (preprocessed images, or features) with their labels; Opacus replaces the loader
    with its Poisson-sampling one, of ``batch_size`` images a batch on average (the logical batch)."""
    y = torch.as_tensor(train.labels, dtype=torch.float32 if train.multilabel else torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, generator=g)


@torch.no_grad()
def head_features(model: nn.Module, head: nn.Module, inputs: Iterable[torch.Tensor], device) -> torch.Tensor:
    """What ``head`` receives from ``model`` (eval mode) for each input of ``inputs`` (batches, in order), on the
    CPU: computed once, since under ``privacy.trainable: head`` nothing below the head changes. Only the features
    are kept, so the inputs can be preprocessed a batch at a time."""
    got: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: got.append(args[0].detach().flatten(1).cpu()))
    model.eval()
    try:
        for x in inputs:
            model(x.to(device))
    finally:
        hook.remove()
    return torch.cat(got)


def head_views(
    model: nn.Module, head: nn.Module, train: ImageSet, spec: ModelSpec, batch: int, views: int, seed: int, device
) -> torch.Tensor:
    """The head's training inputs under ``privacy.trainable: head``: the features of the plain images, (n, d), or
    with ``views`` K > 1, (n, K, d): view 0 plain and views 1 … K − 1 augmented (:func:`medvec.preprocess.augment`,
    seeded), each computed once, a batch at a time."""
    plain = head_features(model, head, (x for x, _ in batches(train, spec, batch)), device)
    if views == 1:
        return plain
    g = torch.Generator().manual_seed(seed)
    more = [
        head_features(model, head, (augment(x, g) for x, _ in batches(train, spec, batch)), device)
        for _ in range(views - 1)
    ]
    return torch.stack([plain, *more], dim=1)


def _rows_of_views(x: torch.Tensor, y: torch.Tensor, views: int, head: bool, g: torch.Generator):
    """A batch of examples as the rows the module sees, K = ``views`` consecutive rows an example, and their
    targets: the head's (n, K, d) features flattened; images repeated K times and each row augmented."""
    if views == 1:
        return x, y
    rows = x.flatten(0, 1) if head else augment(x.repeat_interleave(views, 0), g)
    return rows, y.repeat_interleave(views, 0)


def _mean_over_views(params: list[nn.Parameter], views: int) -> None:
    """Augmentation multiplicity: each example's per-sample gradient becomes the mean of its K rows' (the loss is
    the mean over rows, and Opacus scales each row's gradient by their number), before the optimizer clips it."""
    if views == 1:
        return
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is not None:
            p.grad_sample = gs.view(-1, views, *gs.shape[1:]).mean(1)  # type: ignore[attr-defined]  # set by Opacus


def per_example_loss(loss_fn: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The DP-SGD loss: the plain mean over rows of each row's own (class-weighted) loss, so that Opacus' per-sample
    gradient of a row is w_y·∇ℓ and depends on that row alone. ``nn.CrossEntropyLoss(weight=w)`` divides by the
    batch's Σ w instead: every example's gradient would then scale with the labels of the others in its batch,
    which per-sample clipping does not bound. (Class weights average 1 over the split, so the scale is kept.)"""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None:
        weight = loss_fn.weight
        return lambda out, y: nn.functional.cross_entropy(out, y, weight=weight, reduction="none").mean()
    return loss_fn


@dataclass(frozen=True)
class FeatureCentre:
    """Under ``privacy.centre``: μ, the mean feature that **public** images give the head, and s, one scalar (their
    centred RMS per coordinate). The head trains on (x − μ)/s instead of x (ReLU6-pooled features are all
    positive: every per-example gradient carries their mean, which clipping and noise then share), and starts and
    ends as the same function of x: W̃ = W·s, b̃ = b + W·μ before; W = W̃/s, b = b̃ − W·μ after. μ and s are public,
    so the privacy accounted is unchanged. ``benchmarks/privacy_centering.py``: +0.010 merged test AUC at ε = 3."""

    mean: torch.Tensor
    scale: float

    @classmethod
    def of(
        cls, model: nn.Module, head: nn.Linear, public: ImageSet, spec: ModelSpec, batch: int, device
    ) -> FeatureCentre:
        """μ and s of ``public`` through ``model`` up to ``head``; PrivateDataError for a hospital's split."""
        if public.private:
            raise PrivateDataError(
                "privacy.centre names a hospital's private split: its mean feature would be released unaccounted;"
                " name public images (another data set, or the coordinator's proxy set)"
            )
        f = head_features(model, head, (x for x, _ in batches(public, spec, batch)), device)
        mean = f.mean(0)
        return cls(mean, float(f.sub(mean).norm(dim=1).mean()) / math.sqrt(f.shape[1]))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(x − μ)/s: what the head trains on."""
        return (x - self.mean) / self.scale

    @torch.no_grad()
    def to_centred(self, head: nn.Linear) -> None:
        """``head`` becomes the same function of centred features: b̃ = b + W·μ, W̃ = W·s."""
        head.bias.add_(head.weight @ self.mean.to(head.weight))
        head.weight.mul_(self.scale)

    @torch.no_grad()
    def to_raw(self, head: nn.Linear) -> None:
        """``head`` becomes the same function of raw features: W = W̃/s, b = b̃ − W·μ."""
        head.weight.div_(self.scale)
        head.bias.sub_(head.weight @ self.mean.to(head.weight))

    @contextmanager
    def raw(self, head: nn.Linear | None) -> Iterator[None]:
        """While the block runs, ``head`` (when centring) is the function of raw features, as the model uses it."""
        if head is None:
            yield
            return
        self.to_raw(head)
        try:
            yield
        finally:
            self.to_centred(head)


@dataclass
class DPTraining:
    """What :func:`dp_finetune` returns: the training record and the privacy it spent."""

    result: TrainResult
    spent: PrivacySpent


def _private(model, optimizer, loader, epochs: int, privacy: PrivacyConfig, delta: float):
    """Opacus' PrivacyEngine around the model, optimizer and loader; σ fixed or solved for the target ε."""
    from opacus import PrivacyEngine

    common = {"module": model, "optimizer": optimizer, "data_loader": loader, "max_grad_norm": privacy.max_grad_norm}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # secure_mode needs torchcsprng
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # solving σ probes alphas
        engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=False)
        if privacy.noise_multiplier is not None:
            return engine, *engine.make_private(**common, noise_multiplier=privacy.noise_multiplier)
        return engine, *engine.make_private_with_epsilon(
            **common, target_epsilon=privacy.target_epsilon, target_delta=delta, epochs=epochs
        )


@dataclass
class _Run:
    """One DP-SGD run's parts: the private module, its engine, optimizer, loader and what trains."""

    module: nn.Module
    engine: Any  # opacus.PrivacyEngine
    opt: Any  # opacus.optimizers.DPOptimizer
    loader: Any  # opacus.data_loader.DPDataLoader
    params: list[nn.Parameter]
    delta: float
    centre: FeatureCentre | None = None  # privacy.centre: the head trains on centred features
    head: nn.Linear | None = None


@timed("finetune")
def dp_finetune(
    model: nn.Module,
    train: ImageSet,
    spec: ModelSpec,
    cfg: FinetuneConfig,
    privacy: PrivacyConfig,
    val: ImageSet | None = None,
    progress: bool = True,
    desc: str = "DP fine-tune",
) -> DPTraining:
    """DP-SGD fine-tune of ``model`` in place (BN statistics frozen) of what ``privacy.trainable`` names; returns
    the record and Opacus' accounted (ε, δ).

    ``head`` trains the head on features computed once (the images pass the frozen network once a view,
    preprocessed ``finetune.batch_size`` at a time, so only the features of the split are held in memory);
    ``bn_affine`` and ``all`` backpropagate through the network, with augmentation as ``finetune.augment`` says.
    With K = ``privacy.views`` > 1, each example's gradient is the mean over K views before clipping
    (:func:`head_views`; the network modes augment K copies each step, K times the memory of a physical batch).
    Batches are Poisson-sampled at ``privacy.batch_size`` images on average and computed ``finetune.batch_size`` at
    a time (Opacus' BatchMemoryManager), for ``privacy.epochs``, at ``privacy.lr`` and ``privacy.weight_decay``;
    with ``privacy.ema`` the weights kept are an exponential moving average of the steps' (post-processing: no
    privacy cost).
    ``bn_recalibrate`` is not applied: re-estimating BN statistics on the images would be an unaccounted release.
    """
    device, weighted = prepare_training(model, train, cfg)
    loss_fn = per_example_loss(weighted)
    delta = privacy.delta or default_delta(len(train))
    epochs = privacy.epochs or cfg.epochs
    bn_layers = batchnorm_layers(model)
    params = select_trainable(model, privacy.trainable)
    module: nn.Module = model
    head: nn.Linear | None = None
    centre: FeatureCentre | None = None
    if privacy.trainable == "head":
        module = head = cast(nn.Linear, model.get_submodule(head_name(model)))  # head_name finds an nn.Linear
        x = head_views(model, head, train, spec, cfg.batch_size, privacy.views, cfg.seed + 2, device)
        if privacy.centre:
            from medvec.data.sources import load_split

            public = load_split(privacy.centre, "train")
            centre = FeatureCentre.of(model, head, public, spec, cfg.batch_size, device)
            centre.to_centred(head)
            x = centre.inputs(x)
    else:  # the whole split preprocessed: Opacus samples its batches from it every epoch
        x = to_tensor(train.images, spec)
    decay = cfg.weight_decay if privacy.weight_decay is None else privacy.weight_decay
    opt = torch.optim.AdamW(params, lr=privacy.lr or cfg.lr, weight_decay=decay)
    loader = _loader(x, train, privacy.batch_size or cfg.batch_size, cfg.seed)
    swap = frozen_stats_norms(model) if privacy.trainable == "bn_affine" else nullcontext()
    with swap:
        module.train()  # Opacus checks it
        engine, private, opt, loader = _private(module, opt, loader, epochs, privacy, delta)
        run = _Run(private, engine, opt, loader, params, delta, centre, head if centre else None)
        result, steps = _train(run, model, bn_layers, loss_fn, spec, cfg, epochs, privacy, val, device, progress, desc)
    if centre is not None and head is not None:
        centre.to_raw(head)
    spent = PrivacySpent(
        epsilon=_epsilon(engine, delta),
        delta=delta,
        accountant=privacy.accountant,
        noise_multiplier=float(opt.noise_multiplier),
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=float(loader.sample_rate),
        steps=steps,
        epochs=epochs,
        trainable=privacy.trainable,
    )
    return DPTraining(result, spent)


def _train(run: _Run, model, bn_layers, loss_fn, spec, cfg, epochs, privacy, val, device, progress, desc):
    """The DP-SGD loop over ``run``: (the training record, the logical steps accounted)."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    steps_per_epoch = len(run.loader)
    sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lr_schedule(steps_per_epoch * epochs, cfg.warmup_steps))
    ema = [p.detach().clone() for p in run.params] if privacy.ema else None
    result = TrainResult(device=str(device))
    views, on_features = privacy.views, privacy.trainable == "head"
    augmenting = cfg.augment and not on_features and views == 1  # K > 1 augments each of the K copies
    physical_batch = cfg.batch_size if on_features else max(1, cfg.batch_size // views)
    g = torch.Generator().manual_seed(cfg.seed + 1)  # augmentation only: sampling is Opacus' own
    start, seen, steps = time.perf_counter(), 0, 0
    bar = tqdm(total=steps_per_epoch * epochs, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for epoch in range(epochs):
            run.module.train()
            for layer in bn_layers:
                layer.eval()  # frozen statistics: no batch statistics, no running-stat updates
            running, n = 0.0, 0
            with BatchMemoryManager(
                data_loader=run.loader, max_physical_batch_size=physical_batch, optimizer=run.opt
            ) as physical:
                for x, y in physical:
                    if len(y) == 0:  # an empty Poisson batch (probability (1-q)^n): no update, but accounted
                        run.engine.accountant.step(
                            noise_multiplier=run.opt.noise_multiplier, sample_rate=run.loader.sample_rate
                        )
                        steps += 1
                        bar.update(1)
                        continue
                    x, y = x.to(device), y.to(device)
                    if augmenting:
                        x = augment(x, g)
                    rows, targets = _rows_of_views(x, y, views, on_features, g)
                    loss = loss_fn(run.module(rows), targets)
                    run.opt.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():  # the first conv's input needs no gradient: Opacus says so
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    _mean_over_views(run.params, views)
                    run.opt.step()
                    running, n, seen = running + loss.item() * len(y), n + len(y), seen + len(y)
                    if not run.opt._is_last_step_skipped:  # a logical step ended: schedule, average, count
                        sched.step()
                        steps += 1
                        _average(ema, run.params, privacy.ema, steps)
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{running / max(n, 1):.4f}")
            entry = {"epoch": epoch + 1, "loss": running / max(n, 1), "lr": sched.get_last_lr()[0]}
            entry["epsilon"] = _epsilon(run.engine, run.delta)  # spent so far: the per-epoch curve
            with _averaged(ema, run.params), run.centre.raw(run.head) if run.centre else nullcontext():
                result.history.append(with_local_val(entry, model, val, spec, device))
    finally:
        bar.close()
    if ema is not None:
        for p, a in zip(run.params, ema, strict=True):
            p.data.copy_(a)
    finish_training(model, result, start, seen)
    return result, steps


def _average(ema: list[torch.Tensor] | None, params: list[nn.Parameter], decay: float | None, step: int) -> None:
    """ema ← d·ema + (1 − d)·θ after logical step ``step`` (nothing without ``privacy.ema``), with d the smaller of
    ``privacy.ema`` and (1 + step)/(10 + step), so that the first steps do not leave the average at the start."""
    if ema is None or decay is None:
        return
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for a, p in zip(ema, params, strict=True):
            a.mul_(decay).add_(p.detach(), alpha=1 - decay)


@contextmanager
def _averaged(ema: list[torch.Tensor] | None, params: list[nn.Parameter]) -> Iterator[None]:
    """While the block runs, the parameters hold their moving average (when there is one)."""
    if ema is None:
        yield
        return
    kept = [p.detach().clone() for p in params]
    for p, a in zip(params, ema, strict=True):
        p.data.copy_(a)
    try:
        yield
    finally:
        for p, k in zip(params, kept, strict=True):
            p.data.copy_(k)


def _epsilon(engine, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(engine.get_epsilon(delta))


class Ledger:
    """The hospital's local record of the ε each published vector spent (it never leaves the hospital)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_hospital(cls, privacy: PrivacyConfig, data_dir: str | Path) -> "Ledger":
        """The hospital's ledger: ``privacy.ledger`` when set, else ``privacy-ledger.json`` in ``data_dir``."""
        return cls(privacy.ledger or Path(data_dir) / LEDGER_NAME)

    def entries(self) -> list[dict]:
        """The published vectors' entries (none before the first); UserError when the ledger is unreadable."""
        if not self.path.exists():
            return []
        try:
            return json.loads(self.path.read_text())["vectors"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"privacy ledger {self.path}: unreadable ({exc}); fix or restore it before publishing"
            ) from exc

    def spent(self) -> tuple[float, float]:
        """Total (ε, δ) of the published vectors, by basic composition (an upper bound)."""
        entries = self.entries()
        return sum(e["epsilon"] for e in entries), sum(e["delta"] for e in entries)

    def check(self, vector: DataVector, lifetime_epsilon: float | None) -> None:
        """Refuse (PrivacyBudgetError) a vector whose ε would take the total past ``lifetime_epsilon``.

        The vector is first kept beside the ledger, so refusing it loses nothing.
        """
        spent = vector.meta.privacy
        if spent is None or lifetime_epsilon is None:
            return
        total, _ = self.spent()
        if total + spent.epsilon > lifetime_epsilon + 1e-9:
            kept = self.keep(vector)
            raise PrivacyBudgetError(
                f"hospital {vector.meta.hospital!r}: privacy.lifetime_epsilon={lifetime_epsilon:g} would be exceeded "
                f"(spent ε={total:.3f} in {len(self.entries())} published vectors + this vector's ε={spent.epsilon:.3f}); "
                f"not published; the vector is kept at {kept}"
            )

    def spend(self, vector: DataVector, lifetime_epsilon: float | None) -> None:
        """Before a DP vector is published: :meth:`check` the budget, then :meth:`record` its ε."""
        self.check(vector, lifetime_epsilon)
        self.record(vector)

    def keep(self, vector: DataVector) -> Path:
        """Save a refused vector under ``unpublished/`` beside the ledger; returns its path."""
        folder = self.path.parent / "unpublished"
        folder.mkdir(parents=True, exist_ok=True)
        return vector.save(folder / f"{vector.meta.vector_id}.safetensors")

    def record(self, vector: DataVector) -> None:
        """Add a published vector's ε to the ledger (written atomically)."""
        spent = vector.meta.privacy
        if spent is None:
            return
        entries = self.entries() + [
            {"vector_id": vector.meta.vector_id, "published_at": utcnow()} | spent.model_dump(mode="json")
        ]
        total = sum(e["epsilon"] for e in entries)
        doc = {"hospital": vector.meta.hospital, "composition": "basic", "epsilon_total": total, "vectors": entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.path)


def epsilon_of(spent: PrivacySpent) -> float:
    """The ε Opacus' accountant gives for ``spent``'s σ, sampling rate, steps and δ (an independent recount)."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(spent.accountant)
    accountant.history = [(spent.noise_multiplier, spent.sample_rate, spent.steps)]
    return float(accountant.get_epsilon(spent.delta))


class PrivateDataError(UserError):
    """DP settings tuned on a hospital's private split: a release its privacy ledger would not count."""


@dataclass(frozen=True)
class TunedSetting:
    """One point of :func:`tune_on_public`'s grid: the learning rate, clipping norm, weight decay and epochs (None:
    ``privacy.weight_decay``, ``privacy.epochs`` as given), the public validation AUC DP-SGD reached with them on
    each seeded split (``val_aucs``), and its mean (``val_auc``), which ranks them."""

    lr: float
    max_grad_norm: float
    val_auc: float
    val_aucs: tuple[float, ...] = ()
    weight_decay: float | None = None
    epochs: int | None = None


def tune_on_public(
    public: ImageSet,
    base,
    cfg: FinetuneConfig,
    privacy: PrivacyConfig,
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03),
    norms: tuple[float, ...] = (0.5, 1.0, 2.0),
    val_fraction: float = 0.2,
    seeds: int = 3,
    weight_decays: tuple[float | None, ...] = (None,),
    epochs: tuple[int | None, ...] = (None,),
) -> list[TunedSetting]:
    """``privacy.lr``, ``privacy.max_grad_norm`` and (with ``weight_decays`` and ``epochs``; None: as ``privacy``
    has it) ``privacy.weight_decay`` and ``privacy.epochs`` chosen on **public** data (at a fixed ε, more epochs
    mean more noise each step): DP-SGD as ``privacy`` says (its
    trainable, ε, epochs, batch) on ``seeds`` seeded splits of ``public`` (seeds ``cfg.seed``, ``cfg.seed + 1``,
    …: each changes the split, the noise and the batches), each grid point scored by its mean AUC on the
    held-out parts; the best first. One split is not enough: on BreastMNIST at ε = 3 the head's learning rates
    were within 0.001 AUC of each other on one split and 0.04 apart over three. A hospital's own images are
    refused (:class:`PrivateDataError`): every look at them spends privacy that the ledger does not count, so
    tune on another data set (BreastMNIST for PneumoniaMNIST), or on the coordinator's public proxy set."""
    from medvec.data.split import draw_local_val
    from medvec.evaluate import evaluate_model

    if public.private:
        raise PrivateDataError(
            "tune_on_public was given a hospital's private split: tuning on it spends privacy the ledger does not "
            "count; tune on public data (another data set, or the coordinator's proxy set)"
        )
    grid = [(lr, norm, wd, ep) for lr in lrs for norm in norms for wd in weight_decays for ep in epochs]
    scores: dict[tuple[float, float, float | None, int | None], list[float]] = {point: [] for point in grid}
    for seed in range(cfg.seed, cfg.seed + seeds):
        keep, held = draw_local_val(len(public), val_fraction, seed, public.groups())
        train, val = public.subset(keep), public.subset(held)
        seeded = cfg.model_copy(update={"seed": seed})
        for (lr, norm, wd, ep), got in scores.items():
            model = base.fresh()
            point = {"enabled": True, "lr": lr, "max_grad_norm": norm} | ({} if wd is None else {"weight_decay": wd})
            point |= {} if ep is None else {"epochs": ep}
            setting = privacy.model_copy(update=point)
            dp_finetune(model, train, base.spec, seeded, setting, progress=False)
            got.append(float(evaluate_model(model, val, base.spec)["auc"]))
    out = [
        TunedSetting(lr, norm, sum(got) / len(got), tuple(got), wd, ep) for (lr, norm, wd, ep), got in scores.items()
    ]
    return sorted(out, key=lambda t: -t.val_auc)
