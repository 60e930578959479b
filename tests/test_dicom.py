"""DICOM reading/writing on real MedMNIST images and pydicom's bundled test files, with exact assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from medvec.data.dicom import DicomReadError, dicom_summary, is_dicom, read_dicom, write_dicom

PNEUMONIA = Path(__file__).resolve().parents[1] / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    x = np.load(PNEUMONIA)["train_images"][:8]
    assert x.dtype == np.uint8 and x.shape == (8, 28, 28)
    return x


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)  # only the files shipped inside the pydicom wheel
    assert path, f"{name} is not bundled with pydicom"
    return path


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def test_monochrome2_8bit_round_trip_exact(images, tmp_path):
    for i, x in enumerate(images):
        path = write_dicom(tmp_path / f"{i}.dcm", x)
        y = read_dicom(path)
        assert y.dtype == np.uint8 and y.shape == x.shape
        np.testing.assert_array_equal(y, x)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.PatientName == "" and ds.PatientID == ""
    assert path.read_bytes()[:128] == b"\0" * 128
    # fresh random UIDs per file
    assert pydicom.dcmread(tmp_path / "0.dcm").SOPInstanceUID != ds.SOPInstanceUID


def test_monochrome1_stores_inverted_and_round_trips_exact(images, tmp_path):
    for i, x in enumerate(images):
        path = write_dicom(tmp_path / f"{i}.dcm", x, monochrome1=True)
        ds = pydicom.dcmread(path)
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        np.testing.assert_array_equal(ds.pixel_array, 255 - x)
        np.testing.assert_array_equal(read_dicom(path), x)


@pytest.mark.parametrize("monochrome1", [False, True])
def test_rescale_with_window_round_trips_within_one(images, tmp_path, monochrome1):
    for i, x in enumerate(images):
        path = write_dicom(
            tmp_path / f"{i}.dcm", x, rescale=(0.5, -1024.0), window=(40.0, 400.0), monochrome1=monochrome1
        )
        ds = pydicom.dcmread(path)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (0.5, -1024.0)
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 400.0)
        raw = ds.pixel_array
        assert raw.dtype == np.uint16 and ds.BitsStored == 16
        assert not np.array_equal(raw, x) and int(raw.min()) > 255  # genuinely rescaled stored values
        assert diff(read_dicom(path), x) <= 1


def test_window_without_rescale(images, tmp_path):
    for i, x in enumerate(images):
        path = write_dicom(tmp_path / f"{i}.dcm", x, window=(2048.0, 4096.0))
        ds = pydicom.dcmread(path)
        assert "RescaleSlope" not in ds and ds.BitsStored == 16
        assert int(ds.pixel_array.max()) > 255
        np.testing.assert_array_equal(read_dicom(path), x)


def test_rescale_without_window_uses_min_max(images, tmp_path):
    x = images[0].copy()
    x[0, 0], x[0, 1] = 0, 255  # min-max only round-trips an image that spans 0..255
    path = write_dicom(tmp_path / "ct.dcm", x, rescale=(0.5, -1024.0))
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds
    np.testing.assert_array_equal(ds.pixel_array, x.astype(np.uint16) * 16)
    np.testing.assert_array_equal(read_dicom(path), x)


def test_write_rejects_what_it_cannot_invert(images, tmp_path):
    x = images[0]
    with pytest.raises(ValueError, match="too narrow"):
        write_dicom(tmp_path / "a.dcm", x, rescale=(8.0, 0.0), window=(1000.0, 100.0))
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        write_dicom(tmp_path / "a.dcm", x, window=(0.0, 400.0))
    with pytest.raises(ValueError, match="2-D uint8"):
        write_dicom(tmp_path / "a.dcm", x.astype(np.float32))
    with pytest.raises(ValueError, match="unknown compression"):
        write_dicom(tmp_path / "a.dcm", x, compress="zip")
    with pytest.raises(ValueError, match="32 x 32"):
        write_dicom(tmp_path / "a.dcm", x, compress="jpeg2000-lossless")
    assert not (tmp_path / "a.dcm").exists()


@pytest.mark.parametrize(
    ("compress", "uid"),
    [("rle", pydicom.uid.RLELossless), ("jpeg2000-lossless", pydicom.uid.JPEG2000Lossless)],
)
@pytest.mark.parametrize("options", [{}, {"monochrome1": True, "rescale": (0.5, -1024.0), "window": (40.0, 400.0)}])
def test_compressed_round_trip_exact(images, tmp_path, compress, uid, options):
    x = np.repeat(np.repeat(images[1], 2, axis=0), 2, axis=1)  # 56 x 56: the JPEG 2000 encoder needs >= 32 x 32
    path = write_dicom(tmp_path / "c.dcm", x, compress=compress, **options)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == uid and ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_dicom(path), x)


def test_jpeg_ls_encoding_is_reported_unavailable(images, tmp_path):
    # pydicom encodes JPEG-LS only through pyjpegls, which this project does not install
    with pytest.raises(ValueError, match="pyjpegls"):
        write_dicom(tmp_path / "a.dcm", images[0], compress="jpeg-ls-lossless")


def test_truncated_file_raises(images, tmp_path):
    patient = {"PatientName": "Doe^Jane", "PatientID": "MRN-4711"}
    data = write_dicom(tmp_path / "full.dcm", images[2], patient=patient).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert is_dicom(cut)
    with pytest.raises(DicomReadError, match="truncated or corrupt pixel data") as info:
        read_dicom(cut)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "Doe" not in message and "MRN-4711" not in message and str(tmp_path) not in message
    (tmp_path / "head.dcm").write_bytes(data[:100])
    with pytest.raises(DicomReadError, match="not a readable DICOM file"):
        read_dicom(tmp_path / "head.dcm")


def test_detection_by_content_not_extension(images, tmp_path):
    png = tmp_path / "xray.png"
    Image.fromarray(images[0]).save(png)
    assert not is_dicom(png)
    with pytest.raises(DicomReadError, match="not a readable DICOM file"):
        read_dicom(png)
    disguised = write_dicom(tmp_path / "disguised.png", images[0])
    assert is_dicom(disguised)
    np.testing.assert_array_equal(read_dicom(disguised), images[0])
    (tmp_path / "short").write_bytes(b"DICM")
    assert not is_dicom(tmp_path / "short")
    assert not is_dicom(tmp_path / "missing.dcm")
    assert not is_dicom(tmp_path)  # a directory is unreadable, not an error


def test_multi_frame_rejected(images, tmp_path):
    path = write_dicom(tmp_path / "one.dcm", images[0])
    ds = pydicom.dcmread(path)
    ds.set_pixel_data(images[:3].copy(), "MONOCHROME2", 8)
    ds.save_as(tmp_path / "three.dcm")
    with pytest.raises(DicomReadError, match=r"^multi-frame images are not supported \(3 frames\)$"):
        read_dicom(tmp_path / "three.dcm")
    with pytest.raises(DicomReadError, match=r"\(2 frames\)"):
        read_dicom(bundled("SC_rgb_rle_2frame.dcm"))
    with pytest.raises(DicomReadError, match=r"\(15 frames\)"):
        read_dicom(bundled("rtdose.dcm"))


def test_no_pixel_data_and_undecodable_syntax(images, tmp_path):
    with pytest.raises(DicomReadError, match=r"^no pixel data$"):
        read_dicom(bundled("rtplan.dcm"))
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", images[0]))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # nothing in pydicom decodes MPEG-2
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(DicomReadError, match=r"^cannot decode transfer syntax 1\.2\.840\.10008\.1\.2\.4\.100: "):
        read_dicom(tmp_path / "mpeg.dcm")


def test_voi_lut_sequence_is_applied(images, tmp_path):
    x = images[3]
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", x, window=(2048.0, 4096.0)))
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    lut = np.array([(255 - v // 16) * 257 for v in range(4096)], dtype="<u2")  # 16-bit entries, reversed
    item.add_new("LUTData", "OW", lut.tobytes())
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    stored = ds.pixel_array.astype(np.int64)
    expected = np.rint((255 - stored // 16) * 257 * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(read_dicom(tmp_path / "lut.dcm"), expected)


def linear_window(real: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, written piecewise as in the standard, with output range 0..255."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = ((real - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.select([real <= low, real > high], [0.0, 255.0], inside)


def test_bundled_ct_small_rescale_min_max(tmp_path):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    assert "WindowCenter" not in ds and float(ds.RescaleSlope) == 1.0
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    y = read_dicom(bundled("CT_small.dcm"))
    assert y.shape == (128, 128) and y.dtype == np.uint8
    np.testing.assert_array_equal(y, expected)
    assert (y.min(), y.max()) == (0, 255)


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_bundled_mr_small_window(name):
    reference = pydicom.dcmread(bundled("MR_small.dcm"))
    center, width = float(reference.WindowCenter), float(reference.WindowWidth)
    assert (center, width) == (600.0, 1600.0)
    expected = np.rint(linear_window(reference.pixel_array.astype(np.float64), center, width)).astype(np.uint8)
    y = read_dicom(bundled(name))
    assert y.shape == (64, 64) and y.dtype == np.uint8 and y.std() > 0
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("examples_rgb_color.dcm", (240, 320, 3)),  # RGB, native
        ("SC_ybr_full_422_uncompressed.dcm", (100, 100, 3)),  # YBR_FULL_422, native
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100, 3)),  # JPEG baseline, YBR_FULL
        ("SC_rgb_jpeg_gdcm.dcm", (100, 100, 3)),  # JPEG lossless, RGB
        ("examples_jpeg2k.dcm", (480, 640, 3)),  # JPEG 2000, YBR_RCT
        ("examples_palette.dcm", (350, 800, 3)),  # PALETTE COLOR
        ("JPEG2000.dcm", (1024, 256)),  # JPEG 2000 grayscale, 16-bit signed, no window
        ("JPGExtended.dcm", (1024, 256)),  # JPEG extended 12-bit grayscale
    ],
)
def test_bundled_files_decode(name, shape):
    y = read_dicom(bundled(name))
    assert y.shape == shape and y.dtype == np.uint8
    assert y.min() < y.max() and y.std() > 0


def test_colour_conversion_gives_the_rgb_picture():
    # the same test pattern stored as RGB (JPEG lossless) and as YBR_FULL_422 / YBR_FULL (JPEG baseline):
    # after YCbCr -> RGB conversion they agree up to 8-bit YCbCr rounding and lossy coding
    rgb = read_dicom(bundled("SC_rgb_jpeg_gdcm.dcm"))
    bands = {0: [255, 0, 0], 20: [0, 255, 0], 40: [0, 0, 255], 60: [0, 0, 0], 90: [255, 255, 255]}
    assert {row: rgb[row, 50].tolist() for row in bands} == bands
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        other = read_dicom(bundled(name))
        assert diff(other, rgb) <= 6
        assert np.abs(other.astype(np.int32) - rgb).mean() < 1.0


def test_summary_has_no_identifying_values(images, tmp_path):
    patient = {
        "PatientName": "Müller^Jürgen",
        "PatientID": "MRN-0042-XYZ",
        "PatientBirthDate": "19450817",
        "InstitutionName": "Saint Example General Hospital",
        "AccessionNumber": "ACC77881",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.424242",
    }
    path = write_dicom(tmp_path / "p.dcm", images[4], patient=patient, compress="rle")
    ds = pydicom.dcmread(path)
    for keyword, value in patient.items():  # the values really are in the file
        assert str(ds.data_element(keyword).value) == value
    summary = dicom_summary(path)
    assert summary == {
        "modality": "OT",
        "photometric": "MONOCHROME2",
        "bits_stored": 8,
        "transfer_syntax": "RLE Lossless",
    }
    text = json.dumps(summary, ensure_ascii=False)
    for value in patient.values():
        assert value not in text
    with pytest.raises(ValueError, match="unknown DICOM keyword"):
        write_dicom(tmp_path / "q.dcm", images[4], patient={"PatientNickname": "x"})
    assert dicom_summary(bundled("CT_small.dcm"))["modality"] == "CT"


def test_import_is_cheap():
    code = "import sys, medvec.data.dicom; print('pydicom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
