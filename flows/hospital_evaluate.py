"""``hospital-evaluate``: a hospital's answer to the coordinator's evaluation request (issue 25).

Its worker runs it with the site's pinned parameters and one from the server, the request's id. The flow reads
the request through the store, so a hospital that pinned the coordinator's key refuses one the coordinator did
not sign before it loads anything; it checks each candidate's weights against the sha256 the request names,
scores the candidates on the hospital's local validation split and publishes an answer of aggregates only
(:mod:`medvec.answers`), signed with the hospital's key.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.names import EVALUATE_FLOW
from medvec.config import Params
from medvec.errors import UserError
from medvec.keys import pinned_key
from medvec.runtime import set_threads
from medvec.store import open_store
from tasks.hospital import answer_evaluation, load_local_data


@flow(name=EVALUATE_FLOW, log_prints=True)
def hospital_evaluate(
    hospital: str,
    data_dir: str,
    store_url: str,
    request: str,
    params: Params | None = None,
    key_file: str | None = None,
    progress: bool = False,
) -> dict:
    """Answer evaluation request ``request`` with ``hospital``'s local validation split; the answer's store key."""
    p = params or Params()
    if not key_file:
        raise UserError(f"{hospital} has no signing key: answers are signed (medvec hospital keygen, join --key)")
    set_threads(p.finetune.threads)
    store = open_store(store_url).trusting(verifier=pinned_key(p.hospital.coordinator_key))
    data = load_local_data(data_dir, p)
    if data.val is None or not len(data.val):
        raise UserError(f"{hospital} has no local validation split to answer request {request} with")
    key = answer_evaluation(store, request, hospital, data, key_file, p.evaluate.batch_size)
    get_run_logger().info("answered %s with %d validation images: %s", request, len(data.val or ()), key)
    return {"hospital": hospital, "request": request, "answer": key}
