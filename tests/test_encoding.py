"""Compact vector encodings (medvec.vectors.encoding): exact formulas, the file layout intake checks, signing, merging,
and the streaming reader."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medvec.batchnorm import RunningStats
from medvec.config import ConfigError, IntakeConfig, VectorsConfig, load_params
from medvec.coordinator.methods import get_method, merge_delta
from medvec.hospital.finetune import for_upload
from medvec.keys import keygen
from medvec.vectors.checks import load_vector
from medvec.vectors.encoding import Encoding, EncodingError, decode, encode, encoding_of
from medvec.vectors.format import InvalidVectorError, content_sha256
from medvec.vectors.signing import Keyring, sign_file
from medvec.vectors.vector import DataVector, VectorMeta

ALL = [
    Encoding(),
    Encoding(name="fp16"),
    Encoding(name="bf16"),
    Encoding(name="int8"),
    Encoding(name="int8_channel"),
    Encoding(name="int4", group_size=4),
    Encoding(name="topk", density=0.25),
]
IDS = [e.label for e in ALL]


def _roundtrip(t: torch.Tensor, enc: Encoding) -> torch.Tensor:
    stored = encode("w", t, enc)
    return decode("w", stored.__getitem__, tuple(t.shape), enc)


T = torch.tensor([[0.6, -1.0, 0.25, 0.1], [0.02, 0.0, -0.03, 0.01], [2.0, -2.0, 1.2, 0.7]])


def test_fp16_and_bf16_are_the_casts():
    assert torch.equal(_roundtrip(T, Encoding(name="fp16")), T.half().float())
    assert torch.equal(_roundtrip(T, Encoding(name="bf16")), T.bfloat16().float())


def test_int8_per_tensor_is_q_times_max_over_127():
    s = 2.0 / 127
    want = (T / s).round().clamp(-127, 127) * s
    stored = encode("w", T, Encoding(name="int8"))
    assert stored["w"].dtype == torch.int8 and stored["scale:w"].tolist() == pytest.approx([s])
    assert torch.allclose(_roundtrip(T, Encoding(name="int8")), want, rtol=0, atol=1e-7)
    assert stored["w"][2].tolist() == [127, -127, 76, 44]  # 1.2·63.5 = 76.2 → 76; 0.7·63.5 = 44.45 → 44


def test_int8_per_channel_scales_each_output_row():
    stored = encode("w", T, Encoding(name="int8_channel"))
    assert stored["scale:w"].tolist() == pytest.approx([1.0 / 127, 0.03 / 127, 2.0 / 127])
    back = _roundtrip(T, Encoding(name="int8_channel"))
    assert torch.allclose(back[1], T[1], atol=0.03 / 254 + 1e-9)
    bias = torch.tensor([0.5, -0.25])  # a 1-D tensor has one scale in all
    assert encode("b", bias, Encoding(name="int8_channel"))["scale:b"].shape == (1,)


def test_int4_groups_hold_q_in_minus7_to_7_and_pack_two_per_byte():
    enc = Encoding(name="int4", group_size=4)
    stored = encode("w", T, enc)
    assert stored["w"].dtype == torch.uint8 and stored["w"].shape == (6,)
    assert stored["scale:w"].tolist() == pytest.approx([1.0 / 7, 0.03 / 7, 2.0 / 7])
    assert stored["shape:w"].tolist() == [3, 4]
    # first group: 0.6·7 = 4.2 → 4, -7, 1.75 → 2, 0.7 → 1; stored +8 with the even index in the low nibble
    assert stored["w"][0].item() == (4 + 8) | ((-7 + 8) << 4)
    want = torch.tensor([[4, -7, 2, 1], [5, 0, -7, 2], [7, -7, 4, 2]]) * torch.tensor([[1 / 7], [0.03 / 7], [2 / 7]])
    assert torch.allclose(_roundtrip(T, enc), want.float(), atol=1e-7)


def test_int4_with_an_odd_count_and_a_partial_group():
    t = torch.tensor([1.0, 2.2, 3.0, 4.0, 5.0, 6.0, 7.0])  # groups of 4: [1, 2.2, 3, 4], [5, 6, 7, pad]
    enc = Encoding(name="int4", group_size=4)
    stored = encode("b", t, enc)
    assert stored["b"].shape == (4,) and stored["scale:b"].tolist() == pytest.approx([4 / 7, 1.0])
    back = _roundtrip(t, enc)
    # scale 4/7: 1·7/4 = 1.75 → 2, 2.2·7/4 = 3.85 → 4, 3·7/4 = 5.25 → 5; scale 1 keeps 5, 6, 7 exactly
    assert back.tolist() == pytest.approx([8 / 7, 16 / 7, 20 / 7, 4, 5, 6, 7])


def test_topk_keeps_the_largest_magnitudes_as_fp16():
    enc = Encoding(name="topk", density=0.25)  # 12 entries → 3 kept
    stored = encode("w", T, enc)
    assert stored["index:w"].tolist() == [8, 9, 10]  # 2.0, -2.0, 1.2 at flat positions 8, 9, 10
    back = _roundtrip(T, enc)
    assert back.count_nonzero() == 3 and back[2, :3].tolist() == [2.0, -2.0, torch.tensor(1.2).half().item()]


def test_zero_tensors_and_empty_tensors_round_trip_for_every_encoding():
    for enc in ALL:
        assert torch.equal(_roundtrip(torch.zeros(3, 2), enc), torch.zeros(3, 2)), enc.label
        assert _roundtrip(torch.zeros(0), enc).shape == (0,), enc.label


def test_fp16_overflow_is_a_clear_error():
    with pytest.raises(EncodingError, match="overflow float16; use bf16 or fp32"):
        encode("w", torch.tensor([1e6]), Encoding(name="fp16"))


def test_encoding_settings_are_checked():
    with pytest.raises(ValueError, match="int4 needs group_size"):
        Encoding(name="int4")
    with pytest.raises(ValueError, match="only topk takes one"):
        Encoding(name="fp16", density=0.1)
    with pytest.raises(ConfigError, match="group_size must be even"):
        load_params(None, ["vectors.encoding=int4", "vectors.group_size=7"])
    with pytest.raises(ConfigError, match=r"vectors\.encoding"):
        load_params(None, ["vectors.encoding=int3"])
    assert encoding_of(load_params(None, ["vectors.encoding=int4"]).vectors) == Encoding(name="int4", group_size=64)


# ------------------------------------------------------------------------ files


@pytest.mark.parametrize("enc", ALL, ids=IDS)
def test_an_encoded_file_loads_to_exactly_what_the_hospital_decoded(enc, tmp_path, make_vector, tiny_base):
    v = make_vector("h1").encoded(enc)
    path = v.save(tmp_path / "v.safetensors")
    vf = load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
    assert vf.meta.encoding == enc and vf.content_sha256 == v.content_sha256
    for k in v.keys():
        assert torch.equal(vf.tensor(k), v.tensor(k)), k
        assert vf.tensor(k).dtype == torch.float32 and vf.tensor(k).shape == tiny_base.model.state_dict()[k].shape
    with safe_open(str(path), framework="pt") as f:
        kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {kinds[k] for k in kinds if k.startswith(("bn:", "moments:"))} <= {"F32", "F64"}  # aggregates stay full
    assert {kinds[k] for k in v.keys()} == {
        {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "I8", "int8_channel": "I8", "int4": "U8", "topk": "F16"}[
            enc.name
        ]
    }


def test_bytes_per_encoding_follow_the_layout(tmp_path, make_vector):
    v = make_vector("h1")
    n = sum(t.numel() for t in v.deltas.values())
    sizes = {}
    for enc in ALL:
        stored = v.encoded(enc)._all_tensors()
        sizes[enc.label] = sum(t.numel() * t.element_size() for k, t in stored.items() if not k.startswith("bn:"))
    assert sizes["fp32"] == 4 * n and sizes["fp16"] == sizes["bf16"] == 2 * n
    assert sizes["int8"] == n + 4 * len(v.deltas)
    groups = sum(math.ceil(t.numel() / 4) for t in v.deltas.values())
    packed = sum((t.numel() + 1) // 2 for t in v.deltas.values())
    shapes = sum(8 * t.ndim for t in v.deltas.values())
    assert sizes["int4/g4"] == packed + 4 * groups + shapes


def test_a_vector_encoded_twice_is_unchanged(make_vector):
    for enc in ALL:
        once = make_vector("h1").encoded(enc)
        twice = once.encoded(enc)
        for k in once.keys():
            assert torch.equal(once.tensor(k), twice.tensor(k)), (enc.label, k)


def test_for_upload_applies_params_and_leaves_fp32_alone(make_vector):
    v = make_vector("h1")
    assert for_upload(v, VectorsConfig()) is v
    up = for_upload(v, VectorsConfig(encoding="int4", group_size=8))
    assert up.meta.encoding == Encoding(name="int4", group_size=8) and up.meta.vector_id == v.meta.vector_id


def test_the_encoding_is_signed(tmp_path, make_vector, tiny_base):
    """Changing the encoding in the header breaks the signature: the metadata is what the hospital signed."""
    keygen("h1", tmp_path)
    ring = Keyring()
    ring.add("h1", tmp_path / "h1.pub")
    path = make_vector("h1").encoded(Encoding(name="int8")).save(tmp_path / "v.safetensors")
    sign_file(path, tmp_path / "h1.key")
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    vf = load_vector(path)
    ring.verify(path, vf.meta, vf.content_sha256, header)  # the honest file verifies
    meta = json.loads(header["medvec"])
    meta["encoding"] = {"name": "int8_channel", "group_size": None, "density": None}
    forged = {**header, "medvec": json.dumps(meta)}
    with pytest.raises(InvalidVectorError) as info:
        ring.verify(path, VectorMeta.model_validate_json(forged["medvec"]), vf.content_sha256, forged)
    assert info.value.check == "bad_signature"
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata=forged)
    with pytest.raises(InvalidVectorError) as info:  # and int8_channel's layout differs: refused before that
        load_vector(tmp_path / "forged.safetensors")
    assert info.value.check == "shape"


def _rewrite(tmp_path, make_vector, enc, fn, name="bad.safetensors"):
    """An encoded vector whose stored tensors ``fn`` changes, with an honest content hash (only the layout is wrong)."""
    good = make_vector("h1").encoded(enc).save(tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    meta["content_sha256"] = content_sha256(tensors)
    path = tmp_path / name
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=meta)
    return path


INT4 = Encoding(name="int4", group_size=4)
TOPK = Encoding(name="topk", density=0.25)
INT8 = Encoding(name="int8")


@pytest.mark.parametrize(
    ("enc", "change", "check", "fragment"),
    [
        (INT8, lambda t: t.pop("scale:fc.bias"), "encoding", "fc.bias lacks scale:fc.bias, which int8 needs"),
        (Encoding(name="fp16"), lambda t: t.__setitem__("scale:fc.bias", torch.ones(1)), "encoding", "scale:fc.bias"),
        (INT8, lambda t: t.__setitem__("scale:nope", torch.ones(1)), "encoding", "scale:nope"),
        (INT8, lambda t: t.__setitem__("fc.bias", t["fc.bias"].float()), "dtype", "a int8 vector stores torch.int8"),
        (INT8, lambda t: t.__setitem__("scale:fc.bias", torch.ones(2)), "shape", "scale:fc.bias has shape (2,)"),
        (INT8, lambda t: t.__setitem__("scale:fc.bias", -torch.ones(1)), "encoding", "negative or non-finite scales"),
        (INT8, lambda t: t.__setitem__("scale:fc.bias", torch.tensor([math.nan])), "encoding", "non-finite scales"),
        (INT4, lambda t: t.__setitem__("shape:fc.bias", torch.tensor([3])), "shape", "needs"),
        (INT4, lambda t: t.__setitem__("shape:fc.bias", torch.tensor([-1])), "encoding", "impossible shape"),
        (INT4, lambda t: t.__setitem__("shape:fc.bias", torch.tensor([2.0])), "encoding", "1-D int64"),
        (TOPK, lambda t: t["index:fc.weight"].__setitem__(0, 10_000), "encoding", "outside"),
        (TOPK, lambda t: t["index:fc.weight"].copy_(t["index:fc.weight"].flip(0)), "encoding", "strictly ascending"),
        (
            TOPK,
            lambda t: (
                t.__setitem__("fc.weight", t["fc.weight"][:-1].clone()),
                t.__setitem__("index:fc.weight", t["index:fc.weight"][:-1].clone()),
            ),
            "encoding",
            "keeps",
        ),
        (Encoding(name="fp16"), lambda t: t["fc.bias"].__setitem__(0, math.inf), "non_finite", "fc.bias"),
    ],
    ids=[
        "missing-scale",
        "stray-companion",
        "companion-of-nothing",
        "payload-dtype",
        "scale-shape",
        "negative-scale",
        "nan-scale",
        "int4-shape-vs-payload",
        "negative-shape",
        "float-shape",
        "index-range",
        "index-order",
        "topk-count",
        "fp16-inf",
    ],
)
def test_malformed_encoded_files_are_rejected_by_name(enc, change, check, fragment, tmp_path, make_vector, tiny_base):
    path = _rewrite(tmp_path, make_vector, enc, change)
    with pytest.raises(InvalidVectorError) as info:
        load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
    assert info.value.check == check, str(info.value)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_an_int4_shape_that_fits_its_payload_but_not_the_base_is_a_shape_error(tmp_path, make_vector, tiny_base):
    def reshape(t):  # fc.weight (2, n) claimed as (n, 2): same count, same payload, wrong for the base
        s = t["shape:fc.weight"]
        t["shape:fc.weight"] = s.flip(0).clone()

    path = _rewrite(tmp_path, make_vector, INT4, reshape)
    with pytest.raises(InvalidVectorError) as info:
        load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
    assert info.value.check == "shape" and "shape mismatch for fc.weight" in str(info.value)


# ------------------------------------------------------------------------ merging


@pytest.mark.parametrize("enc", ALL, ids=IDS)
@pytest.mark.parametrize("method", ["sum", "weighted", "ties", "dare", "median"])
def test_merging_encoded_files_equals_merging_their_decoded_vectors(enc, method, tmp_path, make_vector, tiny_base):
    vectors = [make_vector(f"h{i}", seed=i, n_train=10 * i).encoded(enc) for i in range(1, 4)]
    files = [load_vector(v.save(tmp_path / f"v{i}.safetensors")) for i, v in enumerate(vectors)]
    got, want = merge_delta(files, method), merge_delta(vectors, method)
    for k in want.keys():
        assert torch.allclose(got.tensor(k), want.tensor(k), rtol=1e-6, atol=1e-9), (k, enc.label, method)


def test_the_streaming_merge_matches_the_stacked_formula_and_releases_pages(tmp_path, make_vector):
    """Σ c_h τ_h read in place, with a window small enough to release pages after every tensor."""
    vectors = [make_vector(f"h{i}", seed=i, n_train=i) for i in range(1, 6)]
    files = [load_vector(v.save(tmp_path / f"v{i}.safetensors")) for i, v in enumerate(vectors)]
    got = merge_delta(files, get_method("weighted"))
    n = sum(range(1, 6))
    for k in vectors[0].keys():
        want = torch.stack([v.tensor(k) * (i / n) for i, v in enumerate(vectors, start=1)]).sum(0)
        assert torch.allclose(got.tensor(k), want, rtol=1e-6, atol=1e-9)
    assert all(f._touched is None for f in files)  # every read page was handed back
    for f in files:
        f.window = 1  # release after every read: the values must not change
    again = merge_delta(files, get_method("weighted"))
    assert all(torch.equal(again.tensor(k), got.tensor(k)) for k in got.keys())


def test_a_vector_file_survives_pickling_and_closing(tmp_path, make_vector):
    import pickle

    v = make_vector("h1")
    vf = load_vector(v.save(tmp_path / "v.safetensors"))
    k = vf.keys()[0]
    first = vf.tensor(k)
    vf.close()
    other = pickle.loads(pickle.dumps(vf))
    assert torch.equal(vf.tensor(k), first) and torch.equal(other.tensor(k), first)


def test_intake_admits_an_int4_vector_and_hands_the_merge_floats(tmp_path, make_vector, tiny_base):
    from medvec.coordinator.intake import admit
    from medvec.store import open_store

    store = open_store(str(tmp_path / "store"))
    store.put_base(tiny_base)
    sent = for_upload(make_vector("h1"), VectorsConfig(encoding="int4", group_size=8))
    store.put(sent)
    admitted = admit(store, tiny_base, IntakeConfig(defence="off")).admitted
    assert [v.meta.encoding.label for v in admitted] == ["int4/g8"]
    for k in sent.keys():
        assert torch.equal(admitted[0].tensor(k), sent.tensor(k))


def _toy_vector(seed: int, n_train: int) -> DataVector:
    """Deltas ``bn.bias``, ``bn.weight``, ``conv.weight`` with BN statistics ``bn:bn.*``, which a file stores
    between ``bn.weight`` and ``conv.weight`` (safetensors sorts by name)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {"bn.bias": torch.randn(3, generator=g), "bn.weight": torch.randn(3, generator=g)}
    deltas["conv.weight"] = torch.randn(3, 2, 3, 3, generator=g)
    meta = VectorMeta(
        vector_id=f"toy-{seed}",
        hospital=f"h{seed}",
        base_sha256="a" * 64,
        base_model="toy",
        num_classes=2,
        n_train=n_train,
        label_counts=[1, n_train - 1],
        created_at="2026-12-01T00:00:00+00:00",
    )
    return DataVector(deltas, meta, RunningStats({"bn": torch.zeros(3)}, {"bn": torch.ones(3)}, n_train))


