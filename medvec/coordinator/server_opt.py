"""Server optimizers over asynchronous steps: FedAvgM and FedAdam, with Flower's arithmetic.

A step's weighted delta Δ = Σ weight_i·τ_i (:mod:`medvec.coordinator.weights`) becomes the direction d the
champion moves along, θ ← θ_champion + η·d (η fixed or chosen on validation, as before):

* ``none``: d = Δ;
* ``fedavgm`` (server momentum; Hsu et al. 2019, arXiv 1909.06335): m ← β·m + Δ (m = Δ at the first step),
  d = m, as Flower's ``FedAvgM`` with ``server_learning_rate`` 1;
* ``fedadam`` (Reddi et al., ICLR 2021, arXiv 2003.00295): m ← β1·m + (1 − β1)·Δ,
  v ← β2·v + (1 − β2)·Δ², d = lr_t·m / (√v + τ) with Flower's bias-corrected
  lr_t = lr·√(1 − β2^(t+1)) / (1 − β1^(t+1)) at step t (1 for the step from θ_pre).

The state (m, v) belongs to the version chain: it moves only when a step is promoted, is stored with the
version it led to (``merges/<base>/server/v<n>.safetensors``, which hospitals cannot read), and
``medvec lineage --rebuild`` replays it from θ_pre.  Only trained parameters move this way; BN's running
statistics (restored by the BN plan) and integer buffers take Δ as is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from medvec.batchnorm import is_bn_stat
from medvec.config import RefineConfig
from medvec.vectors.vector import DataVector

State = dict[str, torch.Tensor]


def moves(key: str, tensor: torch.Tensor) -> bool:
    """Whether the server optimizer moves ``key``: floating parameters, not BN statistics or integer buffers."""
    return tensor.is_floating_point() and not is_bn_stat(key)


@dataclass
class ServerStep:
    """The optimizer at one step: its settings, the parent version's state, the step number t (1 from θ_pre),
    and, once :meth:`direction` ran on the whole buffer, the state a promotion stores."""

    cfg: RefineConfig
    parent_state: State = field(default_factory=dict)
    t: int = 1
    new_state: State | None = None

    def direction(self, delta: DataVector, keep: bool = True) -> DataVector:
        """d for the step's Δ from the parent's state; ``keep``: remember the state it leads to (the whole buffer's
        step; contribution scores of subsets pass ``keep=False``)."""
        d, state = server_direction(delta.deltas, self.parent_state, self.cfg, self.t)
        if keep:
            self.new_state = state
        return DataVector(d)


def server_direction(delta: Mapping[str, torch.Tensor], state: State, cfg: RefineConfig, t: int) -> tuple[dict, State]:
    """(d, the next state) for Δ = ``delta`` from ``state`` at step ``t`` (the module's formulas)."""
    if cfg.server_optimizer == "none":
        return dict(delta), {}
    out, nxt = dict(delta), {}
    for key, dk in delta.items():
        if not moves(key, dk):
            continue
        dk = dk.float()
        if cfg.server_optimizer == "fedavgm":
            m = cfg.server_momentum * state[f"m.{key}"] + dk if f"m.{key}" in state else dk.clone()
            nxt[f"m.{key}"], out[key] = m, m.clone()
            continue
        b1, b2 = cfg.server_betas
        m = b1 * state.get(f"m.{key}", torch.zeros_like(dk)) + (1 - b1) * dk
        v = b2 * state.get(f"v.{key}", torch.zeros_like(dk)) + (1 - b2) * dk * dk
        lr_t = cfg.server_lr * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        nxt[f"m.{key}"], nxt[f"v.{key}"] = m, v
        out[key] = lr_t * m / (v.sqrt() + cfg.server_tau)
    return out, nxt


def ema_update(previous: State | None, state: Mapping[str, torch.Tensor], decay: float) -> State:
    """The EMA champion after a promotion (``refine.ema``): β·previous + (1 − β)·θ_v for floating tensors, θ_v's
    own integer buffers; the first promoted version starts it (θ_pre is not averaged in)."""
    if previous is None:
        return {k: t.clone() for k, t in state.items()}
    return {k: decay * previous[k] + (1 - decay) * t if t.is_floating_point() else t.clone() for k, t in state.items()}
