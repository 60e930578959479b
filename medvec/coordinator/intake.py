"""Vector intake at the coordinator: every check a vector must pass before a merge.

In order: size limits (before parsing), the safetensors layout, never a pickle,
metadata (size-limited) and values (:func:`medvec.vectors.checks.load_vector`); the
base's hash, keys and shapes; its task and class list (their hash); the store path's hospital equals the metadata's
(a hospital cannot publish into another's folder); with a keyring, a valid
Ed25519 signature by that hospital; and no replay (a vector id or nonce already
seen at another place).  A rejected vector is quarantined with its reason —
never silently dropped.

:func:`admit` is the one intake step before a merge: it lists what landed,
checks every hospital's newest vector (falling back to its next newest when one
fails), screens the survivors for outliers (:mod:`medvec.coordinator.defence`), quarantines
what it rejects and records the replay state.  The store itself only stores.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medvec.config import IntakeConfig, RefineConfig
from medvec.coordinator.defence import screen
from medvec.models import Base
from medvec.record import ContributionScore, Rejection, Screened
from medvec.store import VectorStore
from medvec.timing import utcnow
from medvec.vectors.checks import load_vector
from medvec.vectors.file import VectorFile
from medvec.vectors.format import InvalidVectorError
from medvec.vectors.signing import Keyring, read_header
from medvec.vectors.vector import VectorLike, VectorMeta

SEEN_KEY = "intake/seen.json"


def check_labels(path: Path, meta: VectorMeta, base: Base) -> None:
    """InvalidVectorError (check ``classes``) unless the vector has the base's task and class list."""
    if meta.task != base.task:
        raise InvalidVectorError(path, f"a {meta.task} vector for a {base.task} base", "classes")
    want = base.classes_sha256
    if want is not None and meta.classes_sha256 != want:
        theirs = f"{meta.classes_sha256[:12]}…" if meta.classes_sha256 else "none recorded"
        raise InvalidVectorError(path, f"class list {theirs} differs from the base's {want[:12]}…", "classes")


@dataclass
class Checks:
    """What every vector of one intake is checked against: the settings, the base (and its state, read once),
    the keyring (loaded once) and the replay state (updated as vectors pass)."""

    cfg: IntakeConfig
    base: Base
    state: dict[str, torch.Tensor]
    keyring: Keyring | None
    seen: dict

    @classmethod
    def of(cls, cfg: IntakeConfig, base: Base, seen: dict) -> Checks:
        """The checks for one intake: ``cfg``'s keyring loaded (None without one) and the base's state read once;
        ``seen`` is updated in place."""
        keyring = Keyring.load(cfg.keyring) if cfg.keyring else None
        return cls(cfg, base, base.model.state_dict(), keyring, seen)


@dataclass
class Admission:
    """What intake let through (``admitted``, possibly norm-clipped) and what it refused, with reasons."""

    admitted: list = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    screened: list[Screened] = field(default_factory=list)


def check(store: VectorStore, key: str, checks: Checks) -> VectorFile:
    """Validate one stored vector; raises :class:`InvalidVectorError` (the caller quarantines)."""
    path = store.local_file(key)
    cfg, seen = checks.cfg, checks.seen
    vf = load_vector(
        path,
        base=checks.state,
        base_sha256=checks.base.sha256,
        max_bytes=cfg.max_bytes,
        max_metadata_bytes=cfg.max_metadata_bytes,
    )
    hospital_in_path = key.split("/")[-2] if key.count("/") >= 2 else None
    if hospital_in_path is not None and hospital_in_path != vf.meta.hospital:
        raise InvalidVectorError(
            path, f"published under hospital {hospital_in_path!r} but claims {vf.meta.hospital!r}", "impersonation"
        )
    check_labels(path, vf.meta, checks.base)
    nonce = None
    if checks.keyring is not None:
        nonce = checks.keyring.verify(path, vf.meta, vf.content_sha256, read_header(path))["nonce"]
    first = seen.get("ids", {}).get(vf.meta.vector_id)
    if first is not None and first != key:
        raise InvalidVectorError(path, f"replay: vector id {vf.meta.vector_id} was already seen at {first}", "replay")
    if nonce is not None:
        owner = seen.get("nonces", {}).get(nonce)
        if owner is not None and owner != vf.meta.vector_id:
            raise InvalidVectorError(path, f"replay: signature nonce already used by vector {owner}", "replay")
        seen.setdefault("nonces", {})[nonce] = vf.meta.vector_id
    seen.setdefault("ids", {})[vf.meta.vector_id] = key
    seen.setdefault("landed", {}).setdefault(vf.meta.vector_id, utcnow())  # the coordinator's clock, not the sender's
    return vf


def landed_at(store: VectorStore) -> dict[str, str]:
    """When intake first verified each vector (ISO 8601, the coordinator's clock): the wait ``refine.timeout``
    measures, which a hospital cannot shorten by backdating its own ``created_at``."""
    return dict((store.read_json(SEEN_KEY) or {}).get("landed", {}))


def admit(store: VectorStore, base: Base, cfg: IntakeConfig, refine: RefineConfig | None = None) -> Admission:
    """The intake step: check, screen and quarantine; returns what was admitted and what was rejected.

    One-shot mode admits each hospital's newest valid vector.  Async mode
    (``refine.mode``) admits every valid vector no step has consumed yet, oldest
    first, whose start point is a known version within ``refine.max_staleness``.
    """
    out = Admission()
    seen = store.read_json(SEEN_KEY) or {}
    before = json.dumps(seen, sort_keys=True)
    _, unreadable = store.scan(base.sha256)
    for key, hospital, problem in unreadable:
        out.rejected.append(store.quarantine(key, "sidecar", problem, hospital))
    checks = Checks.of(cfg, base, seen)
    if refine is not None and refine.mode == "async":
        checked = _pending(store, checks, refine, out.rejected)
    else:
        checked = _newest_valid(store, checks, out.rejected)
    if json.dumps(seen, sort_keys=True) != before:
        store.write_json(SEEN_KEY, seen)
    out.admitted, out.screened = _screen(store, checked, cfg, out.rejected)
    return out


