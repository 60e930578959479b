"""MLflow lineage on a real ``mlflow server`` (SQLite backend, served artifacts) started here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BREAST, PNEUMONIA, ROOT
from servers import MlflowServer

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
]

SCRIPT = """
import json, sys
from medvec.config import load_params
from medvec.data import write_hospital_shards
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
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp), json.dumps(OVERRIDES)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-5000:]
        yield {"env": env, "url": server.url, "tmp": tmp, "out": json.loads(proc.stdout.strip().splitlines()[-1])}
    finally:
        server.stop()


def test_lineage_names_exactly_the_two_vectors_and_their_runs(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    from medvec import tracking

    hospitals = tracked["out"]["hospitals"]
    tree = tracking.lineage("medvec@champion")
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


def test_champion_loads_with_pyfunc_and_predicts(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    import mlflow

    from medvec.data import load_split, to_tensor
    from medvec.models import get_spec

    mlflow.set_tracking_uri(tracked["url"])
    model = mlflow.pyfunc.load_model("models:/medvec@champion")
    x = to_tensor(load_split(BREAST, "test").images[:5], get_spec("tiny_cnn", pretrained=False)).numpy()
    out = np.asarray(model.predict(x))
    assert out.shape == (5, 2) and np.isfinite(out).all()


def rebuild(tracked, ref: str) -> str:
    cmd = [sys.executable, "-m", "medvec.cli", "lineage", ref, "--rebuild"]
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

    from medvec import tracking

    decision = tracked["out"]["other_set"]["registry"]
    assert "re-scored on the current validation set" in decision["reason"], decision
    assert "pneumoniamnist.npz val (524 images" in decision["reason"] and "(78 images)" in decision["reason"]
    mv = MlflowClient(tracked["url"]).get_model_version("medvec", decision["version"])
    assert mv.tags["medvec.gate_reason"] == decision["reason"] and mv.tags["medvec.eval_size"] == "524"
    record = tracking.merge_record(f"medvec/{decision['version']}")
    assert record.eval_set.size == 524 and record.eval_set.source.endswith("pneumoniamnist.npz")


def test_dvc_registry_commit_restores_exactly_the_merged_vectors(tracked, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["url"])
    from medvec import tracking
    from medvec.store import open_store

    tree = tracking.lineage("medvec@champion")
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
