"""The vector store: where hospitals publish data vectors and the coordinator reads them.

One interface, two backends: a local directory (the embedded default) and S3
through boto3 (any S3-compatible endpoint).  Layout, the same under a local root
or an ``s3://bucket/prefix``::

    bases/<base-sha>.safetensors                          θ_pre, published by the coordinator
    bases/<base-sha>.json                                 its task and class list (the sha256 covers weights only)
    bases/current.json                                    which base hospitals should fine-tune
    vectors/<base-sha>/<hospital>/<vector-id>.safetensors  a data vector
    vectors/<base-sha>/<hospital>/<vector-id>.json         its sidecar (metadata, content sha256, size)
    models/<base-sha>/<merge-id>.safetensors              a merged model (θ with restored BN)
    models/<base-sha>/latest.json                         the newest merged model (for hospitals' moment sums)
    merges/<base-sha>/<merge-id>.json                     its record (inputs, method, λ, every input's scores)
    merges/<base-sha>/<merge-id>.moments.safetensors      the BN moment sums it used
    merges/<base-sha>/latest.json                         the newest merge record
    starts/<base-sha>/index.json, v<n>.safetensors        the champion start points (asynchronous refinement)
    starts/<base-sha>/v<n>.ema.safetensors                the EMA champion at version n (refine.ema)
    merges/<base-sha>/server/v<n>.safetensors             the server optimizer's state at version n
    reports/<hospital>/<base-sha>/<merge-id>.json         what one hospital may see of a merge with its vectors
    requests/<request-id>.json                            an evaluation request (the candidates, by key and sha256)
    candidates/<request-id>/<name>.safetensors            a candidate's weights
    answers/<request-id>/<hospital>.json                  a hospital's answer, signed with its own key
    quarantine/<hospital>/<name>                          a rejected file and <stem>.reason.json

Who may read and write what (``medvec coordinator add-hospital`` scopes a hospital's store identity to it):
a hospital reads ``bases/``, ``starts/``, ``models/``, ``requests/``, ``candidates/`` and its own ``vectors/*/<hospital>/``,
``reports/<hospital>/`` and ``quarantine/<hospital>/``, and writes only its own ``vectors/*/<hospital>/`` and
``answers/*/<hospital>.json``
(and, on S3, the temporary keys ``tmp/vectors/*/<hospital>/``); ``merges/`` (every input's scores and
the moment sums) is the coordinator's alone.  Merged weights written before ``models/`` existed stay
where their record's ``weights_key`` says.

Publishing is atomic: a vector is written under a temporary name (a temporary
key on S3) and committed by rename (copy), and its sidecar — which makes it
visible to listings — is written last.  A reader never sees a partial vector.
A vector that fails validation is moved to ``quarantine/`` with its reason;
nothing sent is ever silently dropped.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from medvec.answers import CandidateRef, EvalRequest
from medvec.batchnorm import MomentSums
from medvec.errors import Refusal, UserError
from medvec.faults import failpoint
from medvec.keys import DocumentSigner, DocumentVerifier, unwrap
from medvec.models import Base, load_base, save_base
from medvec.record import MergeRecord, ModelPointer, Rejection, StartPoint
from medvec.timing import utcnow
from medvec.vectors.checks import load_vector
from medvec.vectors.file import VectorFile
from medvec.vectors.format import LARGE_WRITE, write_large
from medvec.vectors.signing import sign_file
from medvec.vectors.vector import DataVector


class UnknownRequest(Refusal, LookupError):
    """An evaluation request id the store does not hold (a hospital answers only what the coordinator published)."""


class StoreError(UserError, RuntimeError):
    """A store that cannot be reached, read or written; the message says which and why."""


# the JSON the coordinator publishes (signed with a key)
COORDINATOR_DOCUMENTS = ("bases/", "starts/", "merges/", "models/", "reports/", "requests/")


class VectorStore:
    """Shared logic over a few blob primitives that each backend implements.

    ``signer``: the coordinator's key; every document it writes under :data:`COORDINATOR_DOCUMENTS` goes out
    signed.  ``verifier``: the coordinator's pinned public key; every such document read must be signed by it
    (:class:`~medvec.keys.UntrustedDocument` otherwise).  Both None: documents are read and written as they are.
    """

    url: str
    signer: DocumentSigner | None = None
    verifier: DocumentVerifier | None = None

    def trusting(self, signer: DocumentSigner | None = None, verifier: DocumentVerifier | None = None) -> VectorStore:
        """This store, signing what it publishes with ``signer`` and trusting only what ``verifier`` verifies."""
        self.signer, self.verifier = signer, verifier
        return self

    # ------------------------------------------------------------ primitives
    def _write_file(self, key: str, src: Path) -> None:  # atomic
        raise NotImplementedError

    def _write_bytes(self, key: str, data: bytes) -> None:  # atomic
        raise NotImplementedError

    def _read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def local_file(self, key: str) -> Path:
        """A local path holding the object's bytes (a cached download for S3)."""
        raise NotImplementedError

    def _list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def _exists(self, key: str) -> bool:
        raise NotImplementedError

    def _move(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def read_json(self, key: str) -> Any:
        """The JSON document at ``key``; None when there is no such object.  A coordinator's document is checked
        against the pinned key when the store has one, and comes back without its signature."""
        if not self._exists(key):
            return None
        stored = json.loads(self._read_bytes(key))
        if self.verifier is not None and key.startswith(COORDINATOR_DOCUMENTS):
            return self.verifier.open(key, stored)
        return unwrap(stored)

    def write_json(self, key: str, doc: dict | list) -> None:
        """Write a JSON document atomically; a coordinator's document is signed when the store has a signer."""
        if self.signer is not None and key.startswith(COORDINATOR_DOCUMENTS):
            doc = self.signer.sign(key, doc)
        self._write_bytes(key, json.dumps(doc, indent=2, default=str).encode())

    # ------------------------------------------------------------ bases
    def put_base(self, base: Base, current: bool = True) -> str:
        """Publish θ_pre (idempotent) and, by default, make it the current base."""
        key = f"bases/{base.sha256}.safetensors"
        labels = {"task": base.task, "classes": base.classes}
        known = self.read_json(f"bases/{base.sha256}.json")
        if known is not None and known != labels:  # the sha256 covers the weights, not the label space
            raise StoreError(
                f"{self.url}: base {base.sha256[:12]}… is already published as a {known['task']} model with classes "
                f"{known['classes']}; publish a base with another head (model.seed) for {base.task} {base.classes}"
            )
        if not self._exists(key):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "base.safetensors"
                save_base(base, path)
                self._write_file(key, path)
        if known is None:
            self.write_json(f"bases/{base.sha256}.json", labels)
        if current:
            self.write_json(
                "bases/current.json",
                {
                    "sha256": base.sha256,
                    "spec": base.spec.to_dict(),
                    "num_classes": base.num_classes,
                    "published_at": utcnow(),
                },
            )
        return key

    def current_labels(self) -> dict | None:
        """The current base's task and class list (``{"task", "classes"}``), without its weights; None if unknown."""
        doc = self.read_json("bases/current.json")
        return self.read_json(f"bases/{doc['sha256']}.json") if doc else None

    def current_base(self) -> str:
        """The sha256 of the current base (``bases/current.json``); StoreError when none is published."""
        doc = self.read_json("bases/current.json")
        if not doc:
            raise StoreError(f"{self.url}: no current base model (run `medvec coordinator up` first)")
        return doc["sha256"]

    def bases(self) -> list[str]:
        """The sha256 of every base published to this store."""
        names = (k.rsplit("/", 1)[-1] for k in self._list("bases/"))
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and n != "current.json")

    def get_base(self, sha256: str) -> Base:
        """θ_pre ``sha256``, hash-checked, with the task and class list of its ``bases/<sha>.json``; StoreError when the
        store does not hold it."""
        key = f"bases/{sha256}.safetensors"
        if not self._exists(key):
            raise StoreError(f"{self.url}: no base model {sha256[:12]}…")
        base = load_base(self.local_file(key), expected_sha256=sha256)
        labels = self.read_json(f"bases/{sha256}.json")  # authoritative: it also covers bases published before it
        if labels:
            base.task, base.classes = labels["task"], labels["classes"]
        return base

    # ------------------------------------------------------------ vectors
    @staticmethod
    def vector_key(base_sha256: str, hospital: str, vector_id: str) -> str:
        """Where a hospital's vector lives: ``vectors/<base>/<hospital>/<id>.safetensors``."""
        return f"vectors/{base_sha256}/{hospital}/{vector_id}.safetensors"

    @staticmethod
    def sidecar_key(key: str) -> str:
        """The key of a vector's sidecar: its ``.safetensors`` key with ``.json`` instead."""
        return key[: -len(".safetensors")] + ".json"

    def put(self, vector: DataVector, key_file: str | Path | None = None, keep: Path | None = None) -> str:
        """Publish a vector atomically (signed first with ``key_file`` when given); returns its key.

        ``keep``: leave the file as published (signed) there too, so the publisher need not read it back.
        """
        if not vector.has_meta:
            raise ValueError("only vectors with metadata can be published")
        meta = vector.meta
        key = self.vector_key(meta.base_sha256, meta.hospital, meta.vector_id)
        if self._exists(key):
            raise StoreError(f"vector id {meta.vector_id} already exists in {self.url}")
        with tempfile.TemporaryDirectory() as tmp:
            path = vector.save(keep or Path(tmp) / "v.safetensors")
            if key_file is not None:
                sign_file(path, key_file, meta.hospital)
            size = path.stat().st_size
            self._write_file(key, path)
        side = {
            "meta": meta.model_dump(),
            "content_sha256": vector.content_sha256,
            "size": size,
            "published_at": utcnow(),
        }
        self.write_json(self.sidecar_key(key), side)
        return key

    def scan(self, base_sha: str | None = None) -> tuple[list[dict], list[tuple[str, str, str]]]:
        """Published vectors' sidecars (optionally for one base), oldest first, and the unreadable ones.

        Reads only: unreadable sidecars come back as (vector key, hospital folder, problem)
        for intake to quarantine.
        """
        prefix = f"vectors/{base_sha}/" if base_sha else "vectors/"
        return self._scan(self._list(prefix))

    def own_sidecars(self, hospital: str) -> list[dict]:
        """One hospital's readable sidecars under every base, listing only its own folders (all that a
        hospital's store identity may list)."""
        return self._scan([k for b in self.bases() for k in self._list(f"vectors/{b}/{hospital}/")])[0]

    def _scan(self, keys: list[str]) -> tuple[list[dict], list[tuple[str, str, str]]]:
        out, unreadable = [], []
        for key in keys:
            if not key.endswith(".json"):
                continue
            target = key[: -len(".json")] + ".safetensors"
            if key.count("/") != 3:  # vectors/<base>/<hospital>/<file>: nothing deeper is a hospital's vector
                unreadable.append((target, key.split("/")[2], f"not a vector key: {key}"))
                continue
            try:
                doc = json.loads(self._read_bytes(key))
                doc["meta"]["created_at"], doc["meta"]["vector_id"], doc["meta"]["hospital"]
            except (ValueError, KeyError, TypeError) as exc:
                unreadable.append((target, key.split("/")[-2], f"unreadable sidecar {key} ({exc.__class__.__name__})"))
                continue
            doc["key"] = target
            out.append(doc)
        return sorted(out, key=lambda d: (d["meta"]["created_at"], d["meta"]["vector_id"])), unreadable

    def sidecars(self, base_sha: str | None = None) -> list[dict]:
        """Every readable published vector's sidecar (optionally for one base), oldest first."""
        return self.scan(base_sha)[0]

    def latest(self, base_sha256: str) -> dict[str, list[dict]]:
        """Every hospital's sidecars for ``base_sha256``, newest first (reads only; intake decides)."""
        by_hospital: dict[str, list[dict]] = {}
        for side in reversed(self.sidecars(base_sha256)):
            by_hospital.setdefault(side["meta"]["hospital"], []).append(side)
        return dict(sorted(by_hospital.items()))

    def open_vector(self, key: str, base: dict | None = None, base_sha256: str | None = None) -> VectorFile:
        """The vector at ``key``, validated (:func:`~medvec.vectors.checks.load_vector`; against ``base`` if given)."""
        return load_vector(self.local_file(key), base=base, base_sha256=base_sha256)

    def get(self, vector_id: str, base: dict | None = None, base_sha256: str | None = None) -> VectorFile:
        """The vector ``vector_id`` (under any base), validated; StoreError when no readable sidecar names it."""
        for side in self.sidecars():
            if side["meta"]["vector_id"] == vector_id:
                return self.open_vector(side["key"], base, base_sha256)
        raise StoreError(f"{self.url}: no vector {vector_id}")

    def quarantine(
        self, key: str, check: str, problem: str, hospital: str = "unknown", stem: str | None = None
    ) -> Rejection:
        """Move a rejected object (and its sidecar) under ``quarantine/`` with a JSON reason (``stem``: the name
        it is kept under, default its own)."""
        name = key.rsplit("/", 1)[-1]
        if stem is not None:
            name = stem + "." + name.rsplit(".", 1)[-1]
        stem = name.rsplit(".", 1)[0]
        target = f"quarantine/{hospital}/{name}"
        if self._exists(key):
            self._move(key, target)
        side = key.rsplit(".", 1)[0] + ".json"
        if side != key and self._exists(side):
            self._move(side, f"quarantine/{hospital}/{stem}.sidecar.json")
        reason = Rejection(check=check, problem=problem, hospital_claimed=hospital, time=utcnow(), object=target)
        self.write_json(f"quarantine/{hospital}/{stem}.reason.json", reason.to_json())
        return reason

    def quarantined(self, hospital: str | None = None) -> list[Rejection]:
        """Every rejection recorded under ``quarantine/`` (or only in ``hospital``'s folder)."""
        keys = [
            k
            for k in self._list(f"quarantine/{hospital}/" if hospital else "quarantine/")
            if k.endswith(".reason.json")
        ]
        return [Rejection.model_validate(json.loads(self._read_bytes(k))) for k in keys]

    # ------------------------------------------------------------ start points
    def start_points(self, root: str) -> list[StartPoint]:
        """Version 0 (θ_pre) and every promoted champion for the base ``root``, oldest first."""
        doc = self.read_json(f"starts/{root}/index.json") or []
        return [StartPoint(version=0, sha256=root, promoted_at=""), *(StartPoint.model_validate(d) for d in doc)]

    def champion(self, root: str) -> StartPoint:
        """The current champion start point (version 0, θ_pre, until a step is promoted)."""
        return self.start_points(root)[-1]

    def put_start(self, root: str, model: Base, merge_id: str, val: dict[str, float]) -> StartPoint:
        """Promote ``model`` to the next start point: its weights first, then the index that names it.

        Promoting the same merge again (a retried write) returns the point it already became.
        """
        points = self.start_points(root)
        parent = points[-1]
        if parent.merge_id == merge_id:
            return parent
        point = StartPoint(
            version=parent.version + 1,
            sha256=model.sha256,
            merge_id=merge_id,
            parent_version=parent.version,
            promoted_at=utcnow(),
            val=val,
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "start.safetensors"
            save_base(model, path)
            self._write_file(f"starts/{root}/v{point.version}.safetensors", path)
        self.write_json(f"starts/{root}/index.json", [p.to_json() for p in points[1:]] + [point.to_json()])
        return point

    def get_start(self, root: str, version: int) -> Base:
        """The weights of start point ``version`` (0: θ_pre), hash-checked."""
        if version == 0:
            return self.get_base(root)
        points = {p.version: p for p in self.start_points(root)}
        if version not in points:
            raise StoreError(f"{self.url}: no start point v{version} for base {root[:12]}…")
        key = f"starts/{root}/v{version}.safetensors"
        return load_base(self.local_file(key), expected_sha256=points[version].sha256)

    @staticmethod
    def chain_state_key(root: str, version: int, kind: str) -> str:
        """``ema``: the champion hospitals use, beside its start point; ``server``: the server optimizer's state,
        under ``merges/`` (the coordinator's alone: Adam's second moments are not the hospitals' to read)."""
        if kind == "ema":
            return f"starts/{root}/v{version}.ema.safetensors"
        if kind == "server":
            return f"merges/{root}/server/v{version}.safetensors"
        raise ValueError(f"unknown chain state {kind!r}: valid are ema, server")

    def put_chain_state(self, root: str, version: int, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store what start point ``version`` carries beyond its weights (:meth:`chain_state_key`)."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.safetensors"
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
            self._write_file(self.chain_state_key(root, version, kind), path)

    def get_chain_state(self, root: str, version: int, kind: str) -> dict[str, torch.Tensor] | None:
        """The state stored with start point ``version``; None when it has none (version 0, or the option was off)."""
        from safetensors.torch import load_file

        key = self.chain_state_key(root, version, kind)
        return load_file(str(self.local_file(key))) if version > 0 and self._exists(key) else None

    # ------------------------------------------------------------ merges
    @staticmethod
    def merge_key(base_sha256: str, merge_id: str, suffix: str = ".json") -> str:
        """``merges/<base>/<merge-id><suffix>``: the record, or ``.moments.safetensors``."""
        return f"merges/{base_sha256}/{merge_id}{suffix}"

    @staticmethod
    def model_key(base_sha256: str, merge_id: str) -> str:
        """``models/<base>/<merge-id>.safetensors``: a merge's weights, readable by hospitals."""
        return f"models/{base_sha256}/{merge_id}.safetensors"

    def put_merge(
        self,
        record: MergeRecord,
        weights: Path | None = None,
        moments: MomentSums | None = None,
        latest: bool = True,
    ) -> MergeRecord:
        """Store a merge: weights and BN moment sums first, then the record; ``latest.json`` moves last.

        Returns the record with ``weights_key`` and ``moments_key`` filled in.
        """
        base, merge_id = record.base_sha256, record.merge_id
        update: dict = {}
        if weights is not None:
            update["weights_key"] = self.model_key(base, merge_id)
            self._write_file(update["weights_key"], weights)
        if moments is not None:
            update["moments_key"] = self.merge_key(base, merge_id, ".moments.safetensors")
            with tempfile.TemporaryDirectory() as tmp:
                self._write_file(update["moments_key"], moments.save(Path(tmp) / "moments.safetensors"))
        record = record.model_copy(update=update)
        self.write_json(self.merge_key(base, merge_id), record.to_json())
        if latest:
            if record.weights_key is not None:  # the hospitals' pointer first: merges/ is not theirs to read
                self.write_json(f"models/{base}/latest.json", ModelPointer.of(record).to_json())
            self.write_json(self.merge_key(base, "latest"), record.to_json())
        return record

    def put_merged_model(self, record: MergeRecord, model: Base, moments: MomentSums | None) -> MergeRecord:
        """Store a merge with its model's weights and BN moment sums; ``latest.json`` is left for later."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "merged.safetensors"
            save_base(model, path)
            return self.put_merge(record, path, moments, latest=False)

    def latest_merge(self, base_sha256: str) -> MergeRecord | None:
        """The newest merge record for ``base_sha256`` (``latest.json``); None before the first merge."""
        doc = self.read_json(self.merge_key(base_sha256, "latest"))
        return MergeRecord.model_validate(doc) if doc else None

    def latest_model(self, base_sha256: str) -> ModelPointer | None:
        """The newest merged model for ``base_sha256`` as hospitals see it (``models/<base>/latest.json``)."""
        doc = self.read_json(f"models/{base_sha256}/latest.json")
        return ModelPointer.model_validate(doc) if doc else None

    def pointed_model(self, pointer: ModelPointer) -> Base:
        """The merged model a pointer names, its sha256 checked."""
        return load_base(self.local_file(pointer.weights_key), expected_sha256=pointer.merged_sha256)

    def merges(self, base_sha256: str) -> list[MergeRecord]:
        """Every merge record for ``base_sha256``, oldest first (by ``finished_at``)."""
        keys = [
            k for k in self._list(f"merges/{base_sha256}/") if k.endswith(".json") and not k.endswith("latest.json")
        ]
        records = (MergeRecord.model_validate(self.read_json(k)) for k in keys)
        return sorted(records, key=lambda r: r.finished_at)

    # ------------------------------------------------------------ per-hospital reports
    @staticmethod
    def report_key(hospital: str, base_sha256: str, merge_id: str) -> str:
        """``reports/<hospital>/<base>/<merge-id>.json``: what ``hospital`` may see of one merge."""
        return f"reports/{hospital}/{base_sha256}/{merge_id}.json"

    def put_report(self, hospital: str, base_sha256: str, merge_id: str, entry: dict) -> None:
        """Publish one hospital's view of one merge (signed, as the coordinator's documents are)."""
        self.write_json(self.report_key(hospital, base_sha256, merge_id), entry)

    def reports(self, hospital: str) -> list[dict]:
        """Every merge view published for ``hospital``."""
        return [self.read_json(k) for k in self._list(f"reports/{hospital}/") if k.endswith(".json")]

    # ------------------------------------------------------------ evaluation at the hospitals
    @staticmethod
    def answer_key(request_id: str, hospital: str) -> str:
        """``answers/<request-id>/<hospital>.json``: one hospital's signed answer."""
        return f"answers/{request_id}/{hospital}.json"

    def put_request(
        self, base_sha256: str, candidates: dict[str, Base], min_count: int = 5, bins: int = 10000
    ) -> EvalRequest:
        """Publish the candidates' weights, then the (signed) request that names them by sha256."""
        request = EvalRequest(base_sha256=base_sha256, candidates={}, min_count=min_count, bins=bins)
        refs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, model in candidates.items():
                key = f"candidates/{request.request_id}/{name}.safetensors"
                path = Path(tmp) / f"{name}.safetensors"
                save_base(model, path)
                self._write_file(key, path)
                refs[name] = CandidateRef(key=key, sha256=model.sha256)
        request = request.model_copy(update={"candidates": refs})
        self.write_json(f"requests/{request.request_id}.json", request.to_json())
        return request

    def get_request(self, request_id: str) -> EvalRequest:
        """The request ``request_id``, its signature checked when the store pins the coordinator's key."""
        doc = self.read_json(f"requests/{request_id}.json")
        if doc is None:
            raise UnknownRequest(f"{self.url}: no evaluation request {request_id}")
        return EvalRequest.model_validate(doc)

    def candidate(self, request: EvalRequest, name: str) -> Base:
        """A candidate's weights, their sha256 checked against the request."""
        ref = request.candidates[name]
        return load_base(self.local_file(ref.key), expected_sha256=ref.sha256)

    def put_answer(self, request_id: str, hospital: str, envelope: dict) -> str:
        """Store a hospital's signed answer; its key."""
        key = self.answer_key(request_id, hospital)
        self._write_bytes(key, json.dumps(envelope, indent=2).encode())
        return key

    def answer_envelopes(self, request_id: str) -> dict[str, Any]:
        """Every answer stored for ``request_id``, as stored (signed envelopes), by the hospital its key names."""
        keys = [k for k in self._list(f"answers/{request_id}/") if k.endswith(".json")]
        return {k.rsplit("/", 1)[-1][: -len(".json")]: json.loads(self._read_bytes(k)) for k in keys}

    def answered(self, request_id: str) -> list[str]:
        """The hospitals whose answers to ``request_id`` are stored (read by key, not opened)."""
        keys = [k for k in self._list(f"answers/{request_id}/") if k.endswith(".json")]
        return sorted(k.rsplit("/", 1)[-1][: -len(".json")] for k in keys)

    def quarantine_answer(self, request_id: str, hospital: str, check: str, problem: str) -> Rejection:
        """Move a rejected answer to ``quarantine/<hospital>/answer-<request-id>.json`` with its reason."""
        key = self.answer_key(request_id, hospital)
        return self.quarantine(key, check, problem, hospital, f"answer-{request_id}")

    def merge_weights(self, record: MergeRecord) -> Path:
        """A local file holding a merge's stored weights (θ with restored BN)."""
        if not record.weights_key or not self._exists(record.weights_key):
            raise StoreError(f"{self.url}: no stored weights for merge {record.merge_id}")
        return self.local_file(record.weights_key)

    def merged_model(self, record: MergeRecord) -> Base:
        """A merge's stored model (θ with restored BN), its sha256 checked against the record."""
        return load_base(self.merge_weights(record), expected_sha256=record.merged_sha256)

    def get_moments(self, key: str) -> MomentSums:
        """The BN moment sums stored with a merge."""
        if not self._exists(key):
            raise StoreError(f"{self.url}: no moment sums {key}")
        return MomentSums.load(self.local_file(key))


class LocalStore(VectorStore):
    """A vector store in a local directory (the embedded default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _commit(self, key: str, fill) -> None:
        """Write through ``fill(tmp)`` to a hidden temporary file, then rename it into place."""
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        fill(tmp)
        failpoint("store-before-commit")
        os.replace(tmp, dst)

    def _write_file(self, key: str, src: Path) -> None:
        self._commit(key, lambda tmp: write_large(tmp, Path(src)))

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._commit(key, lambda tmp: tmp.write_bytes(data))

    def _read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def local_file(self, key: str) -> Path:
        """The object's own file under the root (no copy is made)."""
        return self._path(key)

    def _list(self, prefix: str) -> list[str]:
        top = self._path(prefix)
        if not top.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in top.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), target)


