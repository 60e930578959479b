"""The typed merge record: built once, stored with the BN moment sums it used, replayed bit for bit."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conftest import BREAST
from medvec.batchnorm import MomentSums, moment_sums
from medvec.config import load_params
from medvec.coordinator import engine, lineage, scoring
from medvec.data.sources import load_split
from medvec.preprocess import batches
from medvec.record import EvalSetRef, MergeRecord
from medvec.store import LocalStore
from medvec.timing import Started, utcnow
from medvec.vectors.vector import DataVector


@pytest.fixture()
def stored(tmp_path, tiny_base, make_vector):
    """Three hospitals' vectors in a local store, each with moment sums of real images under θ_pre."""
    store = LocalStore(tmp_path / "store")
    store.put_base(tiny_base)
    images = load_split(BREAST, "train")
    vectors = []
    for i in range(3):
        v = make_vector(f"h{i + 1}", seed=i + 1, n_train=40)
        part = images.subset(list(range(40 * i, 40 * (i + 1))))
        sums = moment_sums(tiny_base.fresh(), batches(part, tiny_base.spec, 16))
        meta = v.meta.model_copy(update={"moments_model_sha256": tiny_base.sha256})
        store.put(DataVector(v.deltas, meta, v.running, sums))
    vectors = [
        store.get(s["meta"]["vector_id"], tiny_base.model.state_dict(), tiny_base.sha256) for s in store.sidecars()
    ]
    return store, vectors


def merged_record(store, tiny_base, vectors, overrides, calibration=None) -> MergeRecord:
    params = load_params(None, ["model.name=tiny_cnn", "model.pretrained=false", "merge.lambdas=[0.5,1.0]", *overrides])
    evalsets = scoring.EvalSets.load(BREAST)
    started = Started.now()
    outcome = engine.merge_once(tiny_base, vectors, params, evalsets, calibration)
    record = MergeRecord.build(outcome, vectors, tiny_base.sha256, params, evalsets.ref(), store.url, started)
    return store.put_merge(record, moments=outcome.moments)


@pytest.mark.parametrize(
    ("overrides", "calibrate", "strategy", "source"),
    [
        (["batchnorm.strategy=recompute"], False, "recompute", "hospitals"),
        (["batchnorm.strategy=recompute"], True, "recompute", "hospitals"),
        (["batchnorm.strategy=average"], False, "average", "running"),
        (["batchnorm.strategy=none"], False, "none", "base"),
    ],
)
def test_rebuild_from_the_record_is_bit_identical(stored, tiny_base, overrides, calibrate, strategy, source):
    store, vectors = stored
    calibration = load_split(BREAST, "train").subset(list(range(200, 264))) if calibrate else None
    record = merged_record(store, tiny_base, vectors, overrides, calibration)
    assert (record.bn_strategy, record.bn_source) == (strategy, source)
    assert (record.moments_key is not None) == (strategy == "recompute")
    again = store.latest_merge(tiny_base.sha256)
    assert again == record  # what the store kept is the record, field for field
    _, sha = lineage.rebuild_merge(store, again)
    assert sha == record.merged_sha256


def test_recompute_from_a_calibration_set_keeps_its_sums(stored, tiny_base):
    store, vectors = stored
    plain = [
        DataVector(v.to_vector().deltas, v.meta.model_copy(update={"moments_model_sha256": None}), v.running)
        for v in vectors
    ]
    calibration = load_split(BREAST, "train").subset(list(range(200, 264)))
    record = merged_record(
        store, tiny_base, [_republished(store, v) for v in plain], ["batchnorm.strategy=recompute"], calibration
    )
    assert (record.bn_strategy, record.bn_source) == ("recompute", "calibration")
    kept = store.get_moments(record.moments_key)
    # the kept sums are those of the calibration images under the merged weights (BN in batch mode)
    inputs = [store.get(i.vector_id) for i in record.inputs]
    merged, _ = engine.realize(
        tiny_base, inputs, record.method, record.lam, engine.BnPlan("none", "base"), record.params
    )
    fresh = moment_sums(merged, batches(calibration, tiny_base.spec, record.params.batchnorm.batch_size))
    assert kept.count == fresh.count and all(kept.sum[k].equal(fresh.sum[k]) for k in kept.sum)
    _, sha = lineage.rebuild_merge(store, record)
    assert sha == record.merged_sha256


def _republished(store, vector):
    """A copy of ``vector`` under a new id (no moment sums), as a hospital without them would send."""
    from medvec.vectors.vector import new_vector_id

    meta = vector.meta.model_copy(
        update={"vector_id": new_vector_id(vector.meta.hospital, "c0ffee00"), "created_at": utcnow()}
    )
    fresh = DataVector(vector.deltas, meta, vector.running)
    key = store.put(fresh)
    return store.open_vector(key, store.get_base(meta.base_sha256).model.state_dict(), meta.base_sha256)


def test_a_record_names_its_bn_strategy_and_source_and_round_trips_as_json(stored, tiny_base):
    store, vectors = stored
    record = merged_record(store, tiny_base, vectors, ["batchnorm.strategy=recompute"])
    doc = record.to_json()
    assert doc["lambda"] == record.lam and "lam" not in doc
    assert doc["bn_strategy"] == "recompute" and doc["bn_source"] == "hospitals"
    assert doc["started_at"] <= doc["finished_at"]
    assert [i["vector_id"] for i in doc["inputs"]] == [v.meta.vector_id for v in vectors]
    assert MergeRecord.model_validate(doc) == record
    with pytest.raises(ValidationError, match="frozen"):
        record.method = "sum"


def test_stored_moment_sums_are_exact(tmp_path, tiny_base):
    images = load_split(BREAST, "val")
    sums = moment_sums(tiny_base.fresh(), batches(images, tiny_base.spec, 32))
    back = MomentSums.load(sums.save(tmp_path / "m.safetensors"))
    assert back.count == sums.count
    assert all(back.sum[k].equal(sums.sum[k]) and back.sumsq[k].equal(sums.sumsq[k]) for k in sums.sum)


def test_the_eval_set_identity_tells_sets_apart():
    val = load_split(BREAST, "val")
    a, b = EvalSetRef.of(val, "x.npz", "val"), EvalSetRef.of(val, "y.npz", "val")
    assert a.sha256 == b.sha256 and a.size == len(val) == 78
    other = EvalSetRef.of(val.subset(list(range(70))), "x.npz", "val")
    assert other.sha256 != a.sha256 and other.size == 70


def test_without_a_test_split_the_record_still_keeps_the_threshold_chosen_on_validation(stored, tiny_base):
    from medvec.evaluate import choose_threshold, evaluate_model

    store, vectors = stored
    params = load_params(None, ["model.name=tiny_cnn", "model.pretrained=false", "batchnorm.strategy=average"])
    evalsets = scoring.EvalSets.load(BREAST, with_test=False)
    outcome = engine.merge_once(tiny_base, vectors, params, evalsets)
    record = MergeRecord.build(outcome, vectors, tiny_base.sha256, params, evalsets.ref(), store.url, Started.now())
    val = evaluate_model(outcome.model, evalsets.val, tiny_base.spec, params.evaluate.batch_size)
    assert record.test == {} and record.operating_point == {
        "threshold": pytest.approx(choose_threshold(val["labels"], val["scores"]))
    }
