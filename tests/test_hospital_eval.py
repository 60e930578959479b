"""Evaluation at the hospitals (issue 25): score histograms with exact values on hand-made rows; on real
images, the pooled AUC of three hospitals' reports against scikit-learn's AUC on the union of their validation
images; answers, the pooled gate, and the signed request → signed answers round trip through a store, with the
attacks on it (a forged request, changed candidate weights, an answer under another hospital's name)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import BREAST, PNEUMONIA
from medvec.answers import CandidateRef, EvalAnswer, EvalRequest, answer_problems
from medvec.config import FinetuneConfig
from medvec.coordinator.pooled import both_scored, collect, gate, pool
from medvec.data.sources import load_split
from medvec.evaluate import choose_threshold, metric_value, predict
from medvec.histograms import (
    NEGATIVE,
    POSITIVE,
    Grid,
    ScoreHistograms,
    ScoreReport,
    columns,
    groups,
    hanley_mcneil_se,
    summed_loss,
)
from medvec.hospital.answer import answer, answer_request
from medvec.hospital.train import finetune
from medvec.keys import DocumentSigner, UntrustedDocument, keygen
from medvec.models import BaseMismatchError, create_base, save_base, state_sha256
from medvec.store import LocalStore
from medvec.vectors.signing import Keyring


def hand(neg: dict[int, int], pos: dict[int, int], bins: int = 100) -> ScoreHistograms:
    counts = np.zeros((1, 2, bins))
    for b, n in neg.items():
        counts[0, NEGATIVE, b] = n
    for b, n in pos.items():
        counts[0, POSITIVE, b] = n
    return ScoreHistograms(Grid(bins), counts)


def report_of(neg: dict[int, int], pos: dict[int, int], min_count: int, bins: int = 100) -> ScoreReport:
    """The report of hand-placed scores: ``{bin: images}`` per truth, each image at its bin's lower edge."""
    edges = Grid(bins).lower_edges()
    scores = [edges[b] for side in (neg, pos) for b, n in side.items() for _ in range(n)]
    labels = [truth for truth, side in enumerate((neg, pos)) for n in side.values() for _ in range(n)]
    proba = np.stack([1 - np.array(scores), np.array(scores)], 1)
    return ScoreReport.of(proba, np.array(labels), "multiclass", Grid(bins), min_count)


def test_auc_counts_pairs_across_bins_and_half_a_pair_within_one():
    # positives in bins 2 and 5, negatives in bins 1 and 2: pairs (2,1)=1 (2,2)=½ (5,1)=1 (5,2)=1 → 3.5 / 4
    assert hand({1: 1, 2: 1}, {2: 1, 5: 1}).column_auc(0) == 0.875
    assert np.isnan(hand({1: 3}, {}).column_auc(0))


def test_grouping_merges_neighbours_until_each_group_holds_min_count():
    row = np.zeros(100, dtype=np.int64)
    row[[3, 4, 10, 11, 12, 50, 90]] = [2, 2, 1, 6, 1, 3, 1]
    # left to right: {3,4,10} (5), {11} (6), {12,50,90} (5: the short tail {90} joined the last group)
    # each group with the sum of its images' bins: 3·2 + 4·2 + 10 = 24, 11·6 = 66, 12 + 50·3 + 90 = 252
    assert groups(row, 5) == [(3, 10, 5, 24), (11, 11, 6, 66), (12, 90, 5, 252)]
    assert groups(row, 1) == [(b, b, int(row[b]), b * int(row[b])) for b in (3, 4, 10, 11, 12, 50, 90)]
    assert groups(np.array([0, 2, 0, 2]), 5) is None  # four images in all: withheld
    assert groups(np.zeros(100, dtype=np.int64), 5) == []