@pytest.mark.parametrize("chunk", [1 << 20, 4, 5])  # 4 and 5 values: reads that end inside a delta
def test_whole_runs_of_fp32_deltas_merge_at_once_exactly_as_tensor_by_tensor(tmp_path, monkeypatch, chunk):
    import medvec.vectors.file
    from medvec.vectors.file import _sum_tensor, group_runs, same_fp32_layout

    monkeypatch.setattr(medvec.vectors.file, "RUN_CHUNK", chunk)
    vectors = [_toy_vector(i, 3 * i) for i in range(1, 4)]
    files = [load_vector(v.save(tmp_path / f"v{i}.safetensors")) for i, v in enumerate(vectors)]
    runs = group_runs(files[0].fp32_layout() or ())
    assert [[k for _, _, k, _ in run] for run in runs] == [["bn.bias", "bn.weight"], ["conv.weight"]]
    method = get_method("weighted")
    coeffs = method.coefficients([float(v.meta.n_train) for v in vectors])
    fast = merge_delta(files, method)
    for k in files[0].keys():
        assert torch.equal(fast.tensor(k), _sum_tensor(files, coeffs, k)), k
        want = sum(v.tensor(k) * (v.meta.n_train / 18) for v in vectors)
        assert torch.allclose(fast.tensor(k), want, atol=1e-6) and fast.tensor(k).shape == want.shape
    storages = {fast.deltas[k].untyped_storage().data_ptr() for k in files[0].keys()}
    assert len(storages) == 3 and all(fast.deltas[k].is_contiguous() for k in files[0].keys())  # one tensor each
    fp16 = load_vector(vectors[2].encoded(Encoding(name="fp16")).save(tmp_path / "fp16.safetensors"))
    assert same_fp32_layout(files) is not None and same_fp32_layout([*files[:2], fp16]) is None
    mixed = merge_delta([*files[:2], fp16], method)  # tensor by tensor, fp16 decoded
    for k in files[0].keys():
        assert torch.allclose(mixed.tensor(k), fast.tensor(k), atol=1e-3)