class S3Store(VectorStore):
    """A vector store under ``s3://bucket/prefix`` through boto3.

    ``endpoint_url`` selects any S3-compatible server (also read from
    ``AWS_ENDPOINT_URL``); credentials come from boto3's usual chain.  Transient
    errors are retried with exponential back-off (``retries`` attempts in all), then a
    :class:`StoreError` says what failed.
    """

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        retries: int = 4,
        connect_timeout: float = 3.0,
        cache_dir: str | Path | None = None,
        client=None,
    ):
        import boto3
        from botocore.config import Config

        rest = url[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise StoreError(f"{url}: no bucket in the S3 URL")
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        # the URL round-trips through open_store (flows pass it on), endpoint included
        self.url = f"{url}?endpoint_url={self.endpoint_url}" if endpoint_url else url
        # a fresh session per store: boto3's default session caches the first credentials it saw
        self.client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(
                retries={"total_max_attempts": retries, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=30,
            ),
        )
        self.cache = (
            Path(cache_dir or Path(tempfile.gettempdir()) / "medvec-s3-cache") / self.bucket / (self.prefix or "_")
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise StoreError(
                    f"S3 {self.endpoint_url or 'AWS'} rejected the credentials ({code}) while trying to {what} in {self.url}"
                ) from exc
            raise StoreError(f"S3 error {code} while trying to {what} in {self.url}: {exc}") from exc
        except EndpointConnectionError as exc:
            raise StoreError(
                f"cannot reach S3 endpoint {self.endpoint_url or 'AWS'} to {what} (gave up after retries): {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 failure while trying to {what} in {self.url}: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Check the endpoint, the credentials and the bucket (created when missing)."""
        from botocore.exceptions import ClientError

        try:  # an authenticated read (some servers answer HEAD bucket anonymously) that a hospital may make
            listing = {"Bucket": self.bucket, "Prefix": self._key("bases/"), "MaxKeys": 1}
            self._call("list the bucket", self.client.list_objects_v2, **listing)
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
                "404",
                "NoSuchBucket",
                "NotFound",
            ):
                self._call("create the bucket", self.client.create_bucket, Bucket=self.bucket)
            else:
                raise

    def _write_file(self, key: str, src: Path) -> None:
        # temporary key, then commit by server-side copy: a reader never sees a partial object
        # under the destination's own folder, so an identity scoped to its folder may write it
        tmp = self._key(f"tmp/{key.rsplit('/', 1)[0]}/{uuid.uuid4().hex}")
        self._call(f"upload {key}", self.client.upload_file, str(src), self.bucket, tmp)
        failpoint("store-before-commit")
        self._call(
            f"commit {key}",
            self.client.copy_object,
            Bucket=self.bucket,
            Key=self._key(key),
            CopySource={"Bucket": self.bucket, "Key": tmp},
        )
        self._call(f"clean up {tmp}", self.client.delete_object, Bucket=self.bucket, Key=tmp)

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._call(f"write {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def _read_bytes(self, key: str) -> bytes:
        resp = self._call(f"read {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return resp["Body"].read()

    def local_file(self, key: str) -> Path:
        """Download the object into the local cache (again at every call, over any earlier copy); returns its path."""
        from boto3.s3.transfer import TransferConfig

        dst = self.cache / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.part")
        # whole-part writes, so that the page cache holds the file as large folios (see write_large), from the
        # classic client (the CRT one ignores io_chunksize); at most 8 parts wait for the disk, besides the
        # parts the download threads hold (about 144 MiB in all at worst)
        config = TransferConfig(
            io_chunksize=LARGE_WRITE,
            multipart_chunksize=LARGE_WRITE,
            max_io_queue=8,
            preferred_transfer_client="classic",
        )
        self._call(f"download {key}", self.client.download_file, self.bucket, self._key(key), str(tmp), Config=config)
        os.replace(tmp, dst)
        return dst

    def _list(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix)
        keys: list[str] = []

        def run() -> None:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"][len(self.prefix) + 1 :] if self.prefix else obj["Key"])

        self._call(f"list {prefix}", run)
        return sorted(k for k in keys if not k.startswith("tmp/"))

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return bool(self._call(f"check {key}", head))

    def _move(self, src: str, dst: str) -> None:
        self._call(
            f"move {src}",
            self.client.copy_object,
            Bucket=self.bucket,
            Key=self._key(dst),
            CopySource={"Bucket": self.bucket, "Key": self._key(src)},
        )
        self._call(f"move {src}", self.client.delete_object, Bucket=self.bucket, Key=self._key(src))


def current_labels(url: str | Path, verifier: DocumentVerifier | None = None) -> dict | None:
    """The current base's task and class list at ``url`` (signed by ``verifier``'s key, when given), creating
    nothing (None where no store or base is)."""
    if not str(url).startswith("s3://") and not Path(url).is_dir():
        return None
    return open_store(url).trusting(verifier=verifier).current_labels()


def open_store(url: str | Path, endpoint_url: str | None = None) -> VectorStore:
    """Open a store by URL: ``s3://bucket/prefix[?endpoint_url=http://host:port]`` or a local path.

    The S3 endpoint comes from the URL's ``endpoint_url`` query, the argument, or
    ``AWS_ENDPOINT_URL``; credentials from boto3's usual chain (``AWS_ACCESS_KEY_ID``…).
    """
    url = str(url)
    if url.startswith("s3://"):
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(url)
        query = parse_qs(parts.query)
        endpoint_url = query["endpoint_url"][0] if query.get("endpoint_url") else endpoint_url
        store = S3Store(f"s3://{parts.netloc}{parts.path}", endpoint_url=endpoint_url)
        store.ensure_bucket()
        return store
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalStore(url)


def vector_rows(store: VectorStore, include_quarantined: bool = False) -> list[dict]:
    """Rows for ``medvec vectors list``."""
    rows = []
    sidecars, unreadable = store.scan()
    for side in sidecars:
        m = side["meta"]
        rows.append(
            {
                "status": "landed",
                "vector_id": m["vector_id"],
                "hospital": m["hospital"],
                "base": m["base_sha256"][:12],
                "n_train": m["n_train"],
                "content": side["content_sha256"][:12],
                "created_at": m["created_at"],
            }
        )
    for key, hospital, problem in unreadable:
        rows.append(
            {"status": "unreadable", "vector_id": key.rsplit("/", 1)[-1], "hospital": hospital, "reason": problem}
        )
    if include_quarantined:
        for q in store.quarantined():
            rows.append(
                {
                    "status": f"quarantined: {q.check}",
                    "vector_id": q.object.rsplit("/", 1)[-1],
                    "hospital": q.hospital_claimed,
                    "created_at": q.time,
                    "reason": q.problem,
                }
            )
    return rows
