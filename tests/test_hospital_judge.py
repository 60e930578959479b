"""The coordinator decides from the hospitals' answers (issue 25, ``evaluate.where: hospitals``): the λ scan, the
operating point and the gate read pooled answers, every round is recorded, a missed quorum stops promotion, and
through the store a forged answer is rejected and an absent hospital costs only the timeout.

Real data throughout: a tiny CNN fine-tuned on PneumoniaMNIST, scored on the real validation split divided
among three hospitals. The store is a local folder and the hospitals answer from threads: the Prefect path
is tested on real servers in ``test_tenancy.py``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import PNEUMONIA
from medvec.config import FinetuneConfig, Params
from medvec.coordinator.compare import single_rows
from medvec.coordinator.contribution import score_merge
from medvec.coordinator.engine import choose_scale
from medvec.coordinator.judge import HospitalJudge, StoreAsk, below_chance, quorum, voted_out
from medvec.coordinator.refine import compute_step, vote_on_inputs
from medvec.coordinator.scoring import EvalSets
from medvec.data.sources import load_split
from medvec.demo.answering import InProcessAsk
from medvec.evaluate import choose_threshold, evaluate_model, predict
from medvec.hospital.answer import answer_request
from medvec.hospital.train import finetune
from medvec.keys import DocumentSigner, keygen
from medvec.models import create_base, state_sha256
from medvec.record import StartPoint
from medvec.store import LocalStore
from medvec.vectors.signing import Keyring
from medvec.vectors.vector import DataVector

GRID = [0.5, 1.0, 1.5, 2.0]  # λ = 0 is θ_pre: its scores differ by less than a bin (ties count half)


@pytest.fixture(scope="module")
def setting():
    """θ_pre (tiny CNN), a hospital's vector from two epochs on PneumoniaMNIST's training images, and the real
    validation split cut into three hospitals' splits."""
    torch.set_num_threads(1)
    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    tuned = base.fresh()
    train = load_split(PNEUMONIA, "train")
    finetune(tuned, train, base.spec, FinetuneConfig(epochs=2, lr=0.003, threads=1, seed=0), progress=False)
    tau = DataVector.from_states(
        base.model.state_dict(),
        tuned.state_dict(),
        hospital="a",
        base_sha256=base.sha256,
        base_model="tiny_cnn",
        num_classes=2,
        n_train=len(train),
        label_counts=np.bincount(np.asarray(train.labels).reshape(-1)).tolist(),
    )
    val = load_split(PNEUMONIA, "val")
    order = np.random.default_rng(0).permutation(len(val))
    splits = {h: val.subset(np.sort(part)) for h, part in zip("abc", np.array_split(order, 3), strict=True)}
    return base, tau, val, splits


def params(**evaluate) -> Params:
    p = Params()
    return p.model_copy(
        update={
            "evaluate": p.evaluate.model_copy(update={"where": "hospitals", **evaluate}),
            "batchnorm": p.batchnorm.model_copy(update={"strategy": "none"}),
            "merge": p.merge.model_copy(update={"lambdas": GRID}),
        }
    )


def judge_of(setting, p: Params, absent: set[str] | None = None) -> HospitalJudge:
    base, _, _, splits = setting
    ask = InProcessAsk(splits, absent or set())
    return HospitalJudge(ask, base, ["a", "b", "c"], p.evaluate, {h: len(s) for h, s in splits.items()})


