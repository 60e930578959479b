"""Contribution scores: leave-one-out and Shapley values against merges computed directly, the harmful rule,
and ``medvec hospital report``."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import BREAST
from flows.cli import main
from medvec.batchnorm import moment_sums
from medvec.config import load_params
from medvec.coordinator import engine, scoring
from medvec.coordinator.contribution import harmful_reason, markdown, paired_se, score_merge, scored_merge_once
from medvec.coordinator.intake import quarantine_harmful
from medvec.data.sources import load_split
from medvec.evaluate import evaluate_model
from medvec.preprocess import batches
from medvec.record import ContributionScore, MergeRecord
from medvec.store import LocalStore
from medvec.timing import Started
from medvec.vectors.vector import DataVector

TINY = ["model.name=tiny_cnn", "model.pretrained=false"]


@pytest.fixture(scope="module")
def evalsets():
    return scoring.EvalSets.load(BREAST)


def with_moments(tiny_base, v: DataVector, part: int) -> DataVector:
    """The vector with moment sums of 40 real breastmnist images under θ_pre (BN recompute from hospitals)."""
    images = load_split(BREAST, "train").subset(list(range(40 * part, 40 * (part + 1))))
    sums = moment_sums(tiny_base.fresh(), batches(images, tiny_base.spec, 16))
    return DataVector(v.deltas, v.meta.model_copy(update={"moments_model_sha256": tiny_base.sha256}), v.running, sums)


@pytest.fixture()
def vectors(tiny_base, make_vector):
    return [with_moments(tiny_base, make_vector(f"h{i + 1}", seed=i + 1, n_train=40, scale=0.05), i) for i in range(3)]


def value(base, vectors, params, evalsets, lam: float) -> float:
    """v(S) the long way: a production merge of S alone at the given λ (θ_pre itself for S = ∅)."""
    if not vectors:
        return evaluate_model(base.model, evalsets.val, base.spec)["auc"]
    fixed = params.model_copy(update={"merge": params.merge.model_copy(update={"lam": lam})})
    return engine.merge_once(base, vectors, fixed, evalsets).val["auc"]


@pytest.mark.parametrize("strategy", ["average", "recompute", "none"])
def test_leave_one_out_equals_the_difference_of_two_merges(tiny_base, vectors, evalsets, strategy):
    params = load_params(None, [*TINY, "merge.lambdas=[0.5,1.0]", f"batchnorm.strategy={strategy}"])
    outcome = engine.merge_once(tiny_base, vectors, params, evalsets)
    scores = score_merge(tiny_base, vectors, outcome, params, evalsets)
    assert scores.method == "loo" and scores.metric == "auc" and scores.merges == 3
    assert scores.value_all == outcome.val["auc"]
    for i, s in enumerate(scores.scores):
        rest = vectors[:i] + vectors[i + 1 :]
        assert s.vector_id == vectors[i].meta.vector_id
        assert s.loo == outcome.val["auc"] - value(tiny_base, rest, params, evalsets, outcome.lam)
        assert s.loo_se is not None and s.loo_se > 0
        assert s.shapley is None and s.harmful is None
    assert scores.value_none == value(tiny_base, [], params, evalsets, outcome.lam)


def test_shapley_from_every_join_order_equals_the_exact_shapley_value(tiny_base, vectors, evalsets):
    params = load_params(None, [*TINY, "merge.lam=0.5", "batchnorm.strategy=average", "contribution.method=shapley"])
    outcome = engine.merge_once(tiny_base, vectors, params, evalsets)
    scores = score_merge(tiny_base, vectors, outcome, params, evalsets)
    assert scores.method == "shapley" and scores.exact and scores.permutations == 6 and scores.merges == 6
    v = {
        s: value(tiny_base, [vectors[i] for i in s], params, evalsets, 0.5)
        for r in range(4)
        for s in itertools.combinations(range(3), r)
    }
    for i, got in enumerate(scores.scores):
        exact = 0.0
        for s, vs in v.items():
            if i in s:
                continue
            with_i = tuple(sorted((*s, i)))
            weight = math.factorial(len(s)) * math.factorial(3 - len(s) - 1) / math.factorial(3)
            exact += weight * (v[with_i] - vs)
        assert got.shapley == pytest.approx(exact, abs=1e-12)
        assert got.shapley_se == 0.0
    # efficiency: the values share out exactly what the merge added over θ_pre
    total = sum(s.shapley for s in scores.scores)
    assert total == pytest.approx(v[(0, 1, 2)] - v[()], abs=1e-12)


def test_sampled_shapley_stays_within_its_budget(tiny_base, make_vector, evalsets):
    vs = [make_vector(f"h{i}", seed=i, n_train=20, scale=0.05) for i in range(1, 6)]
    params = load_params(
        None,
        [*TINY, "merge.lam=0.5", "batchnorm.strategy=average", "contribution.method=shapley", "contribution.budget=6"],
    )
    outcome = engine.merge_once(tiny_base, vs, params, evalsets)
    scores = score_merge(tiny_base, vs, outcome, params, evalsets)
    assert not scores.exact and scores.permutations >= 1
    # 5 leave-one-out merges, then orders until 6 more subsets, the last order adding at most 2 beyond
    assert 5 + 6 <= scores.merges <= 5 + 6 + 2 < 2**5 - 2
    assert all(s.shapley is not None and s.shapley_se is not None for s in scores.scores)
    again = score_merge(tiny_base, vs, outcome, params, evalsets)  # seeded: the same orders, the same values
    assert [s.shapley for s in again.scores] == [s.shapley for s in scores.scores]
    one = params.model_copy(update={"contribution": params.contribution.model_copy(update={"budget": 1})})
    single = score_merge(tiny_base, vs, outcome, one, evalsets)  # one join order: a mean without an error
    assert single.permutations == 1 and all(s.shapley_se is None for s in single.scores)
    rows = markdown(single)[4:]
    assert len(rows) == 5 and all(f"| {s.shapley:+.4f} | ok |" in r for s, r in zip(single.scores, rows))


def test_the_vectorized_bootstrap_auc_equals_scikit_learn_on_every_resample():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from medvec.coordinator.contribution import _binary_auc

    rng = np.random.default_rng(0)
    y, scores = rng.integers(0, 2, 80), np.round(rng.random(80), 1)  # rounded: many ties
    idx = rng.integers(0, 80, (50, 80))
    idx[0] = np.flatnonzero(y == 1)[0]  # one resample with a single class: undefined
    got = _binary_auc(y, scores, idx)
    assert np.isnan(got[0])
    assert np.allclose(got[1:], [roc_auc_score(y[i], scores[i]) for i in idx[1:]], rtol=0, atol=1e-12)


def test_paired_bootstrap_error_is_zero_for_identical_models_and_seeded(tiny_base, evalsets):
    m = evaluate_model(tiny_base.model, evalsets.val, tiny_base.spec)
    assert paired_se(m, m, "auc", 50, 0) == 0.0
    assert paired_se(m, m, "auc", 0, 0) is None


def test_the_harmful_rule_needs_both_the_floor_and_the_standard_errors():
    cfg = load_params(None, ["intake.harm_min=0.01", "intake.harm_z=2"]).intake
    s = ContributionScore(vector_id="v", hospital="h", loo=-0.05, loo_se=0.02)
    assert "0.0500 ± 0.0200 higher without it" in harmful_reason(s, cfg, "auc")
    assert harmful_reason(s.model_copy(update={"loo_se": 0.03}), cfg, "auc") is None  # within 2 SE
    assert harmful_reason(s.model_copy(update={"loo": -0.009, "loo_se": 0.001}), cfg, "auc") is None  # above floor
    assert harmful_reason(s.model_copy(update={"loo": 0.2}), cfg, "auc") is None


@pytest.mark.parametrize("mode", ["flag", "exclude"])
def test_harmful_vectors_are_flagged_or_excluded_and_kept_with_their_reason(tmp_path, tiny_base, make_vector, mode):
    store = LocalStore(tmp_path / "store")
    store.put_base(tiny_base)
    for i in range(4):
        store.put(make_vector(f"h{i + 1}", seed=i + 1, n_train=20, scale=0.05))
    vectors = [store.get(s["meta"]["vector_id"], tiny_base.model.state_dict()) for s in store.sidecars()]
    # a zero floor and zero standard errors: every vector with a negative LOO is harmful
    over = [*TINY, "merge.lam=1.0", "batchnorm.strategy=average", f"intake.harmful={mode}", "intake.harm_min=0"]
    params = load_params(None, [*over, "intake.harm_z=0"])
    evalsets = scoring.EvalSets.load(BREAST)
    first = score_merge(tiny_base, vectors, engine.merge_once(tiny_base, vectors, params, evalsets), params, evalsets)
    bad = {s.vector_id for s in first.scores if s.loo < 0}
    assert bad and len(bad) < 4, "the fixture needs some, not all, vectors that lower the merge"
    guarded = scored_merge_once(tiny_base, vectors, params, evalsets)
    assert {s.vector_id for s in guarded.outcome.scores.scores if s.harmful} >= (bad if mode == "flag" else set())
    if mode == "flag":
        assert guarded.vectors == vectors and not guarded.excluded
        return
    assert {v.meta.vector_id for v, _ in guarded.excluded} == bad
    assert {v.meta.vector_id for v in guarded.vectors} == {v.meta.vector_id for v in vectors} - bad
    assert {s.vector_id: s.loo for s in guarded.outcome.scores.excluded} == {
        s.vector_id: s.loo for s in first.scores if s.vector_id in bad
    }
    direct = engine.merge_once(tiny_base, guarded.vectors, params, evalsets)
    assert guarded.outcome.val["auc"] == direct.val["auc"]  # merged again without them
    rejections = quarantine_harmful(store, guarded.excluded)
    assert {r.check for r in rejections} == {"harmful"}
    assert all("higher without it" in r.problem for r in rejections)
    assert {s["meta"]["vector_id"] for s in store.sidecars()} == {v.meta.vector_id for v in guarded.vectors}
    kept = {Path(r.object).stem for r in store.quarantined()}
    assert kept == bad  # moved, with the reason, not deleted


def test_the_demo_bn_answers_come_from_the_subsets_hospitals_only(tmp_path, tiny_base):
    from medvec.data.split import write_hospital_shards
    from medvec.hospital.finetune import live_moments
    from medvec.hospital.local import LocalData

    write_hospital_shards(BREAST, tmp_path, hospitals=3, alpha=1.0, seed=0)
    params = load_params(None, TINY)
    local = {h: LocalData.load(tmp_path / h) for h in ("h1", "h2", "h3")}
    live = live_moments(tiny_base, local, params.batchnorm)
    model = tiny_base.fresh()
    two = live.only(["h1", "h3"])
    assert [h for h, _, _ in two.local] == ["h1", "h3"] and [s for _, _, s in two.local] == [0, 2]
    counts = [next(iter(m(model).count.values())) for m in (two, live, live.only(["h2"]))]
    assert counts[0] == counts[1] - counts[2] > 0


def stored_merge(store, base, params, evalsets) -> MergeRecord:
    """What merge-and-evaluate does with the store: admit, merge and score, the hospitals' views, record."""
    from medvec.coordinator.intake import admit
    from medvec.tracking.finish import publish_views

    started = Started.now()
    admission = admit(store, base, params.intake)
    guarded = scored_merge_once(base, admission.admitted, params, evalsets)
    record = MergeRecord.build(
        guarded.outcome, guarded.vectors, base.sha256, params, evalsets.ref(), store.url, started
    )
    publish_views(store, record)
    return store.put_merge(record)


