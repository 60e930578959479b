"""Every merge formula on hand-computable tensors, with exact expected values."""

from __future__ import annotations

import pytest
import torch

from medvec.config import MergeConfig
from medvec.coordinator.methods import (
    UnknownMethodError,
    get_method,
    merge_delta,
    merge_vectors,
    method_names,
    trim_top_k,
)
from medvec.vectors.checks import load_vector
from medvec.vectors.vector import DataVector


class Meta:
    def __init__(self, n):
        self.n_train = n


def vectors(*rows, weights=(1, 2, 1)):
    return [DataVector({"w": torch.tensor(r, dtype=torch.float32)}, meta=None) for r in rows], list(weights)


T1, T2, T3 = [1.0, -2.0, 3.0, 0.0], [3.0, 2.0, -1.0, 0.0], [-1.0, 4.0, 2.0, 1.0]
BASE = {"w": torch.tensor([10.0, 10.0, 10.0, 10.0]), "n": torch.tensor(3)}


def merged(name, lam=1.0, rows=(T1, T2, T3), ns=(1, 2, 1), **kw):
    vs = [DataVector({"w": torch.tensor(r)}) for r in rows]
    for v, n in zip(vs, ns):
        v.meta = Meta(n)
    return merge_vectors(BASE, vs, get_method(name, MergeConfig(**kw)), lam)["w"]


def test_sum_is_the_paper():
    assert torch.equal(merged("sum"), torch.tensor([13.0, 14.0, 14.0, 11.0]))


def test_task_arithmetic_scales_the_sum():
    assert torch.equal(merged("task_arithmetic", 0.5), torch.tensor([11.5, 12.0, 12.0, 10.5]))


def test_mean():
    assert torch.allclose(merged("mean"), torch.tensor([11.0, 10 + 4 / 3, 10 + 4 / 3, 10 + 1 / 3]), atol=0, rtol=1e-7)


def test_weighted_by_sample_count():
    # (1·τ1 + 2·τ2 + 1·τ3) / 4
    assert torch.equal(merged("weighted"), torch.tensor([11.5, 11.5, 10.75, 10.25]))


def test_median_even_and_odd():
    assert torch.equal(merged("median"), torch.tensor([11.0, 12.0, 12.0, 10.0]))
    assert torch.equal(merged("median", rows=(T1, T2)), torch.tensor([12.0, 10.0, 11.0, 10.0]))


def test_ties_trim_elect_disjoint_mean():
    # trim to top 2 of 4: τ1→[0,-2,3,0], τ2→[3,2,0,0], τ3→[0,4,2,0]; γ = sign([3,4,5,0]) = [1,1,1,0]
    # disjoint means: [3/1, (2+4)/2, (3+2)/2, 0]
    assert torch.equal(merged("ties", ties_density=0.5), torch.tensor([13.0, 13.0, 12.5, 10.0]))


def test_dare_drops_and_rescales_seeded():
    a = merged("dare", dare_drop=0.5, seed=7)
    b = merged("dare", dare_drop=0.5, seed=7)
    assert torch.equal(a, b)
    # each vector's entry is either dropped (0) or doubled (1/(1-p)); check every coordinate is such a sum
    options = []
    for i in range(4):
        vals = {0.0}
        for t in (T1, T2, T3):
            vals = {v + x for v in vals for x in (0.0, 2 * t[i])}
        options.append(vals)
    for i in range(4):
        assert float(a[i]) - 10.0 in options[i]
    assert torch.equal(merged("dare", dare_drop=0.0), merged("sum"))


def test_dare_keeps_expected_fraction_on_a_large_tensor():
    v = DataVector({"w": torch.ones(10_000)})
    out = merge_delta([v], get_method("dare", MergeConfig(dare_drop=0.3, seed=1))).deltas["w"]
    kept = int((out != 0).sum())
    assert 6_800 < kept < 7_200  # Binomial(10000, 0.7): ±4.4σ
    assert torch.allclose(out[out != 0], torch.full((kept,), 1 / 0.7))


def test_trim_keeps_exact_count():
    t = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    out = trim_top_k(t, 0.2)
    assert int((out != 0).sum()) == 20
    assert set(out[out != 0].abs().tolist()) == set(range(81, 101))


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownMethodError) as info:
        get_method("fedprox")
    for name in ("sum", "task_arithmetic", "mean", "weighted", "ties", "dare", "median"):
        assert name in str(info.value)
    assert set(method_names()) == {"sum", "task_arithmetic", "mean", "weighted", "ties", "dare", "median"}


def test_every_method_keeps_every_tensor_and_no_nan(make_vector, tiny_base):
    vs = [make_vector(f"h{i}", seed=i) for i in range(3)]
    state = tiny_base.model.state_dict()
    for name in method_names():
        out = merge_vectors(state, vs, name, 1.0)
        assert set(out) == set(state)
        for k in state:
            assert out[k].shape == state[k].shape and out[k].dtype == state[k].dtype
            if out[k].is_floating_point():
                assert torch.isfinite(out[k]).all(), (name, k)


def test_lazy_files_merge_like_memory(tmp_path, make_vector, tiny_base):
    vs = [make_vector(f"h{i}", seed=i) for i in range(3)]
    files = [load_vector(v.save(tmp_path / f"{i}.safetensors")) for i, v in enumerate(vs)]
    state = tiny_base.model.state_dict()
    for name in ("ties", "weighted", "median"):
        a, b = merge_vectors(state, vs, name, 0.7), merge_vectors(state, files, name, 0.7)
        for k in state:
            assert torch.equal(a[k], b[k])


def test_merge_rejects_empty_and_mismatched():
    with pytest.raises(ValueError, match="no vectors"):
        merge_delta([], "sum")
    a, b = DataVector({"w": torch.zeros(2)}), DataVector({"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="differ in keys"):
        merge_delta([a, b], "sum")
