"""Images to model inputs: resize, channel mapping and normalisation for a model's :class:`~medvec.models.ModelSpec`, light augmentation, and seeded batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from medvec.data.images import DataError, ImageSet
from medvec.models import ModelSpec


def to_tensor(images: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """uint8 images -> float NCHW (stored channels-last), resized to the spec's size and normalised.

    Grayscale images feed RGB models by repeating the channel (keeps ImageNet
    weights usable); RGB images feed one-channel models by averaging.
    """
    x = torch.as_tensor(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    if x.shape[1] != spec.in_chans:
        if x.shape[1] == 1:
            x = x.expand(-1, spec.in_chans, -1, -1)
        elif spec.in_chans == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise DataError(f"cannot feed {x.shape[1]}-channel images to a {spec.in_chans}-channel model")
    if x.shape[-2:] != (spec.image_size, spec.image_size):
        x = F.interpolate(
            x, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(
        spec.mean[: spec.in_chans] if len(spec.mean) >= spec.in_chans else spec.mean * spec.in_chans
    ).view(1, -1, 1, 1)
    std = torch.tensor(spec.std[: spec.in_chans] if len(spec.std) >= spec.in_chans else spec.std * spec.in_chans).view(
        1, -1, 1, 1
    )
    # channels-last: the convolutions run about twice as fast on CPU (benchmarks/finetune_throughput.py)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation: random translation of up to 1/16 of the side, random horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)  # a per-image copy loop: faster here than one batched gather
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


PREDECODE_BYTES = 1024**3  # a training split this small (as float pixels) is decoded once, not every epoch


def predecode(data: ImageSet, spec: ModelSpec, budget: int = PREDECODE_BYTES) -> torch.Tensor | None:
    """Every image of ``data`` preprocessed once (:func:`to_tensor`), or None when that would pass ``budget`` bytes,
    or when the images are already at the model's size (files decoded at ``data.decode_size``, the model's): with
    no resize, preprocessing a batch costs little, and the float copy would cost 4 × channels bytes a pixel.

    Filled 256 images at a time, so the temporaries of resizing stay small next to the result.
    """
    size = len(data) * spec.in_chans * spec.image_size**2 * 4
    if not len(data) or size > budget or data.images.shape[1:3] == (spec.image_size, spec.image_size):
        return None
    out = torch.empty((len(data), spec.in_chans, spec.image_size, spec.image_size)).contiguous(
        memory_format=torch.channels_last
    )
    for start in range(0, len(data), 256):
        out[start : start + 256] = to_tensor(data.images[start : start + 256], spec)
    return out


def batches(
    data: ImageSet,
    spec: ModelSpec,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment_data: bool = False,
    limit: int | None = None,
    decoded: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield preprocessed ``(x, y)`` batches (y: class indices, or float 0/1 rows for multi-label); seeded when
    shuffling or augmenting.  ``decoded`` (:func:`predecode` of ``data``) replaces the per-batch preprocessing,
    with the same values."""
    g = torch.Generator().manual_seed(seed)
    n = len(data) if limit is None else min(limit, len(data))
    order = torch.randperm(len(data), generator=g).numpy()[:n] if shuffle or limit is not None else np.arange(n)
    if limit is not None and not shuffle:
        order = np.sort(order)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if decoded is None:
            x = to_tensor(data.images[idx], spec)
        else:
            x = decoded[torch.as_tensor(idx)].contiguous(memory_format=torch.channels_last)
        if augment_data:
            x = augment(x, g)
        y = torch.as_tensor(data.labels[idx])
        yield x, y.float() if data.multilabel else y
