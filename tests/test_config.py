from __future__ import annotations

import pytest
from pydantic import ValidationError

from medvec.config import ConfigError, load_params


def test_params_yaml_loads_and_overrides(root):
    p = load_params(
        root / "params.yaml", ["merge.method=ties", "finetune.epochs=5", "merge.lambdas=[0.5, 1.0]", "split.alpha=0.1"]
    )
    assert (
        p.merge.method == "ties" and p.finetune.epochs == 5 and p.merge.lambdas == (0.5, 1.0) and p.split.alpha == 0.1
    )
    assert p.model.name == "efficientnet_lite0" and p.split.hospitals == 4
    with pytest.raises(ValidationError, match="frozen"):
        p.finetune.epochs = 3  # frozen


def test_the_method_names_config_accepts_are_the_registry_s(root):
    """config.py names the merge methods without importing the registry; the two lists agree, in order."""
    from medvec.config import METHOD_NAMES, MergeConfig
    from medvec.coordinator.methods import method_names

    assert METHOD_NAMES == tuple(method_names()) == MergeConfig().methods
    with pytest.raises(ConfigError, match="unknown merge method 'fedprox': valid methods are sum, task_arithmetic"):
        load_params(None, ["merge.methods=[mean, fedprox]"])


def test_bad_overrides_name_the_problem(root):
    with pytest.raises(ConfigError, match="valid methods are sum"):
        load_params(root / "params.yaml", ["merge.method=fedavgx"])
    with pytest.raises(ConfigError, match="epochs"):
        load_params(root / "params.yaml", ["finetune.epochs=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_params(root / "params.yaml", ["finetune.epochs"])
    with pytest.raises(ConfigError, match="unknown_key"):
        load_params(root / "params.yaml", ["finetune.unknown_key=1"])


def test_missing_file_gives_defaults(tmp_path):
    assert load_params(tmp_path / "none.yaml").batchnorm.strategy == "recompute"


def test_decode_size_left_null_is_the_model_s_input_size(root):
    """data.decode_size null: the model's input size (model.image_size), 256 for a model at its native size; a
    number given wins. Resolved once in Params, so the record and the registered model hold the number."""
    from medvec.config import NATIVE_DECODE_SIZE, Params

    assert load_params(root / "params.yaml").data.decode_size == 64  # the shipped params: model.image_size 64
    assert Params().data.decode_size == NATIVE_DECODE_SIZE == 256
    assert Params.model_validate({"model": {"image_size": 96}}).data.decode_size == 96
    assert Params.model_validate({"model": {"image_size": 96}, "data": {"decode_size": 300}}).data.decode_size == 300
    assert Params.model_validate(Params().model_dump()).data.decode_size == 256  # a dumped record reads back