def test_scalar_and_empty_deltas_merge_through_whole_runs(tmp_path, monkeypatch):
    import medvec.vectors.file
    from medvec.vectors.file import group_runs

    monkeypatch.setattr(
        medvec.vectors.file, "RUN_CHUNK", 3
    )  # reads of 3 values: every delta's edge is a read's edge or not
    vectors = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        deltas = {"a": torch.tensor(0.5 * seed), "b": torch.zeros(0, 3), "c": torch.randn(7, generator=g)}
        meta = _toy_vector(seed, 4).meta.model_copy(update={"n_train": 2 * seed, "label_counts": [1, 2 * seed - 1]})
        vectors.append(DataVector(deltas, meta))
    files = [load_vector(v.save(tmp_path / f"s{i}.safetensors")) for i, v in enumerate(vectors)]
    assert len(group_runs(files[0].fp32_layout() or ())) == 1  # a, b and c follow each other in the file
    merged = merge_delta(files, get_method("weighted"))  # weights 2/6 and 4/6
    assert merged.tensor("a").shape == () and float(merged.tensor("a")) == pytest.approx(0.5 * 2 / 6 + 1.0 * 4 / 6)
    assert merged.tensor("b").shape == (0, 3)
    assert torch.allclose(merged.tensor("c"), (vectors[0].deltas["c"] * 2 + vectors[1].deltas["c"] * 4) / 6)


