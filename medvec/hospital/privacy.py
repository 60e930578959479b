"""Differential privacy at the hospital: DP-SGD fine-tuning with Opacus, and the hospital's privacy ledger.

DP-SGD clips each example's gradient to ``max_grad_norm`` and adds Gaussian noise of
``noise_multiplier × max_grad_norm``; batches are Poisson-sampled, as Opacus does it
(each image joins each batch with probability q = 1/⌈n/batch_size⌉, so batch sizes vary).
Opacus' accountant (RDP or PRV) turns σ, the sampling rate and the number of steps
into the (ε, δ) this module reports: medvec computes no privacy figure of its own.

Batch norm: per-sample gradients and batch statistics do not mix, so BN layers are
frozen (eval-mode running statistics, affine weights not trained). Their running
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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medvec.config import FinetuneConfig, PrivacyConfig
from medvec.data.images import ImageSet
from medvec.errors import UserError
from medvec.hospital.train import TrainResult, finish_training, lr_schedule, prepare_training, with_local_val
from medvec.models import ModelSpec
from medvec.preprocess import augment, to_tensor
from medvec.timing import timed, utcnow
from medvec.vectors.vector import DataVector, PrivacySpent

LEDGER_NAME = "privacy-ledger.json"


class PrivacyBudgetError(UserError):
    """Publishing a vector would spend more than the hospital's lifetime ε."""


def default_delta(n: int) -> float:
    """δ = 1/(10·n): well below the 1/n at which one record could be released outright."""
    return 1.0 / (10 * max(n, 1))


def freeze_batchnorm(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Freeze BN affine weights and return the BN layers (to be kept in eval mode while training)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(False)
    return layers


def _loader(train: ImageSet, spec: ModelSpec, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """All training images preprocessed once; Opacus replaces the loader with its Poisson-sampling one."""
    x = to_tensor(train.images, spec)
    y = torch.as_tensor(train.labels, dtype=torch.float32 if train.multilabel else torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, generator=g)


@dataclass
class DPTraining:
    """What :func:`dp_finetune` returns: the training record and the privacy it spent."""

    result: TrainResult
    spent: PrivacySpent


def _private(model, optimizer, loader, cfg: FinetuneConfig, privacy: PrivacyConfig, delta: float):
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
            **common, target_epsilon=privacy.target_epsilon, target_delta=delta, epochs=cfg.epochs
        )


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
    """DP-SGD fine-tune of ``model`` in place (BN frozen); returns the record and Opacus' accounted (ε, δ).

    ``bn_recalibrate`` is not applied: re-estimating BN statistics on the images would be an
    unaccounted release.
    """
    device, loss_fn = prepare_training(model, train, cfg)
    delta = privacy.delta or default_delta(len(train))
    bn_layers = freeze_batchnorm(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, private, opt, loader = _private(
        model, opt, _loader(train, spec, cfg.batch_size, cfg.seed), cfg, privacy, delta
    )
    steps_per_epoch = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(steps_per_epoch * cfg.epochs, cfg.warmup_steps))
    result = TrainResult(device=str(device))
    g = torch.Generator().manual_seed(cfg.seed + 1)  # augmentation only: sampling is Opacus' own
    start, seen, steps = time.perf_counter(), 0, 0
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for epoch in range(cfg.epochs):
            private.train()
            for layer in bn_layers:
                layer.eval()  # frozen statistics: no batch statistics, no running-stat updates
            running, n = 0.0, 0
            for x, y in loader:
                steps += 1
                bar.update(1)
                if len(y) == 0:  # an empty Poisson batch (probability (1-q)^n): no update, but still accounted
                    engine.accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=loader.sample_rate)
                    continue
                x, y = x.to(device), y.to(device)
                if cfg.augment:
                    x = augment(x, g)
                loss = loss_fn(private(x), y)
                opt.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # the first conv's input needs no gradient: Opacus' hooks say so
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                opt.step()
                sched.step()
                running, n, seen = running + loss.item() * len(y), n + len(y), seen + len(y)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / max(n, 1):.4f}")
            entry = {"epoch": epoch + 1, "loss": running / max(n, 1), "lr": sched.get_last_lr()[0]}
            entry["epsilon"] = _epsilon(engine, delta)  # spent so far: the fine-tune run's per-epoch curve
            result.history.append(with_local_val(entry, model, val, spec, device))
    finally:
        bar.close()
    finish_training(model, result, start, seen)
    spent = PrivacySpent(
        epsilon=_epsilon(engine, delta),
        delta=delta,
        accountant=privacy.accountant,
        noise_multiplier=float(opt.noise_multiplier),
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=float(loader.sample_rate),
        steps=steps,
        epochs=cfg.epochs,
    )
    return DPTraining(result, spent)


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
