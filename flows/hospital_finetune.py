"""``hospital-finetune``: the flow a hospital's own worker runs.

Loads θ_pre from the store (checking its sha256), fine-tunes on the hospital's
local folder, builds and validates the data vector with the batch-norm
aggregates the configured strategy needs (its own running statistics for
``average``; for ``recompute``, moment sums of its data under the current merged
model when one exists), publishes it atomically and emits
``medvec.vector.landed``.  Only the vector and aggregate metadata leave.
"""

from __future__ import annotations

import tempfile

from prefect import flow, get_run_logger

from flows.events import emit_vector_landed
from flows.names import HOSPITAL_FLOW
from flows.ui import base_tag, hospital_run_name, label_run
from medvec.config import Params
from medvec.hospital.finetune import for_upload
from medvec.keys import pinned_key
from medvec.runtime import set_threads
from medvec.store import open_store
from tasks.common import fetch_base
from tasks.hospital import (
    attach_moments,
    fetch_start,
    finetune_hospital,
    load_local_data,
    publish_vector,
    spend_privacy_budget,
    track_hospital_run,
)


@flow(name=HOSPITAL_FLOW, flow_run_name=hospital_run_name, log_prints=True)
def hospital_finetune(
    hospital: str,
    data_dir: str,
    store_url: str,
    base_sha256: str | None = None,
    params: Params | None = None,
    emit: bool = True,
    progress: bool = True,
    key_file: str | None = None,
) -> dict:
    """Fine-tune θ_pre at ``hospital`` on ``data_dir`` and publish τ_h to ``store_url``.

    ``base_sha256`` defaults to the store's current base, so scheduled runs follow
    the coordinator when it publishes a new base; ``hospital.start_from`` picks the
    start point at run time: the current champion (async refinement) or θ_pre.  With ``key_file`` (the
    hospital's Ed25519 key from ``medvec hospital keygen``) the vector is signed.
    """
    logger = get_run_logger()
    p = params or Params()
    set_threads(p.finetune.threads)
    # once for the run: every task below takes it; with a pinned coordinator key, only what it signed is trusted
    store = open_store(store_url).trusting(verifier=pinned_key(p.hospital.coordinator_key))
    base_sha256 = base_sha256 or store.current_base()
    label_run(tags=["medvec", "hospital", f"hospital:{hospital}", base_tag(base_sha256)])
    base = fetch_base(store, base_sha256)
    start, version = fetch_start(store, base, p.hospital.start_from)
    data = load_local_data(data_dir, p)
    vector, training = finetune_hospital(base, hospital, data, p.finetune, progress, start, version, p.privacy)
    if p.batchnorm.strategy == "recompute" and not p.privacy.enabled:  # under DP no moment sums leave
        vector = attach_moments(store, base, vector, data, p.batchnorm)
    if p.privacy.enabled:
        spend_privacy_budget(vector, p.privacy, data_dir)
    vector = for_upload(vector, p.vectors)
    with tempfile.TemporaryDirectory(prefix="medvec-published-") as folder:
        published = publish_vector(store, vector, base, folder, key_file)
        if vector.meta.privacy is not None:
            spent = vector.meta.privacy
            logger.info(
                "DP-SGD: ε=%.3f at δ=%.2g (%s, σ=%.3f)",
                spent.epsilon,
                spent.delta,
                spent.accountant,
                spent.noise_multiplier,
            )
        logger.info(
            "published %s (content %s…, n=%d)", published.vector_id, published.content_sha256[:12], published.n_train
        )
        summary = published.summary()
        if p.registry.enabled:  # the file as published, not read back from the store
            summary["mlflow_run_id"] = track_hospital_run(published, vector.meta.finetune, training)
    if emit:
        emit_vector_landed(summary)
    return summary