def test_a_group_is_read_as_the_most_entropy_spread_over_its_bins_with_its_mean_bin():
    report = report_of({3: 2, 4: 2, 10: 1}, {20: 5}, 5)
    assert report.rows == ((((3, 10, 5, 24),), ((20, 20, 5, 100),)),)
    h = report.histograms("maxent")  # a geometric spread over bins 3…10 whose mean bin is 24 / 5 = 4.8
    neg = h.counts[0, NEGATIVE]
    assert neg.sum() == pytest.approx(5) and (neg * np.arange(neg.size)).sum() / 5 == pytest.approx(4.8)
    assert neg[:3].sum() == 0 and neg[11:].sum() == 0
    ratios = neg[4:11] / neg[3:10]
    assert np.allclose(ratios, ratios[0]) and 0 < ratios[0] < 1  # e^(rate·k), falling: the mean is left of 6.5
    assert h.counts[0, POSITIVE, 20] == 5 and h.column_auc(0) == 1.0
    centred = report_of({3: 2, 9: 2, 6: 1}, {}, 5).histograms("maxent").counts[0, NEGATIVE]  # mean 6, mid: even
    assert np.allclose(centred[3:10], 5 / 7) and centred.sum() == pytest.approx(5)
    at_end = report_of({3: 1}, {}, 1)  # one image, one bin
    assert at_end.histograms("maxent").counts[0, NEGATIVE, 3] == 1


def test_a_group_is_read_at_its_two_ends_in_the_shares_of_its_mean_bin():
    report = report_of({3: 2, 4: 2, 10: 1}, {20: 5}, 5)
    h = report.histograms("ends")
    # mean bin 24 / 5 = 4.8 over [3, 10]: (4.8 − 3) / 7 of the 5 images at bin 10, the rest at bin 3
    assert h.counts[0, NEGATIVE, 10] == pytest.approx(9 / 7) and h.counts[0, NEGATIVE, 3] == pytest.approx(26 / 7)
    assert h.counts[0, NEGATIVE].sum() == pytest.approx(5) and h.counts[0, NEGATIVE, 4:10].sum() == 0
    assert h.counts[0, POSITIVE, 20] == 5 and h.column_auc(0) == 1.0


def test_a_confident_mistake_grouped_with_far_neighbours_is_kept_there_by_ends_and_moved_by_the_others():
    # a saturated model: 40 negatives at bin 0, one positive there too, four more positives at bins 60–63.
    # Exactly: the positive at bin 0 ties the 40 negatives (½ each), the others beat them: AUC 0.9
    report = report_of({0: 40}, {0: 1, 60: 1, 61: 1, 62: 1, 63: 1}, 5)
    assert report.rows[0][1] == ((0, 63, 5, 246),)
    ends = report.histograms("ends").column_auc(0)
    assert ends == pytest.approx(246 / 5 / 63 + (1 - 246 / 5 / 63) * 0.5) and abs(ends - 0.9) < 0.01
    # the most-entropy spread with mean bin 49.2 leans to bin 63 and so does the even one: both read ~0.99, the
    # case ``ends`` is for (benchmarks/pooled_auc.py measures how rare it is: maxent errs least on average)
    assert report.histograms("even").column_auc(0) == pytest.approx(0.9921875)
    assert report.histograms("maxent").column_auc(0) > 0.99


def test_a_row_below_min_count_is_withheld_and_the_other_row_still_pairs_with_the_other_sites():
    report = report_of({1: 40}, {7: 3}, 5)  # 3 positives: withheld; the 40 negatives are reported
    assert report.withheld == ((0, POSITIVE),) and report.rows == ((((1, 1, 40, 40),), ()),)
    assert report.smallest_group() == 40 and np.isnan(report.histograms().column_auc(0))
    other = report_of({2: 10}, {50: 10}, 5)
    pooled = report.histograms() + other.histograms()
    assert pooled.counts[0, NEGATIVE].sum() == 50 and pooled.counts[0, POSITIVE].sum() == 10
    assert pooled.column_auc(0) == 1.0  # the first site's negatives rank below the second's positives
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["withheld"] == [[0, 1]] and ScoreReport.from_json(doc) == report
    with pytest.raises(ValueError, match=r"is not \[column, 0"):
        ScoreReport.from_json({**doc, "withheld": [[0, 2]]})


