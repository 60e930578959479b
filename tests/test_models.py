"""Model registry, base identity and the proof that the offline weights are ImageNet's."""

from __future__ import annotations

import pytest
import torch

from medvec.models import (
    BaseMismatchError,
    UnknownModelError,
    build_model,
    create_base,
    head_keys,
    head_name,
    load_base,
    model_names,
    save_base,
    state_sha256,
)


@pytest.mark.parametrize(
    "photo, cls, prob",
    [("chelsea", 285, 0.79), ("coffee", 967, 0.91)],  # 285 'Egyptian cat', 967 'espresso'
)
def test_efficientnet_lite0_offline_weights_are_imagenet(photo, cls, prob):
    skimage_data = pytest.importorskip("skimage.data")
    from medvec.preprocess import to_tensor

    model, spec = build_model("efficientnet_lite0", num_classes=1000, pretrained=True)
    assert (spec.image_size, spec.mean, spec.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    img = getattr(skimage_data, photo)()  # H×W×3 uint8
    x = to_tensor(img[None], spec)  # resized to 224, normalised with the model's own config
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x), 1)[0]
    assert int(p.argmax()) == cls
    assert float(p[cls]) == pytest.approx(prob, abs=0.05)


def test_efficientnet_new_head_for_grayscale_task():
    model, spec = build_model("efficientnet_lite0", num_classes=2, pretrained=True, image_size=64)
    assert spec.in_chans == 3 and spec.image_size == 64
    out = model.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 2)


def test_tiny_cnn_is_grayscale_and_seeded():
    a, spec = build_model("tiny_cnn", 3, pretrained=False, seed=1)
    b, _ = build_model("tiny_cnn", 3, pretrained=False, seed=1)
    c, _ = build_model("tiny_cnn", 3, pretrained=False, seed=2)
    assert spec.in_chans == 1 and spec.image_size == 28
    assert state_sha256(a.state_dict()) == state_sha256(b.state_dict()) != state_sha256(c.state_dict())
    assert a.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 3)


def test_torchvision_architecture_by_name_gets_a_new_head():
    model, spec = build_model("resnet18", 3, pretrained=False)
    assert model.fc.out_features == 3 and spec.mean == (0.485, 0.456, 0.406)
    model, _ = build_model("mobilenet_v3_small", 5, pretrained=False)
    assert model.classifier[-1].out_features == 5


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(UnknownModelError, match="efficientnet_lite0, tiny_cnn"):
        build_model("alexnet_9000", 2)


def test_state_sha256_tracks_every_byte():
    state = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3)}
    h = state_sha256(state)
    assert h == state_sha256({"b": torch.tensor(3), "a": torch.tensor([1.0, 2.0])})
    assert h != state_sha256({"a": torch.tensor([1.0, 2.0000002]), "b": torch.tensor(3)})
    assert h != state_sha256({"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor(3)})


def test_base_round_trip_and_hash_check(tmp_path):
    base = create_base("tiny_cnn", 2, pretrained=False, seed=3)
    path = tmp_path / "base.safetensors"
    save_base(base, path)
    loaded = load_base(path, expected_sha256=base.sha256)
    assert loaded.sha256 == base.sha256 and loaded.spec == base.spec
    with pytest.raises(BaseMismatchError, match="expected"):
        load_base(path, expected_sha256="0" * 64)


@pytest.mark.parametrize("name", [*model_names(), "resnet18", "mobilenet_v3_small"])  # all registered, 2 torchvision
def test_the_head_found_on_each_model_is_the_head_keys_of_its_state(name):
    """One head: the module head_name finds on the model (the one the builder replaced, and DP-SGD's head mode
    trains) is the model's last nn.Linear, of num_classes outputs, and holds exactly head_keys of its state dict
    (all that intake, which has only state dicts, reads)."""
    import medvec.vectors.vector

    model, _ = build_model(name, 3, pretrained=False)
    head = head_name(model)
    linears = [q for q, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert head == linears[-1] and model.get_submodule(head).out_features == 3
    assert head_keys(model.state_dict()) == [f"{head}.weight", f"{head}.bias"]
    assert medvec.vectors.vector.head_keys is head_keys  # intake's and the hospital's are the same function


def test_a_model_whose_last_two_dimensional_weight_is_no_linear_has_no_head():
    """A last 2-D weight that is not a Linear's (an embedding after the linear layer), or no 2-D weight at all:
    no head medvec could replace or train, refused rather than taking another layer for it."""
    from medvec.models import _replace_head

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Embedding(3, 5))
    with pytest.raises(
        UnknownModelError, match=r"last two-dimensional weight, 1\.weight, is not a linear layer's \(Embedding\)"
    ):
        head_name(model)
    with pytest.raises(UnknownModelError, match="cannot find a linear classification head in Sequential"):
        _replace_head(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)), 2, 0)