def test_the_scan_chooses_lambda_and_threshold_from_pooled_answers_as_the_union_would(setting):
    base, tau, val, _ = setting
    p = params(min_count=1)  # every bin as it is: the exact comparison; min_count 5 below
    judge = judge_of(setting, p)
    outcome = choose_scale(base, tau, GRID, "task_arithmetic", [tau], p, EvalSets(None, None, judge=judge), None)
    # one request for the whole scan, answered by all three sites
    (scan,) = judge.rounds
    assert scan.purpose == "scan" and scan.candidates == len(GRID)
    assert scan.answered == ("a", "b", "c") and scan.absent == () and scan.quorum_met
    assert scan.n == len(val) and set(scan.answer_sha256) == set(scan.splits) == {"a", "b", "c"}
    # the coordinator's numbers are the union's: the pooled AUC of each λ within 0.001 of the exact one
    labels = np.asarray(val.labels).reshape(-1)
    exact = {}
    for lam, auc in outcome.curve:
        model = base.fresh()
        model.load_state_dict(tau.apply_to(base.model.state_dict(), lam))
        model.eval()
        exact[lam] = roc_auc_score(labels, predict(model, val, base.spec)[:, 1])
        assert abs(auc - exact[lam]) < 0.001, (lam, auc, exact[lam])
    assert exact[outcome.lam] >= max(exact.values()) - 0.001
    # the operating point is the pooled ROC's: within a bin of Youden's threshold on the union's scores
    scores = predict(outcome.model, val, base.spec)[:, 1]
    union = choose_threshold(labels, scores)
    assert abs(np.log(outcome.val["threshold"] / (1 - outcome.val["threshold"])) - np.log(union / (1 - union))) < 0.01
    assert outcome.val["sites"] == ["a", "b", "c"] and outcome.val["n"] == len(val)
    # nothing per image reached the coordinator: no scores, no labels, no probabilities
    assert not {"scores", "labels", "proba"} & set(outcome.val)


def test_the_gate_asks_for_both_models_at_once_and_needs_a_standard_error(setting):
    base, tau, _, _ = setting
    p = params(gate_z=1.0)
    judge = judge_of(setting, p)
    merged = base.fresh()
    merged.load_state_dict(tau.apply_to(base.model.state_dict(), 1.0))
    merged.eval()
    promote, reason = judge.gate(merged, base.model, "champion v1")
    (gate_round,) = judge.rounds
    assert gate_round.purpose == "gate" and gate_round.candidates == 2
    assert promote, reason  # a trained model against an untrained one
    assert (
        reason.startswith("pooled val auc ") and "beats champion v1's " in reason and "on 3 sites (a, b, c;" in reason
    )
    assert judge.gate(base.model, base.model, "champion v1")[0] is False  # never against itself


def test_a_missed_quorum_is_recorded_and_stops_promotion(setting):
    base, tau, _, _ = setting
    p = params(quorum=0.75)
    judge = judge_of(setting, p, absent={"c"})
    outcome = choose_scale(base, tau, GRID, "ta", [tau], p, EvalSets(None, None, judge=judge), None)
    assert outcome.val["sites"] == ["a", "b"]  # the merge proceeds on the sites that answered
    (scan,) = judge.rounds
    assert scan.absent == ("c",) and not scan.quorum_met
    assert scan.quorum == "quorum 0.75 by sites missed: 2 of 3 sites answered"
    promote, reason = judge.gate(outcome.model, base.model)
    assert promote is False
    assert reason == f"not promoted: scan round {scan.request_id}: quorum 0.75 by sites missed: 2 of 3 sites answered"
    assert judge.evaluation().quorum_met is False and judge.evaluation().sites() == ["a", "b"]
    # the next merge starts with a fresh judge: same hospitals, no rounds of this one
    fresh = EvalSets(None, None, judge=judge).fresh().judge
    assert isinstance(fresh, HospitalJudge) and fresh.rounds == [] and fresh.hospitals == judge.hospitals


def test_quorum_by_samples_weighs_each_site_by_its_images():
    cfg = params(quorum=0.6, quorum_by="samples").evaluate
    weights = {"a": 500, "b": 300, "c": 200}
    assert quorum(["a", "b"], ["a", "b", "c"], cfg, weights) == (
        True,
        "quorum 0.6 by samples met: 800 of 1000 training images answered",
    )
    assert quorum(["b", "c"], ["a", "b", "c"], cfg, weights)[0] is False


def test_central_and_hospital_scoring_agree_on_the_same_images(setting):
    """The same union of images scored centrally and by the hospitals: the AUCs agree to 0.001 with every bin
    reported; cells of at least five images (the default) cost under 0.01 on 175-image sites."""
    base, tau, val, _ = setting
    model = base.fresh()
    model.load_state_dict(tau.apply_to(base.model.state_dict(), 1.0))
    model.eval()
    central = evaluate_model(model, val, base.spec)
    exact = EvalSets(None, None, judge=judge_of(setting, params(min_count=1))).validate_one(model, base.spec, 64)
    assert abs(exact["auc"] - central["auc"]) < 0.001
    coarse = EvalSets(None, None, judge=judge_of(setting, params())).validate_one(model, base.spec, 64)
    assert abs(coarse["auc"] - central["auc"]) < 0.01


