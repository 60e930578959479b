"""Read and write single-frame DICOM images as uint8 arrays (what an 8-bit PNG of them would hold).

Reading (``read_dicom``) follows the DICOM grayscale pipeline, PS3.3 C.11 / PS3.4 N.2:

1. decode the stored values (``pydicom``; compressed syntaxes via pylibjpeg when installed);
2. modality transform: Modality LUT Sequence, or Rescale Slope/Intercept -> real-world values;
3. VOI transform: the first VOI LUT Sequence item, or the first Window Center/Width, mapped to 0..255;
   with no VOI information the real-valued min..max of the image is mapped linearly to 0..255, except for
   plain unsigned data of <= 8 stored bits without rescale, whose possible range 0..2**BitsStored-1 is mapped
   to 0..255 (the identity for 8 bits, so 8-bit MONOCHROME2 files round-trip exactly);
4. MONOCHROME1 inversion (``255 - v``) so bright always means more attenuation, as in MONOCHROME2;
5. round to nearest, clip to 0..255, uint8.

Colour images (RGB, YBR_* converted to RGB, PALETTE COLOR) come back as H x W x 3 uint8.

``write_dicom`` is the inverse of ``read_dicom`` for uint8 grayscale images (Secondary Capture objects).

Privacy: no function here returns, logs or puts into an exception message any tag value other than the
technical fields of ``dicom_summary``; ``DicomReadError`` messages hold a short reason only (no file path,
no patient or institution values). pydicom is imported inside the functions so ``import medvec.data.dicom``
stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

PathLike = str | os.PathLike[str]
Source = PathLike | BinaryIO  # a file, or its bytes in memory (a served request)

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_EMPTY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "PatientOrientation",
)  # fmt: skip
_COMPRESSIONS = {
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless (pydicom's own encoder)
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless (pylibjpeg-openjpeg)
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless (needs pyjpegls)
}


class DicomReadError(ValueError):
    """A DICOM file could not be turned into pixels; the message is a short reason without tag values or path."""


def is_dicom(path: Source) -> bool:
    """True when the file (or bytes in memory, read from where they stand and left there) has the DICOM Part 10
    signature: ``b"DICM"`` at bytes 128..131 (content, not extension)."""
    if not isinstance(path, (str, os.PathLike)):
        where = path.tell()
        head = path.read(132)
        path.seek(where)
        return len(head) == 132 and head[128:132] == b"DICM"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _reason(exc: BaseException) -> str:
    """Exception type and the first line of its message (OSError: strerror only, which never holds the path)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    first = (text.strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _dcmread(path: Source, **kwargs: Any) -> Dataset:
    import pydicom

    try:
        return pydicom.dcmread(path, **kwargs)
    except Exception as exc:
        raise DicomReadError(f"not a readable DICOM file ({_reason(exc)})") from None


def _decode(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decoded pixels and the photometric interpretation they are in after decoding (YBR_FULL* becomes RGB)."""
    from pydicom.pixels import as_pixel_options, get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        decoder = get_decoder(tsyntax)
    except Exception as exc:
        raise DicomReadError(f"cannot decode transfer syntax {tsyntax}: {_reason(exc)}") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no decoding plugin"
        raise DicomReadError(f"cannot decode transfer syntax {tsyntax}: {missing}")
    try:
        arr, meta = decoder.as_array(ds, validate=True, raw=False, **as_pixel_options(ds))
    except Exception as exc:
        raise DicomReadError(f"truncated or corrupt pixel data: {_reason(exc)}") from None
    return arr, str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element (Window Center/Width may hold several windows)."""
    return float(np.ravel(np.asarray(value, dtype=np.float64))[0])


def _window(real: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI window of PS3.3 C.11.2.1.2 with output range 0..255 (float).

    LINEAR (default):  y = clip(((x - (c - 0.5)) / (w - 1) + 0.5), 0, 1) * 255, w >= 1
                       (identical to the standard's piecewise form: x <= c - 0.5 - (w-1)/2 -> 0,
                       x > c - 0.5 + (w-1)/2 -> 255; w == 1 is a threshold at c - 0.5).
    LINEAR_EXACT:      y = clip((x - c) / w + 0.5, 0, 1) * 255, w > 0.
    SIGMOID:           y = 255 / (1 + exp(-4 (x - c) / w)), w > 0.
    """
    x = np.asarray(real, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "LINEAR":
        if width < 1:
            raise DicomReadError("window width < 1 is invalid for a LINEAR VOI function")
        if width == 1:
            return np.where(x > center - 0.5, 255.0, 0.0)
        return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0
    if width <= 0:
        raise DicomReadError(f"window width <= 0 is invalid for a {function} VOI function")
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0) * 255.0
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise DicomReadError(f"unsupported VOI LUT function {function}")


def _min_max(values: np.ndarray) -> np.ndarray:
    """Map the image's own min..max linearly to 0..255 (a constant image becomes 0)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    return np.zeros_like(v) if hi <= lo else (v - lo) * (255.0 / (hi - lo))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _has_voi(ds: Dataset) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _is_plain_small(ds: Dataset) -> bool:
    """Unsigned, <= 8 stored bits, no modality LUT / non-identity rescale, no VOI: pass through (scaled to 8 bits)."""
    return (
        int(ds.get("PixelRepresentation", 0) or 0) == 0
        and int(ds.get("BitsStored", 8) or 8) <= 8
        and not ds.get("ModalityLUTSequence")
        and float(ds.get("RescaleSlope", 1) or 1) == 1.0
        and float(ds.get("RescaleIntercept", 0) or 0) == 0.0
        and not _has_voi(ds)
        and "PixelData" in ds
    )


def _grayscale(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi

    if arr.ndim != 2:
        raise DicomReadError(f"unexpected grayscale pixel array shape {arr.shape}")
    if _is_plain_small(ds):
        out = arr.astype(np.float64) * (255.0 / (2 ** int(ds.get("BitsStored", 8) or 8) - 1))
    else:
        real = apply_modality_lut(arr, ds)
        if ds.get("VOILUTSequence"):
            item = ds.VOILUTSequence[0]
            depth = int(item.LUTDescriptor[2])
            out = apply_voi(np.rint(real).astype(np.int64), ds).astype(np.float64) * (255.0 / (2**depth - 1))
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            function = str(ds.get("VOILUTFunction") or "LINEAR")
            out = _window(real, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
        else:
            out = _min_max(real)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return _to_uint8(out)


def _colour(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype.itemsize > 1:  # 16-bit palette entries: 0..65535 -> 0..255
            arr = _to_uint8(arr.astype(np.float64) / 257.0)
    elif photometric in ("YBR_FULL", "YBR_FULL_422") and arr.dtype == np.uint8:
        arr = convert_color_space(arr, photometric, "RGB")  # only reached when the decoder left it as YBR
    elif photometric != "RGB":
        raise DicomReadError(f"unsupported photometric interpretation {photometric}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DicomReadError(f"unexpected colour pixel array shape {arr.shape}")
    return arr.astype(np.uint8) if arr.dtype == np.uint8 else _to_uint8(_min_max(arr))


def read_dicom(path: Source) -> np.ndarray:
    """uint8 pixels of a single-frame DICOM file: H x W (grayscale) or H x W x 3 (colour); see the module docstring.

    Every failure is a :class:`DicomReadError` with a short reason, so a caller skips the file and goes on.
    """
    return read_dicom_file(path).pixels


class DicomImage(NamedTuple):
    """What one read of a DICOM file gives: uint8 pixels, its Modality and its PatientID ("" when absent)."""

    pixels: np.ndarray
    modality: str
    patient: str


def read_dicom_file(path: Source) -> DicomImage:
    """:func:`read_dicom`'s pixels, the file's Modality (``unknown`` when absent) and PatientID, from one read."""
    try:
        ds = _dcmread(path)
        return DicomImage(_pixels(ds), str(ds.get("Modality") or "unknown"), str(ds.get("PatientID") or "").strip())
    except DicomReadError:
        raise
    except Exception as exc:  # malformed LUTs, odd tag values: pydicom raises many types
        raise DicomReadError(f"cannot convert the pixel data: {_reason(exc)}") from exc


def _pixels(ds: Dataset) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomReadError(f"multi-frame images are not supported ({frames} frames)")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise DicomReadError("no pixel data")
    arr, photometric = _decode(ds)
    if photometric in _MONOCHROME:
        return _grayscale(arr, ds, photometric)
    return _colour(arr, ds, photometric)


def _ds_number(value: float) -> float:
    """Round a number the way it will be stored as a DS string (at most 16 characters), so writer and reader agree."""
    return float(f"{float(value):.10g}")


def _stored_values(
    v: np.ndarray, rescale: tuple[float, float] | None, window: tuple[float, float] | None
) -> tuple[np.ndarray, int]:
    """Stored pixel values and Bits Stored that read_dicom maps back onto ``v`` (the pre-inversion display values).

    * no rescale, no window: ``v`` itself, 8 bits.
    * window (c, w): the real value is the LINEAR window's inverse, ``c - 0.5 + (v/255 - 0.5) * (w - 1)``, and the
      stored value is ``round((real - intercept) / slope)`` (slope 1, intercept 0 without rescale), 16 bits.
    * rescale without window: stored ``16 * v`` (12 bits), real ``slope * 16 * v + intercept``; read_dicom's
      min-max fallback recovers ``v`` exactly when ``v`` spans 0..255.
    """
    if window is None and rescale is None:
        return v, 8
    slope, intercept = rescale or (1.0, 0.0)
    if window is None:
        return v.astype(np.uint16) * 16, 12
    center, width = window
    real = center - 0.5 + (v.astype(np.float64) / 255.0 - 0.5) * (width - 1)
    raw = np.rint((real - intercept) / slope)
    if raw.min() < 0 or raw.max() > 65535:
        raise ValueError("window/rescale put the stored values outside 0..65535; choose another window or rescale")
    return raw.astype(np.uint16), 16


def _check_inverse(
    raw: np.ndarray,
    x: np.ndarray,
    monochrome1: bool,
    rescale: tuple[float, float] | None,
    window: tuple[float, float] | None,
) -> None:
    """Raise ValueError when read_dicom's windowed result for ``raw`` would differ from ``x`` by more than 1."""
    if window is None:
        return
    slope, intercept = rescale or (1.0, 0.0)
    out = _window(raw.astype(np.float64) * slope + intercept, *window)
    back = _to_uint8(255.0 - out if monochrome1 else out)
    if np.abs(back.astype(np.int16) - x.astype(np.int16)).max() > 1:
        raise ValueError("window too narrow for the rescale slope: the stored values cannot reproduce the image")


def _base_dataset(path: PathLike, patient: dict[str, Any] | None) -> Dataset:
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword in _EMPTY_TYPE2:  # required but may be empty: no identifiers by default
        setattr(ds, keyword, "")
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword, value in (patient or {}).items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword {keyword!r}")
        setattr(ds, keyword, value)
    return ds


def write_dicom(
    path: PathLike,
    pixels: np.ndarray,
    *,
    monochrome1: bool = False,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    patient: dict[str, Any] | None = None,
    compress: str | None = None,
) -> Path:
    """Write uint8 grayscale ``pixels`` (H x W) as a Secondary Capture DICOM file that read_dicom maps back to them.

    Explicit VR little endian, or ``compress``: "rle" (pydicom's encoder), "jpeg2000-lossless" (pylibjpeg-openjpeg,
    images of at least 32 x 32), "jpeg-ls-lossless" (only with pyjpegls installed; ValueError otherwise). Fresh random
    UIDs, and no patient identifiers unless ``patient`` (keyword -> value) sets them.

    Guarantees for ``read_dicom(write_dicom(p, x, ...))``:

    * default (MONOCHROME2, 8 bits stored as is) and ``monochrome1`` (stores ``255 - x``): equal to ``x`` exactly;
    * ``window=(center, width)``, with or without ``rescale=(slope, intercept)``: stored 16-bit values sit on the
      inverse of the LINEAR window, rounded to integers, so the result is within 1 of ``x`` (exact whenever
      ``slope * 255 / (width - 1) < 1``, e.g. window (40, 400) with slope 1 or 0.5); ValueError when the window
      is too narrow for that or the stored values would leave 0..65535;
    * ``rescale`` without ``window``: stored ``16 * x`` (12 bits) whose real values ``slope * 16 * x + intercept``
      go through read_dicom's min-max fallback: exact when ``x`` spans 0..255, otherwise contrast-stretched.
      ``slope`` must be positive.
    """
    x = np.asarray(pixels)
    if x.dtype != np.uint8 or x.ndim != 2:
        raise ValueError(f"pixels must be a 2-D uint8 array, got {x.dtype} with shape {x.shape}")
    if rescale is not None:
        rescale = (_ds_number(rescale[0]), _ds_number(rescale[1]))
        if rescale[0] <= 0:
            raise ValueError("rescale slope must be positive")
    if window is not None:
        window = (_ds_number(window[0]), _ds_number(window[1]))
        if window[1] <= 1:
            raise ValueError("window width must be greater than 1")
    uid = None if compress is None else _encoder_uid(compress)
    if compress == "jpeg2000-lossless" and min(x.shape) < 32:
        raise ValueError("jpeg2000-lossless needs at least 32 x 32 pixels (the encoder uses 6 wavelet resolutions)")
    v = 255 - x if monochrome1 else x
    raw, bits = _stored_values(v, rescale, window)
    _check_inverse(raw, x, monochrome1, rescale, window)
    ds = _base_dataset(path, patient)
    photometric = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.set_pixel_data(np.ascontiguousarray(raw), photometric, bits, generate_instance_uid=False)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:.10g}", f"{rescale[1]:.10g}"
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:.10g}", f"{window[1]:.10g}"
    if uid is not None:
        try:
            ds.compress(uid, generate_instance_uid=False)
        except Exception as exc:
            raise ValueError(f"{compress} encoding failed: {_reason(exc)}") from None
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def _encoder_uid(name: str) -> str:
    """Transfer syntax UID for a compression name, or ValueError when unknown or no encoder is installed."""
    from pydicom.pixels import get_encoder

    if name not in _COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}; choose one of {sorted(_COMPRESSIONS)}")
    uid = _COMPRESSIONS[name]
    try:
        encoder = get_encoder(uid)
    except NotImplementedError as exc:
        raise ValueError(f"compression {name!r} is not supported by pydicom: {exc}") from None
    if not encoder.is_available:
        raise ValueError(f"compression {name!r} needs an encoder: {'; '.join(encoder.missing_dependencies)}")
    return uid


def dicom_summary(path: PathLike) -> dict[str, Any]:
    """Non-identifying technical fields for a local data report (never a patient or institution value)."""
    ds = _dcmread(path, stop_before_pixels=True)
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    bits = ds.get("BitsStored")
    try:
        bits = int(bits) if bits is not None else None
    except (TypeError, ValueError):
        bits = None
    return {
        "modality": str(ds.get("Modality") or "unknown"),
        "photometric": str(ds.get("PhotometricInterpretation") or "unknown"),
        "bits_stored": bits,
        "transfer_syntax": getattr(tsyntax, "name", None) or "unknown",
    }
