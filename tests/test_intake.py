"""Vector intake: one test per rejection case, each asserting the reason and that the
quarantined copy exists; concurrency; a property-based fuzz of the parser."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvec.config import IntakeConfig
from medvec.coordinator.intake import admit
from medvec.keys import SigningKeyError, keygen
from medvec.store import LocalStore
from medvec.vectors.checks import load_vector
from medvec.vectors.encoding import Encoding
from medvec.vectors.format import InvalidVectorError, content_sha256
from medvec.vectors.signing import Keyring, KeyringError, read_header, sign_file


@pytest.fixture()
def store(tmp_path, tiny_base):
    s = LocalStore(tmp_path / "store")
    s.put_base(tiny_base)
    return s


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    ring = Keyring()
    for h in ("h1", "h2"):
        keygen(h, d)
        ring.add(h, d / f"{h}.pub")
    keygen("mallory", d)  # not in the keyring
    keygen("h9", d)
    ring.save(d / "keyring.json")
    return {"dir": d, "ring": ring, "signed": IntakeConfig(defence="off", keyring=str(d / "keyring.json"))}


def plant(store: LocalStore, src: Path, hospital_folder: str, meta: dict, name: str | None = None) -> str:
    """Put a file into the store's layout exactly as an uploader could (file, then sidecar)."""
    key = f"vectors/{meta['base_sha256']}/{hospital_folder}/{name or meta['vector_id']}.safetensors"
    store._write_file(key, src)
    store.write_json(key[:-12] + ".json", {"meta": meta, "content_sha256": "?", "size": src.stat().st_size})
    return key


def admitted(store: LocalStore, tiny_base, cfg: IntakeConfig | None = None) -> list[str]:
    """Vector ids that intake admits (screen off unless ``cfg`` says otherwise)."""
    return [v.meta.vector_id for v in admit(store, tiny_base, cfg or IntakeConfig(defence="off")).admitted]


def rejected(
    store: LocalStore, tiny_base, check: str, hospital: str, cfg: IntakeConfig | None = None, fragment: str = ""
):
    adm = admit(store, tiny_base, cfg or IntakeConfig(defence="off"))
    reasons = [q for q in adm.rejected if q.check == check]
    assert reasons, f"no {check!r} rejection; have {adm.rejected}"
    r = reasons[-1]
    assert r.hospital_claimed == hospital and fragment in r.problem, r
    assert r in store.quarantined(), "the reason is not kept in the store"
    assert (store.root / r.object).is_file(), "the quarantined copy is missing"
    assert all(v.meta.vector_id not in r.object for v in adm.admitted)
    return r


def tampered(tmp_path: Path, vector, fn) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = vector.save(tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors, header)
    header["content_sha256"] = content_sha256(tensors)
    out = tmp_path / "bad.safetensors"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out), metadata=header)
    return out


def _meta(v) -> dict:
    return v.meta.model_dump()


@pytest.mark.parametrize(
    "case, fn, check, fragment",
    [
        ("nan", lambda t, h: t["fc.bias"].__setitem__(0, float("nan")), "non_finite", "NaN"),
        ("inf", lambda t, h: t["fc.bias"].__setitem__(1, float("-inf")), "non_finite", "Inf"),
        ("shape", lambda t, h: t.__setitem__("fc.bias", torch.zeros(5)), "shape", "fc.bias"),
        ("missing", lambda t, h: t.pop("fc.weight"), "missing_key", "fc.weight"),
        ("extra", lambda t, h: t.__setitem__("fc.extra", torch.zeros(1)), "extra_key", "fc.extra"),
        (
            "stale",
            lambda t, h: h.__setitem__("medvec", json.dumps({**json.loads(h["medvec"]), "base_sha256": "f" * 64})),
            "base_hash",
            "stale",
        ),
    ],
)
def test_bad_content_is_quarantined(case, fn, check, fragment, store, tiny_base, make_vector, tmp_path):
    v = make_vector("h1")
    bad = tampered(tmp_path, v, fn)
    plant(store, bad, "h1", _meta(v))
    rejected(store, tiny_base, check, "h1", fragment=fragment)