@pytest.fixture()
def parties(tmp_path):
    """Keys for the coordinator and three hospitals; the keyring of the hospitals' public keys."""
    keyring, signers = Keyring(), {}
    for name in ("coordinator", "a", "b", "c"):
        keygen(name, tmp_path / "keys")
        signers[name] = DocumentSigner.load(tmp_path / "keys" / f"{name}.key")
        if name != "coordinator":
            keyring.add(name, tmp_path / "keys" / f"{name}.pub")
    return signers, keyring


def test_through_the_store_a_forged_answer_is_rejected_and_an_absent_site_costs_the_timeout(setting, parties, tmp_path):
    base, _, _, splits = setting
    signers, keyring = parties
    coordinator = signers["coordinator"]
    store = LocalStore(tmp_path / "store").trusting(coordinator, coordinator.verifier)
    hospitals_view = LocalStore(tmp_path / "store").trusting(verifier=coordinator.verifier)

    def start(request_id: str, hospitals: list[str]) -> None:
        """a answers honestly, then signs a copy naming b with its own key and stores it as b's; c is down."""

        def run():
            answer_request(hospitals_view, request_id, "a", splits["a"], splits["a"].sha256(), signers["a"])
            honest = hospitals_view.read_json(hospitals_view.answer_key(request_id, "a"))
            forged = signers["a"].sign(hospitals_view.answer_key(request_id, "b"), honest | {"hospital": "b"})
            hospitals_view.put_answer(request_id, "b", forged)

        threading.Thread(target=run).start()

    ask = StoreAsk(store, keyring, base.sha256, ["a", "b", "c"], timeout_s=8.0, start=start, poll_s=0.2)
    p = params(quorum=0.3)
    judge = HospitalJudge(ask, base, ["a", "b", "c"], p.evaluate)
    metrics = judge.validate({"model": base.model})["model"]
    (r,) = judge.rounds
    assert r.answered == ("a",) and r.absent == ("b", "c") and r.quorum_met
    assert r.waited_s >= 8.0  # c never answered: the round waited the whole timeout, and no longer than it needs
    assert metrics["sites"] == ["a"] and metrics["n"] == len(splits["a"])
    (rejected,) = r.rejected
    assert rejected.hospital_claimed == "b" and rejected.check == "bad_signature"
    assert rejected.problem == f"answers/{r.request_id}/b.json does not verify with hospital 'b''s key (signed by " + (
        f"{signers['a'].verifier.fingerprint}, or changed)"
    )
    # the rejected answer is kept, with its reason, in quarantine; it is no longer among the answers
    assert store.answer_envelopes(r.request_id).keys() == {"a"}
    assert store.read_json(f"quarantine/b/answer-{r.request_id}.reason.json")["check"] == "bad_signature"
    assert store.read_json(f"quarantine/b/answer-{r.request_id}.json")["hospital"] == "b"
    # the next round of the same merge asks everyone again but waits only for the site that answered
    judge.validate({"model": base.model})
    assert judge.rounds[1].answered == ("a",) and judge.rounds[1].waited_s < 8.0


def vector_to(base, hospital: str, state: dict) -> DataVector:
    """Hospital ``hospital``'s vector from θ_pre to ``state`` (100 balanced training images, as metadata)."""
    return DataVector.from_states(
        base.model.state_dict(),
        state,
        hospital=hospital,
        base_sha256=base.sha256,
        base_model="tiny_cnn",
        num_classes=2,
        n_train=100,
        label_counts=[50, 50],
    )


