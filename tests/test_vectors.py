"""DataVector algebra (exact values), safetensors round trip and every bad-vector case."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch

from medvec.vectors.checks import load_vector
from medvec.vectors.format import InvalidVectorError
from medvec.vectors.vector import DataVector, vector_keys

BASE = {
    "conv.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
    "bn.weight": torch.tensor([1.0, 1.0]),
    "bn.bias": torch.tensor([0.0, 0.0]),
    "bn.running_mean": torch.tensor([0.0, 0.0]),
    "bn.running_var": torch.tensor([1.0, 1.0]),
    "bn.num_batches_tracked": torch.tensor(0),
}
TUNED_A = {
    **BASE,
    "conv.weight": torch.tensor([[2.0, 2.0], [3.0, 2.0]]),
    "bn.bias": torch.tensor([0.5, -0.5]),
    "bn.running_mean": torch.tensor([5.0, 5.0]),
    "bn.running_var": torch.tensor([0.1, 9.0]),
    "bn.num_batches_tracked": torch.tensor(40),
}
TUNED_B = {**BASE, "conv.weight": torch.tensor([[0.0, 3.0], [3.0, 4.0]]), "bn.weight": torch.tensor([2.0, 1.0])}
SHA = "a" * 64


def vec(tuned, hospital="h1", n=10):
    return DataVector.from_states(
        BASE,
        tuned,
        hospital=hospital,
        base_sha256=SHA,
        base_model="toy",
        num_classes=2,
        n_train=n,
        label_counts=[n // 2, n - n // 2],
    )


def test_vector_excludes_integer_buffers_and_bn_running_statistics():
    assert vector_keys(BASE) == ["conv.weight", "bn.weight", "bn.bias"]
    v = vec(TUNED_A)
    assert v.keys() == ["bn.bias", "bn.weight", "conv.weight"]


def test_vector_algebra_exact_values():
    a, b = vec(TUNED_A), vec(TUNED_B, "h2")
    assert torch.equal(a.deltas["conv.weight"], torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    assert torch.equal(b.deltas["conv.weight"], torch.tensor([[-1.0, 1.0], [0.0, 0.0]]))
    s = a + b
    assert torch.equal(s.deltas["conv.weight"], torch.tensor([[0.0, 1.0], [0.0, -2.0]]))
    assert torch.equal(s.deltas["bn.weight"], torch.tensor([1.0, 0.0]))
    assert torch.equal(sum([a, b]).deltas["bn.bias"], torch.tensor([0.5, -0.5]))
    assert torch.equal((2 * a).deltas["conv.weight"], torch.tensor([[2.0, 0.0], [0.0, -4.0]]))
    assert torch.equal((a * 0.5).deltas["bn.bias"], torch.tensor([0.25, -0.25]))
    assert torch.equal((-a).deltas["bn.bias"], torch.tensor([-0.5, 0.5]))
    assert torch.equal((a - b).deltas["conv.weight"], torch.tensor([[2.0, -1.0], [0.0, -2.0]]))
    assert a.norm() == pytest.approx((1 + 4 + 0.25 + 0.25) ** 0.5)


def test_apply_to_is_base_plus_lambda_tau_and_keeps_excluded_keys():
    a, b = vec(TUNED_A), vec(TUNED_B, "h2")
    merged = (a + b).apply_to(BASE, lam=0.5)
    assert torch.equal(merged["conv.weight"], torch.tensor([[1.0, 2.5], [3.0, 3.0]]))
    assert torch.equal(merged["bn.weight"], torch.tensor([1.5, 1.0]))
    assert torch.equal(merged["bn.running_var"], BASE["bn.running_var"])
    assert merged["bn.num_batches_tracked"].dtype == torch.int64 and int(merged["bn.num_batches_tracked"]) == 0
    assert torch.equal(a.apply_to(BASE, 1.0)["conv.weight"], TUNED_A["conv.weight"])


def test_safetensors_round_trip(tmp_path, make_vector, tiny_base):
    v = make_vector()
    path = v.save(tmp_path / "v.safetensors")
    loaded = load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
    assert loaded.meta == v.meta
    assert loaded.content_sha256 == v.content_sha256
    back = loaded.to_vector()
    assert back.keys() == v.keys()
    for k in v.keys():
        assert torch.equal(back.deltas[k], v.deltas[k])
    for layer in v.running.mean:
        assert torch.equal(back.running.mean[layer], v.running.mean[layer])
        assert torch.equal(back.running.var[layer], v.running.var[layer])
    assert back.running.count == 10
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle


# --------------------------------------------------------------------------- bad vectors


def _save_raw(path, tensors, header_meta):
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=header_meta)
    return path


def _tamper(tmp_path, make_vector, fn, name="bad.safetensors"):
    """Save a valid vector, change its tensors with ``fn`` and re-sign the content hash honestly."""
    from safetensors import safe_open

    from medvec.vectors.format import content_sha256

    good = make_vector().save(tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    meta["content_sha256"] = content_sha256(tensors)
    return _save_raw(tmp_path / name, tensors, meta)


def _reject(path, tiny_base, check, *fragments):
    with pytest.raises(InvalidVectorError) as info:
        load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
    err = info.value
    assert err.check == check, str(err)
    assert str(path) in str(err)
    for frag in fragments:
        assert frag in str(err), str(err)
    return err


def test_nan_rejected(tmp_path, make_vector, tiny_base):
    path = _tamper(tmp_path, make_vector, lambda t: t["fc.weight"].view(-1).__setitem__(3, float("nan")))
    _reject(path, tiny_base, "non_finite", "fc.weight", "1 NaN")


def test_inf_rejected(tmp_path, make_vector, tiny_base):
    path = _tamper(tmp_path, make_vector, lambda t: t["fc.bias"].__setitem__(0, float("inf")))
    _reject(path, tiny_base, "non_finite", "fc.bias", "1 Inf")


def test_shape_mismatch_rejected(tmp_path, make_vector, tiny_base):
    path = _tamper(tmp_path, make_vector, lambda t: t.__setitem__("fc.bias", torch.zeros(3)))
    _reject(path, tiny_base, "shape", "fc.bias", "(3,)", "(2,)")


def test_missing_key_rejected(tmp_path, make_vector, tiny_base):
    path = _tamper(tmp_path, make_vector, lambda t: t.pop("fc.bias"))
    _reject(path, tiny_base, "missing_key", "missing 1 key", "fc.bias")


def test_extra_key_rejected(tmp_path, make_vector, tiny_base):
    path = _tamper(tmp_path, make_vector, lambda t: t.__setitem__("fc.extra", torch.zeros(2)))
    _reject(path, tiny_base, "extra_key", "1 extra key", "fc.extra")


def test_wrong_base_hash_rejected(tmp_path, make_vector, tiny_base):
    path = make_vector().save(tmp_path / "v.safetensors")
    with pytest.raises(InvalidVectorError) as info:
        load_vector(path, base=tiny_base.model.state_dict(), base_sha256="b" * 64)
    assert info.value.check == "base_hash"
    assert "expected base bbbbbbbbbbbb" in str(info.value)


def test_truncated_file_rejected(tmp_path, make_vector, tiny_base):
    good = make_vector().save(tmp_path / "v.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    _reject(cut, tiny_base, "truncated", "truncated", f"file has {len(data) - 100}")
    head_only = tmp_path / "head.safetensors"
    head_only.write_bytes(data[:20])
    _reject(head_only, tiny_base, "truncated", "truncated")


def test_modified_bytes_fail_integrity(tmp_path, make_vector, tiny_base):
    good = make_vector().save(tmp_path / "v.safetensors")
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x01  # flip one bit of the last tensor
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    _reject(bad, tiny_base, "integrity", "does not match")


def test_pickle_file_rejected_without_unpickling(tmp_path, tiny_base):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": Boom()}, protocol=4))
    _reject(path, tiny_base, "pickle", "pickle", "never unpickles")
    zipped = tmp_path / "torch.pt"
    torch.save({"w": torch.zeros(2)}, zipped)
    _reject(zipped, tiny_base, "pickle", "zip archive")


def test_not_a_file_rejected(tmp_path, tiny_base):
    _reject(tmp_path, tiny_base, "not_a_file", "not a file")
    _reject(tmp_path / "absent.safetensors", tiny_base, "not_a_file", "no such file")


def test_foreign_safetensors_without_metadata_rejected(tmp_path, tiny_base):
    path = _save_raw(tmp_path / "plain.safetensors", {"fc.bias": torch.zeros(2)}, {"format": "pt"})
    _reject(path, tiny_base, "metadata", "not a medvec vector")


def test_oversized_header_rejected(tmp_path, tiny_base):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    _reject(path, tiny_base, "too_large", "header length")


def test_integer_tensor_rejected(tmp_path, make_vector, tiny_base):
    path = _tamper(tmp_path, make_vector, lambda t: t.__setitem__("fc.bias", torch.tensor([1, 2])))
    _reject(path, tiny_base, "dtype", "fc.bias", "torch.int64")


def test_non_finite_local_metrics_are_left_out_and_the_vector_loads(tmp_path, tiny_base):
    """A hospital whose local validation split has one class has AUC NaN: its vector must still be valid."""
    state = tiny_base.model.state_dict()
    v = DataVector.from_states(
        state,
        state,
        hospital="h1",
        base_sha256=tiny_base.sha256,
        base_model="tiny_cnn",
        num_classes=2,
        n_train=4,
        label_counts=[0, 4],
        metrics={"val_auc": float("nan"), "val_accuracy": 1.0, "loss": float("inf")},
    )
    assert v.meta.metrics == {"val_accuracy": 1.0}
    loaded = load_vector(v.save(tmp_path / "v.safetensors"), base=state, base_sha256=tiny_base.sha256)
    assert loaded.meta.metrics == {"val_accuracy": 1.0}