def test_json_round_trip_and_refusal_of_groups_outside_the_grid_or_overlapping():
    report = report_of({1: 5, 30: 7}, {60: 9}, 5)
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["columns"] == [{"negative": [[1, 1, 5, 5], [30, 30, 7, 210]], "positive": [[60, 60, 9, 540]]}]
    assert ScoreReport.from_json(doc) == report
    for bad in ([[99, 100, 1, 99]], [[5, 9, 3, 19], [9, 12, 3, 30]], [[4, 4, 0, 0]]):
        doc["columns"][0]["positive"] = bad
        with pytest.raises(ValueError, match="is outside the grid, overlaps another or is empty"):
            ScoreReport.from_json(doc)
    # a group's first and last bins hold an image each: 3 images in [5, 9] sum to 19 … 23
    for bad, message in (([[5, 9, 3, 18]], "cannot sum its bins to 18"), ([[5, 9, 3]], "is .first, last, images")):
        doc["columns"][0]["positive"] = bad
        with pytest.raises(ValueError, match=message):
            ScoreReport.from_json(doc)


def test_a_grid_has_at_least_100_bins_and_its_edges_bound_its_bins():
    with pytest.raises(ValueError, match="at least 100 bins"):
        Grid(50)
    grid = Grid()
    edges = grid.lower_edges()
    assert edges[0] == 0.0 and (np.diff(edges) > 0).all()
    assert (grid.index(edges[1:]) == np.arange(1, grid.bins)).all()
    assert grid.index(np.array([0.0, 1.0])).tolist() == [0, grid.bins - 1]


def test_summed_loss_is_the_cross_entropy_summed_over_images():
    proba = np.array([[0.8, 0.2], [0.25, 0.75]])
    assert summed_loss(proba, np.array([0, 1]), "multiclass") == pytest.approx(-np.log(0.8) - np.log(0.75))
    ml = np.array([[0.9, 0.4]])
    expected = -np.log(0.9) - np.log(0.6)
    assert summed_loss(ml, np.array([[1, 0]]), "multilabel") == pytest.approx(expected)


@pytest.fixture(scope="module")
def network():
    """A tiny CNN fine-tuned for two epochs on PneumoniaMNIST's training images (the candidate), the same
    architecture after one epoch on a tenth of them (the champion), and the real validation split."""
    torch.set_num_threads(1)
    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    train = load_split(PNEUMONIA, "train")
    models = {}
    for name, epochs, share in (("candidate", 2, 1.0), ("champion", 1, 0.1)):
        model = base.fresh()
        subset = train.subset(np.arange(int(share * len(train))))
        finetune(model, subset, base.spec, FinetuneConfig(epochs=epochs, lr=0.003, threads=1, seed=0), progress=False)
        models[name] = model
    return base, models, load_split(PNEUMONIA, "val")


@pytest.fixture(scope="module")
def trained(network):
    """The candidate's validation predictions and the labels."""
    base, models, val = network
    return predict(models["candidate"], val, base.spec), np.asarray(val.labels).reshape(-1)