def test_contribution_scores_go_out_in_one_request_with_the_pooled_standard_errors(setting):
    base, tau, _, _ = setting
    p = params()
    p = p.model_copy(update={"contribution": p.contribution.model_copy(update={"method": "shapley"})})
    # two hospitals' vectors along the trained direction
    vectors = [
        vector_to(base, name, tau.apply_to(base.model.state_dict(), scale)) for name, scale in (("a", 0.5), ("b", 1.5))
    ]
    judge = judge_of(setting, p)
    evalsets = EvalSets(None, None, judge=judge)
    outcome = choose_scale(base, tau, [1.0], "mean", vectors, p, evalsets, None)
    scores = score_merge(base, vectors, outcome, p, evalsets)
    assert [r.purpose for r in judge.rounds] == ["scan", "contribution"]  # every subset in one request
    assert judge.rounds[1].candidates == 3  # ∅ and the two singletons; the merge itself is the scan's
    assert scores is not None and scores.exact and scores.method == "shapley"
    for s in scores.scores:
        assert s.loo_se is not None and s.loo_se > 0  # √(SE² + SE²) of the pooled AUCs


def test_the_below_chance_vote_flags_a_model_that_ranks_most_other_sites_backwards():
    matrix = {"a": {"a": 0.9, "b": 0.8, "c": 0.7}, "b": {"a": 0.3, "b": 0.9, "c": 0.45, "d": 0.6}, "c": {"a": 0.49}}
    assert below_chance(matrix, ["a", "b", "c"]) == {
        "b": "its own model scores below chance at 2 of 3 other sites (a 0.300, c 0.450, d 0.600)",
        "c": "its own model scores below chance at 1 of 1 other sites (a 0.490)",
    }
    assert below_chance({"b": {"a": 0.3, "c": 0.6}}, ["b"]) == {}  # half is not more than half
    # with standard errors: 0.45 + 1 × 0.06 is not below chance at c, so b is below at 1 of 3 only
    se = {"b": {"a": 0.05, "c": 0.06, "d": 0.05}}
    assert below_chance(matrix, ["b"], se, z=1.0) == {}
    assert "at 2 of 3" in below_chance(matrix, ["b"], se, z=0.5)["b"]  # 0.45 + 0.03 < 0.5


def flipped(state: dict) -> dict:
    """The same model with its two output classes swapped: what fine-tuning on flipped labels converges to."""
    return state | {"fc.weight": state["fc.weight"].flip(0), "fc.bias": state["fc.bias"].flip(0)}


def test_a_label_flipped_model_is_flagged_from_the_cross_site_matrix(setting):
    """b's model calls pneumonia normal (its head's classes swapped): it ranks a's and c's patients backwards,
    and the vote says so, from the hospitals' answers alone."""
    base, tau, _, _ = setting
    p = params()
    honest = tau.apply_to(base.model.state_dict(), 1.0)
    vectors = [vector_to(base, name, state) for name, state in (("a", honest), ("b", flipped(honest)))]
    judge = judge_of(setting, p)
    rows = single_rows(base, vectors, EvalSets(None, None, judge=judge), p)
    assert [r["name"] for r in rows] == ["a", "b"] and [r.purpose for r in judge.rounds] == ["matrix"]
    evaluation = judge.evaluation()
    assert set(evaluation.matrix) == {"a", "b"} and set(evaluation.matrix["a"]) == {"a", "b", "c"}
    assert all(auc > 0.5 for auc in evaluation.matrix["a"].values())
    assert all(auc < 0.5 for auc in evaluation.matrix["b"].values())
    assert list(evaluation.flagged) == ["b"] and evaluation.flagged["b"].startswith(
        "its own model scores below chance at 2 of 2 other sites (a 0."
    )
    # intake.vote: exclude keeps b out of the merge, with the reason; flag keeps it in
    kept, out = voted_out(vectors, evaluation.flagged, "exclude")
    assert kept == vectors[:1] and out == [(vectors[1], f"below-chance vote: {evaluation.flagged['b']}")]
    assert voted_out(vectors, evaluation.flagged, "flag") == (vectors, [])


