"""Shared fixtures: tiny models and hand-checkable states (mergekit style), real data paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

import tasks  # noqa: F401  (Prefect's local defaults, tasks/__init__.py, before anything imports Prefect)
from servers import free_port

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# `make test` runs two pytest-xdist workers on this 2-core machine: one torch thread each (oversubscribed
# threads run ~20x slower), and each worker gets its own embedded Prefect home and MLflow database, so
# no two processes share a SQLite file. Tests that start real servers set their own.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _SCRATCH = Path(tempfile.mkdtemp(prefix=f"medvec-{_WORKER}-"))
    os.environ["MEDVEC_THREADS"] = "1"
    os.environ["PREFECT_HOME"] = str(_SCRATCH / "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SCRATCH / 'mlflow.db'}"
    (_SCRATCH / "prefect").mkdir()
os.environ.setdefault("MEDVEC_THREADS", "2")

# One real Prefect server for the whole session (started by the ``prefect_api`` fixture below, before any test):
# every flow this process or its subprocesses run talks to it. Each subprocess would otherwise start Prefect's
# ephemeral server of its own, 15 to 25 s of CPU before its first flow (a trivial flow in a fresh process here:
# 19 s with the ephemeral server). Tests of the ephemeral path clear PREFECT_API_URL (the demo's, the CLI's and
# the front door's), and tests that need a server of their own start one (servers.PrefectServer).
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix=f"medvec-{_WORKER or 'main'}-prefect-server-"))
_PREFECT_PORT = free_port()
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PREFECT_PORT}/api"

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT / "data" / "breastmnist.npz"
PNEUMONIA = ROOT / "data" / "pneumoniamnist.npz"
# the tiny model trained briefly on one thread: the flows' integration tests start from these overrides
TINY_FLOW = [
    "model.name=tiny_cnn",
    "model.pretrained=false",
    "finetune.epochs=2",
    "finetune.lr=0.003",
    "finetune.threads=1",
]


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """The session's Prefect server, at the PREFECT_API_URL set above (its own home and SQLite database)."""
    from servers import PrefectServer

    server = PrefectServer(_PREFECT_HOME, port=_PREFECT_PORT)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_base():
    from medvec.models import create_base

    return create_base("tiny_cnn", 2, pretrained=False, seed=0)


def perturbed_state(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' state: floating tensors moved by seeded noise, BN stats changed too."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=g) * scale
            out[k] = v + noise if not k.endswith("running_var") else v * (1 + noise.abs())
        else:
            out[k] = v + 7
    return out


@pytest.fixture()
def make_vector(tiny_base):
    from medvec.batchnorm import RunningStats
    from medvec.vectors.vector import DataVector

    def make(hospital: str = "h1", seed: int = 1, n_train: int = 10, scale: float = 0.01):
        base_state = tiny_base.model.state_dict()
        tuned = perturbed_state(base_state, seed, scale)
        model = tiny_base.fresh()
        model.load_state_dict(tuned)
        return DataVector.from_states(
            base_state,
            tuned,
            hospital=hospital,
            base_sha256=tiny_base.sha256,
            base_model="tiny_cnn",
            num_classes=2,
            n_train=n_train,
            label_counts=[n_train // 2, n_train - n_train // 2],
            finetune={"epochs": 1},
            metrics={"val_auc": 0.5},
            running=RunningStats.of(model, n_train),
        )

    return make


def toy_meta(vector_id: str = "v", hospital: str = "h1"):
    """Metadata for a vector whose deltas a test writes by hand (no base model behind them)."""
    from medvec.vectors.vector import VectorMeta

    return VectorMeta(
        vector_id=vector_id,
        hospital=hospital,
        base_sha256="a" * 64,
        base_model="toy",
        num_classes=2,
        n_train=4,
        label_counts=[2, 2],
        created_at="2026-12-01T00:00:00+00:00",
    )


def benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package): registered under its name,
    where its dataclasses look their module up, with benchmarks/ on the path for their ``common`` import."""
    import importlib.util
    import sys

    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def folio_share(tmp_path):
    """``share(path)``: how much of a file a read-only map maps with 2 MiB entries (benchmarks/common.py).

    Skips where this kernel and filesystem cache no 2 MiB folios even for one large write,
    and checks the contrast first: 1 MiB writes leave 4 KiB pages."""
    common = benchmark("common")
    reference, small = tmp_path / "one-write.bin", tmp_path / "small-writes.bin"
    reference.write_bytes(b"\1" * (12 << 20))
    with open(small, "wb") as f:
        for _ in range(12):
            f.write(b"\1" * (1 << 20))
    if not common.pmd_share(str(reference)) or common.pmd_share(str(small)) != 0:
        pytest.skip("this kernel and filesystem do not cache a large write as 2 MiB folios and small ones as pages")
    return lambda path: common.pmd_share(str(path))