@pytest.mark.parametrize("share", [False, True])
def test_hospital_report_of_a_hospital_that_contributed_twice(tmp_path, tiny_base, make_vector, capsys, share):
    store = LocalStore(tmp_path / "store")
    store.put_base(tiny_base)
    params = load_params(None, [*TINY, "merge.lam=0.5", "batchnorm.strategy=average", f"contribution.share={share}"])
    evalsets = scoring.EvalSets.load(BREAST, with_test=False)
    first = [make_vector("h1", seed=1, n_train=30, scale=0.05), make_vector("h2", seed=2, n_train=50, scale=0.05)]
    for v in first:
        store.put(v)
    one = stored_merge(store, tiny_base, params, evalsets)
    second = make_vector("h1", seed=3, n_train=31, scale=0.05)
    store.put(second)
    two = stored_merge(store, tiny_base, params, evalsets)
    shutil.rmtree(store.root / "merges")  # a hospital reads its own views, never the coordinator's records
    assert main(["hospital", "report", "h1", "--store", str(store.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["vector_id"] for v in doc["vectors"]] == [first[0].meta.vector_id, second.meta.vector_id]
    assert [m["merge_id"] for m in doc["merges"]] == [two.merge_id, one.merge_id]
    for m, record, vid in (
        (doc["merges"][0], two, second.meta.vector_id),
        (doc["merges"][1], one, first[0].meta.vector_id),
    ):
        assert [y["vector_id"] for y in m["yours"]] == [vid]
        assert m["yours"][0]["loo"] == record.contribution.of(vid).loo
        if share:
            assert [o["hospital"] for o in m["others"]] == ["h2"]
        else:
            assert m["others"] is None
    assert main(["hospital", "report", "h1", "--store", str(store.root)]) == 0
    text = capsys.readouterr().out
    assert f"leave-one-out {two.contribution.of(second.meta.vector_id).loo:+.4f}" in text
    assert ("h2" in text) is share  # another hospital's name, let alone its scores, only when shared
