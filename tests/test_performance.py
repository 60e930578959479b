"""The speed-ups keep results: batches decoded once equal batches decoded per step, channels-last layout, and
medvec.timing's accounting of nested phases (on a fake clock: no timed test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import toy_meta
from medvec import timing
from medvec.data.images import ImageSet
from medvec.models import create_base
from medvec.preprocess import batches, predecode, to_tensor


@pytest.fixture(scope="module")
def spec():
    return create_base("tiny_cnn", 2, pretrained=False, seed=0).spec


def _images(n=37, seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 32, 32), dtype=np.uint8), rng.integers(0, 2, n), ["a", "b"])


def test_batches_from_predecoded_images_equal_batches_decoded_each_step(spec):
    data = _images()
    decoded = predecode(data, spec)
    assert decoded is not None and decoded.shape == (37, spec.in_chans, spec.image_size, spec.image_size)
    for kwargs in ({}, {"shuffle": True, "seed": 3}, {"shuffle": True, "seed": 4, "augment_data": True}):
        plain = list(batches(data, spec, 8, **kwargs))
        fast = list(batches(data, spec, 8, decoded=decoded, **kwargs))
        assert len(plain) == len(fast) == 5
        for (x1, y1), (x2, y2) in zip(plain, fast):
            assert torch.equal(x1, x2) and torch.equal(y1, y2), kwargs


def test_predecode_keeps_to_its_budget(spec):
    data = _images()
    per_image = spec.in_chans * spec.image_size**2 * 4
    assert predecode(data, spec, budget=37 * per_image) is not None
    assert predecode(data, spec, budget=37 * per_image - 1) is None
    assert predecode(_images(0), spec) is None
    at_size = ImageSet(np.zeros((5, spec.image_size, spec.image_size), np.uint8), np.zeros(5), ["a", "b"])
    assert predecode(at_size, spec) is None  # already at the model's size: nothing to save by preprocessing once


def test_batches_are_channels_last_with_the_same_values(spec):
    data = _images(5)
    x = to_tensor(data.images, spec)
    assert x.is_contiguous(memory_format=torch.channels_last)
    x_aug = next(batches(data, spec, 5, shuffle=True, augment_data=True))[0]
    assert x_aug.is_contiguous(memory_format=torch.channels_last)
    model = create_base("tiny_cnn", 2, pretrained=False, seed=0).model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.contiguous()), atol=1e-5)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_fine_tuning_counts_as_the_finetune_phase():
    """The whole training loop, not a helper inside it, is ``finetune`` (the demo's phase split depends on it)."""
    from medvec.config import FinetuneConfig
    from medvec.hospital.train import finetune

    base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
    timing.reset()
    result = finetune(base.fresh(), _images(96), base.spec, FinetuneConfig(epochs=2, batch_size=16), progress=False)
    counted = timing.snapshot()["finetune"]
    assert counted["calls"] == 1 and counted["seconds"] >= result.seconds > 0


def test_nested_phases_count_once_in_the_innermost(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    timing.reset()
    with timing.phase("contribution"):
        clock.now += 1.0
        with timing.phase("merge"):
            clock.now += 2.0
        with timing.phase("evaluate"):
            clock.now += 4.0
            with timing.phase("bn_restore"):
                clock.now += 8.0
        clock.now += 16.0

    @timing.timed("evaluate")
    def evaluate():
        clock.now += 32.0
        return "done"

    assert evaluate() == "done"
    assert timing.snapshot() == {
        "bn_restore": {"seconds": 8.0, "calls": 1},
        "contribution": {"seconds": 17.0, "calls": 1},
        "evaluate": {"seconds": 36.0, "calls": 2},
        "merge": {"seconds": 2.0, "calls": 1},
    }
    timing.reset()
    assert timing.snapshot() == {}


def test_a_phase_that_raises_is_still_counted(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    timing.reset()
    with pytest.raises(RuntimeError), timing.phase("merge"):
        clock.now += 3.0
        raise RuntimeError("boom")
    assert timing.snapshot() == {"merge": {"seconds": 3.0, "calls": 1}}
    timing.reset()


def test_vector_files_land_in_the_page_cache_as_2_mib_folios_where_the_kernel_makes_them(tmp_path, folio_share):
    """medvec's writers (save, sign, the local store's copy) write in large pieces; a merge then maps each
    2 MiB of a file with one entry.  1 MiB writes and shutil.copyfile (sendfile) leave 4 KiB pages."""
    from medvec.keys import keygen
    from medvec.store import LocalStore
    from medvec.vectors.vector import DataVector

    meta = toy_meta("big")
    vector = DataVector({"w": torch.randn(3 << 20)}, meta)  # 12 MiB of deltas
    saved = vector.save(tmp_path / "v.safetensors")
    assert folio_share(saved) > 0.5
    key_path, _ = keygen("h1", tmp_path / "keys")
    store = LocalStore(tmp_path / "store")
    key = store.put(vector, key_path)  # saved, signed, then copied into the store
    assert folio_share(store.local_file(key)) > 0.5


def test_a_vector_above_the_in_memory_limit_is_streamed_then_copied_to_the_same_content(tmp_path, monkeypatch):
    import medvec.vectors.format
    from medvec.vectors.checks import load_vector
    from medvec.vectors.vector import DataVector

    meta = toy_meta("v")
    vector = DataVector({"w": torch.randn(1000), "b": torch.randn(3)}, meta)
    in_memory = vector.save(tmp_path / "memory.safetensors")
    monkeypatch.setattr(medvec.vectors.format, "IN_MEMORY_SAVE", 0)
    streamed = vector.save(tmp_path / "streamed.safetensors")
    a, b = load_vector(in_memory), load_vector(streamed)
    assert a.content_sha256 == b.content_sha256 and in_memory.stat().st_size == streamed.stat().st_size
    assert torch.equal(b.tensor("w"), vector.deltas["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors", "streamed.safetensors"]