def test_an_int8_scale_that_would_decode_minus_128_to_infinity_is_refused(tmp_path, make_vector, tiny_base):
    def huge(t):
        t["fc.bias"] = torch.tensor([-128, 1], dtype=torch.int8)
        t["scale:fc.bias"] = torch.tensor([float(torch.finfo(torch.float32).max) / 127.5])

    path = _rewrite(tmp_path, make_vector, INT8, huge)
    with pytest.raises(InvalidVectorError) as info:
        load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
    assert info.value.check == "encoding" and "too large" in str(info.value)


def test_a_scalar_delta_round_trips_in_every_encoding():
    for enc in ALL:
        back = _roundtrip(torch.tensor(0.25), enc)
        assert back.shape == () and abs(float(back) - 0.25) < 0.04, enc.label
    assert _roundtrip(torch.zeros(3, 0), Encoding(name="int8_channel")).shape == (3, 0)


def test_a_file_replaced_after_validation_is_not_read(tmp_path, make_vector):
    vf = load_vector(make_vector("h1").save(tmp_path / "v.safetensors"))
    make_vector("h1", seed=7).save(tmp_path / "v.safetensors")  # atomically replaced: another inode
    with pytest.raises(InvalidVectorError) as info:
        vf.tensor(vf.keys()[0])
    assert info.value.check == "integrity" and "changed on disk" in str(info.value)
