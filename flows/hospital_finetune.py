"""``hospital-finetune``: the flow a hospital's own worker runs.

Loads θ_pre from the store (checking its sha256), fine-tunes on the hospital's
local folder, publishes the validated data vector atomically and emits
``medvec.vector.landed``.  Only the vector and aggregate metadata leave.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.events import emit_vector_landed
from medvec.config import FinetuneConfig
from medvec.train import set_threads
from tasks.hospital import fetch_base, finetune_hospital, load_local_data, publish_vector


@flow(name="hospital-finetune", log_prints=True)
def hospital_finetune(
    hospital: str,
    data_dir: str,
    store_url: str,
    base_sha256: str,
    finetune: FinetuneConfig = FinetuneConfig(),
    emit: bool = True,
    progress: bool = True,
) -> dict:
    """Fine-tune θ_pre at ``hospital`` on ``data_dir`` and publish τ_h to ``store_url``."""
    logger = get_run_logger()
    set_threads(finetune.threads)
    base = fetch_base(store_url, base_sha256)
    data = load_local_data(data_dir)
    vector = finetune_hospital(base, hospital, data, finetune, progress)
    summary = publish_vector(store_url, vector, base)
    logger.info("published %s (content %s…, n=%d)", summary["vector_id"], summary["content_sha256"][:12], summary["n_train"])
    if emit:
        emit_vector_landed(summary)
    return summary
