"""Loaders (npz with N or N×1 labels, image folders), preprocessing and the split simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import BREAST, PNEUMONIA
from medvec.data.images import DataError
from medvec.data.sources import load_split
from medvec.data.split import split_indices, write_hospital_shards
from medvec.models import ModelSpec
from medvec.preprocess import to_tensor


def test_real_npz_splits_and_counts():
    train = load_split(PNEUMONIA, "train")
    assert (len(train), train.label_counts()) == (3882, [388, 3494])
    assert len(load_split(PNEUMONIA, "val")) == 524 and len(load_split(PNEUMONIA, "test")) == 624
    b = load_split(BREAST, "train")
    assert (len(b), b.label_counts(), b.images.shape[1:]) == (546, [147, 399], (28, 28))


def test_medmnist_files_get_their_label_names(tmp_path):
    # MedMNIST's .npz files carry no names; its INFO does (label 0 of breastmnist is malignant)
    assert load_split(PNEUMONIA, "test").classes == ["normal", "pneumonia"]
    assert load_split(BREAST, "val").classes == ["malignant", "normal, benign"]
    # a hospital's shard keeps them, and an unknown file falls back to the label numbers
    summary = write_hospital_shards(BREAST, tmp_path / "h", 2, "iid", 0.5, 0)
    assert summary["classes"] == ["malignant", "normal, benign"]
    assert load_split(tmp_path / "h" / "h1", "train").classes == ["malignant", "normal, benign"]
    z = tmp_path / "other.npz"
    np.savez(z, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.array([0, 1, 2]))
    assert load_split(z, "train").classes == ["0", "1", "2"]


def test_labels_of_shape_n_and_n_by_1(tmp_path):
    imgs = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "a.npz", train_images=imgs, train_labels=np.array([[0], [1], [1]], np.uint8))
    np.savez(tmp_path / "b.npz", train_images=imgs, train_labels=np.array([0, 1, 1], np.uint8))
    for name in ("a.npz", "b.npz"):
        s = load_split(tmp_path / name, "train")
        assert s.labels.tolist() == [0, 1, 1] and s.label_counts() == [1, 2]
    with pytest.raises(DataError, match="no split 'test'"):
        load_split(tmp_path / "a.npz", "test")


def test_image_folder_loader(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for c in ("normal", "pneumonia"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 10 * i + (c == "pneumonia") * 100, np.uint8)).save(folder / f"{i}.png")
    s = load_split(tmp_path, "train")
    assert s.classes == ["normal", "pneumonia"] and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.images.shape == (6, 8, 8) and int(s.images[4, 0, 0]) == 110
    assert len(load_split(tmp_path, "test")) == 4


def test_to_tensor_resizes_normalises_and_repeats_gray():
    spec = ModelSpec("m", 8, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = to_tensor(np.full((2, 4, 4), 255, np.uint8), spec)
    assert x.shape == (2, 3, 8, 8) and torch.allclose(x, torch.ones_like(x))
    gray = ModelSpec("g", 4, 1, (0.5,), (0.25,))
    y = to_tensor(np.zeros((1, 4, 4, 3), np.uint8), gray)
    assert y.shape == (1, 1, 4, 4) and torch.allclose(y, torch.full_like(y, -2.0))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_split_is_a_seeded_partition(scheme):
    labels = load_split(PNEUMONIA, "train").labels
    parts = split_indices(labels, 4, scheme, 0.5, seed=3, min_samples=16)
    again = split_indices(labels, 4, scheme, 0.5, seed=3, min_samples=16)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    assert min(len(p) for p in parts) >= 16


def test_dirichlet_skews_labels_and_iid_does_not():
    labels = load_split(PNEUMONIA, "train").labels

    def spread(parts):
        return np.ptp([labels[p].mean() for p in parts])

    assert spread(split_indices(labels, 4, "dirichlet", 0.1, seed=0)) > 0.2
    assert spread(split_indices(labels, 4, "iid", seed=0)) < 0.05
    with pytest.raises(DataError, match="valid are iid, dirichlet, quantity"):
        split_indices(labels, 4, "sorted")


def test_hospital_shards_hold_only_their_own_share(tmp_path):
    summary = write_hospital_shards(BREAST, tmp_path, hospitals=3, alpha=0.5, seed=1)
    total = 0
    for name, meta in summary["hospitals"].items():
        tr, va = load_split(tmp_path / name, "train"), load_split(tmp_path / name, "val")
        assert (len(tr), len(va)) == (meta["n_train"], meta["n_val"])
        assert json.loads((tmp_path / name / "meta.json").read_text())["train_label_counts"] == tr.label_counts()
        total += len(tr) + len(va)
    assert total == 546