def sites(n: int, seed: int = 0) -> list[np.ndarray]:
    """Three hospitals' shares of ``n`` validation images (unequal, shuffled)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.split(order, [int(0.2 * n), int(0.55 * n)])


def test_pooled_auc_of_three_hospitals_is_within_0_001_of_the_exact_auc_on_the_union(trained):
    proba, labels = trained
    exact = roc_auc_score(labels, proba[:, 1])
    assert 0.7 < exact < 0.999  # a real, imperfect model: scores spread over the grid
    grid = Grid()
    first, *rest = [ScoreHistograms.of(proba[i], labels[i], "multiclass", grid) for i in sites(len(labels))]
    pooled = sum(rest, first)
    assert pooled.counts.sum() == len(labels)
    assert abs(pooled.auc("multiclass") - exact) < 0.001
    # the operating point: Youden's J on the pooled ROC is within one bin of scikit-learn's on the union
    t = pooled.threshold("youden")
    reference = choose_threshold(labels, proba[:, 1], "youden")
    assert abs(grid.index(np.array([t]))[0] - grid.index(np.array([reference]))[0]) <= 1
    op = pooled.at_threshold(t)
    predicted = proba[:, 1] >= t
    assert op["sensitivity"] == pytest.approx(predicted[labels == 1].mean())
    assert op["specificity"] == pytest.approx((~predicted[labels == 0]).mean())


def test_with_min_count_5_every_reported_group_aggregates_five_images_and_the_auc_moves_little(trained):
    proba, labels = trained
    exact = roc_auc_score(labels, proba[:, 1])
    reports = [ScoreReport.of(proba[i], labels[i], "multiclass", Grid(), 5) for i in sites(len(labels))]
    assert min(r.smallest_group() for r in reports) >= 5
    first, *rest = [r.histograms() for r in reports]
    pooled = sum(rest, first)
    assert pooled.counts.sum() == pytest.approx(len(labels))
    assert abs(pooled.auc("multiclass") - exact) < 0.005  # the price of the rule at 104–236 images a site


def test_multi_class_histograms_give_scikit_learn_s_one_vs_rest_macro_auc():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + 2.0 * np.eye(4)[labels]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pooled = ScoreHistograms.of(proba, labels, "multiclass", Grid())
    assert pooled.counts.shape == (4, 2, Grid().bins)
    assert abs(pooled.auc("multiclass") - metric_value(labels, proba, "auc")) < 0.001


def test_columns_read_the_positive_class_for_binary_and_every_label_for_multi_label():
    scores, positives = columns(np.array([[0.3, 0.7]]), np.array([1]), "multiclass")
    assert scores.tolist() == [[0.7]] and positives.tolist() == [[True]]
    scores, positives = columns(np.array([[0.3, 0.9]]), np.array([[0, 1]]), "multilabel")
    assert scores.tolist() == [[0.3, 0.9]] and positives.tolist() == [[False, True]]


def test_breast_images_too():
    """BreastMNIST's validation images under a tiny CNN fine-tuned on its training images."""
    torch.set_num_threads(1)
    base = create_base("tiny_cnn", 2, pretrained=False, seed=3)
    model = base.fresh()
    finetune(
        model, load_split(BREAST, "train"), base.spec, FinetuneConfig(epochs=3, lr=0.003, threads=1), progress=False
    )
    val = load_split(BREAST, "val")
    proba, labels = predict(model, val, base.spec), np.asarray(val.labels).reshape(-1)
    pooled = ScoreHistograms.of(proba, labels, "multiclass", Grid())
    assert abs(pooled.auc("multiclass") - roc_auc_score(labels, proba[:, 1])) < 0.001


def test_scores_closer_than_a_bin_tie():
    """The grid's limit: scores that differ by less than a bin's width count as ties (an untrained model's
    scores all sit within 0.003 of 0.49 on BreastMNIST: the pooled AUC reads 0.5 where the exact one is 0.51)."""
    p = np.array([[0.5, 0.5], [0.4999, 0.5001]])
    h = ScoreHistograms.of(p, np.array([0, 1]), "multiclass", Grid())
    assert h.column_auc(0) == 0.5


def test_hanley_mcneil_standard_error_by_hand():
    # A = 0.9, 50 and 50: Q1 = 0.9/1.1, Q2 = 1.62/1.9; variance (0.09 + 49(Q1 − 0.81) + 49(Q2 − 0.81)) / 2500
    q1, q2 = 0.9 / 1.1, 1.62 / 1.9
    assert hanley_mcneil_se(0.9, 50, 50) == pytest.approx(((0.09 + 49 * (q1 - 0.81) + 49 * (q2 - 0.81)) / 2500) ** 0.5)
    assert hanley_mcneil_se(0.9, 50, 50) == pytest.approx(0.03212, abs=1e-5)
    assert np.isnan(hanley_mcneil_se(0.9, 0, 50))
    h = hand({1: 50}, {5: 45, 0: 5})  # A = 0.9 exactly: 5 of 50 positives below every negative
    assert h.column_auc(0) == pytest.approx(0.9) and h.auc_se("multiclass") == pytest.approx(
        hanley_mcneil_se(0.9, 50, 50)
    )


def request_for(names: tuple[str, ...] = ("candidate", "champion"), min_count: int = 5) -> EvalRequest:
    """A request for ``names`` (the weights are not read by the tests that use it)."""
    refs = {n: CandidateRef(key=f"candidates/r1/{n}.safetensors", sha256="0" * 64) for n in names}
    return EvalRequest(
        request_id="r1", base_sha256="0" * 64, candidates=refs, min_count=min_count, created_at="2026-12-05T00:00:00"
    )


