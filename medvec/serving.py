"""What clients send a served model, made model-ready with the model's own preprocessing.

One row per image, in exactly one of three columns (the registered pyfunc's signature names them):

* ``image``: the bytes of a PNG, JPEG or DICOM file, base64-encoded; DICOM is told apart by content (``DICM`` at
  byte 128) and read by the same pydicom path as training (:mod:`medvec.data.dicom`: rescale, VOI window,
  MONOCHROME1 inverted);
* ``pixels``: a raw image of any size, rows of grayscale values (H × W) or of ``[r, g, b]`` (H × W × 3), either
  8-bit values (whole numbers 0–255, or a uint8 array) or floats in [0, 1];
* ``tensor``: an image already model-ready (C × S × S floats at the model's size, as
  :func:`medvec.preprocess.to_tensor` makes them); taken as it is.

Every raw image goes through :func:`medvec.preprocess.to_tensor` for the model's
:class:`~medvec.models.ModelSpec`, exactly as in training and evaluation, so a client never reimplements it.
Anything else is an :class:`InputError` with one line naming the row and the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvec.errors import UserError
from medvec.models import ModelSpec
from medvec.preprocess import to_tensor

COLUMNS = ("image", "pixels", "tensor")


@dataclass(frozen=True)
class Registered:
    """A registered model version, ready to score: weights, input spec, task and operating point."""

    name: str
    version: str
    model: torch.nn.Module
    spec: ModelSpec
    task: str
    threshold: float | None
    decode_size: int | None = None  # data.decode_size when it was registered: raw images shrunk to fit first
    resize: str | None = None  # data.resize when it was registered: how a raw image is made square first

    @property
    def uri(self) -> str:
        """The version's ``models:/NAME/VERSION`` URI."""
        return f"models:/{self.name}/{self.version}"


class InputError(UserError, ValueError):
    """A request the model cannot read; the message is one line naming the row."""


def pixels_to_uint8(value: Any) -> np.ndarray:
    """A raw image (nested lists or an array, H × W or H × W × 3) as uint8: 8-bit values kept, [0, 1] floats × 255."""
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged rows
        raise ValueError("its rows are not all the same length") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError("its values are not all numbers")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)) or 0 in arr.shape:
        raise ValueError(f"shape {tuple(arr.shape)} is not H × W (grayscale) or H × W × 3 (RGB)")
    if not np.isfinite(arr).all():
        raise ValueError("it holds NaN or infinite values")
    if arr.dtype == np.uint8:
        return arr
    low, high = float(arr.min()), float(arr.max())
    floats = np.issubdtype(arr.dtype, np.floating)
    eight_bit = low >= 0 and high <= 255 and bool((arr == np.round(arr)).all())
    if eight_bit and not (floats and high <= 1):  # whole numbers are 8-bit values; [0, 1] floats are not
        return arr.astype(np.uint8)
    if floats and low >= 0 and high <= 1:
        return np.round(arr.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(
        f"values from {low:g} to {high:g}: send 8-bit values (0–255) or floats in [0, 1];"
        " send 16-bit images as DICOM or PNG bytes in 'image'"
    )


def images_to_batch(images: list[np.ndarray], spec: ModelSpec) -> torch.Tensor:
    """uint8 images of any sizes and channels → one model-ready batch, in order (same-shaped ones together)."""
    flat = [im[..., 0] if im.ndim == 3 and im.shape[2] == 1 else im for im in images]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(flat):
        by_shape.setdefault(im.shape, []).append(i)
    if len(by_shape) == 1:  # the common case: one stack, no copies beyond to_tensor's
        return to_tensor(np.stack(flat), spec)
    out = torch.empty((len(images), spec.in_chans, spec.image_size, spec.image_size))
    for index in by_shape.values():
        out[index] = to_tensor(np.stack([flat[i] for i in index]), spec)
    return out.contiguous(memory_format=torch.channels_last)


def _tensor(value: Any, spec: ModelSpec) -> torch.Tensor:
    """A model-ready image (C × S × S at the model's size) as a float tensor."""
    arr = np.asarray(value, dtype=np.float32)
    want = (spec.in_chans, spec.image_size, spec.image_size)
    if arr.shape != want:
        raise ValueError(f"shape {tuple(arr.shape)} is not the model's C × S × S {want}; send raw images in 'pixels'")
    if not np.isfinite(arr).all():
        raise ValueError("it holds NaN or infinite values")
    return torch.from_numpy(arr)


def _present(value: Any) -> bool:
    """Whether a cell holds something (a DataFrame fills absent columns with None or NaN)."""
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and value == "")