def test_an_async_step_asks_for_its_scan_and_its_scores_and_nothing_more(setting):
    """The champion is scored beside the step's candidates in the scan's request (the gate reads it there) and
    as v(∅) in the scores' request: the hospitals are not asked for it in a round of its own."""
    base, tau, _, _ = setting
    p = params()
    p = p.model_copy(update={"contribution": p.contribution.model_copy(update={"method": "loo"})})
    parent = StartPoint(version=0, sha256=base.sha256, promoted_at="2026-12-05T00:00:00")
    judge = judge_of(setting, p)
    vector = vector_to(base, "a", tau.apply_to(base.model.state_dict(), 1.0))
    step = compute_step(base, parent, [vector], p, EvalSets(None, None, judge=judge))
    assert [r.purpose for r in judge.rounds] == ["scan", "contribution"]
    assert state_sha256(base.model.state_dict()) in judge.scored[0][0]  # the champion, beside the step's scan
    assert step.promoted and step.reason.startswith("pooled val auc ") and "champion v0's" in step.reason
    assert step.reason.endswith(f"; round {judge.rounds[0].request_id}")


def test_a_champion_beside_the_scan_is_gated_from_the_scan_s_answers_as_a_round_of_its_own_would_gate_it(setting):
    base, tau, _, _ = setting
    p = params(gate_z=1.0)
    champion = base.fresh()
    champion.load_state_dict(tau.apply_to(base.model.state_dict(), 0.3))
    champion.eval()
    judge = judge_of(setting, p)
    evalsets = EvalSets(None, None, judge=judge)
    evalsets.beside_scan("champion", champion)
    outcome = choose_scale(base, tau, GRID, "ta", [tau], p, evalsets, None)
    (scan,) = judge.rounds
    assert scan.candidates == len(GRID) + 1
    promote, reason = judge.gate(outcome.model, champion, "champion v1")
    assert len(judge.rounds) == 1 and reason.endswith(f"; round {scan.request_id}")  # no round of its own
    alone = judge_of(setting, p)  # the same verdict and figures from a gate round of its own
    promote_alone, reason_alone = alone.gate(outcome.model, champion, "champion v1")
    assert [r.purpose for r in alone.rounds] == ["gate"] and promote_alone == promote
    assert reason_alone.split("; round ")[0] == reason.split("; round ")[0]
    assert judge.matrix["champion"] == alone.matrix["champion"] and judge.matrix["merged"] == alone.matrix["merged"]
    other = base.fresh()  # a model the scan did not score: the gate asks for it
    judge.gate(other, champion)
    assert [r.purpose for r in judge.rounds] == ["scan", "gate"]


def test_an_async_step_asks_each_input_s_own_model_first_and_the_vote_keeps_a_flipped_one_out(setting):
    """The cross-site matrix and the below-chance vote run before an asynchronous step too: each input's own
    model (its start point + τ) at every site in one request; with ``intake.vote: exclude`` the label-flipped
    input is kept out of the step, which then merges the honest one alone."""
    base, tau, _, _ = setting
    p = params()
    p = p.model_copy(update={"intake": p.intake.model_copy(update={"vote": "exclude"})})
    parent = StartPoint(version=0, sha256=base.sha256, promoted_at="2026-12-05T00:00:00")
    honest = tau.apply_to(base.model.state_dict(), 1.0)
    vectors = [vector_to(base, name, state) for name, state in (("a", honest), ("b", flipped(honest)))]
    judge = judge_of(setting, p)
    evalsets = EvalSets(None, None, judge=judge)
    kept, out = vote_on_inputs(base, vectors, {0: base}, p, evalsets)
    assert [r.purpose for r in judge.rounds] == ["matrix"] and set(judge.matrix) == {"a", "b"}
    assert kept == vectors[:1] and [v for v, _ in out] == vectors[1:]
    assert out[0][1].startswith("below-chance vote: its own model scores below chance at 2 of 2 other sites")
    step = compute_step(base, parent, kept, p, evalsets)
    assert [i.meta.hospital for i in step.vectors] == ["a"] and step.promoted
    assert judge.rounds[0].purpose == "matrix" and judge.evaluation().flagged.keys() == {"b"}
    # on the coordinator's own set nothing is asked and every input is kept
    assert vote_on_inputs(base, vectors, {0: base}, p, EvalSets(None, None)) == (vectors, [])