def test_truncated_file_is_quarantined(store, tiny_base, make_vector, tmp_path):
    v = make_vector("h1")
    path = v.save(tmp_path / "v.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-64])
    plant(store, cut, "h1", _meta(v))
    rejected(store, tiny_base, "truncated", "h1", fragment="truncated")


def test_pickle_payload_is_quarantined_unexecuted(store, tiny_base, make_vector, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload()))
    plant(store, evil, "h1", _meta(make_vector("h1")))
    rejected(store, tiny_base, "pickle", "h1", fragment="never unpickles")
    assert not marker.exists()


def test_oversized_file_is_quarantined_before_parsing(store, tiny_base, make_vector, tmp_path):
    v = make_vector("h1")
    plant(store, v.save(tmp_path / "v.safetensors"), "h1", _meta(v))
    rejected(
        store,
        tiny_base,
        "too_large",
        "h1",
        IntakeConfig(defence="off", max_vector_mb=1024 / 2**20),
        fragment="over the limit",
    )


def test_oversized_metadata_is_quarantined(store, tiny_base, make_vector, tmp_path):
    v = make_vector("h1")
    big = tampered(
        tmp_path,
        v,
        lambda t, h: h.__setitem__(
            "medvec", json.dumps({**json.loads(h["medvec"]), "finetune": {"blob": "x" * 100_000}})
        ),
    )
    plant(store, big, "h1", _meta(v))
    rejected(store, tiny_base, "too_large", "h1", fragment="metadata is")


def test_unsigned_vector_is_quarantined(store, tiny_base, make_vector, keys):
    v = make_vector("h1")
    store.put(v)
    rejected(store, tiny_base, "unsigned", "h1", keys["signed"], fragment="unsigned")


def test_forged_signature_is_quarantined(store, tiny_base, make_vector, keys, tmp_path):
    v = make_vector("h1")
    path = v.save(tmp_path / "v.safetensors")
    sign_file(path, keys["dir"] / "mallory.key", signer="h1")  # mallory signs, claiming to be h1
    plant(store, path, "h1", _meta(v))
    rejected(store, tiny_base, "bad_signature", "h1", keys["signed"], fragment="does not verify")


def test_tampered_metadata_breaks_the_signature(store, tiny_base, make_vector, keys, tmp_path):
    v = make_vector("h1", n_train=10)
    path = v.save(tmp_path / "v.safetensors")
    sign_file(path, keys["dir"] / "h1.key")
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    header["medvec"] = json.dumps({**json.loads(header["medvec"]), "n_train": 100000})  # inflate its weight
    save_file(tensors, str(bad), metadata=header)
    plant(store, bad, "h1", _meta(v))
    rejected(store, tiny_base, "bad_signature", "h1", keys["signed"])


def test_unknown_hospital_is_quarantined(store, tiny_base, make_vector, keys):
    v = make_vector("h9")
    store.put(v, key_file=keys["dir"] / "h9.key")
    rejected(store, tiny_base, "unknown_hospital", "h9", keys["signed"], fragment="not in the keyring")


def test_replay_is_quarantined(store, tiny_base, make_vector, keys):
    policy = keys["signed"]
    v = make_vector("h1")
    key = store.put(v, key_file=keys["dir"] / "h1.key")
    assert admitted(store, tiny_base, policy) == [v.meta.vector_id]
    # the same signed bytes published again under a new name, with a sidecar that claims to be newer
    meta = {**_meta(v), "created_at": "2999-01-01T00:00:00+00:00"}
    plant(store, store.local_file(key), "h1", meta, name="replayed")
    r = rejected(store, tiny_base, "replay", "h1", policy, fragment="already seen")
    assert admitted(store, tiny_base, policy) == [v.meta.vector_id]
    assert "replayed" in r.object


