"""Hospital data as hospitals have it: CSV manifests of PNG and DICOM files, the shared class list and its
hash, multi-label and multi-class tasks, and ``medvec hospital check`` — on real MedMNIST images."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BREAST, PNEUMONIA, ROOT
from medvec.data.examples import combined_multiclass, composite_multilabel, write_manifest
from medvec.data.images import DataError, DataSpec, DataWarning, ImageSet, classes_sha256
from medvec.data.sources import load_npz, load_split
from medvec.data.split import draw_local_val


def subset(source: Path, n: dict[str, int]) -> dict[str, ImageSet]:
    """n images of each split, drawn with a fixed seed (both classes present), in file order."""
    out = {}
    for split, k in n.items():
        data = load_npz(source, split)
        out[split] = data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[:k]))
    return out


SMALL = {"train": 60, "val": 30, "test": 30}
PNEUMONIA_CLASSES = DataSpec("multiclass", ("normal", "pneumonia"))


@pytest.fixture(scope="module")
def small():
    return subset(PNEUMONIA, SMALL)


@pytest.fixture(scope="module", params=["png", "dicom"])
def manifest(request, small, tmp_path_factory):
    return write_manifest(small, tmp_path_factory.mktemp(request.param), request.param, progress=False)


def write_csv(path: Path, rows: list[dict], fields=("path", "label", "split")) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def rows_of(manifest: Path) -> list[dict]:
    with manifest.open() as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- manifests


def test_a_manifest_loads_the_same_pixels_labels_and_splits_as_the_npz(manifest, small):
    """PNG and DICOM (MONOCHROME1, a 16-bit rescale with a window, RLE rotate through the files) read back exact."""
    for split, ref in small.items():
        got = load_split(manifest, split)
        assert got.classes == ["normal", "pneumonia"]
        np.testing.assert_array_equal(got.labels, ref.labels)
        np.testing.assert_array_equal(got.images, ref.images)


def test_dicom_files_are_found_by_content_not_by_extension(small, tmp_path):
    from medvec.data.dicom import write_dicom

    rows = []
    for i in range(20):
        name = f"img{i}.png" if i % 2 else f"img{i}"  # DICOM files named .png, or with no extension
        write_dicom(tmp_path / name, small["train"].images[i], monochrome1=bool(i % 3))
        rows.append({"path": name, "label": small["train"].classes[small["train"].labels[i]]})
    data = load_split(write_csv(tmp_path / "m.csv", rows, ("path", "label")), "train", PNEUMONIA_CLASSES)
    np.testing.assert_array_equal(data.images, small["train"].images[:20])


def test_the_configured_class_list_sets_the_label_order(manifest, small):
    data = load_split(manifest, "train", DataSpec(classes=("pneumonia", "normal")))
    assert data.classes == ["pneumonia", "normal"]
    np.testing.assert_array_equal(data.labels, 1 - small["train"].labels)


def test_a_label_outside_the_class_list_is_refused_naming_it(manifest):
    with pytest.raises(DataError, match=r"label\(s\) \['pneumonia'\] are not in model.classes"):
        load_split(manifest, "train", DataSpec(classes=("normal", "effusion")))


@pytest.mark.parametrize(
    ("rows", "fields", "message"),
    [
        ([{"file": "a.png", "label": "x"}], ("file", "label"), "manifest has no path column"),
        ([{"path": "a.png", "label": "x", "split": "holdout"}], None, "split 'holdout' is not one of train, val, test"),
        ([{"path": "a.png", "label": "x|y", "split": "train"}], None, r"line 2: 2 labels; a multiclass task"),
        ([{"path": "a.png", "label": "x", "split": ""}], None, r"line 2: split \(empty\) is not one of"),
        ([{"path": "a.png", "label": "", "split": "train"}], None, "line 2: no label"),
        ([{"path": "a.png", "label": "x", "split": "train"}], None, "one class"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_problem(tmp_path, rows, fields, message):
    path = write_csv(tmp_path / "m.csv", rows, fields or ("path", "label", "split"))
    with pytest.raises(DataError, match=message):
        load_split(path, "train")


def test_a_spreadsheet_export_with_a_bom_crlf_extra_columns_and_a_multiline_cell_reads(tmp_path, small):
    from PIL import Image

    for i in range(3):
        Image.fromarray(small["train"].images[i]).save(tmp_path / f"{i}.png")
    text = (
        "\ufeffPath,Label,Split,Note\r\n0.png,normal,train,x\r\n"
        '1.png,pneumonia,train,"two\r\nlines"\r\n2.png,pneumonia,holdout,\r\n'
    )
    (tmp_path / "m.csv").write_text(text, encoding="utf-8", newline="")
    with pytest.raises(DataError, match=r"m\.csv line 5: split 'holdout'"):  # the file's own line number
        load_split(tmp_path / "m.csv", "train")
    (tmp_path / "m.csv").write_text(text.replace("holdout", "train"), encoding="utf-8", newline="")
    data = load_split(tmp_path / "m.csv", "train")
    assert data.classes == ["normal", "pneumonia"] and data.labels.tolist() == [0, 1, 1]


def test_unreadable_files_are_skipped_with_a_warning_and_too_many_are_an_error(small, tmp_path):
    from medvec.data.dicom import write_dicom

    rows = []
    for i in range(30):
        write_dicom(tmp_path / f"{i}.dcm", small["train"].images[i], rescale=(0.5, -1024.0), window=(40.0, 400.0))
        rows.append({"path": f"{i}.dcm", "label": small["train"].classes[small["train"].labels[i]]})
    data = (tmp_path / "7.dcm").read_bytes()
    (tmp_path / "7.dcm").write_bytes(data[: len(data) * 6 // 10])  # truncated in the pixel data
    with pytest.warns(DataWarning, match=r"skipped .*7\.dcm: not a readable image"):
        got = load_split(write_csv(tmp_path / "m.csv", rows, ("path", "label")), "train", PNEUMONIA_CLASSES)
    keep = [i for i in range(30) if i != 7]
    np.testing.assert_array_equal(got.images, small["train"].images[keep])
    np.testing.assert_array_equal(got.labels, small["train"].labels[keep])
    for i in (3, 11, 19):  # 4 of 30 unreadable > 10%
        (tmp_path / f"{i}.dcm").write_bytes(b"not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError, match=r"4 of 30 images could not be read \(more than 10%\)"):
            load_split(tmp_path / "m.csv", "train", PNEUMONIA_CLASSES)
        lenient = DataSpec("multiclass", ("normal", "pneumonia"), max_bad_fraction=0.2)  # data.max_bad_fraction
        assert len(load_split(tmp_path / "m.csv", "train", lenient)) == 26


def test_without_a_split_column_the_local_val_split_is_drawn_by_the_seeded_rule(manifest, small):
    from medvec.hospital.local import LocalData

    rows = [r for r in rows_of(manifest) if r["split"] == "train"]
    path = write_csv(manifest.parent / "nosplit.csv", rows, ("path", "label"))
    local = LocalData.load(path, local_val_fraction=0.2, seed=3)
    keep, held = draw_local_val(60, 0.2, 3)
    assert len(held) == 12 and len(local.val) == 12 and len(local.train) == 48
    np.testing.assert_array_equal(local.val.images, small["train"].images[held])
    np.testing.assert_array_equal(local.train.labels, small["train"].labels[keep])


def test_a_multilabel_manifest_reads_into_a_label_matrix(tmp_path, small):
    from PIL import Image

    labels = ["effusion|nodule", "", "nodule", "effusion", "nodule | effusion"]
    rows = []
    for i, label in enumerate(labels):
        Image.fromarray(small["train"].images[i]).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": label})
    path = write_csv(tmp_path / "m.csv", rows, ("path", "label"))
    data = load_split(path, "train", DataSpec("multilabel"))
    assert data.classes == ["effusion", "nodule"] and data.multilabel and data.task == "multilabel"
    np.testing.assert_array_equal(data.labels, [[1, 1], [0, 0], [0, 1], [1, 0], [1, 1]])
    assert data.label_counts() == [3, 3]
    assert len(set(data.strata().tolist())) == 4
    with pytest.raises(DataError, match=r"holds multilabel labels but model\.task is multiclass"):
        DataSpec("multiclass").check(data, path)


# ----------------------------------------------------------------------------- class list and intake


def test_intake_refuses_a_vector_whose_class_list_differs(tmp_path):
    from medvec.config import IntakeConfig
    from medvec.coordinator.intake import admit
    from medvec.models import create_base
    from medvec.store import LocalStore
    from medvec.vectors.vector import DataVector

    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    base.classes = ["normal", "pneumonia"]
    store = LocalStore(tmp_path / "store")
    store.put_base(base)
    state = base.model.state_dict()
    tuned = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    for hospital, classes in (("h1", ["normal", "pneumonia"]), ("h2", ["pneumonia", "normal"]), ("h3", None)):
        v = DataVector.from_states(
            state,
            tuned,
            hospital=hospital,
            base_sha256=base.sha256,
            base_model="tiny_cnn",
            num_classes=2,
            n_train=10,
            label_counts=[5, 5],
            classes_sha256=classes_sha256(classes) if classes else None,
        )
        store.put(v)
    adm = admit(store, base, IntakeConfig(defence="off"))
    assert [v.meta.hospital for v in adm.admitted] == ["h1"]
    reasons = {r.hospital_claimed: r for r in adm.rejected}
    assert set(reasons) == {"h2", "h3"} and all(r.check == "classes" for r in reasons.values())
    assert f"differs from the base's {classes_sha256(['normal', 'pneumonia'])[:12]}" in reasons["h2"].problem
    assert "none recorded" in reasons["h3"].problem
    assert all(r in store.quarantined() for r in reasons.values())


def test_a_hospital_with_another_class_list_is_refused_before_training(small, tmp_path):
    from medvec.config import FinetuneConfig
    from medvec.hospital.finetune import finetune_vector
    from medvec.hospital.local import LocalData
    from medvec.models import create_base

    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    base.classes = ["normal", "pneumonia"]
    data = LocalData(ImageSet(small["train"].images, small["train"].labels, ["healthy", "pneumonia"]), None)
    with pytest.raises(DataError, match=r"classes \['healthy', 'pneumonia'\] differ from the base model's"):
        finetune_vector(base, "h1", data, FinetuneConfig(epochs=1), progress=False)


def test_the_base_records_its_class_list_and_task(tmp_path):
    from medvec.config import ModelConfig
    from medvec.models import base_from_config, load_base, save_base

    base = base_from_config(ModelConfig(name="tiny_cnn", pretrained=False, task="multilabel"), 2, ["a", "b"])
    save_base(base, tmp_path / "b.safetensors")
    back = load_base(tmp_path / "b.safetensors")
    assert (back.classes, back.task, back.classes_sha256) == (["a", "b"], "multilabel", classes_sha256(["a", "b"]))


def test_the_store_keeps_a_bases_class_list_and_refuses_the_same_weights_with_another(tmp_path):
    from medvec.models import create_base
    from medvec.store import LocalStore, StoreError

    store = LocalStore(tmp_path / "store")
    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    base.classes = ["normal", "pneumonia"]
    store.put_base(base)
    assert store.current_labels() == {"task": "multiclass", "classes": ["normal", "pneumonia"]}
    assert store.get_base(base.sha256).classes == ["normal", "pneumonia"]
    base.classes = ["pneumonia", "normal"]  # same weights (same sha256), another label order
    with pytest.raises(StoreError, match=r"already published as a multiclass model with classes \['normal'"):
        store.put_base(base)


# ----------------------------------------------------------------------------- multi-label and multi-class


def test_pos_weight_is_negatives_per_positive():
    from medvec.hospital.train import positive_weights

    torch.testing.assert_close(positive_weights([1, 3, 0], 4), torch.tensor([3.0, 1 / 3, 1.0]))


def test_multilabel_metrics_are_per_label_aucs_and_their_macro_mean():
    from sklearn.metrics import roc_auc_score

    from medvec.evaluate import metric_value, metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3))
    p = np.clip(y * 0.3 + rng.random((50, 3)) * 0.7, 0, 1)
    m = metrics(y, p)
    expected = [roc_auc_score(y[:, c], p[:, c]) for c in range(3)]
    assert m["auc_per_label"] == pytest.approx(expected, abs=0)
    assert m["auc"] == pytest.approx(float(np.mean(expected)), abs=1e-15)
    assert metric_value(y, p, "auc") == m["auc"] and "confusion" not in m
    y[:, 1] = 0  # a label without positives: its AUC is undefined and left out of the macro mean
    m = metrics(y, p)
    assert np.isnan(m["auc_per_label"][1]) and m["auc_labels"] == 2
    assert m["auc"] == pytest.approx((expected[0] + expected[2]) / 2, abs=1e-15) == metric_value(y, p, "auc")
    y[:, :] = 0
    assert np.isnan(metrics(y, p)["auc"])


@pytest.fixture(scope="module")
def multilabel_run():
    """A tiny model fine-tuned on the real two-label composite (chest|breast), two hospitals, merged."""
    from medvec.config import FinetuneConfig, load_params
    from medvec.coordinator.engine import merge_once
    from medvec.coordinator.scoring import EvalSets
    from medvec.hospital.finetune import finetune_vector
    from medvec.hospital.local import LocalData
    from medvec.models import create_base

    sets = composite_multilabel(ROOT / "data")
    pick = np.random.default_rng(0).permutation  # the files are ordered by label: draw, don't slice
    train = sets["train"].subset(pick(len(sets["train"]))[:600])
    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    base.classes, base.task = ["pneumonia", "malignant"], "multilabel"
    cfg = FinetuneConfig(epochs=2, lr=0.003, threads=1)
    halves = [train.subset(np.arange(0, 300)), train.subset(np.arange(300, 600))]
    vectors = [finetune_vector(base, f"h{i}", LocalData(h, None), cfg, progress=False)[0] for i, h in enumerate(halves)]
    evalsets = EvalSets(sets["val"].subset(pick(len(sets["val"]))[:200]), sets["test"], "composite")
    params = load_params(None, ["merge.method=task_arithmetic", "merge.lam=1.0", "batchnorm.strategy=average"])
    outcome = merge_once(base, vectors, params, evalsets)
    return {"vectors": vectors, "outcome": outcome, "halves": halves, "evalsets": evalsets, "base": base}


def test_a_multilabel_vector_publishes_per_label_counts(multilabel_run):
    for v, half in zip(multilabel_run["vectors"], multilabel_run["halves"], strict=True):
        assert v.meta.task == "multilabel"
        assert v.meta.label_counts == half.labels.sum(0).tolist()
        assert v.meta.classes_sha256 == classes_sha256(["pneumonia", "malignant"])


def test_a_multilabel_merge_reports_per_label_auc_above_chance(multilabel_run):
    from medvec.evaluate import evaluate_model

    test = multilabel_run["outcome"].test
    per = test["auc_by_label"]
    assert list(per) == ["pneumonia", "malignant"]
    assert test["auc"] == pytest.approx(np.mean(list(per.values())), abs=1e-12)
    assert per["pneumonia"] > 0.7, per  # the chest half of the composite carries the pneumonia label
    again = evaluate_model(
        multilabel_run["outcome"].model, multilabel_run["evalsets"].test, multilabel_run["base"].spec
    )
    assert again["auc_by_label"] == per


def test_the_mlflow_pyfunc_frame_of_a_multilabel_model_has_a_label_per_class(multilabel_run):
    from medvec.preprocess import to_tensor
    from medvec.serving import label_frame

    x = to_tensor(multilabel_run["evalsets"].test.images[:5], multilabel_run["base"].spec).numpy()
    frame = label_frame(multilabel_run["outcome"].model, x, None, "multilabel")
    assert list(frame.columns) == ["p_0", "p_1", "label_0", "label_1"]
    assert ((frame["p_0"] >= 0.5).astype(int) == frame["label_0"]).all()
    assert not np.allclose(frame[["p_0", "p_1"]].sum(1), 1.0)  # independent sigmoids, not a softmax


def test_a_four_class_task_on_real_images_scores_macro_one_vs_rest_auc():
    from sklearn.metrics import roc_auc_score

    from medvec.config import FinetuneConfig
    from medvec.evaluate import evaluate_model
    from medvec.hospital.train import finetune
    from medvec.models import create_base

    sets = combined_multiclass(ROOT / "data")
    assert sets["test"].classes[2:] == ["breast malignant", "breast normal or benign"]
    rng = np.random.default_rng(0)
    train = sets["train"].subset(rng.permutation(len(sets["train"]))[:800])
    base = create_base("tiny_cnn", 4, pretrained=False, seed=0)
    model = base.fresh()
    finetune(model, train, base.spec, FinetuneConfig(epochs=2, lr=0.003, threads=1), progress=False)
    m = evaluate_model(model, sets["test"], base.spec)
    assert m["auc"] == pytest.approx(roc_auc_score(sets["test"].labels, m["proba"], multi_class="ovr"), abs=1e-12)
    assert m["auc"] > 0.8 and len(m["confusion"]) == 4


# ----------------------------------------------------------------------------- hospital check


def test_hospital_check_reports_reads_failures_counts_duplicates_and_the_published_fields(manifest, small, tmp_path):
    from medvec.hospital.datacheck import check_data
    from medvec.hospital.finetune import published_data_fields

    rows = rows_of(manifest)
    first = manifest.parent / rows[0]["path"]
    bad = manifest.parent / "images" / "train" / "broken.bin"
    bad.write_bytes(b"\x00" * 300)
    rows += [
        {"path": rows[0]["path"], "label": rows[0]["label"], "split": "test"},  # the same image again, in test
        {"path": "images/train/broken.bin", "label": "normal", "split": "train"},
    ]
    path = write_csv(manifest.parent / "checked.csv", rows)
    r = check_data(path, DataSpec("multiclass"))
    assert r.usable and r.layout == "CSV manifest" and r.classes == ["normal", "pneumonia"]
    assert (r.splits["train"].found, r.splits["train"].read) == (61, 60)
    assert r.splits["train"].failed[0][0] == "images/train/broken.bin"
    assert r.splits["test"].found == 31
    counts = small["train"].label_counts()
    assert r.splits["train"].label_counts == {"normal": counts[0], "pneumonia": counts[1]}
    assert [f"train:{rows[0]['path']}", f"test:{rows[0]['path']}"] in r.duplicates
    assert r.sizes == {"28×28": 60 + 30 + 31}
    kind = "PNG" if first.suffix == ".png" else "DICOM OT"
    assert r.kinds == {kind: 121}
    assert r.published == published_data_fields(small["train"]) | {"num_classes": 2}
    assert set(r.published) == {"n_train", "label_counts", "task", "classes_sha256", "num_classes"}
    text = r.text()
    assert "failed images/train/broken.bin" in text and "usable: yes" in text


def test_hospital_check_finds_a_class_list_mismatch_and_unreadable_data(manifest, tmp_path):
    from medvec.hospital.datacheck import check_data

    r = check_data(manifest, DataSpec("multiclass", ("normal", "effusion")))
    assert not r.usable and "not in model.classes" in r.problems[0]
    rows = [{"path": f"missing{i}.png", "label": "a" if i % 2 else "b"} for i in range(5)]
    r = check_data(write_csv(tmp_path / "gone.csv", rows, ("path", "label")))
    assert not r.usable and r.splits["train"].read == 0 and "5 of 5 images could not be read" in r.problems[0]


def _medvec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # join must refuse before any server call
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_check_and_join_commands_exit_2_with_the_report_on_unusable_data(tmp_path):
    rows = [{"path": f"missing{i}.png", "label": "a" if i % 2 else "b"} for i in range(5)]
    bad = write_csv(tmp_path / "bad.csv", rows, ("path", "label"))
    check = _medvec("hospital", "check", "--data", str(bad), "--json", cwd=ROOT)
    assert check.returncode == 2 and json.loads(check.stdout)["usable"] is False
    store = ["-S", f"store.url={tmp_path / 'store'}"]
    join = _medvec("hospital", "join", "h1", "--data", str(bad), "--no-worker", *store, cwd=ROOT)
    assert join.returncode == 2, join.stderr
    lines = join.stderr.strip().splitlines()  # the data check line by line, then one error line
    assert lines[-1] == f"error: {bad}: not usable for joining (the data check above says why)"
    assert "usable: NO" in lines[:-1] and not any(line.startswith("error:") for line in lines[:-1])
    assert any(line.startswith("train: 5 found, 0 read, 5 failed") for line in lines), lines
    assert "Prefect" not in join.stderr  # refused before any server was asked


def test_join_refuses_data_whose_classes_are_not_the_coordinators(manifest, tmp_path):
    from medvec.models import create_base
    from medvec.store import LocalStore

    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    base.classes = ["pneumonia", "normal"]  # the coordinator's order differs from the manifest's sorted names
    LocalStore(tmp_path / "store").put_base(base)
    store = ["-S", f"store.url={tmp_path / 'store'}"]
    join = _medvec("hospital", "join", "h1", "--data", str(manifest), "--no-worker", *store, cwd=ROOT)
    assert join.returncode == 2 and "differ from the coordinator's base ['pneumonia', 'normal']" in join.stderr
    ok = _medvec("hospital", "check", "--data", str(manifest), "-S", "model.classes=[pneumonia,normal]", cwd=ROOT)
    assert ok.returncode == 0 and "classes (2, in label order): 'pneumonia', 'normal'" in ok.stdout


def test_data_export_writes_a_manifest_the_check_reads(tmp_path):
    out = _medvec("data", "export", "--data", str(BREAST), "--out", str(tmp_path / "b"), "--format", "dicom", cwd=ROOT)
    assert out.returncode == 0, out.stderr
    check = _medvec("hospital", "check", "--data", str(tmp_path / "b" / "manifest.csv"), "--json", cwd=ROOT)
    report = json.loads(check.stdout)
    assert check.returncode == 0 and report["usable"]
    assert {s: v["read"] for s, v in report["splits"].items()} == {"train": 546, "val": 78, "test": 156}
    assert report["kinds"] == {"DICOM OT": 780}
    assert report["classes"] == ["malignant", "normal, benign"]


# ----------------------------------------------------------------------------- patients


def test_one_group_per_image_draws_exactly_the_images_the_rule_without_groups_draws():
    for n, fraction, seed in [(60, 0.2, 3), (101, 0.1, 0), (7, 0.5, 2)]:
        plain = draw_local_val(n, fraction, seed)
        grouped = draw_local_val(n, fraction, seed, np.arange(n).astype(str))
        for a, b in zip(plain, grouped, strict=True):
            np.testing.assert_array_equal(a, b)


def patient_rows(small, folder: Path, fmt: str) -> list[dict]:
    """60 training images as 20 patients of 3 images each (ids p0..p19), as PNG with a patient column or as
    DICOM files carrying PatientID (no column)."""
    from PIL import Image

    from medvec.data.dicom import write_dicom

    train, rows = small["train"], []
    for i in range(60):
        patient = f"p{i // 3}"
        name = f"{i}.png" if fmt == "png" else f"{i}.dcm"
        if fmt == "png":
            Image.fromarray(train.images[i]).save(folder / name)
        else:
            write_dicom(folder / name, train.images[i], patient={"PatientID": patient})
        rows.append({"path": name, "label": train.classes[train.labels[i]], "patient": patient})
    return rows


@pytest.mark.parametrize("fmt", ["png", "dicom"])
def test_a_drawn_local_validation_split_never_puts_a_patient_on_both_sides(small, tmp_path, fmt):
    from medvec.hospital.local import LocalData

    rows = patient_rows(small, tmp_path, fmt)
    fields = ("path", "label", "patient") if fmt == "png" else ("path", "label")  # DICOM: PatientID says
    path = write_csv(tmp_path / "m.csv", rows, fields)
    local = LocalData.load(path, local_val_fraction=0.2, seed=3)
    assert local.train.patients is not None and local.val.patients is not None
    train_patients, val_patients = set(local.train.patients), set(local.val.patients)
    assert not train_patients & val_patients and len(train_patients | val_patients) == 20
    assert len(local.val) == 12 and len(val_patients) == 4  # 20 % of 60 images: 4 whole patients
    by_pixels = {local.val.images[i].tobytes(): p for i, p in enumerate(local.val.patients)}
    for i in range(60):  # each image kept its own patient
        if small["train"].images[i].tobytes() in by_pixels:
            assert by_pixels[small["train"].images[i].tobytes()] == f"p{i // 3}"


def test_the_simulated_hospitals_keep_each_patient_in_one_hospital_and_one_split(small, tmp_path):
    from medvec.data.split import write_hospital_shards

    rows = patient_rows(small, tmp_path, "png")
    path = write_csv(tmp_path / "m.csv", rows, ("path", "label", "patient"))
    patient_of = {small["train"].images[i].tobytes(): f"p{i // 3}" for i in range(60)}
    write_hospital_shards(path, tmp_path / "h", hospitals=2, alpha=1.0, seed=0, local_val_fraction=0.2, min_samples=4)
    seen: dict[str, str] = {}
    for h in ("h1", "h2"):
        for split in ("train", "val"):
            for im in load_npz(tmp_path / "h" / h / "data.npz", split).images:
                where = seen.setdefault(patient_of[im.tobytes()], f"{h}/{split}")
                assert where == f"{h}/{split}", "a patient's images in two places"
    assert len(seen) == 20 and any(w.endswith("/val") for w in seen.values())


def test_hospital_check_counts_patients_and_notes_one_on_both_sides_of_explicit_splits(small, tmp_path):
    from medvec.hospital.datacheck import check_data

    rows = patient_rows(small, tmp_path, "png")
    for r, split in zip(rows, ["train"] * 45 + ["val"] * 15, strict=True):
        r["split"] = split
    rows[44]["split"] = "val"  # p14's third image in val, its first two in train
    path = write_csv(tmp_path / "m.csv", rows, ("path", "label", "split", "patient"))
    report = check_data(path, PNEUMONIA_CLASSES)
    text = report.text()
    assert (
        "train: 44 found, 44 read, 0 failed, 15 patients" in text
        and "val: 16 found, 16 read, 0 failed, 6 patients" in text
    )
    assert "note: 1 patient(s) have images in both train and val: val results would overstate accuracy" in text
    assert "p14" not in text  # counts, never an identifier


# ----------------------------------------------------------------------------- the decode cache


def test_a_second_read_decodes_nothing_and_a_changed_file_or_setting_decodes_again(small, tmp_path, monkeypatch):
    from PIL import Image

    import medvec.data.images as images
    from medvec.data.dicom import write_dicom
    from medvec.hospital.datacheck import check_data

    files = []
    for i in range(3):
        Image.fromarray(small["train"].images[i]).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    files.append(write_dicom(tmp_path / "3.dcm", small["train"].images[3], patient={"PatientID": "p3"}))
    cache = tmp_path / "cache"
    decoded = []
    real = images._decode_one

    def counting(path, *args):
        decoded.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(images, "_decode_one", counting)
    first = images.decode_files(files, 256, "stretch", cache)
    assert decoded == ["0.png", "1.png", "2.png", "3.dcm"] and cache.stat().st_mode & 0o777 == 0o700
    second = images.decode_files(files, 256, "stretch", cache)
    assert decoded == ["0.png", "1.png", "2.png", "3.dcm"]  # nothing decoded again
    for a, b in zip(first.images, second.images, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (second.kinds, second.patients, second.native) == (first.kinds, first.patients, first.native)
    assert second.patients[3] == "p3" and second.kinds[3].startswith("DICOM")
    Image.fromarray(255 - small["train"].images[1]).save(files[1])  # the file changes
    third = images.decode_files(files, 256, "stretch", cache)
    assert decoded[4:] == ["1.png"]
    np.testing.assert_array_equal(np.asarray(third.images[1]), 255 - small["train"].images[1])
    images.decode_files(files, 16, "stretch", cache)  # another decode size: every file again
    assert decoded[5:] == ["0.png", "1.png", "2.png", "3.dcm"]
    rows = [
        {"path": f.name, "label": "normal" if i % 2 else "pneumonia", "split": "train"} for i, f in enumerate(files)
    ]
    spec = DataSpec("multiclass", ("normal", "pneumonia"), decode_size=256, cache=str(cache))
    text = check_data(write_csv(tmp_path / "m.csv", rows), spec).text()
    assert (
        "cache: 9 decoded file(s)" in text
    )  # 4 + the changed file + 4 at another size; the check hit them and "(patient images: it stays on this machine)" in text


def test_decoding_in_worker_processes_gives_the_same_images_in_the_same_order(small, tmp_path):
    from PIL import Image

    from medvec.data.images import PARALLEL_MIN, decode_files

    files = []
    for i in range(2 * PARALLEL_MIN + 3):
        Image.fromarray(small["train"].images[i]).save(tmp_path / f"{i:02d}.png")
        files.append(tmp_path / f"{i:02d}.png")
    (tmp_path / "05.png").write_bytes(b"not an image")  # one unreadable file among them
    one, two = decode_files(files, 256, "stretch", None, 1), decode_files(files, 256, "stretch", None, 2)
    assert one.kept == two.kept and 5 not in two.kept and [f for f, _ in two.failed] == [tmp_path / "05.png"]
    assert one.failed == two.failed and one.kinds == two.kinds and one.native == two.native
    for a, b in zip(one.images, two.images, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
