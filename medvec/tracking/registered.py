"""A registered model version read back from MLflow, ready to score (``medvec predict``, ``medvec hospital
monitor``): its safetensors weights and spec from the logged model, and its threshold from the model config."""

from __future__ import annotations

from pathlib import Path

from medvec.models import load_base
from medvec.serving import Registered
from medvec.tracking.lineage import resolve


def load_registered(ref: str) -> Registered:
    """The registered version ``ref`` names (``NAME@alias`` or ``NAME/version``), read from the tracking server."""
    import mlflow
    from mlflow.models import Model

    mv = resolve(ref)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}"))
    flavor = Model.load(str(local)).flavors["python_function"]
    base = load_base(local / flavor["artifacts"]["weights"]["path"])
    config = flavor.get("config") or {}
    return Registered(
        mv.name,
        str(mv.version),
        base.model.eval(),
        base.spec,
        base.task,
        config.get("threshold"),
        config.get("decode_size"),
        config.get("resize"),
    )