def site_answers(network, min_count: int = 5) -> list[EvalAnswer]:
    """Three hospitals' answers, each scoring both models on its share of the validation images."""
    base, models, val = network
    request = request_for()
    out = []
    for name, index in zip(("a", "b", "c"), sites(len(val)), strict=True):
        own = val.subset(index)
        args = (request.request_id, request.sha256(), name, models, own, own.sha256(), base.spec, Grid(), min_count)
        out.append(answer(*args))
    return out


def test_answers_hold_aggregates_only_and_pool_to_the_union(network, trained):
    proba, labels = trained
    answers = site_answers(network)
    for a in answers:
        assert answer_problems(a, request_for()) == []
        doc = a.to_json()
        # what leaves: counts, a summed loss, cells of at least five images; no score, no index, no image id
        for c in doc["candidates"].values():
            assert set(c) == {"n", "loss_sum", "histograms"}
            assert min(g[2] for row in c["histograms"]["columns"] for side in row.values() for g in side) >= 5
    pooled = pool(answers, "candidate")
    assert pooled.sites == ("a", "b", "c") and pooled.n == len(labels)
    assert abs(pooled.auc - roc_auc_score(labels, proba[:, 1])) < 0.005
    assert pooled.loss == pytest.approx(summed_loss(proba, labels, "multiclass") / len(labels), rel=1e-5)
    assert set(pooled.per_site_auc) == {"a", "b", "c"} and pooled.op["threshold"] == pooled.threshold
    # each site's own AUC reads its groups by ``site_reading`` (maxent), the pooled figures by ``reading`` (ends)
    for a in answers:
        report = a.candidates["candidate"].report()
        assert pooled.per_site_auc[a.hospital] == report.histograms("maxent").auc("multiclass")
        assert pool(answers, "candidate", site_reading="ends").per_site_auc[a.hospital] == report.histograms().auc(
            "multiclass"
        )
    assert pooled.auc == pool(answers, "candidate", site_reading="ends").auc


def test_the_gate_compares_like_with_like_and_needs_more_than_a_standard_error(network):
    answers = site_answers(network)
    promote, reason = gate(answers, "candidate", "champion")
    new, old = pool(answers, "candidate"), pool(answers, "champion")
    assert promote == (new.auc > old.auc + old.auc_se), reason
    assert reason.endswith(f"on 3 sites (a, b, c; {new.n} images)")
    # a site that scored only the candidate is left out of the comparison
    partial = [
        *answers[:2],
        answers[2].model_copy(update={"candidates": {"candidate": answers[2].candidates["candidate"]}}),
    ]
    assert both_scored(partial, "candidate", "champion") == ["a", "b"]
    assert "on 2 sites (a, b;" in gate(partial, "candidate", "champion")[1]
    # the champion against itself never passes
    assert gate(answers, "champion", "champion")[0] is False


def test_an_answer_that_breaks_the_request_s_rules_is_named_with_every_reason(network):
    a = site_answers(network, min_count=1)[0]
    other = request_for(("candidate", "other")).model_copy(update={"request_id": "r2"})
    problems = answer_problems(a, other)
    assert problems[0] == f"answers request r1 ({a.request_sha256[:12]}), not r2"
    assert problems[1] == "candidates differ from the request's: missing ['other'], not asked ['champion']"
    assert problems[2] == "min_count 1 is below the request's 5"
    assert problems[3].startswith("candidate candidate: a group counts ")
    assert problems[3].endswith("fewer than min_count 5")


@pytest.fixture()
def parties(tmp_path):
    """A coordinator with its key, three hospitals with theirs, and the keyring that holds the hospitals'."""
    keygen("coordinator", tmp_path / "keys")
    keyring = Keyring()
    signers = {}
    for h in ("a", "b", "c"):
        keygen(h, tmp_path / "keys")
        keyring.add(h, tmp_path / "keys" / f"{h}.pub")
        signers[h] = DocumentSigner.load(tmp_path / "keys" / f"{h}.key")
    coordinator = DocumentSigner.load(tmp_path / "keys" / "coordinator.key")
    return coordinator, signers, keyring


def publish_request(network, store_root, coordinator) -> tuple[LocalStore, EvalRequest]:
    base, models, _ = network
    store = LocalStore(store_root).trusting(coordinator, coordinator.verifier)
    candidates = {n: base.with_model(m, state_sha256(m.state_dict())) for n, m in models.items()}
    return store, store.put_request(base.sha256, candidates, min_count=5)


