"""MLflow lineage on a real ``mlflow server`` (SQLite backend, served artifacts) started here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import BREAST, PNEUMONIA, ROOT
from servers import MlflowServer, run_driver

pytestmark = pytest.mark.integration

OVERRIDES = [
    "model.name=tiny_cnn",
    "model.pretrained=false",
    "finetune.epochs=3",
    "finetune.lr=0.003",
    "finetune.threads=2",
    "merge.method=weighted",
    "merge.lam=1.0",
    "batchnorm.strategy=average",
    f"coordinator.eval_data={BREAST}",
    "evaluate.where=coordinator",  # these tests are of the coordinator's own set; hospitals: test_tenancy
]

SCRIPT = """
import json, sys
from medvec.config import load_params
from medvec.data.split import write_hospital_shards
from medvec.models import create_base
from medvec.store import open_store
from flows.hospital_finetune import hospital_finetune
from flows.merge_and_evaluate import merge_and_evaluate
tmp, overrides = sys.argv[1], json.loads(sys.argv[2])
overrides = overrides + [f"registry.dvc_repo={tmp}/registry", f"registry.dvc_remote={tmp}/dvc-remote"]
p = load_params("params.yaml", overrides)
store = open_store(tmp + "/store")
store.put_base(create_base("tiny_cnn", 2, False, None, 0))
write_hospital_shards(%(data)r, tmp + "/h", hospitals=2, alpha=1.0, seed=0)
out = {"hospitals": [hospital_finetune(h, tmp + "/h/" + h, tmp + "/store", params=p.model_dump(mode="json"), emit=False, progress=False) for h in ("h1", "h2")]}
out["good"] = merge_and_evaluate(tmp + "/store", %(data)r, params=p.model_dump(mode="json"))
worse = load_params("params.yaml", overrides + ["merge.lam=-3.0"])  # a deliberately bad λ
out["worse"] = merge_and_evaluate(tmp + "/store", %(data)r, params=worse.model_dump(mode="json"), force=True)
recompute = load_params("params.yaml", overrides + ["batchnorm.strategy=recompute"])  # BN from a calibration set
out["recompute"] = merge_and_evaluate(tmp + "/store", %(data)r, params=recompute, calibration_data=%(data)r, force=True)
out["other_set"] = merge_and_evaluate(tmp + "/store", %(other)r, params=p, force=True)  # another validation set
print(json.dumps(out, default=str))
""" % {"data": str(BREAST), "other": str(PNEUMONIA)}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lineage")
    server = MlflowServer(tmp / "mlflow")
    env = server.client_env()
    try:
        yield {"env": env, "url": server.url, "tmp": tmp, "out": run_driver(SCRIPT, tmp, OVERRIDES, env)}
    finally:
        server.stop()


def test_lineage_names_exactly_the_two_vectors_and_their_runs(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    from medvec.tracking import lineage

    hospitals = tracked["out"]["hospitals"]
    tree = lineage.lineage("medvec@champion")
    assert tree["model"]["version"] == tracked["out"]["good"]["registry"]["version"]
    got = sorted(
        (v["vector_id"], v["hospital"], v["content_sha256"], v["finetune_run"]["run_id"]) for v in tree["vectors"]
    )
    want = sorted((h["vector_id"], h["hospital"], h["content_sha256"], h["mlflow_run_id"]) for h in hospitals)
    assert got == want
    for v in tree["vectors"]:
        assert v["finetune_run"]["content_sha256"] == v["content_sha256"]
        assert v["finetune_run"]["params"]["finetune.epochs"] == "3"
    assert tree["merge_run"]["params"]["method"] == "weighted" and len(tree["base"]["versions"]) == 1


def test_a_worse_merge_does_not_move_champion(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    from mlflow import MlflowClient

    good, worse = tracked["out"]["good"]["registry"], tracked["out"]["worse"]["registry"]
    assert good["champion"] and not worse["champion"]
    client = MlflowClient(tracked["url"])
    assert client.get_model_version_by_alias("medvec", "champion").version == good["version"]
    mv = client.get_model_version("medvec", worse["version"])
    assert "does not beat champion" in mv.tags["rejected"]


def test_champion_pyfunc_returns_probabilities_and_the_label_at_its_registered_threshold(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    import mlflow
    from mlflow import MlflowClient

    from medvec.data.sources import load_split
    from medvec.models import get_spec
    from medvec.preprocess import to_tensor

    mlflow.set_tracking_uri(tracked["url"])
    model = mlflow.pyfunc.load_model("models:/medvec@champion")
    x = to_tensor(load_split(BREAST, "test").images[:40], get_spec("tiny_cnn", pretrained=False)).numpy()
    out = model.predict(pd.DataFrame({"tensor": list(x)}))  # model-ready images, as the merge evaluates them
    assert list(out.columns) == ["p_0", "p_1", "label"] and len(out) == 40
    np.testing.assert_allclose(out["p_0"] + out["p_1"], 1.0, rtol=1e-5)
    mv = MlflowClient().get_model_version_by_alias("medvec", "champion")
    threshold = float(mv.tags["medvec.threshold"])
    assert threshold == model.model_config["threshold"]
    assert (out["label"] == (out["p_1"] >= threshold).astype(int)).all()


def rebuild(tracked, ref: str) -> str:
    cmd = [sys.executable, "-m", "flows.cli", "lineage", ref, "--rebuild"]
    proc = subprocess.run(cmd, cwd=ROOT, env=tracked["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== registered (identical)" in proc.stdout
    return proc.stdout


def test_merge_rebuilt_from_lineage_is_bit_identical(tracked):
    out = rebuild(tracked, "medvec@champion")
    assert "bn=average from running" in out
    assert "└─ base" in out and out.count("fine-tune run ") == 2


def test_recompute_merge_rebuilt_from_its_stored_moment_sums_is_bit_identical(tracked):
    version = tracked["out"]["recompute"]["registry"]["version"]
    out = rebuild(tracked, f"medvec/{version}")
    assert "bn=recompute from calibration" in out


def test_the_gate_rescores_a_champion_scored_on_another_validation_set(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    from mlflow import MlflowClient

    from medvec.tracking import lineage

    decision = tracked["out"]["other_set"]["registry"]
    assert "re-scored on the current validation set" in decision["reason"], decision
    assert "pneumoniamnist.npz val (524 images" in decision["reason"] and "(78 images)" in decision["reason"]
    mv = MlflowClient(tracked["url"]).get_model_version("medvec", decision["version"])
    assert mv.tags["medvec.gate_reason"] == decision["reason"] and mv.tags["medvec.eval_size"] == "524"
    record = lineage.merge_record(f"medvec/{decision['version']}")
    assert record.eval_set.size == 524 and record.eval_set.source.endswith("pneumoniamnist.npz")


def test_dvc_registry_commit_restores_exactly_the_merged_vectors(tracked, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    from medvec.store import open_store
    from medvec.tracking import lineage

    tree = lineage.lineage("medvec@champion")
    commit = tree["merge_run"]["dvc_commit"]
    assert commit and len(commit) == 40
    dvc = str(Path(sys.executable).parent / "dvc")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(tracked["tmp"] / "registry"), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    subprocess.run([dvc, "pull", "-q"], cwd=clone, check=True, capture_output=True)
    store = open_store(tracked["tmp"] / "store")
    restored = sorted(clone.glob("vectors/*/*.safetensors"))
    assert sorted(p.stem for p in restored) == sorted(v["vector_id"] for v in tree["vectors"])
    for p in restored:
        assert p.read_bytes() == store.get(p.stem).path.read_bytes()


# --------------------------------------------------------------------------- following lineage in the MLflow UI

RUN_LINK = re.compile(r"\]\(#/experiments/(\d+)/runs/([0-9a-f]+)\)")


def _client(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    from mlflow import MlflowClient

    return MlflowClient(tracked["url"])


def test_the_merge_run_description_links_each_input_vector_to_its_fine_tune_run(tracked, monkeypatch):
    client = _client(tracked, monkeypatch)
    good = tracked["out"]["good"]
    note = client.get_run(good["registry"]["run_id"]).data.tags["mlflow.note.content"]
    vectors = sorted(i["vector_id"] for i in good["inputs"])
    assert len(RUN_LINK.findall(note)) == len(vectors) == 2  # one link per input vector, no other run link
    for vid in vectors:
        (row,) = [line for line in note.splitlines() if f"`{vid}`" in line]
        ((exp, run_id),) = RUN_LINK.findall(row)
        linked = client.get_run(run_id)
        assert linked.data.tags["medvec.vector_id"] == vid and linked.info.experiment_id == exp
    for i in good["inputs"]:
        assert f"`{i['content_sha256'][:12]}`" in note
    assert "Method **weighted**" in note and "batch norm **average**" in note
    assert "**Gate:** champion: first version" in note


def test_the_merge_run_logs_its_evaluation_set_and_the_lambda_sweep(tracked, monkeypatch):
    client = _client(tracked, monkeypatch)
    from medvec.tracking import lineage, server

    decision = tracked["out"]["other_set"]["registry"]
    record = lineage.merge_record(f"medvec/{decision['version']}")
    run = client.get_run(decision["run_id"])
    (inp,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in inp.tags}
    # MLflow keeps at most 36 characters of a digest: the first 32 of the sha256, the whole in tag and profile
    assert inp.dataset.digest == record.eval_set.sha256[: server.DIGEST_CHARS]
    assert tags["medvec.sha256"] == record.eval_set.sha256 and tags["mlflow.data.context"] == "validation"
    profile = json.loads(inp.dataset.profile)
    assert profile["sha256"] == record.eval_set.sha256 and profile["num_rows"] == record.eval_set.size == 524
    assert record.eval_set.source in inp.dataset.source
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "lambda_curve.json")).read_text())
    assert table["columns"] == ["method", "bn", "lambda", "val_auc"]
    assert record.lambda_curve and [row[2] for row in table["data"]] == [lam for lam, _ in record.lambda_curve]
    assert "`val_auc_by_lambda` the step is λ×1000" in run.data.tags["mlflow.note.content"]


def test_a_hospital_run_description_lists_the_merges_that_used_its_vector(tracked, monkeypatch):
    client = _client(tracked, monkeypatch)
    merges = [tracked["out"][k]["registry"] for k in ("good", "worse", "recompute", "other_set")]
    for h in tracked["out"]["hospitals"]:
        run = client.get_run(h["mlflow_run_id"])
        note = run.data.tags["mlflow.note.content"]
        for m in merges:
            exp = client.get_run(m["run_id"]).info.experiment_id
            assert f"](#/experiments/{exp}/runs/{m['run_id']})" in note
            assert f"](#/models/medvec/versions/{m['version']})" in note
        assert run.data.tags["medvec.vector_id"] == h["vector_id"]  # the search tags stay
        assert run.data.metrics["finetune_seconds"] > 0
        datasets = {
            t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"
        }
        train = json.loads(datasets["training"].profile)
        assert train["num_rows"] == h["n_train"] == sum(train["label_counts"].values())
        assert len(datasets["training"].digest) == 32
        assert str(tracked["tmp"]) not in json.dumps([d.source for d in datasets.values()])


def test_the_champion_version_description_links_its_merge_run(tracked, monkeypatch):
    client = _client(tracked, monkeypatch)
    mv = client.get_model_version_by_alias("medvec", "champion")
    exp = client.get_run(mv.run_id).info.experiment_id
    assert f"](#/experiments/{exp}/runs/{mv.run_id})" in mv.description
    assert "Gate: **champion**" in mv.description and "Asynchronous step" not in mv.description
    worse = client.get_model_version("medvec", tracked["out"]["worse"]["registry"]["version"])
    assert "Gate: **rejected**: val auc" in worse.description


def test_an_async_step_description_names_its_parent_champion_version(tracked, monkeypatch):
    client = _client(tracked, monkeypatch)
    from medvec.tracking import lineage, registry

    good = tracked["out"]["good"]["registry"]
    client.set_model_version_tag("medvec", good["version"], "medvec.version", "7")  # as if it were step v7
    try:
        record = lineage.merge_record(f"medvec/{good['version']}")
        step = record.model_copy(update={"mode": "async", "parent_version": 7, "version": 8})
        note = registry._version_note(client, step, "#/experiments/1/runs/abc", "champion", "first version")
        assert f"parent champion v7 ([`medvec` v{good['version']}](#/models/medvec/versions/{good['version']}))" in note
        assert "became v8" in note and "η = 1" in note
        assert "parent version v7, became v8" in registry._merge_note(step, {}, "auc", None)
    finally:
        client.delete_model_version_tag("medvec", good["version"], "medvec.version")