def _newest_valid(store: VectorStore, checks: Checks, rejected: list[Rejection]) -> list[VectorFile]:
    """Each hospital's newest vector that passes :func:`check`; the failures are quarantined."""
    chosen = []
    for hospital, sidecars in store.latest(checks.base.sha256).items():
        for side in sidecars:
            try:
                chosen.append(check(store, side["key"], checks))
                break
            except InvalidVectorError as exc:
                rejected.append(store.quarantine(side["key"], exc.check, exc.problem, hospital))
    return chosen


def consumed(store: VectorStore, root: str, carry: bool = False) -> set[str]:
    """Vector ids that an async step (promoted or not) or a promoted first step has already merged: never applied
    twice. With ``carry`` (``refine.carry``), a step the gate did not promote spends its vectors only once the
    champion has moved past the version it started from: until then they wait for the next step."""
    champion = store.champion(root).version if carry else 0
    return {
        i.vector_id
        for r in store.merges(root)
        if r.version is not None or (r.mode == "async" and (not carry or r.parent_version != champion))
        for i in r.inputs
    }


def _pending(store: VectorStore, checks: Checks, refine: RefineConfig, rejected: list[Rejection]) -> list[VectorFile]:
    """Every valid vector not yet consumed by a step, oldest first, started from a live start point."""
    base = checks.base
    points = {p.version: p for p in store.start_points(base.sha256)}
    champion = max(points)
    done = consumed(store, base.sha256, refine.carry)
    out = []
    for side in store.sidecars(base.sha256):
        if side["meta"]["vector_id"] in done:
            continue
        try:
            vf = check(store, side["key"], checks)
            _check_start(vf, points, champion, refine.max_staleness)
            out.append(vf)
        except InvalidVectorError as exc:
            rejected.append(store.quarantine(side["key"], exc.check, exc.problem, side["meta"]["hospital"]))
    return out


def _check_start(vf: VectorFile, points: dict, champion: int, max_staleness: int) -> None:
    """The vector's start point is a known version, with that version's sha256, and not too stale."""
    version = vf.meta.start_version
    if version not in points:
        raise InvalidVectorError(
            vf.path, f"unknown start point v{version}: the store has v0..v{champion}", "start_point"
        )
    if vf.meta.start != points[version].sha256:
        want = points[version].sha256[:12]
        raise InvalidVectorError(
            vf.path, f"start point v{version} is {want}…, the vector names {vf.meta.start[:12]}…", "start_point"
        )
    if champion - version > max_staleness:
        problem = f"stale: started from version {version}, champion is {champion} (max_staleness {max_staleness})"
        raise InvalidVectorError(vf.path, problem, "stale")


def _screen(
    store: VectorStore, vectors: list[VectorFile], cfg: IntakeConfig, rejected: list[Rejection]
) -> tuple[list[VectorLike], list[Screened]]:
    """The norm and direction outlier screen: quarantine (a rejection) or clip (admitted, scaled down)."""
    result = screen(vectors, cfg.defence, cfg.mad_k)
    report = []
    for v, reason in result.flagged:
        meta = v.meta
        if cfg.defence == "quarantine":
            key = store.vector_key(meta.base_sha256, meta.hospital, meta.vector_id)
            rejected.append(store.quarantine(key, "outlier", reason, meta.hospital))
        stats = result.stats.get(meta.vector_id, {})
        scale = result.scales.get(meta.vector_id)
        report.append(
            Screened(
                vector_id=meta.vector_id,
                hospital=meta.hospital,
                action=cfg.defence,
                reason=reason,
                scale=scale,
                **stats,
            )
        )
    return result.kept, report


def screened_out(store: VectorStore, since: str, hospitals: Collection[str]) -> set[str]:
    """Those of ``hospitals`` whose vector the outlier screen quarantined after ``since`` (an ISO time, such as
    the champion's ``promoted_at``; "" for ever): they reported, and their vector will not be merged, so a fresh
    buffer does not wait for another (:func:`~medvec.coordinator.refine.step_ready`). Reads those hospitals'
    quarantine folders only."""
    return {h for h in hospitals if any(r.check == "outlier" and r.time > since for r in store.quarantined(h))}


def quarantine_harmful(store: VectorStore, excluded: Sequence[tuple[VectorLike, ContributionScore]]) -> list[Rejection]:
    """Move the vectors the harmful rule excluded (:func:`~medvec.coordinator.contribution.guarded_merge`) to
    quarantine, each with its reason."""
    out = []
    for v, score in excluded:
        key = store.vector_key(v.meta.base_sha256, v.meta.hospital, v.meta.vector_id)
        out.append(store.quarantine(key, "harmful", score.harmful or "harmful", v.meta.hospital))
    return out


def quarantine_voted(store: VectorStore, excluded: Sequence[tuple[VectorLike, str]]) -> list[Rejection]:
    """Move the vectors the below-chance vote excluded (``intake.vote: exclude``) to quarantine, with the reason."""
    out = []
    for v, reason in excluded:
        key = store.vector_key(v.meta.base_sha256, v.meta.hospital, v.meta.vector_id)
        out.append(store.quarantine(key, "vote", reason, v.meta.hospital))
    return out
