"""Rebuilding what the coordinator recorded: a merge bit for bit from its record, and the version chain of asynchronous steps."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from medvec.coordinator.engine import apply_delta
from medvec.coordinator.methods import get_method, merge_delta
from medvec.coordinator.server_opt import ServerStep, State, ema_update
from medvec.models import Base
from medvec.record import MergeRecord
from medvec.vectors.file import weighted_sum


def rebuild_merge(store, record, parent: Base | None = None) -> tuple[nn.Module, str]:
    """Rebuild a recorded merge bit for bit from its :class:`~medvec.record.MergeRecord`.

    Inputs come from the store by id (content hashes checked), norm clipping is
    re-applied, and a ``recompute`` merge takes the moment sums stored with it.
    An async step starts from ``parent`` (default: its stored parent start point) and, with a server optimizer,
    from the state stored with that parent.
    Returns (model, sha256 of its state); equal to ``record.merged_sha256`` when reproducible.
    """
    model, sha, _ = _rebuild(store, record, parent, None)
    return model, sha


def _rebuild(store, record, parent: Base | None, server: State | None) -> tuple[nn.Module, str, State]:
    """(model, sha256, the server optimizer's state after the step) of a recorded merge."""
    from medvec.coordinator.defence import Scaled
    from medvec.models import state_sha256

    root = store.get_base(record.base_sha256)
    vectors = [store.get(i.vector_id, base=root.model.state_dict(), base_sha256=root.sha256) for i in record.inputs]
    for v, i in zip(vectors, record.inputs):
        if v.content_sha256 != i.content_sha256:
            raise ValueError(
                f"vector {i.vector_id}: content {v.content_sha256[:12]}… differs from the lineage's {i.content_sha256[:12]}…"
            )
    scales = record.scales()
    vectors = [Scaled(v, scales[v.meta.vector_id]) if v.meta.vector_id in scales else v for v in vectors]
    moments_fn = None
    if record.bn_strategy == "recompute":
        if not record.moments_key:
            raise ValueError(f"merge {record.merge_id}: recompute merge without stored moment sums")
        stored = store.get_moments(record.moments_key)
        moments_fn = lambda model: stored  # noqa: E731
    state: State = {}
    if record.mode == "async":
        start = parent or store.get_start(root.sha256, record.parent_version)
        if server is None and record.params.refine.server_optimizer != "none":
            server = store.get_chain_state(root.sha256, record.parent_version, "server")
        delta = weighted_sum(vectors, step_weights_of(record), fused=False)
        step = ServerStep(record.params.refine, server or {}, record.parent_version + 1)
        tau, state = step.direction(delta), step.new_state or {}
    else:
        start, tau = root, merge_delta(vectors, get_method(record.method, record.params.merge))
    model, _ = apply_delta(start, tau, record.lam, record.bn_strategy, vectors, moments_fn)
    return model, state_sha256(model.state_dict()), state


def step_weights_of(record: MergeRecord) -> list[float]:
    """The weight of each input of a recorded asynchronous step, as the step applied it."""
    missing = [i.vector_id for i in record.inputs if i.weight is None]
    if missing:
        raise ValueError(f"async step {record.merge_id}: inputs {missing} have no recorded weight")
    return [float(i.weight) for i in record.inputs if i.weight is not None]


def chain(store, record: MergeRecord) -> list[MergeRecord]:
    """The promoted steps from θ_pre to ``record``, oldest first (a one-shot merge is its own chain)."""
    by_version = {r.version: r for r in store.merges(record.base_sha256) if r.version is not None}
    steps = [record]
    while steps[-1].mode == "async" and steps[-1].parent_version > 0:
        parent = by_version.get(steps[-1].parent_version)
        if parent is None:
            raise ValueError(
                f"{store.url}: no record of champion v{steps[-1].parent_version}, parent of {steps[-1].merge_id}"
            )
        steps.append(parent)
    return steps[::-1]


def chain_rows(store, record: MergeRecord) -> list[dict]:
    """The version chain for lineage: each step's version, parent, η, metric and its vectors with staleness and weight."""
    rows = []
    for r in chain(store, record):
        vectors = [
            {
                "vector_id": i.vector_id,
                "hospital": i.hospital,
                "start_version": i.start_version,
                "staleness": i.staleness,
                "weight": i.weight,
            }
            for i in r.inputs
        ]
        rows.append(
            {
                "version": r.version,
                "parent_version": r.parent_version,
                "merge_id": r.merge_id,
                "mode": r.mode,
                "eta": r.lam,
                "bn": f"{r.bn_strategy} from {r.bn_source}",
                "val": r.val,
                "vectors": vectors,
            }
        )
    return rows


@dataclass(frozen=True)
class Replayed:
    """One promoted step rebuilt from its rebuilt parent: its sha256 and whether it is the recorded one; with
    ``refine.ema``, the same for the EMA champion stored with it."""

    version: int
    sha256: str
    identical: bool
    ema_sha256: str | None = None
    ema_identical: bool | None = None


def replay_chain(store, record: MergeRecord) -> list[Replayed]:
    """Rebuild every promoted step from θ_pre up to ``record``, each from the *rebuilt* parent and the server
    optimizer's *rebuilt* state, and the EMA champion of every version from the rebuilt versions; oldest first."""
    from medvec.models import state_sha256

    root = store.get_base(record.base_sha256)
    out, parent, server, ema = [], None, None, None
    for step in chain(store, record):
        model, sha, server = _rebuild(store, step, parent, server)
        version = step.version or 0
        row = Replayed(version, sha, sha == step.merged_sha256)
        decay = step.params.refine.ema
        ema = ema_update(ema, model.state_dict(), decay) if decay is not None else None
        if ema is not None:
            stored = store.get_chain_state(root.sha256, version, "ema")
            ema_sha = state_sha256(ema)
            row = replace(row, ema_sha256=ema_sha, ema_identical=stored is not None and state_sha256(stored) == ema_sha)
        out.append(row)
        parent = root.with_model(model, sha)
    return out
