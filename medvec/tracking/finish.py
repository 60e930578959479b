"""The one way a merge is finished, whoever made it: the merge flow (one-shot merges and asynchronous steps),
the demo and its simulation, and the DVC ``merge`` stage all call :func:`finish_merge`."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from medvec.config import ConfigError, Params
from medvec.coordinator.defence import Scaled
from medvec.coordinator.engine import MergeOutcome, MomentsFn
from medvec.coordinator.hospital_report import merge_entries
from medvec.coordinator.intake import Admission, landed_at, quarantine_harmful, quarantine_voted, screened_out
from medvec.coordinator.refine import (
    ChainState,
    Step,
    compute_step,
    step_ready,
    step_record,
    step_verdict,
    vote_on_inputs,
)
from medvec.coordinator.scoring import EvalSets
from medvec.coordinator.server_opt import ema_update
from medvec.data.images import ImageSet
from medvec.models import Base
from medvec.record import MergeRecord
from medvec.retry import SERVICE_DELAYS, retry
from medvec.store import VectorStore
from medvec.timing import Started
from medvec.tracking.dvc import record_merge
from medvec.vectors.file import VectorFile
from medvec.vectors.signing import Keyring
from medvec.vectors.vector import VectorLike


def finish_merge(
    store: VectorStore,
    record: MergeRecord,
    outcome: MergeOutcome,
    root: Base,
    vectors: Sequence[VectorLike],
    evalsets: EvalSets,
    plots: dict[str, Path] | None = None,
    promoted: tuple[bool, str] | None = None,
) -> MergeRecord:
    """Store, version, register and publish a computed merge, in this order, and return its final record:

    1. the merged weights and the BN moment sums used, then the record (its vectors now count as consumed,
       so a vector is never applied twice, even if a later step fails; with ``refine.carry`` an unpromoted
       step's count only once the champion has moved past its parent, :func:`~medvec.coordinator.intake.consumed`);
    2. an asynchronous step whose gate ``promoted`` it becomes the next start point (``record.version``);
    3. with ``registry.dvc_repo``: one commit of the input vectors in the git+DVC registry;
    4. with ``registry.enabled``: the MLflow run and model version, through the champion gate (an
       asynchronous step's own verdict, ``promoted``, is its gate), with ``plots`` or else the merge's own;
    5. each contributing hospital's view of the merge (``reports/<hospital>/``, what ``medvec hospital
       report`` reads: ``merges/`` is the coordinator's alone);
    6. the record again, with what 3 and 4 added, and ``latest.json`` moves: last, so a crash before here
       leaves the merge to be redone.

    ``root`` is θ_pre, the base the merge's vectors were made against.  Each step retries on its own
    (:mod:`medvec.retry`); retrying the whole would register the merge twice.
    """
    params = record.params
    merged = root.with_model(outcome.model, record.merged_sha256)
    record = retry(lambda: store.put_merged_model(record, merged, outcome.moments), f"store merge {record.merge_id}")
    if promoted is not None and promoted[0]:
        record = _promote(store, record, merged, root, outcome)
    if params.registry.dvc_repo:
        commit = _commit(record, vectors, params)
        record = record.model_copy(update={"dvc_commit": commit})
    if params.registry.enabled:  # an async step's gate is its own verdict, "v3 → v4: …" or "v3 → kept: …"
        decided = (promoted[0], step_verdict(record, promoted[1])) if promoted is not None else None
        decision = _register(store, record, outcome, merged, root, evalsets, plots, decided)
        record = record.model_copy(update={"registry": decision, "evaluation": evalsets.evaluation()})
    final = record
    retry(lambda: publish_views(store, final), f"publish the hospitals' views of {record.merge_id}")
    return retry(lambda: store.put_merge(final), f"publish merge {record.merge_id}")


def publish_views(store: VectorStore, record: MergeRecord) -> None:
    """Write each contributing hospital's view of ``record`` where that hospital may read it."""
    for hospital, entry in merge_entries(record).items():
        store.put_report(hospital, record.base_sha256, record.merge_id, entry)


def _promote(store: VectorStore, record: MergeRecord, merged: Base, root: Base, outcome: MergeOutcome) -> MergeRecord:
    """The next start point (its weights, the server optimizer's state and the EMA champion that go with it, then
    the index that names it); the record, stored again, names it."""
    version = store.champion(root.sha256).version + 1
    r = record.params.refine
    if outcome.server is not None and outcome.server.new_state:
        state = outcome.server.new_state
        retry(lambda: store.put_chain_state(root.sha256, version, "server", state), "store the server state")
    if r.ema is not None:
        ema = ema_update(store.get_chain_state(root.sha256, version - 1, "ema"), merged.model.state_dict(), r.ema)
        retry(lambda: store.put_chain_state(root.sha256, version, "ema", ema), "store the EMA champion")
    point = retry(lambda: store.put_start(root.sha256, merged, record.merge_id, record.val), "promote the step")
    promoted = record.model_copy(update={"version": point.version})
    return retry(lambda: store.put_merge(promoted, latest=False), f"store merge {record.merge_id}")


def _register(
    store: VectorStore,
    record: MergeRecord,
    outcome: MergeOutcome,
    merged: Base,
    root: Base,
    evalsets: EvalSets,
    plots: dict[str, Path] | None,
    decided: tuple[bool, str] | None,
):
    """The MLflow run, model version and gate (MLflow is imported only here, when the registry is on)."""
    from medvec.tracking.registry import merge_plots, register_merge

    with tempfile.TemporaryDirectory() as tmp:
        classes = evalsets.val.classes if evalsets.val is not None else root.classes or []
        shown = plots if plots is not None else merge_plots(record, outcome, classes, Path(tmp))
        return retry(
            lambda: register_merge(record, merged, root, evalsets, store, shown, decided),
            f"register merge {record.merge_id}",
            SERVICE_DELAYS,
        )


def _commit(record: MergeRecord, vectors: Sequence[VectorLike], params: Params) -> str:
    """Commit the merge's input vectors (their files, as intake read them) to the git+DVC registry and push
    (retried); returns the commit."""
    repo, remote = params.registry.dvc_repo, params.registry.dvc_remote
    if not repo or not remote:
        raise ConfigError("registry.dvc_repo is set but registry.dvc_remote is not: the DVC registry needs one")
    files = {v.meta.vector_id: _file(v) for v in vectors}
    push = lambda: record_merge(repo, remote, record, files, params.registry.dvc_endpoint_url)  # noqa: E731
    return retry(push, f"commit merge {record.merge_id} to the DVC registry", SERVICE_DELAYS)


def _file(vector: VectorLike) -> Path:
    """The file a merge input was read from (a vector in memory has none: it cannot be committed)."""
    if isinstance(vector, (VectorFile, Scaled)):
        return vector.path
    raise TypeError(f"vector {vector.meta.vector_id} is not a stored file; only stored vectors go to the DVC registry")


@dataclass
class FinishedStep:
    """An asynchronous step once finished: its final record, what was computed, and the verdict
    (``v3 → v4: …`` or ``v3 → kept: …``)."""

    record: MergeRecord
    step: Step
    verdict: str

    @property
    def promoted(self) -> bool:
        """Whether the step became the new champion start point."""
        return self.step.promoted


def _start_points(
    store: VectorStore, root: Base, admission: Admission, evalsets: EvalSets, known: dict[int, Base]
) -> dict[int, Base]:
    """The start points the admitted vectors name (read only when the hospitals score their own models)."""
    if evalsets.judge is None:
        return known
    for version in {v.meta.start_version for v in admission.admitted} - set(known):
        known[version] = _read_start(store, root, version)
    return known


def _read_start(store: VectorStore, root: Base, version: int) -> Base:
    return retry(lambda: store.get_start(root.sha256, version), f"read start point v{version}")


def finish_step(
    store: VectorStore,
    root: Base,
    admission: Admission,
    params: Params,
    evalsets: EvalSets,
    calibration: ImageSet | None = None,
    moments_fn: MomentsFn | None = None,
    trigger: dict[str, str] | None = None,
    started: Started | None = None,
) -> FinishedStep | None:
    """One asynchronous step as the merge flow runs it: with the hospitals scoring, their below-chance vote on
    each input's own model first (:func:`~medvec.coordinator.refine.vote_on_inputs`); merge the buffer into the
    champion, score and gate it (:func:`~medvec.coordinator.refine.compute_step`), keep the vectors the vote and
    the harmful rule excluded in quarantine, then finish it (:func:`finish_merge`), promoted if it beat the
    champion. None when the vote excluded every input (they are in quarantine, with the reason): no step."""
    started = started or Started.now()
    point = retry(lambda: store.champion(root.sha256), "read the champion")
    champion = _read_start(store, root, point.version)
    starts = _start_points(store, root, admission, evalsets, {point.version: champion})
    admitted, out = vote_on_inputs(champion, admission.admitted, starts, params, evalsets)
    voted = retry(lambda: quarantine_voted(store, out), "quarantine the voted-out vectors") if out else []
    if not admitted:
        return None
    chain = chain_state(store, root, point.version, admitted, params)
    step = compute_step(champion, point, admitted, params, evalsets, calibration, moments_fn, chain)
    harmful = retry(lambda: quarantine_harmful(store, step.excluded), "quarantine the harmful vectors")
    rejected = [*voted, *harmful]
    record = step_record(step, admission, rejected, root.sha256, params, evalsets, store.url, started, trigger)
    record = finish_merge(
        store, record, step.outcome, root, step.vectors, evalsets, promoted=(step.promoted, step.reason)
    )
    return FinishedStep(record, step, step_verdict(record, step.reason))


def chain_state(
    store: VectorStore, root: Base, version: int, admitted: Sequence[VectorLike], params: Params
) -> ChainState:
    """The network's sample counts (:func:`network_counts`) and the server optimizer's state at champion
    ``version``."""
    server = store.get_chain_state(root.sha256, version, "server") if params.refine.server_optimizer != "none" else None
    return ChainState(network_counts(store, root, admitted), server or {})


def network_counts(store: VectorStore, root: Base, admitted: Sequence[VectorLike]) -> dict[str, int]:
    """The newest verified sample count per hospital: the inputs of every recorded merge, then the admitted
    buffer (never a sidecar's unchecked claim)."""
    network: dict[str, int] = {}
    for r in store.merges(root.sha256):  # oldest first
        network |= {i.hospital: i.n_train for i in r.inputs}
    return network | {v.meta.hospital: int(v.meta.n_train) for v in admitted}


def buffer_ready(
    store: VectorStore, root: Base, admission: Admission, params: Params, now: datetime | None = None
) -> tuple[bool, str]:
    """Whether the merge flow steps on this landing (:func:`~medvec.coordinator.refine.step_ready`): the network
    is ``refine.network``, else the hospitals of ``intake.keyring``, else every hospital the coordinator has
    verified a vector from; the wait is wall-clock seconds since the
    oldest buffered vector was first verified (:func:`~medvec.coordinator.intake.landed_at`: the coordinator's clock,
    never a hospital's own ``created_at``). A hospital whose vector the screen quarantined since the champion
    has reported (:func:`~medvec.coordinator.intake.screened_out`)."""
    champion = store.champion(root.sha256)
    if params.intake.keyring:  # the hospitals allowed to publish are the network
        network = set(Keyring.load(params.intake.keyring).keys)
    else:
        network = set(network_counts(store, root, admission.admitted))
    landed = landed_at(store)
    times = [datetime.fromisoformat(landed[v.meta.vector_id]) for v in admission.admitted if v.meta.vector_id in landed]
    now = now or datetime.now(timezone.utc)
    waited = (now - min(times)).total_seconds() if times else 0.0
    screened = partial(screened_out, store, champion.promoted_at)
    return step_ready(admission.admitted, champion.version, params.refine, network, waited, screened)
