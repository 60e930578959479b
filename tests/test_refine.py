"""Asynchronous refinement: staleness discounts and the step formula by hand, then a real chain of steps."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BREAST
from medvec.config import load_params
from medvec.coordinator.intake import admit, consumed
from medvec.coordinator.lineage import replay_chain
from medvec.coordinator.scoring import EvalSets
from medvec.coordinator.weights import staleness_discount, step_weights
from medvec.data.split import write_hospital_shards
from medvec.hospital.finetune import finetune_vector
from medvec.hospital.local import LocalData
from medvec.store import LocalStore
from medvec.tracking.finish import finish_step
from medvec.vectors.file import weighted_sum
from medvec.vectors.vector import DataVector


def test_staleness_discounts_by_hand():
    assert staleness_discount(0) == 1.0
    assert staleness_discount(3, "polynomial", a=0.5) == 0.5  # (1 + 3)^-0.5
    assert math.isclose(staleness_discount(2, "polynomial", a=1.0), 1 / 3)
    assert staleness_discount(4, "hinge", a=0.5, b=4) == 1.0
    assert staleness_discount(6, "hinge", a=0.5, b=4) == 0.5  # 1 / (0.5·2 + 1)
    with pytest.raises(ValueError, match="future version"):
        staleness_discount(-1)
    with pytest.raises(ValueError, match="valid are polynomial, hinge"):
        staleness_discount(1, "cosine")


def test_step_weights_and_delta_by_hand(make_vector):
    a, b = make_vector("h1", seed=1, n_train=1), make_vector("h2", seed=2, n_train=3)
    b.meta = b.meta.model_copy(update={"start_version": 1})
    parts = step_weights([a, b], champion_version=4, kind="polynomial", a=0.5, b=4)
    assert [(c.staleness, c.discount) for c in parts] == [(4, 5**-0.5), (3, 0.5)]
    assert math.isclose(parts[0].weight, 1 * 5**-0.5 / 4) and parts[1].weight == 3 * 0.5 / 4
    x = DataVector({"w": torch.tensor([1.0, 2.0])})
    y = DataVector({"w": torch.tensor([4.0, -8.0])})
    assert torch.equal(weighted_sum([x, y], [0.25, 0.5]).deltas["w"], torch.tensor([2.25, -3.5]))


def test_a_step_sums_each_rounded_product_as_steps_always_have(tmp_path, make_vector):
    """An asynchronous step's Σ w_i·τ_i rounds each product before adding it (the arithmetic its records
    rebuild with); read from files in place, it equals that sum bit for bit."""
    from medvec.vectors.checks import load_vector

    vectors = [make_vector(f"h{i}", seed=i, scale=0.3) for i in range(1, 4)]
    files = [load_vector(v.save(tmp_path / f"v{i}.safetensors")) for i, v in enumerate(vectors)]
    weights = [0.1234567, 0.7654321, 0.3333333]
    got = weighted_sum(files, weights, fused=False)
    for key in vectors[0].keys():
        want = vectors[0].deltas[key] * weights[0]
        for v, w in zip(vectors[1:], weights[1:]):
            want = want.add_(v.deltas[key].float() * w)
        assert torch.equal(got.deltas[key], want), key


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine")
    write_hospital_shards(BREAST, out, hospitals=3, alpha=1.0, seed=0)
    return out


def contribute(store, base, shards, hospital: str, params, seed: int, land: bool = True):
    """A hospital's run: fine-tune the current champion start point, publish τ = θ_h − θ_start."""
    point = store.champion(base.sha256)
    start = store.get_start(base.sha256, point.version)
    cfg = params.finetune.model_copy(update={"seed": seed})
    vector, _ = finetune_vector(base, hospital, LocalData.load(shards / hospital), cfg, False, start, point.version)
    if land:
        store.put(vector)
    return vector


def test_a_chain_of_async_steps_replays_bit_for_bit_and_keeps_stale_vectors(tmp_path, shards):
    from medvec.models import create_base

    params = load_params(
        None,
        [
            "model.name=tiny_cnn",
            "finetune.epochs=2",
            "finetune.lr=0.003",
            "refine.mode=async",
            "refine.eta=1.0",
            "refine.max_staleness=1",
            "batchnorm.strategy=average",
            "intake.defence=off",
            "registry.enabled=false",
        ],
    )
    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    store = LocalStore(tmp_path / "store")
    store.put_base(base)
    evalsets = EvalSets.load(BREAST)
    late = contribute(store, base, shards, "h3", params, seed=9, land=False)  # starts from v0, lands at the end
    steps = []
    for n, hospital in enumerate(["h1", "h2", "h1", "h2"]):
        vector = contribute(store, base, shards, hospital, params, seed=n)
        adm = admit(store, base, params.intake, params.refine)
        assert [v.meta.vector_id for v in adm.admitted] == [vector.meta.vector_id]  # B = 1: one per step
        steps.append(finish_step(store, base, adm, params, evalsets))
    promoted = [s.record for s in steps if s.promoted]
    assert promoted, [s.verdict for s in steps]
    chain = store.start_points(base.sha256)
    assert [p.version for p in chain] == list(range(len(promoted) + 1))
    assert [p.merge_id for p in chain[1:]] == [r.merge_id for r in promoted]
    for n, step in enumerate(steps):  # each step started from the champion of its time
        assert step.record.parent_version == sum(s.promoted for s in steps[:n])
    # every landed vector is in exactly one step
    ids = [i.vector_id for s in steps for i in s.record.inputs]
    assert len(ids) == len(set(ids)) == 4 and consumed(store, base.sha256) == set(ids)
    # the late vector lands now, two versions stale with max_staleness 1 (when two steps were promoted)
    store.put(late)
    adm = admit(store, base, params.intake, params.refine)
    assert len(promoted) >= 2, [s.verdict for s in steps]  # seeded: the first two steps each beat their champion
    (stale,) = [r for r in adm.rejected if r.check == "stale"]
    assert stale.problem.startswith(f"stale: started from version 0, champion is {len(promoted)}")
    assert any(q.check == "stale" for q in store.quarantined()) and adm.admitted == []
    # the chain replays from θ_pre, each step from its rebuilt parent
    replayed = replay_chain(store, promoted[-1])
    assert [v for v, _, _ in replayed] == [r.version for r in promoted]
    assert all(same for _, _, same in replayed), replayed
    assert promoted[-1].inputs[0].weight == 1.0 and promoted[-1].inputs[0].staleness == 0
