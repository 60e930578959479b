"""DVC stage ``finetune@<hospital>``: fine-tune θ_pre on one hospital's folder and write its vector."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvec.config import Params, load_params
from medvec.hospital.finetune import finetune_vector, for_upload
from medvec.hospital.local import LocalData
from medvec.models import load_base
from medvec.runtime import set_threads
from medvec.vectors.vector import DataVector


def finetune(
    params: Params, hospital: str, data_dir: str | Path, base_path: str | Path
) -> tuple[DataVector, list[dict]]:
    """The same core call as the ``hospital-finetune`` flow (DP-SGD with ``privacy.enabled``; no ledger here:
    the DVC pipeline simulates hospitals on one machine and publishes nothing)."""
    set_threads(params.finetune.threads)
    base = load_base(base_path)
    data = LocalData.of(data_dir, params)
    vector, record = finetune_vector(base, hospital, data, params.finetune, progress=True, privacy=params.privacy)
    return for_upload(vector, params.vectors), record.history


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("hospital")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    vector, history = finetune(
        load_params(args.params), args.hospital, f"work/hospitals/{args.hospital}", "work/base.safetensors"
    )
    vector.save(f"work/vectors/{args.hospital}.safetensors")
    Path("work/finetune").mkdir(parents=True, exist_ok=True)
    last = history[-1] if history else {}
    Path(f"work/finetune/{args.hospital}.json").write_text(
        json.dumps(
            {
                "vector_id": vector.meta.vector_id,
                "content_sha256": vector.content_sha256,
                "n_train": vector.meta.n_train,
                "dp_epsilon": vector.meta.privacy.epsilon if vector.meta.privacy else None,
                **last,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