def test_a_hospital_cannot_publish_as_another(store, tiny_base, make_vector, keys, tmp_path):
    policy = keys["signed"]
    # h1 signs honestly but drops the file into h2's folder
    v = make_vector("h1")
    path = v.save(tmp_path / "v.safetensors")
    sign_file(path, keys["dir"] / "h1.key")
    plant(store, path, "h2", _meta(v))
    rejected(store, tiny_base, "impersonation", "h1", policy, fragment="published under hospital 'h2' but claims 'h1'")
    # h1 writes metadata claiming h2 and signs with its own key
    w = make_vector("h2", seed=5)
    p2 = w.save(tmp_path / "w.safetensors")
    sign_file(p2, keys["dir"] / "h1.key", signer="h1")
    plant(store, p2, "h2", _meta(w))
    rejected(store, tiny_base, "impersonation", "h2", policy, fragment="signed by 'h1'")
    # and cannot overwrite h2's published vector
    good = make_vector("h2", seed=6)
    store.put(good, key_file=keys["dir"] / "h2.key")
    from medvec.store import StoreError

    with pytest.raises(StoreError, match="already exists"):
        store.put(good, key_file=keys["dir"] / "h1.key")


def test_norm_and_direction_outliers_are_quarantined(store, tiny_base, make_vector):
    common = make_vector("c", seed=99).deltas  # honest hospitals share a direction, plus their own noise
    honest = [make_vector(f"h{i}", seed=i) for i in range(1, 5)]
    for v in honest:
        v.deltas = {k: common[k] + 0.5 * t for k, t in v.deltas.items()}
    big = make_vector("h5", seed=5)
    big.deltas = {k: 50 * (common[k] + 0.5 * t) for k, t in big.deltas.items()}
    flipped = make_vector("h6", seed=6)
    flipped.deltas = {k: -(common[k] + 0.5 * t) for k, t in flipped.deltas.items()}
    for v in [*honest, big, flipped]:
        store.put(v)
    adm = admit(store, tiny_base, IntakeConfig(defence="quarantine"))
    assert sorted(v.meta.hospital for v in adm.admitted) == ["h1", "h2", "h3", "h4"]
    by = {r.hospital: r for r in adm.screened}
    assert set(by) == {"h5", "h6"} and "norm" in by["h5"].reason and "cosine" in by["h6"].reason
    q = {x.hospital_claimed: x for x in store.quarantined()}
    assert q["h5"].check == "outlier" and (store.root / q["h5"].object).is_file()
    assert {r.hospital_claimed for r in adm.rejected} == {"h5", "h6"}
    again = admit(store, tiny_base, IntakeConfig(defence="clip"))
    assert len(again.admitted) == 4  # quarantined ones are gone; nothing left to clip
    assert again.screened == [] and again.rejected == []


def test_a_fresh_buffer_does_not_wait_for_a_hospital_whose_vector_the_screen_quarantined(store, tiny_base, make_vector):
    """async_vs_sync.py seed 5: once a third vector landed, the screen quarantined h3's, and the fresh buffer
    waited for h3 (which had reported) until the timeout. A hospital screened out since the champion has
    reported; one screened out before the champion was promoted has not reported from it."""
    from functools import partial

    from medvec.config import load_params
    from medvec.coordinator.intake import screened_out
    from medvec.coordinator.refine import step_ready
    from medvec.record import StartPoint
    from medvec.timing import utcnow
    from medvec.tracking.finish import buffer_ready

    before = utcnow()
    common = make_vector("c", seed=99).deltas
    vectors = [make_vector(f"h{i}", seed=i) for i in range(1, 5)]
    for v in vectors:
        scale = 50 if v.meta.hospital == "h4" else 1
        v.deltas = {k: scale * (common[k] + 0.5 * t) for k, t in v.deltas.items()}
        store.put(v)
    params = load_params(None, ["refine.mode=async", "refine.fresh=true", "refine.timeout=3600"])
    network = ("h1", "h2", "h3", "h4")  # as refine.network names it (else the hospitals of merges so far)
    params = params.model_copy(update={"refine": params.refine.model_copy(update={"network": network})})
    adm = admit(store, tiny_base, params.intake, params.refine)
    assert sorted(v.meta.hospital for v in adm.admitted) == ["h1", "h2", "h3"]
    assert screened_out(store, before, network) == {"h4"} and screened_out(store, utcnow(), network) == set()
    assert buffer_ready(store, tiny_base, adm, params) == (
        True,
        "every hospital of the network reported (3 vectors; the screen left out h4)",
    )
    later = StartPoint(version=1, sha256=tiny_base.sha256, promoted_at=utcnow())  # a step since: h4 owes a vector
    screened = partial(screened_out, store, later.promoted_at)
    assert step_ready(adm.admitted, 1, params.refine, set(network), 0.0, screened) == (
        False,
        "waiting for h4 (3 buffered)",
    )

    def unasked(missing):  # the quarantine is read only for a fresh buffer's missing hospitals
        raise AssertionError(f"asked for {missing}")

    everyone = params.refine.model_copy(update={"network": ("h1", "h2", "h3")})
    assert step_ready(adm.admitted, 1, everyone, set(), 0.0, unasked)[0]
    assert step_ready(adm.admitted, 1, params.refine.model_copy(update={"fresh": False}), set(), 0.0, unasked)[0]


