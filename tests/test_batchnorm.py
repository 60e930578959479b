"""BN moment sums: exact combination across hospitals and restoration strategies."""

from __future__ import annotations

import pytest
import torch

from medvec.batchnorm import MomentSums, RunningStats, average_running, bn_layers, moment_sums, restore_batchnorm


def _batches(seed, n_batches, size=8, side=12):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, side, side, generator=g) * 2 + 1, torch.zeros(size, dtype=torch.long))
        for _ in range(n_batches)
    ]


def test_combined_moment_sums_equal_a_single_pass_over_all_batches(tiny_base):
    model = tiny_base.fresh()
    a, b, c = _batches(1, 3), _batches(2, 2), _batches(3, 4)
    combined = moment_sums(model, a) + moment_sums(model, b) + moment_sums(model, c)
    union = moment_sums(model, a + b + c)
    m1, v1 = combined.mean_var()
    m2, v2 = union.mean_var()
    assert set(m1) == set(bn_layers(model)) and len(m1) == 4
    for k in m1:
        assert combined.count[k] == union.count[k]
        assert torch.allclose(m1[k], m2[k], atol=1e-5, rtol=0)
        assert torch.allclose(v1[k], v2[k], atol=1e-5, rtol=0)


def test_moment_sums_equal_direct_statistics_of_the_layer_inputs(tiny_base):
    """Same batches, same mode: compare with torch's own mean/var of the captured BN inputs."""
    model = tiny_base.fresh()
    batches = _batches(4, 3) + _batches(5, 2)
    layer_name, layer = next(iter(bn_layers(model).items()))
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].detach().clone()))
    sums = moment_sums(model, batches, mode="train")
    handle.remove()
    x = torch.cat(captured).double().transpose(0, 1).reshape(layer.num_features, -1)
    mean, var = sums.mean_var()
    assert torch.allclose(mean[layer_name], x.mean(1), atol=1e-5, rtol=0)
    assert torch.allclose(var[layer_name], x.var(1, unbiased=True), atol=1e-5, rtol=0)
    assert sums.count[layer_name] == x.shape[1]


def test_moment_sums_leave_the_model_untouched(tiny_base):
    model = tiny_base.fresh().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moment_sums(model, _batches(6, 2))
    assert not model.training and not any(m.training for m in bn_layers(model).values())
    model.train()
    moment_sums(model, _batches(6, 2), mode="eval")
    assert model.training and all(m.training for m in bn_layers(model).values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_moment_sums_tensor_round_trip(tiny_base):
    s = moment_sums(tiny_base.fresh(), _batches(7, 2))
    back = MomentSums.from_tensors(s.to_tensors())
    assert back.count == s.count
    for k in s.sum:
        assert torch.equal(back.sum[k], s.sum[k]) and torch.equal(back.sumsq[k], s.sumsq[k])


def test_average_is_sample_weighted():
    a = RunningStats({"bn": torch.tensor([0.0, 4.0])}, {"bn": torch.tensor([1.0, 2.0])}, 1)
    b = RunningStats({"bn": torch.tensor([4.0, 0.0])}, {"bn": torch.tensor([3.0, 6.0])}, 3)
    mean, var = average_running([a, b])
    assert torch.equal(mean["bn"], torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.equal(var["bn"], torch.tensor([2.5, 5.0], dtype=torch.float64))


def test_restore_strategies(tiny_base):
    model = tiny_base.fresh()
    layers = bn_layers(model)
    stats = RunningStats(
        {k: torch.full_like(m.running_mean, 2.0) for k, m in layers.items()},
        {k: torch.full_like(m.running_var, 3.0) for k, m in layers.items()},
        5,
    )
    restore_batchnorm(model, "average", running=[stats])
    assert all(torch.equal(m.running_mean, torch.full_like(m.running_mean, 2.0)) for m in layers.values())
    sums = moment_sums(model, _batches(8, 2))
    restore_batchnorm(model, "recompute", moments=sums)
    mean, var = sums.mean_var()
    for k, m in layers.items():
        assert torch.allclose(m.running_mean, mean[k].float()) and torch.allclose(m.running_var, var[k].float())
    with pytest.raises(ValueError, match="valid are none, average, recompute"):
        restore_batchnorm(model, "magic")
    with pytest.raises(ValueError, match="needs moment sums"):
        restore_batchnorm(model, "recompute")
