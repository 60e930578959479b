"""Fault injection with real processes: a hospital killed mid-upload (S3 server and local
store) and a merge killed during registration leave nothing partial visible, and the
next run succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import BREAST, ROOT
from servers import MlflowServer, SeaweedS3, wait_until

pytestmark = pytest.mark.integration

OVERRIDES = [
    "model.name=tiny_cnn",
    "model.pretrained=false",
    "finetune.epochs=1",
    "finetune.threads=1",
    "merge.method=mean",
    "merge.lam=1.0",
    "batchnorm.strategy=average",
    f"coordinator.eval_data={BREAST}",
    "evaluate.where=coordinator",  # these tests are of the coordinator's own set; hospitals: test_tenancy
]

HOSPITAL = """
import json, sys
from medvec.config import load_params
from medvec.models import create_base
from medvec.store import open_store
from flows.hospital_finetune import hospital_finetune
store_url, data, hospital, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
store = open_store(store_url)
try:
    store.current_base()
except Exception:
    store.put_base(create_base("tiny_cnn", 2, False, None, 0))
p = load_params("params.yaml", overrides)
print(json.dumps(hospital_finetune(hospital, data, store_url, params=p.model_dump(mode="json"), emit=False, progress=False)))
"""

MERGE = """
import json, sys
from medvec.config import load_params
from flows.merge_and_evaluate import merge_and_evaluate
store_url, data, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
p = load_params("params.yaml", overrides)
print(json.dumps(merge_and_evaluate(store_url, data, params=p.model_dump(mode="json")), default=str))
"""


def start(code: str, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out


def kill_at_failpoint(proc: subprocess.Popen, marker, timeout: float = 240) -> None:
    wait_until(lambda: marker.exists() or proc.poll() is not None, timeout, "the failpoint")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from medvec.data.split import write_hospital_shards

    d = tmp_path_factory.mktemp("shards")
    write_hospital_shards(BREAST, d, hospitals=2, alpha=1.0, seed=0)
    return d


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_hospital_killed_mid_upload_leaves_no_visible_vector(backend, tmp_path, shards, monkeypatch):
    from medvec.store import open_store

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MEDVEC_THREADS": "1",
    }
    s3 = SeaweedS3(tmp_path / "s3") if backend == "s3" else None
    try:
        if s3:
            env.update(s3.env())
            for k, v in s3.env().items():
                monkeypatch.setenv(k, v)
        store_url = f"s3://medvec-faults/run?endpoint_url={s3.endpoint}" if s3 else str(tmp_path / "store")
        from medvec.models import create_base

        open_store(store_url).put_base(create_base("tiny_cnn", 2, False, None, 0))  # the coordinator's part
        marker = tmp_path / "reached"
        args = [store_url, str(shards / "h1"), "h1", json.dumps(OVERRIDES)]
        proc = start(
            HOSPITAL, args, {**env, "MEDVEC_FAILPOINT": "store-before-commit", "MEDVEC_FAILPOINT_MARKER": str(marker)}
        )
        kill_at_failpoint(proc, marker)
        store = open_store(store_url)
        base = store.current_base()
        assert store.sidecars() == [] and store.latest(base) == {}
        if s3:  # the bytes were uploaded to a temporary key only
            keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="medvec-faults").get("Contents", [])]
            assert any("/tmp/" in k for k in keys) and not any(
                k.endswith(".safetensors") and "/vectors/" in k for k in keys
            )
        # the next run succeeds and exactly one vector is visible
        summary = json.loads(finish(start(HOSPITAL, args, env)).strip().splitlines()[-1])
        assert [s["meta"]["vector_id"] for s in open_store(store_url).sidecars(base)] == [summary["vector_id"]]
    finally:
        if s3:
            s3.stop()


def test_merge_killed_during_registration_moves_nothing_and_the_next_run_completes(tmp_path, shards, request):
    from mlflow import MlflowClient

    from medvec.store import open_store

    server = MlflowServer(tmp_path / "mlflow")  # the real tracking server of the lineage issue
    request.addfinalizer(server.stop)
    db = server.url
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MEDVEC_THREADS": "1"}
    store_url = str(tmp_path / "store")
    for h in ("h1", "h2"):
        finish(start(HOSPITAL, [store_url, str(shards / h), h, json.dumps(OVERRIDES)], env))
    marker = tmp_path / "reached"
    proc = start(
        MERGE,
        [store_url, str(BREAST), json.dumps(OVERRIDES)],
        {**env, "MEDVEC_FAILPOINT": "registry-before-register", "MEDVEC_FAILPOINT_MARKER": str(marker)},
    )
    kill_at_failpoint(proc, marker, timeout=300)
    store = open_store(store_url)
    base = store.current_base()
    assert store.latest_merge(base) is None  # not marked done: the next trigger redoes it
    client = MlflowClient(db)
    names = [m.name for m in client.search_registered_models()]
    assert "medvec" not in names or client.search_model_versions("name = 'medvec'") == []
    out = json.loads(
        finish(start(MERGE, [store_url, str(BREAST), json.dumps(OVERRIDES)], env)).strip().splitlines()[-1]
    )
    assert out["skipped"] is False and out["registry"]["champion"] is True
    assert str(client.get_model_version_by_alias("medvec", "champion").version) == out["registry"]["version"]
    assert len(store.latest_merge(base).inputs) == 2
