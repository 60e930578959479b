"""Using the model at a hospital: what a served request may hold (:mod:`medvec.serving`) and ``medvec predict``
on a model registered in MLflow (this worker's SQLite file) by the registry's own code path. The served model
behind a real ``mlflow models serve`` is tested in test_lineage, on the champion a merge flow registered."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BREAST
from medvec.data.sources import load_split
from medvec.models import create_base
from medvec.preprocess import to_tensor
from medvec.serving import InputError, frame_to_batch, pixels_to_uint8


@pytest.fixture(scope="module")
def spec():
    return create_base("tiny_cnn", 2, pretrained=False, seed=0).spec


def png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def dicom(pixels: np.ndarray, tmp_path, **kwargs) -> str:
    from medvec.data.dicom import write_dicom

    path = write_dicom(tmp_path / f"{len(list(tmp_path.iterdir()))}.dcm", pixels, **kwargs)
    return base64.b64encode(path.read_bytes()).decode()


def test_raw_pixels_are_8_bit_whole_numbers_or_floats_in_0_1():
    assert pixels_to_uint8([[0, 128], [255, 7]]).tolist() == [[0, 128], [255, 7]]
    assert pixels_to_uint8([[0.0, 128.0], [255.0, 7.0]]).tolist() == [[0, 128], [255, 7]]  # JSON with decimals
    assert pixels_to_uint8([[0.0, 0.5], [1.0, 0.25]]).tolist() == [[0, 128], [255, 64]]  # round(x * 255)
    assert pixels_to_uint8(np.ones((2, 2), dtype=np.float32)).tolist() == [[255, 255], [255, 255]]  # floats: [0, 1]
    assert pixels_to_uint8(np.full((1, 1, 3), 9, dtype=np.uint8)).shape == (1, 1, 3)
    for bad, reason in [
        ([[1.5, 2]], "values from 1.5 to 2"),
        ([[0, 300]], "values from 0 to 300"),
        ([[0, 1], [2]], "not all the same length"),
        ([[[1, 2]]], "is not H × W (grayscale) or H × W × 3"),
        ([["a", "b"]], "not all numbers"),
        ([[float("nan"), 0.5]], "NaN"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            pixels_to_uint8(bad)


def test_every_request_form_gives_the_batch_training_preprocessing_gives(spec, tmp_path):
    images = load_split(BREAST, "test").images[:3]  # real 28 × 28 ultrasound images
    want = to_tensor(images, spec)
    for column, cells in [
        ("pixels", [im.tolist() for im in images]),
        ("pixels", list(images)),  # uint8 arrays from a Python caller
        ("pixels", [(im / 255.0).tolist() for im in images]),  # floats in [0, 1]
        ("image", [png(im) for im in images]),
        ("image", [dicom(im, tmp_path) for im in images]),
        ("image", [dicom(im, tmp_path, monochrome1=True, compress="rle") for im in images]),
        ("tensor", list(want.numpy())),
    ]:
        got = frame_to_batch(pd.DataFrame({column: cells}), spec)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=column)
    rgb = np.repeat(images[:1, :, :, None], 3, axis=3)  # an RGB image of grey pixels reads like the grey one
    torch.testing.assert_close(frame_to_batch(pd.DataFrame({"pixels": [rgb[0]]}), spec), want[:1], atol=1e-6, rtol=0)


def test_images_of_other_sizes_and_mixed_forms_keep_their_order(spec):
    a, b = np.full((40, 40), 200, np.uint8), np.arange(900, dtype=np.int64).reshape(30, 30) % 256
    frame = pd.DataFrame({"pixels": [a, None, b.tolist()], "image": [None, png(b.astype(np.uint8)), None]})
    got = frame_to_batch(frame, spec)
    torch.testing.assert_close(got[0], to_tensor(a[None], spec)[0])
    torch.testing.assert_close(got[1], to_tensor(b.astype(np.uint8)[None], spec)[0])
    torch.testing.assert_close(got[2], got[1])


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"image": ["not base64!"]}), "row 0 ('image'): 'image' is not valid base64"),
        (
            pd.DataFrame({"image": [base64.b64encode(b"hello").decode()]}),
            "row 0 ('image'): not a readable PNG, JPEG or DICOM",
        ),
        (pd.DataFrame({"pixels": [[[0, 1]], [[0, 1.5]]]}), "row 1 ('pixels'): values from 0 to 1.5"),
        (
            pd.DataFrame({"pixels": [[[0]]], "image": ["eA=="]}),
            "row 0: fill exactly one of 'image', 'pixels', 'tensor' (it has image, pixels)",
        ),
        (pd.DataFrame({"pixels": [None]}), "row 0: fill exactly one of 'image', 'pixels', 'tensor' (it has none)"),
        (
            pd.DataFrame({"tensor": [np.zeros((3, 28, 28)).tolist()]}),
            "row 0 ('tensor'): shape (3, 28, 28) is not the model's",
        ),
        (pd.DataFrame({"x": [1]}), "columns ['x']: send one image per row in 'image'"),
        (pd.DataFrame({"pixels": []}), "the request holds no images"),
    ],
)
def test_a_request_the_model_cannot_read_is_refused_in_one_line_naming_the_row(spec, frame, message):
    with pytest.raises(InputError) as err:
        frame_to_batch(frame, spec)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A briefly trained tiny model registered as ``medvec-predict`` (champion) with a threshold."""
    import mlflow
    from mlflow import MlflowClient

    from medvec.config import load_params
    from medvec.hospital.train import finetune
    from medvec.models import state_sha256
    from medvec.tracking.registry import _log_model
    from medvec.tracking.server import connect, experiment_id

    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    p = load_params("params.yaml", ["model.name=tiny_cnn", "model.pretrained=false", "finetune.epochs=2"])
    finetune(base.model, load_split(BREAST, "train"), base.spec, p.finetune, progress=False)
    base = base.with_model(base.model.eval(), state_sha256(base.model.state_dict()))
    connect()
    with mlflow.start_run(experiment_id=experiment_id("medvec-predict-test")):
        version = _log_model(base, "medvec-predict", 0.6)
    MlflowClient().set_registered_model_alias("medvec-predict", "champion", version)
    return {"base": base, "version": version, "threshold": 0.6}


