"""Each task module through ``.fn()``: the function a Prefect task wraps, called without an engine (Prefect's
testing guide), on real data and a real local store.  The flows that compose them run in the integration tests."""

from __future__ import annotations

import pytest
import torch

from conftest import BREAST
from medvec.config import load_params
from medvec.coordinator.scoring import EvalSets
from medvec.data.split import write_hospital_shards
from medvec.store import LocalStore
from medvec.vectors.checks import load_vector

TINY = ["model.name=tiny_cnn", "model.pretrained=false", "finetune.epochs=1", "registry.enabled=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_hospital_shards(BREAST, out, hospitals=2, alpha=1.0, seed=0)
    return out


@pytest.fixture()
def store(tmp_path, tiny_base):
    s = LocalStore(tmp_path / "store")
    s.put_base(tiny_base)
    return s


def test_common_fetch_base_reads_the_published_base(store, tiny_base):
    from tasks.common import fetch_base

    got = fetch_base.fn(store, tiny_base.sha256)
    assert got.sha256 == tiny_base.sha256 and got.num_classes == 2


def test_hospital_tasks_fine_tune_publish_and_keep_the_file_they_published(store, tiny_base, shards, tmp_path):
    from tasks.hospital import fetch_start, finetune_hospital, load_local_data, publish_vector

    params = load_params(None, TINY)
    start, version = fetch_start.fn(store, tiny_base, "champion")
    assert version == 0 and start is tiny_base  # no champion yet: θ_pre itself
    data = load_local_data.fn(str(shards / "h1"), params)
    vector, training = finetune_hospital.fn(tiny_base, "h1", data, params.finetune, False)
    assert len(training.history) == 1 and set(training.data) == {"train", "val"}
    assert training.data["train"]["size"] == len(data.train) == vector.meta.n_train
    published = publish_vector.fn(store, vector, tiny_base, str(tmp_path))
    stored = load_vector(store.local_file(published.key))
    assert published.file.read_bytes() == store.local_file(published.key).read_bytes()  # the very bytes stored
    assert published.content_sha256 == stored.content_sha256 == vector.content_sha256
    assert "file" not in published.summary() and published.summary()["vector_id"] == vector.meta.vector_id


def test_hospital_attach_moments_needs_a_stored_merge(store, tiny_base, make_vector, shards):
    from tasks.hospital import attach_moments, load_local_data

    params = load_params(None, TINY)
    vector = make_vector("h1")
    data = load_local_data.fn(str(shards / "h1"), params)
    assert attach_moments.fn(store, tiny_base, vector, data, params.batchnorm) is vector  # no merge yet


def test_coordinator_tasks_admit_merge_and_finish_into_the_store(store, tiny_base, make_vector, shards):
    from medvec.record import MergeRecord
    from medvec.timing import Started
    from tasks.coordinator import admit_vectors, finish, last_merge, merge_task, quarantine_excluded, supersede_queued

    params = load_params(None, [*TINY, "merge.method=mean", "merge.lam=1.0", "batchnorm.strategy=average"])
    for i, hospital in enumerate(("h1", "h2", "h3")):
        store.put(make_vector(hospital, seed=i + 1, n_train=10 * (i + 1)))
    admission = admit_vectors.fn(store, tiny_base, params.intake, params.refine)
    assert sorted(v.meta.hospital for v in admission.admitted) == ["h1", "h2", "h3"]
    assert last_merge.fn(store, tiny_base.sha256) is None
    evalsets = EvalSets.load(BREAST, with_test=False)
    guarded = merge_task.fn(tiny_base, admission.admitted, params, evalsets, None)
    assert quarantine_excluded.fn(store, guarded.excluded) == []  # intake.harmful is off: nothing excluded
    record = MergeRecord.build(
        guarded.outcome, guarded.vectors, tiny_base.sha256, params, evalsets.ref(), store.url, Started.now()
    )
    final = finish.fn(store, record, guarded.outcome, tiny_base, guarded.vectors, evalsets)
    assert last_merge.fn(store, tiny_base.sha256) == final and final.registry is None  # registry off
    assert store.merged_model(final).sha256 == final.merged_sha256
    assert supersede_queued.fn([v.meta.vector_id for v in admission.admitted], "test") == 0  # no deployment run
    # a hospital's next run now answers moment sums under the stored merge (recompute)
    from tasks.hospital import attach_moments, load_local_data

    data = load_local_data.fn(str(shards / "h1"), params)
    answered = attach_moments.fn(store, tiny_base, make_vector("h4", seed=4), data, params.batchnorm)
    assert answered.meta.moments_model_sha256 == final.merged_sha256
    assert answered.moments is not None and set(answered.moments.count) == set(answered.running.mean)


def test_demo_tasks_give_the_control_and_centralized_rows(tiny_base, make_vector, shards):
    from medvec.coordinator.engine import BnPlan
    from medvec.hospital.local import LocalData
    from tasks.demo import centralized, control

    params = load_params(None, TINY)
    evalsets = EvalSets.load(BREAST)
    vectors = [make_vector("h1", seed=1, n_train=10), make_vector("h2", seed=2, n_train=30)]
    row = control.fn(tiny_base, vectors, evalsets, params, BnPlan("average", "running"), None)
    assert row["kind"] == "control" and row["n_train"] == 40 and row["lambda"] == 1.0
    local = [LocalData.load(shards / h) for h in ("h1", "h2")]
    torch.manual_seed(0)
    row = centralized.fn(tiny_base, local, evalsets, params, False)
    assert row["kind"] == "centralized" and row["n_train"] == sum(len(d.train) for d in local)
    assert 0.0 <= row["test"]["auc"] <= 1.0


def test_the_converged_reference_stops_early_and_keeps_its_best_epoch(tiny_base, shards):
    """Early stopping on validation: training stops ``patience`` epochs after the best, whose model is kept."""
    from medvec.data.images import ImageSet
    from medvec.demo.baselines import train_to_convergence
    from medvec.evaluate import evaluate_model
    from medvec.hospital.local import LocalData

    params = load_params(None, TINY)
    evalsets = EvalSets.load(BREAST)
    assert evalsets.val is not None
    pooled = ImageSet.concat([LocalData.load(shards / h).train for h in ("h1", "h2")])
    done = train_to_convergence(tiny_base, pooled, evalsets.val, params, max_epochs=12, patience=2)
    best = done.curve.index(max(done.curve))
    assert done.epochs == best + 1 and (len(done.curve) == 12 or len(done.curve) == best + 3), done.curve
    assert done.stopped_early == (len(done.curve) == best + 3)  # else the cap of 12 epochs ran out first
    assert evaluate_model(done.model, evalsets.val, tiny_base.spec)["auc"] == max(done.curve)  # the best kept


@pytest.mark.parametrize("given, expected", [(None, 120.0), ("45", 45.0)])
def test_importing_a_flow_gives_the_ephemeral_server_time_to_start_unless_the_user_chose(given, expected):
    """A flow called from Python (the lineage test's driver, a user's notebook) starts Prefect's ephemeral
    server; Prefect's own 20 s ran out in CI. Prefect reads settings when imported, so the package sets them."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if given:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = given
    code = (
        "import flows.merge_and_evaluate\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as S\nprint(S.value())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == expected