def _row_image(row: int, column: str, value: Any):
    """Row ``row``'s raw image from its ``image`` or ``pixels`` cell, as a PIL image (a file's bytes read by
    training's own reader, :func:`medvec.data.images.read_image`)."""
    from PIL import Image, UnidentifiedImageError

    from medvec.data.images import read_image

    if column == "pixels":
        pixels = pixels_to_uint8(value)
        return Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
    if not isinstance(value, (str, bytes)):
        raise ValueError(f"'image' holds a {type(value).__name__}, not base64 text")
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else value
    except (binascii.Error, ValueError):
        raise ValueError("'image' is not valid base64") from None
    try:
        return read_image(io.BytesIO(data))[0]
    except UnidentifiedImageError:
        raise ValueError("not a readable PNG, JPEG or DICOM file (an unknown image format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # truncated, corrupt, too many pixels
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"not a readable PNG, JPEG or DICOM file ({first})") from None


def frame_to_batch(frame, spec: ModelSpec, max_side: int | None = None, resize: str | None = None) -> torch.Tensor:
    """The model-ready batch of a request (a DataFrame with one of :data:`COLUMNS` filled per row); raw images are
    made square by ``resize`` and shrunk to fit ``max_side`` first (:func:`medvec.data.images.fit`), as training
    reads decoded files."""
    from medvec.data.images import fit

    known = [c for c in COLUMNS if c in frame.columns]
    unknown = [str(c) for c in frame.columns if c not in COLUMNS]
    if unknown or not known:
        raise InputError(
            f"columns {unknown or list(map(str, frame.columns))}: send one image per row in 'image' (base64 PNG,"
            " JPEG or DICOM), 'pixels' (a raw H × W or H × W × 3 array) or 'tensor' (model-ready C × S × S)"
        )
    if len(frame) == 0:
        raise InputError("the request holds no images")
    raw: list[np.ndarray] = []
    where: list[tuple[str, int]] = []  # per row: ("raw", index into raw) or ("tensor", row)
    tensors: dict[int, torch.Tensor] = {}
    for row, cells in enumerate(frame[known].itertuples(index=False, name=None)):
        filled = [(c, v) for c, v in zip(known, cells, strict=True) if _present(v)]
        if len(filled) != 1:
            names = [c for c, _ in filled] or ["none"]
            raise InputError(f"row {row}: fill exactly one of 'image', 'pixels', 'tensor' (it has {', '.join(names)})")
        column, value = filled[0]
        try:
            if column == "tensor":
                tensors[row] = _tensor(value, spec)
                where.append(("tensor", row))
            else:
                raw.append(np.asarray(fit(_row_image(row, column, value), max_side, resize or "stretch")))
                where.append(("raw", len(raw) - 1))
        except ValueError as exc:
            raise InputError(f"row {row} ('{column}'): {exc}") from None
    batch = images_to_batch(raw, spec) if raw else None
    rows = [batch[i] if kind == "raw" and batch is not None else tensors[i] for kind, i in where]
    return torch.stack(rows).contiguous(memory_format=torch.channels_last)


def label_columns(p: np.ndarray, threshold: float | None, task: str = "multiclass") -> pd.DataFrame:
    """``p_0 … p_{k-1}`` and the label(s) of class probabilities ``p``: a binary model's label is
    ``p_1 >= threshold`` (its registered operating point), else the argmax; multi-label: ``label_c = p_c >= 0.5``."""
    probs = {f"p_{c}": p[:, c] for c in range(p.shape[1])}
    if task == "multilabel":
        return pd.DataFrame({**probs, **{f"label_{c}": (p[:, c] >= 0.5).astype(np.int64) for c in range(p.shape[1])}})
    if threshold is not None and p.shape[1] == 2:
        label = (p[:, 1] >= threshold).astype(np.int64)
    else:
        label = p.argmax(1).astype(np.int64)
    return pd.DataFrame({**probs, "label": label})


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, x: torch.Tensor, task: str = "multiclass") -> np.ndarray:
    """The model's class probabilities (per-label sigmoids for a multi-label task) on a model-ready batch."""
    from medvec.evaluate import probabilities

    return probabilities(model(x), task).cpu().numpy()


@torch.no_grad()
def class_scores(model: torch.nn.Module, x: torch.Tensor, task: str = "multiclass") -> tuple[np.ndarray, np.ndarray]:
    """The model's class probabilities and their log-odds (:func:`medvec.evaluate.log_odds`, what an AUC ranks by)
    on a model-ready batch, from one forward pass."""
    from medvec.evaluate import log_odds, probabilities

    logits = model(x)
    return probabilities(logits, task).cpu().numpy(), log_odds(logits, task)


def label_frame(
    model: torch.nn.Module, x: np.ndarray | torch.Tensor, threshold: float | None, task: str = "multiclass"
):
    """:func:`label_columns` of ``model`` on model-ready ``x`` (what the registered pyfunc returns)."""
    return label_columns(class_probabilities(model, torch.as_tensor(x), task), threshold, task)