def predict_cli(*args: str) -> int:
    from flows.cli import main

    return main(["predict", *args, "--no-progress"])


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_on_a_dicom_manifest_skips_an_unreadable_file_and_matches_the_evaluation(registered, tmp_path, capsys):
    from medvec.data.examples import write_manifest
    from medvec.evaluate import at_threshold, evaluate_model

    test = load_split(BREAST, "test")
    manifest = write_manifest({"test": test}, tmp_path / "export", "dicom", progress=False)
    broken = manifest.parent / "images" / "test" / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"truncated")
    with manifest.open("a") as f:
        f.write(f"images/test/broken.dcm,{test.classes[0]},test\n")
    with pytest.warns(UserWarning, match=f"skipped {broken}: not a readable image"):
        assert predict_cli("medvec-predict@champion", "--data", str(manifest), "--out", str(tmp_path / "p.csv")) == 0
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["path", "p_0", "p_1", "label"] and len(rows) == len(test)
    assert rows[0]["path"].endswith("images/test/00000.dcm") and not any("broken" in r["path"] for r in rows)
    want = evaluate_model(registered["base"].model, test, registered["base"].spec)
    p1 = np.array([float(r["p_1"]) for r in rows])
    np.testing.assert_allclose(p1, want["scores"], atol=1e-6)
    assert [int(r["label"]) for r in rows] == (want["scores"] >= 0.6).astype(int).tolist()  # the registered threshold
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["auc"] == pytest.approx(want["auc"], abs=1e-9) and metrics["confusion"] == want["confusion"]
    op = at_threshold(test.labels, want["scores"], 0.6)
    assert metrics["op"] == pytest.approx(op, abs=1e-9)
    out = capsys.readouterr().out
    assert f"medvec-predict/{registered['version']} on cpu: {len(test)} image(s)" in out
    assert "skipped 1 unreadable file(s)" in out and f"sensitivity {op['sensitivity']:.4f}" in out


