"""Payload audit: everything the hospital flow writes outside its own data folder —
store objects, MLflow artifacts, params, tags and metrics, and the event payload —
is vector tensors with the model's parameter shapes and aggregate metadata only.

It runs twice: on PNG folders whose file names carry identifiers, and on a CSV manifest of
DICOM files with identifying patient tags set (synthetic values, none may leave)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from conftest import BREAST, ROOT

pytestmark = pytest.mark.integration

SCRIPT = """
import json, sys
from pathlib import Path
from medvec.config import load_params
from medvec.keys import keygen
from medvec.models import create_base
from medvec.store import open_store
from flows.hospital_evaluate import hospital_evaluate
from flows.hospital_finetune import hospital_finetune
from flows.events import landed_event
store_url, data, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base = create_base("tiny_cnn", 2, False, None, 0)
open_store(store_url).put_base(base)
p = load_params("params.yaml", overrides)
summary = hospital_finetune("audit", data, store_url, params=p.model_dump(mode="json"), emit=True, progress=False)
# then the coordinator asks for scores of θ_pre (its one candidate) and the hospital answers (issue 25)
key = keygen("audit", Path(store_url).parent / "keys")[0]
request = open_store(store_url).put_request(base.sha256, {"base": base}, min_count=5)
answer = hospital_evaluate("audit", data, store_url, request.request_id, p, str(key))
print(json.dumps({"summary": summary, "event": landed_event(summary), "answer": answer["answer"]}))
"""


def _png_folders(data: Path) -> tuple[Path, list[str]]:
    """``<split>/<class>/patient_…_scan.png``: the file names carry identifiers."""
    from PIL import Image

    from medvec.data.sources import load_split

    s, names = load_split(BREAST, "train"), []
    for split, n in (("train", 120), ("val", 24)):
        for i in range(n):
            j = i if split == "train" else 200 + i
            name = f"patient_{split}_{j:04d}_scan.png"
            folder = data / split / str(int(s.labels[j]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.images[j]).save(folder / name)
            names.append(name)
    return data, names


def _dicom_manifest(data: Path) -> tuple[Path, list[str]]:
    """DICOM files with identifying patient tags set (synthetic values), listed in a CSV manifest."""
    import csv

    from medvec.data.dicom import write_dicom
    from medvec.data.examples import DICOM_VARIANTS, fake_patient
    from medvec.data.sources import load_split

    s, names, rows = load_split(BREAST, "train"), [], []
    for split, n in (("train", 120), ("val", 24)):
        (data / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            j = i if split == "train" else 200 + i
            name = f"patient_{split}_{j:04d}_scan.dcm"
            variant = DICOM_VARIANTS[j % len(DICOM_VARIANTS)]
            write_dicom(data / split / name, s.images[j], patient=fake_patient(j), **variant)
            names += [name, *fake_patient(j).values()]
            rows.append({"path": f"{split}/{name}", "label": s.classes[int(s.labels[j])], "split": split})
    with (data / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return data / "labels.csv", names


@pytest.fixture(scope="module", params=["png-folders", "dicom-manifest"])
def audit(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("audit")
    make = _png_folders if request.param == "png-folders" else _dicom_manifest
    source, names = make(tmp / "hospital-data")
    data = tmp / "hospital-data"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MEDVEC_THREADS": "2",
    }
    overrides = ["model.name=tiny_cnn", "model.pretrained=false", "finetune.epochs=2", "batchnorm.strategy=average"]
    # MLflow's embedded artifact folder is created relative to the working directory: run in tmp
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp / "store"), str(source), json.dumps(overrides)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tmp": tmp, "data": data, "names": names, "n_train": 120, **out, "db": env["MLFLOW_TRACKING_URI"]}


def _tensor_ok(t, allowed_shapes: set, n_train: int) -> None:
    shape = tuple(t.shape)
    assert shape in allowed_shapes, shape
    assert n_train not in shape, f"a dimension equals the number of training samples: {shape}"
    assert shape[-2:] != (28, 28), f"image-shaped array {shape}"


def test_everything_written_is_vector_tensors_and_aggregates(audit, tiny_base):
    from mlflow import MlflowClient

    state = tiny_base.model.state_dict()
    allowed = {tuple(v.shape) for v in state.values()} | {(1,)}  # (1,) = a moment-sum count
    texts: list[str] = []
    # 1. store objects
    store_files = [p for p in (audit["tmp"] / "store").rglob("*") if p.is_file()]
    assert store_files
    for p in store_files:
        if "bases" in p.parts:
            continue  # θ_pre is the coordinator's, not written by the hospital
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    _tensor_ok(f.get_tensor(k), allowed, audit["n_train"])
                texts.append(json.dumps(f.metadata()))
        else:
            texts.append(p.read_text())
    # 2. MLflow: params, metrics, tags and every artifact of the hospital run
    client = MlflowClient(audit["db"])
    run = client.get_run(audit["summary"]["mlflow_run_id"])
    texts += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(run.data.metrics)]
    for v in run.data.metrics.values():
        assert isinstance(v, float)
    art_dir = Path(client.download_artifacts(run.info.run_id, "", str(audit["tmp"] / "artifacts")))
    arts = [p for p in art_dir.rglob("*") if p.is_file()]
    assert arts
    for p in arts:
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    _tensor_ok(f.get_tensor(k), allowed, audit["n_train"])
        else:
            texts.append(p.read_text())
    # 3. the event payload
    texts.append(json.dumps(audit["event"]))
    blob = "\n".join(texts)
    for name in audit["names"]:
        assert name not in blob, f"an image file name or a DICOM tag value left the hospital: {name}"
    assert "patient_" not in blob and str(audit["data"]) not in blob
    # aggregate metadata only: counts per class, never per sample
    meta = json.loads(json.loads(next(t for t in texts if '"medvec"' in t))["medvec"])
    assert (
        meta["n_train"] == audit["n_train"]
        and len(meta["label_counts"]) == 2
        and sum(meta["label_counts"]) == audit["n_train"]
    )
    for v in meta["metrics"].values():
        assert isinstance(v, float)
    assert not any(isinstance(v, list) and len(v) >= audit["n_train"] for v in meta.values())


def test_the_evaluation_answer_holds_counts_and_histograms_of_five_or_more_images_only(audit):
    """What answering the coordinator's evaluation request writes (also read for names by the test above)."""
    doc = json.loads((audit["tmp"] / "store" / audit["answer"]).read_text())["doc"]
    assert set(doc) == {
        "kind", "request_id", "request_sha256", "hospital", "task", "split_n", "split_sha256", "min_count",
        "candidates", "created_at",
    }  # fmt: skip
    assert doc["split_n"] == 24 and doc["min_count"] == 5
    (scored,) = doc["candidates"].values()
    assert set(scored) == {"n", "loss_sum", "histograms"} and scored["n"] == 24
    groups = [g for row in scored["histograms"]["columns"] for side in row.values() for g in side]
    # each group: its first and last bin, its images (five or more: no count about fewer), the sum of their bins
    assert groups and all(len(g) == 4 and g[2] >= 5 for g in groups)
    assert all(first * (n - 1) + last <= total <= first + last * (n - 1) for first, last, n, total in groups)
    assert sum(g[2] for g in groups) <= 24 and len(groups) <= 24 // 5


def test_no_numeric_array_in_metadata_is_sample_sized(audit):
    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            yield x
            for v in x:
                yield from walk(v)

    for arr in walk(audit["summary"]):
        assert len(arr) < audit["n_train"]
    assert np.isfinite(audit["summary"]["n_train"])
