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
from servers import MlflowServer, ModelServer, run_driver

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


FRESH_LOAD = """
import json, mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model("models:/medvec@champion")
import medvec
out = model.predict(pd.DataFrame({"pixels": [np.arange(64, dtype=np.uint8).reshape(8, 8).tolist()]}))
print(json.dumps({"medvec": medvec.__file__, "p_1": float(out["p_1"][0])}))
"""


def test_the_champion_carries_medvec_as_one_zip_and_a_fresh_process_runs_its_code_from_it(tracked, tmp_path):
    """One code artifact (each file was an authenticated upload), and the model's own code is what runs."""
    import mlflow

    mlflow.set_tracking_uri(tracked["url"])
    local = Path(mlflow.artifacts.download_artifacts("models:/medvec@champion", dst_path=str(tmp_path / "model")))
    assert [p.name for p in (local / "code").iterdir()] == ["medvec-code.zip"]
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD], cwd=tmp_path, env=tracked["env"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "medvec-code.zip/medvec/__init__.py" in fresh["medvec"]
    here = mlflow.pyfunc.load_model("models:/medvec@champion").predict(
        pd.DataFrame({"pixels": [np.arange(64, dtype=np.uint8).reshape(8, 8).tolist()]})
    )
    assert fresh["p_1"] == pytest.approx(float(here["p_1"][0]), abs=1e-6)


def test_the_served_champion_takes_raw_images_and_dicom_bytes_and_answers_as_medvec_predict(tracked, tmp_path):
    """``mlflow models serve`` on the champion the merge flow registered: 40 × 40 uint8 images (trained at 28 × 28)
    as raw pixels and as base64 DICOM files give medvec predict's probabilities; a bad request is a one-line 400."""
    import base64

    from PIL import Image

    from medvec.data.dicom import write_dicom
    from medvec.data.sources import load_split

    test = load_split(BREAST, "test")
    images = np.stack([np.asarray(Image.fromarray(im).resize((40, 40), Image.BILINEAR)) for im in test.images[:8]])
    np.savez(tmp_path / "big.npz", test_images=images, test_labels=test.labels[:8])
    cmd = [sys.executable, "-m", "flows.cli", "predict", "medvec@champion", "--data", str(tmp_path / "big.npz")]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "p.csv"), "--no-progress"],
        cwd=ROOT,
        env=tracked["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = pd.read_csv(tmp_path / "p.csv")
    dicoms = [
        base64.b64encode(write_dicom(tmp_path / f"{i}.dcm", im, compress="rle").read_bytes()).decode()
        for i, im in enumerate(images)
    ]
    server = ModelServer("models:/medvec@champion", tracked["env"], tmp_path / "serve")
    try:
        raw = server.post({"dataframe_split": {"columns": ["pixels"], "data": [[im.tolist()] for im in images]}})
        dicom = server.post({"inputs": {"image": dicoms}})
        bad = server.post({"dataframe_records": [{"pixels": images[0].tolist()}, {"image": "not base64!"}]})
        ragged = server.post({"inputs": {"pixels": [[[0, 1, 2], [3]]]}})
    finally:
        server.stop()
    for status, answer in (raw, dicom):
        assert status == 200, answer
        got = pd.DataFrame(answer["predictions"])
        np.testing.assert_allclose(got[["p_0", "p_1"]].to_numpy(), want[["p_0", "p_1"]].to_numpy(), atol=1e-5, rtol=0)
        assert got["label"].tolist() == want["label"].tolist()
    assert bad[0] == 400 and bad[1]["error_code"] == "INVALID_PARAMETER_VALUE"
    assert bad[1]["message"] == "row 1 ('image'): 'image' is not valid base64"  # the reason alone, no request dump
    assert ragged[0] == 400 and ragged[1]["message"] == "row 0 ('pixels'): its rows are not all the same length"


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
    assert "## Gate\n\n**champion**" in mv.description and "Asynchronous step" not in mv.description
    worse = client.get_model_version("medvec", tracked["out"]["worse"]["registry"]["version"])
    assert "## Gate\n\n**rejected**: val auc" in worse.description


def test_an_async_step_description_names_its_parent_champion_version(tracked, monkeypatch):
    client = _client(tracked, monkeypatch)
    from medvec.tracking import lineage, registry

    good = tracked["out"]["good"]["registry"]
    client.set_model_version_tag("medvec", good["version"], "medvec.version", "7")  # as if it were step v7
    try:
        record = lineage.merge_record(f"medvec/{good['version']}")
        step = record.model_copy(update={"mode": "async", "parent_version": 7, "version": 8})
        note = registry._version_note(client, step, "#/experiments/1/runs/abc")
        assert f"parent champion v7 ([`medvec` v{good['version']}](#/models/medvec/versions/{good['version']}))" in note
        assert "became v8" in note and "η = 1" in note
        assert "parent version v7, became v8" in registry._merge_note(step, {}, "auc", None)
    finally:
        client.delete_model_version_tag("medvec", good["version"], "medvec.version")


def test_medvec_card_is_the_champion_description_and_its_figures_are_the_merge_records(tracked, monkeypatch):
    from medvec.tracking import lineage
    from medvec.tracking.card import SECTIONS, Registration, model_card

    client = _client(tracked, monkeypatch)
    mv = client.get_model_version_by_alias("medvec", "champion")
    record = lineage.merge_record("medvec@champion")
    cmd = [sys.executable, "-m", "flows.cli", "card", "medvec@champion"]
    proc = subprocess.run(cmd, cwd=ROOT, env=tracked["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = proc.stdout
    assert mv.description.startswith(card.rstrip("\n"))  # the version's description is the same card
    assert [line[3:] for line in card.splitlines() if line.startswith("## ")] == list(SECTIONS)
    assert card.startswith(f"# medvec v{mv.version}: model card")
    assert "0 = malignant, 1 = normal, benign" in card  # the classes, by index
    total, mix = sum(i.n_train for i in record.inputs), [sum(i.label_counts[c] for i in record.inputs) for c in (0, 1)]
    assert total == sum(mix) and all(sum(i.label_counts) == i.n_train for i in record.inputs)
    assert f"{total} training images at 2 sites (label mix: malignant: {mix[0]}, normal, benign: {mix[1]})" in card
    assert "Per-site counts are not shown" in card and "input 1: trained without DP" in card
    assert not any(i.vector_id in card or f"{i.hospital} " in card for i in record.inputs)  # no site named
    # a network that shares per-site figures (contribution.share) shows each site's count and label mix
    shared = record.model_copy(
        update={
            "params": record.params.model_copy(
                update={"contribution": record.params.contribution.model_copy(update={"share": True})}
            )
        }
    )
    open_card = model_card(shared, Registration.of(mv.name, mv.version, mv.tags))
    for i in record.inputs:
        row = f"| {i.hospital} | `{i.vector_id}` | {i.n_train} | malignant: {i.label_counts[0]}, normal, benign: {i.label_counts[1]} |"
        assert row in open_card and row not in card
        assert f"- {i.hospital} `{i.vector_id}`: trained without DP" in open_card
    assert f"AUC {record.val['auc']:.4f}" in card and f"AUC {record.test['auc']:.4f}" in card
    op = record.operating_point
    assert (
        f"(threshold {op['threshold']:.6g}): sensitivity {op['sensitivity']:.4f}, specificity {op['specificity']:.4f}"
        in card
    )
    assert f"`p_1` ≥ {op['threshold']:.6g}" in card and "trained without DP" in card
    assert f"{record.method}, λ = {record.lam:g}, batch norm {record.bn_strategy}" in card
    assert "resized to 28 × 28" in card or "resized to 64 × 64" in card