def test_predict_scores_an_unlabelled_folder_of_files_and_an_npz_by_index(registered, tmp_path):
    from PIL import Image

    images = load_split(BREAST, "test").images[:5]
    folder = tmp_path / "pacs" / "study"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).resize((50, 50)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: not read
    assert (
        predict_cli(
            "medvec-predict/" + registered["version"],
            "--data",
            str(tmp_path / "pacs"),
            "--out",
            str(tmp_path / "f.csv"),
        )
        == 0
    )
    rows = read_csv(tmp_path / "f.csv")
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == [f"{i}.png" for i in range(5)]
    assert not (tmp_path / "f.metrics.json").exists()  # no labels, no metrics
    assert predict_cli("medvec-predict", "--data", str(BREAST), "--split", "val", "--out", str(tmp_path / "v.csv")) == 0
    rows = read_csv(tmp_path / "v.csv")
    assert rows[0]["index"] == "0" and len(rows) == len(load_split(BREAST, "val"))


def test_predict_names_what_is_missing(registered, tmp_path, capsys):
    assert predict_cli("medvec-predict@nope", "--data", str(BREAST)) == 2
    assert "model 'medvec-predict' has no such alias or version (aliases: champion" in capsys.readouterr().err
    assert predict_cli("medvec-predict", "--data", str(tmp_path / "absent")) == 2
    assert f"{tmp_path / 'absent'}: no such file or folder" in capsys.readouterr().err
    assert predict_cli("medvec-predict", "--data", str(BREAST), "--split", "holdout") == 2
    assert "no split 'holdout'" in capsys.readouterr().err


def test_psi_is_the_population_stability_index_over_the_reference_quantile_bins():
    from medvec.hospital.monitor import psi, verdict

    reference = np.arange(10.0)  # one value per decile bin: p = 0.1 each
    value, edges, ref_counts, new_counts = psi(reference, reference)
    assert value == 0.0 and ref_counts == new_counts == [1] * 10
    np.testing.assert_allclose(edges, np.arange(1, 10) * 0.9)
    value, _, _, new_counts = psi(reference, np.zeros(10))  # everything in the first bin; empty bins count 1e-4
    assert new_counts == [10] + [0] * 9
    assert value == pytest.approx(0.9 * np.log(1 / 0.1) + 9 * (1e-4 - 0.1) * np.log(1e-4 / 0.1), rel=1e-12)
    assert [verdict(v) for v in (0.05, 0.1, 0.2, 0.25, 3.0)] == [
        "stable",
        "moderate shift",
        "moderate shift",
        "drift",
        "drift",
    ]
    from medvec.hospital.monitor import bins_for, noise_floor

    assert [bins_for(n) for n in (5, 24, 78, 100, 5000)] == [2, 2, 7, 10, 10]
    assert noise_floor(10, 24, 624) == pytest.approx(9 * (1 / 24 + 1 / 624))  # ≈ 0.39: two samples of one population


def test_hospital_monitor_reads_inverted_images_as_drift_and_logs_only_aggregates(registered, tmp_path, capsys):
    import mlflow

    from flows.cli import main

    test = load_split(BREAST, "test")
    np.savez(tmp_path / "same.npz", test_images=test.images, test_labels=test.labels)
    np.savez(tmp_path / "inverted.npz", test_images=255 - test.images, test_labels=test.labels)  # MONOCHROME1 read raw
    args = [
        "hospital",
        "monitor",
        "h1",
        "--reference",
        str(BREAST),
        "--model",
        "medvec-predict@champion",
        "--no-progress",
    ]
    assert main([*args, "--data", str(tmp_path / "same.npz")]) == 0
    same = capsys.readouterr().out
    assert "h1: 156 new image(s) against 78 reference image(s), model medvec-predict/" in same
    assert re.search(r"mean intensity +0\.\d{3} +0\.\d{3}  stable", same) and "logged to MLflow run" in same
    assert main([*args, "--data", str(tmp_path / "inverted.npz")]) == 0
    inverted = capsys.readouterr().out
    assert re.search(r"mean intensity +\d+\.\d{3} +0\.\d{3}  drift", inverted), inverted
    assert "most moved: mean intensity" in inverted or "most moved: score" in inverted
    run_id = re.search(r"logged to MLflow run (\w+)", inverted).group(1)
    run = mlflow.get_run(run_id)
    assert run.data.tags["medvec.kind"] == "monitor" and run.data.tags["medvec.monitored"] == "inverted.npz"
    assert run.data.metrics["psi.mean_intensity"] > 0.25 and run.data.metrics["n_new"] == 156
    drift = mlflow.artifacts.load_dict(f"runs:/{run_id}/drift.json")
    for f in drift["features"]:  # bins and counts only: nothing per image
        assert len(f["reference_counts"]) == len(f["new_counts"]) == len(f["edges"]) + 1 <= 7  # 78 images: 7 bins
        assert sum(f["new_counts"]) == 156 and sum(f["reference_counts"]) == 78


def test_a_large_image_is_shrunk_once_at_decode_the_same_way_for_a_file_and_a_served_request(spec, tmp_path):
    """data.decode_size: a file larger than it keeps only a copy that fits (stretch: each side capped); a served raw image or
    file is shrunk the same way, so both reach the model as the same tensor."""
    from PIL import Image

    from medvec.data.dicom import write_dicom
    from medvec.data.images import decode_files, stack_images

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (300, 600), dtype=np.uint8)  # H × W
    Image.fromarray(wide).save(tmp_path / "wide.png")
    write_dicom(tmp_path / "big.dcm", np.ascontiguousarray(wide[:, :300]), window=(128, 256))
    decoded = decode_files([tmp_path / "wide.png", tmp_path / "big.dcm"], max_side=256)
    assert decoded.native == [(600, 300), (300, 300)] and [im.size for im in decoded.images] == [(256, 256), (256, 256)]
    full = decode_files([tmp_path / "wide.png"])
    assert full.images[0].size == (600, 300)  # without a decode size: the file as stored
    from_file = to_tensor(stack_images(decoded.images[:1]), spec)
    served = frame_to_batch(pd.DataFrame({"pixels": [wide]}), spec, 256)
    torch.testing.assert_close(served, from_file, atol=0, rtol=0)
    as_bytes = frame_to_batch(pd.DataFrame({"image": [png(wide)]}), spec, 256)
    torch.testing.assert_close(as_bytes, from_file, atol=0, rtol=0)
    small = load_split(BREAST, "test").images[:2]  # 28 × 28: kept as they are
    torch.testing.assert_close(frame_to_batch(pd.DataFrame({"pixels": list(small)}), spec, 256), to_tensor(small, spec))