def test_clipping_keeps_the_outlier_scaled_to_the_median_norm(store, tiny_base, make_vector):
    from medvec.coordinator.defence import Scaled

    common = make_vector("c", seed=99).deltas
    vectors = [make_vector(f"h{i}", seed=i) for i in range(1, 5)]
    for n, v in enumerate(vectors):
        factor = 50 if n == 3 else 1
        v.deltas = {k: factor * (common[k] + 0.5 * t) for k, t in v.deltas.items()}
        store.put(v)
    adm = admit(store, tiny_base, IntakeConfig(defence="clip"))
    assert len(adm.admitted) == 4 and adm.rejected == []
    (flag,) = adm.screened
    assert flag.hospital == "h4" and flag.action == "clip" and 0 < flag.scale < 0.1
    (clipped,) = [v for v in adm.admitted if isinstance(v, Scaled)]
    assert clipped.meta.hospital == "h4" and clipped.scale == flag.scale


def test_twenty_concurrent_vectors_from_four_hospitals_merge_the_latest_valid_of_each(store, tiny_base, make_vector):
    from medvec.coordinator.methods import merge_delta

    vectors = []
    for i in range(5):
        for h in ("h1", "h2", "h3", "h4"):
            vectors.append(make_vector(h, seed=10 * i + int(h[1])))
            time.sleep(0.002)  # distinct created_at, in this order
    errors = []

    def publish(v):
        try:
            store.put(v)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(v,)) for v in reversed(vectors)]  # land out of order
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # the newest of h3 is corrupted after landing: its previous one must be used
    newest = {v.meta.hospital: v for v in vectors}
    key = f"vectors/{tiny_base.sha256}/h3/{newest['h3'].meta.vector_id}.safetensors"
    p = store.local_file(key)
    p.write_bytes(p.read_bytes()[:-10])
    latest = admit(store, tiny_base, IntakeConfig(defence="off")).admitted
    want = {h: v.meta.vector_id for h, v in newest.items()}
    want["h3"] = [v for v in vectors if v.meta.hospital == "h3"][-2].meta.vector_id
    assert {v.meta.hospital: v.meta.vector_id for v in latest} == want
    assert len(merge_delta(latest, "mean").keys()) == len(vectors[0].keys())
    assert not list(store.root.rglob("*.tmp"))


FUZZ_SEEDS: dict = {}


def _retensor(good: bytes, data, tmp_path) -> bytes:
    """``good`` with one stored tensor's bytes (payload, scale, index or shape) replaced at random, honestly rehashed."""
    from safetensors.torch import load, save

    meta = json.loads(good[8 : 8 + int.from_bytes(good[:8], "little")])["__metadata__"]
    tensors = load(good)
    name = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    raw = data.draw(st.binary(min_size=t.numel() * t.element_size(), max_size=t.numel() * t.element_size()))
    if t.numel():
        tensors[name] = torch.frombuffer(bytearray(raw), dtype=t.dtype).reshape(t.shape).clone()
    meta["content_sha256"] = content_sha256(tensors)
    return save(tensors, metadata=meta)


FUZZ_ENCODINGS = [
    Encoding(),
    Encoding(name="int8_channel"),
    Encoding(name="int4", group_size=4),
    Encoding(name="topk", density=0.3),
]