def test_a_signed_request_is_answered_by_three_hospitals_and_pooled_by_the_coordinator(network, parties, tmp_path):
    coordinator, signers, keyring = parties
    _, _, val = network
    store, request = publish_request(network, tmp_path / "store", coordinator)
    hospital_view = LocalStore(tmp_path / "store").trusting(verifier=coordinator.verifier)  # the pinned key
    for name, index in zip(("a", "b", "c"), sites(len(val)), strict=True):
        own = val.subset(index)
        key = answer_request(hospital_view, request.request_id, name, own, own.sha256(), signers[name])
        assert key == f"answers/{request.request_id}/{name}.json"
    collected = collect(store, request, keyring)
    assert collected.sites == ["a", "b", "c"] and collected.rejected == []
    # the same answers as scoring in process: the store round trip changes nothing
    direct = site_answers(network)
    for got, expected in zip(collected.answers, direct, strict=True):
        assert got.candidates == expected.candidates
    pooled = pool(collected.answers, "candidate")
    assert pooled.n == len(val) and pooled.auc == pool(direct, "candidate").auc


def test_a_request_the_coordinator_did_not_sign_or_changed_weights_are_refused_before_anything_is_scored(
    network, parties, tmp_path
):
    coordinator, signers, _ = parties
    _, _, val = network
    store, request = publish_request(network, tmp_path / "store", coordinator)
    hospital_view = LocalStore(tmp_path / "store").trusting(verifier=coordinator.verifier)
    member = LocalStore(tmp_path / "store")  # whoever can write requests/ without the coordinator's key
    member.write_json(f"requests/{request.request_id}.json", request.to_json())  # unsigned, same content
    with pytest.raises(UntrustedDocument, match=f"requests/{request.request_id}.json is not signed by the coordinator"):
        answer_request(hospital_view, request.request_id, "a", val, val.sha256(), signers["a"])
    store.write_json(f"requests/{request.request_id}.json", request.to_json())  # signed again
    # changed weights under a candidate's key: the sha256 the signed request names no longer matches
    other = create_base("tiny_cnn", 2, pretrained=False, seed=9)
    save_base(other, tmp_path / "store" / request.candidates["candidate"].key)
    with pytest.raises(BaseMismatchError, match=f"base sha256 is {other.sha256}, expected "):
        answer_request(hospital_view, request.request_id, "a", val, val.sha256(), signers["a"])
    assert store.answer_envelopes(request.request_id) == {}  # nothing answered


def test_an_answer_under_another_hospital_s_name_or_unsigned_is_rejected_and_kept_with_its_reason(
    network, parties, tmp_path
):
    coordinator, signers, keyring = parties
    _, _, val = network
    store, request = publish_request(network, tmp_path / "store", coordinator)
    own = val.subset(sites(len(val))[0])
    answer_request(store, request.request_id, "a", own, own.sha256(), signers["a"])
    genuine = store.answer_envelopes(request.request_id)["a"]
    # a signs an answer and stores it as b's (with a write credential a should not hold, or as the store's operator)
    doc = {**genuine["doc"], "hospital": "b"}
    store.put_answer(request.request_id, "b", signers["a"].sign(store.answer_key(request.request_id, "b"), doc))
    # an unsigned answer as c's
    store.put_answer(request.request_id, "c", {**genuine["doc"], "hospital": "c"})
    collected = collect(store, request, keyring)
    assert collected.sites == ["a"]
    reasons = {r.hospital_claimed: (r.check, r.problem) for r in collected.rejected}
    assert reasons["b"][0] == "bad_signature"
    assert reasons["b"][1].endswith(
        f"does not verify with hospital 'b''s key (signed by {signers['a'].verifier.fingerprint}, or changed)"
    )
    assert reasons["c"] == ("unsigned", f"answers/{request.request_id}/c.json is not signed (hospital 'c')")
    kept = {r.object for r in store.quarantined()}
    assert kept == {f"quarantine/b/answer-{request.request_id}.json", f"quarantine/c/answer-{request.request_id}.json"}
    assert sorted(store.answer_envelopes(request.request_id)) == ["a"]