def test_pad_and_center_crop_make_a_non_square_file_square_without_stretching_it(spec, tmp_path):
    """data.resize on a 600 × 300 image (W × H) with decode_size 256: pad centres it on black, center_crop keeps
    its middle square; a served raw image is read the same way."""
    from PIL import Image

    from medvec.data.images import decode_files, stack_images

    wide = np.full((300, 600), 200, dtype=np.uint8)
    wide[:, 150:450] = 50  # the middle square is dark, the sides light
    Image.fromarray(wide).save(tmp_path / "wide.png")
    (pad,) = decode_files([tmp_path / "wide.png"], 256, "pad").images
    (crop,) = decode_files([tmp_path / "wide.png"], 256, "center_crop").images
    (stretch,) = decode_files([tmp_path / "wide.png"], 256, "stretch").images
    assert pad.size == crop.size == stretch.size == (256, 256)
    pad_px, crop_px = np.asarray(pad), np.asarray(crop)
    assert (pad_px[:60] == 0).all() and (pad_px[-60:] == 0).all()  # the black bands above and below
    assert pad_px[128, 10] > 150 and pad_px[128, 128] < 100  # the light sides and the dark middle kept
    assert abs(int(crop_px.mean()) - 50) <= 1  # the middle square only
    for mode, got in (("pad", pad), ("center_crop", crop)):
        served = frame_to_batch(pd.DataFrame({"pixels": [wide]}), spec, 256, mode)
        torch.testing.assert_close(served, to_tensor(stack_images([got]), spec), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"unknown data\.resize 'fit'"):
        from medvec.data.images import DataSpec

        DataSpec(resize="fit")