@settings(
    max_examples=int(os.environ.get("MEDVEC_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_files_end_in_a_clean_rejection_or_a_valid_load(data, tmp_path, make_vector, tiny_base):
    """Random bytes and mutations of a valid file (of any encoding): InvalidVectorError or a valid VectorFile that
    decodes every delta to the base's shape, nothing else."""
    seeds = FUZZ_SEEDS.setdefault("files", {})
    if not seeds:  # a valid file of each layout: plain floats, per-channel int8, packed int4, sparse top-k
        for enc in FUZZ_ENCODINGS:
            seeds[enc.label] = make_vector("h1").encoded(enc).save(tmp_path / "seed.safetensors").read_bytes()
    good = seeds[data.draw(st.sampled_from(sorted(seeds)))]
    kind = data.draw(st.sampled_from(["random", "flip", "truncate", "splice", "header", "retensor"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=4096))
    elif kind == "flip":
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    elif kind == "truncate":
        blob = good[: data.draw(st.integers(0, len(good)))]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(good)))
        blob = good[:i] + data.draw(st.binary(max_size=64)) + good[i:]
    elif kind == "retensor":  # new bytes in one stored tensor, the content hash made to match: only layout checks
        blob = _retensor(good, data, tmp_path)
    else:
        n = int.from_bytes(good[:8], "little")
        header = bytearray(good[8 : 8 + n])
        i = data.draw(st.integers(0, len(header) - 1))
        header[i] = data.draw(st.sampled_from(list(b'{}[]":,0123456789-eE ')))
        blob = good[:8] + bytes(header) + good[8 + n :]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    t0 = time.monotonic()
    try:
        vf = load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
        assert vf.content_sha256 and vf.meta.hospital  # a valid load is fully valid
        state = tiny_base.model.state_dict()
        for k in vf.keys():
            t = vf.tensor(k)
            assert t.dtype == torch.float32 and t.shape == state[k].shape and bool(torch.isfinite(t).all())
    except InvalidVectorError as exc:
        assert str(path) in str(exc) and exc.check
    assert time.monotonic() - t0 < 5, "the parser hung"


def test_a_header_entry_without_its_shape_is_a_clean_rejection(tmp_path, make_vector, tiny_base):
    """Found by the fuzzer: a mutated header whose entry lost its ``shape`` key raised KeyError."""
    good = make_vector("h1").save(tmp_path / "good.safetensors").read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = good[8 : 8 + n].replace(b'"shape"', b'"shap1"', 1)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(good[:8] + header + good[8 + n :])
    with pytest.raises(InvalidVectorError, match="corrupt safetensors header entry") as exc:
        load_vector(path, base=tiny_base.model.state_dict(), base_sha256=tiny_base.sha256)
    assert exc.value.check == "corrupt"


def test_quarantined_vectors_are_listed_with_their_reasons(store, tiny_base, make_vector, tmp_path):
    from medvec.store import vector_rows

    good, bad = make_vector("h1", seed=1), make_vector("h2", seed=2)
    store.put(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(bad.save(tmp_path / "b.safetensors").read_bytes()[:-8])
    plant(store, cut, "h2", _meta(bad))
    admit(store, tiny_base, IntakeConfig(defence="off"))
    rows = vector_rows(store, include_quarantined=True)
    assert [r["status"] for r in rows] == ["landed", "quarantined: truncated"]
    assert rows[1]["hospital"] == "h2" and "truncated" in rows[1]["reason"]
    assert [r["status"] for r in vector_rows(store)] == ["landed"]


# ---------------------------------------------------------------------------- keys: revocation, replacement, keygen


def _ring(tmp_path: Path, *hospitals: str) -> tuple[Path, Keyring]:
    """Fresh keys for ``hospitals`` in tmp_path/keys and a keyring of them at tmp_path/keyring.json."""
    ring = Keyring()
    for h in hospitals:
        keygen(h, tmp_path / "keys")
        ring.add(h, tmp_path / "keys" / f"{h}.pub")
    ring.save(tmp_path / "keyring.json")
    return tmp_path / "keyring.json", ring


def test_a_revoked_hospital_s_vectors_are_refused_with_the_reason(store, tiny_base, make_vector, tmp_path):
    """Attack: a hospital's key is stolen after it was removed; what the thief signs is refused, saying why."""
    path, ring = _ring(tmp_path, "h1", "h2")
    cfg = IntakeConfig(defence="off", keyring=str(path))
    stolen = make_vector("h1")
    store.put(stolen, key_file=tmp_path / "keys" / "h1.key")
    honest = make_vector("h2", seed=2)
    store.put(honest, key_file=tmp_path / "keys" / "h2.key")
    ring.remove("h1", "laptop stolen 2026-12-05")
    ring.save(path)
    r = rejected(store, tiny_base, "revoked", "h1", cfg, fragment="laptop stolen 2026-12-05")
    assert "h1" in r.problem and "revoked" in r.problem
    assert admitted(store, tiny_base, cfg) == [honest.meta.vector_id]  # the other hospital is unaffected


def test_a_replaced_key_is_revoked_and_its_signatures_refused(store, tiny_base, make_vector, tmp_path):
    path, ring = _ring(tmp_path, "h1")
    cfg = IntakeConfig(defence="off", keyring=str(path))
    keygen("h1", tmp_path / "new")
    with pytest.raises(KeyringError, match=r"already has key SHA256:.*--replace"):
        ring.add("h1", tmp_path / "new" / "h1.pub")  # a key is never replaced by mistake
    ring.add("h1", tmp_path / "new" / "h1.pub", replace=True)
    ring.save(path)
    store.put(make_vector("h1", seed=1), key_file=tmp_path / "keys" / "h1.key")  # signed with the old key
    rejected(store, tiny_base, "revoked", "h1", cfg, fragment="replaced by SHA256:")
    fresh = make_vector("h1", seed=2)
    store.put(fresh, key_file=tmp_path / "new" / "h1.key")
    assert admitted(store, tiny_base, cfg) == [fresh.meta.vector_id]
    with pytest.raises(KeyringError, match="revoked"):  # and the old key cannot come back
        ring.add("h1", tmp_path / "keys" / "h1.pub", replace=True)


def test_the_keyring_refuses_another_hospital_s_public_key_and_a_missing_file(tmp_path, tiny_base, store):
    _, ring = _ring(tmp_path, "h1")
    with pytest.raises(KeyringError, match="hospital 'h1''s public key, not 'h2''s"):
        ring.add("h2", tmp_path / "keys" / "h1.pub")
    with pytest.raises(KeyringError, match="no keyring there"):  # a wrong intake.keyring is an error, not "nobody"
        admit(store, tiny_base, IntakeConfig(defence="off", keyring=str(tmp_path / "typo.json")))
    with pytest.raises(KeyringError, match="not in the keyring"):
        ring.remove("h7")


def test_keygen_never_overwrites_and_a_protected_key_needs_its_passphrase(tmp_path, make_vector, monkeypatch):
    key, pub = keygen("h1", tmp_path, passphrase=b"correct horse")
    assert key.stat().st_mode & 0o777 == 0o600 and b"ENCRYPTED" in key.read_bytes()
    before = key.read_bytes()
    with pytest.raises(SigningKeyError, match="never overwrites"):
        keygen("h1", tmp_path)
    assert key.read_bytes() == before
    vector = make_vector("h1").save(tmp_path / "v.safetensors")
    monkeypatch.delenv("MEDVEC_KEY_PASSPHRASE", raising=False)
    with pytest.raises(SigningKeyError, match="passphrase-protected: set MEDVEC_KEY_PASSPHRASE"):
        sign_file(vector, key)
    monkeypatch.setenv("MEDVEC_KEY_PASSPHRASE", "wrong")
    with pytest.raises(SigningKeyError, match="passphrase does not open"):
        sign_file(vector, key)
    monkeypatch.setenv("MEDVEC_KEY_PASSPHRASE", "correct horse")
    sign_file(vector, key)
    ring = Keyring()
    ring.add("h1", pub)
    vf = load_vector(vector)
    assert ring.verify(vector, vf.meta, vf.content_sha256, read_header(vector))["signer"] == "h1"
