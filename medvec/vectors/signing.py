"""Ed25519 signatures for data vectors, and the coordinator's keyring.

A hospital signs ``medvec-vector-signature/1`` + the vector's content sha256 +
its canonical metadata JSON + a random nonce.  The signature, the nonce and the
signer's name go into the safetensors header (key ``signature``); the tensors and
their content hash are unchanged.  The coordinator verifies against the public
key its keyring holds for the hospital the metadata names, so hospital A cannot
publish as hospital B, and any change to tensors or metadata breaks the
signature.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path
from typing import Any

from medvec.errors import UserError
from medvec.keys import ENVELOPE, document_payload, fingerprint, is_signed, load_private
from medvec.timing import utcnow
from medvec.vectors.checks import load_vector
from medvec.vectors.format import FORMAT, InvalidVectorError, write_safetensors
from medvec.vectors.vector import VectorMeta

DOMAIN = b"medvec-vector-signature/1\n"


class DocumentRejected(UserError, ValueError):
    """A hospital's signed document (an evaluation answer) that does not verify; ``check`` names why."""

    def __init__(self, message: str, check: str):
        super().__init__(message)
        self.check = check


def payload(content_sha256: str, meta_json: str, nonce: str) -> bytes:
    """The bytes a signature covers: the domain tag, the content sha256, the metadata JSON in canonical form
    (sorted keys, no spaces) and the nonce, a line each."""
    meta = json.dumps(json.loads(meta_json), sort_keys=True, separators=(",", ":"))
    return DOMAIN + content_sha256.encode() + b"\n" + meta.encode() + b"\n" + nonce.encode()


def sign_file(
    path: str | Path, key_path: str | Path, signer: str | None = None, passphrase: bytes | None = None
) -> dict:
    """Sign a vector file in place (atomically rewritten); returns the signature block.

    A passphrase-protected key takes ``passphrase``, else ``$MEDVEC_KEY_PASSPHRASE``."""
    from safetensors import safe_open

    path = Path(path)
    vf = load_vector(path)  # validate before signing
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    nonce = secrets.token_hex(16)
    key = load_private(key_path, passphrase)
    sig = key.sign(payload(vf.content_sha256, header["medvec"], nonce))
    block = {
        "alg": "ed25519",
        "signer": signer or vf.meta.hospital,
        "nonce": nonce,
        "sig": base64.b64encode(sig).decode(),
    }
    header["signature"] = json.dumps(block)
    write_safetensors(path, tensors, header)
    return block


class KeyringError(UserError, ValueError):
    """A keyring change that is refused: a hospital's key replaced without ``--replace``, a public key file of
    another hospital, a hospital that is not in the keyring."""


class Keyring:
    """Allowed hospitals and their public keys, and the keys revoked (a JSON file
    ``{"hospitals": {name: base64}, "revoked": [{"hospital", "public_key", "revoked_at", "reason"}]}``)."""

    def __init__(self, keys: dict[str, str] | None = None, revoked: list[dict] | None = None):
        self.keys = dict(keys or {})
        self.revoked = list(revoked or [])

    @classmethod
    def load(cls, path: str | Path, missing_ok: bool = False) -> Keyring:
        """The keyring in the JSON file at ``path``.  A missing file is an error (a wrong ``intake.keyring`` must
        not read as "no hospital allowed"), unless ``missing_ok`` (a keyring being created)."""
        p = Path(path)
        if not p.exists():
            if missing_ok:
                return cls()
            raise KeyringError(f"{path}: no keyring there (create it with medvec keyring add)")
        doc = json.loads(p.read_text())
        return cls(doc.get("hospitals", {}), doc.get("revoked", []))

    def save(self, path: str | Path) -> None:
        """Write the keyring to ``path`` atomically (temporary file, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps({"hospitals": self.keys, "revoked": self.revoked}, indent=2, sort_keys=True))
        os.replace(tmp, p)

    def add(self, name: str, pub_file: str | Path, replace: bool = False) -> str:
        """Allow hospital ``name`` with the key in ``pub_file`` (as :func:`medvec.keys.keygen` writes it); returns its
        fingerprint.  A hospital's other key is replaced only with ``replace``, and is then revoked."""
        doc = json.loads(Path(pub_file).read_text())
        if doc.get("alg") != "ed25519" or "public_key" not in doc:
            raise KeyringError(f"{pub_file}: not an ed25519 public key file")
        if doc.get("hospital") not in (None, name):
            raise KeyringError(f"{pub_file} is hospital {doc['hospital']!r}'s public key, not {name!r}'s")
        key = doc["public_key"]
        if any(r["public_key"] == key for r in self.revoked):
            raise KeyringError(f"{pub_file}: this key ({fingerprint(key)}) was revoked; a revoked key stays revoked")
        old = self.keys.get(name)
        if old is not None and old != key:
            if not replace:
                raise KeyringError(
                    f"hospital {name!r} already has key {fingerprint(old)}; add --replace to replace it "
                    "(the old key is revoked)"
                )
            self._revoke(name, old, f"replaced by {fingerprint(key)}")
        self.keys[name] = key
        return fingerprint(key)

    def remove(self, name: str, reason: str = "removed") -> str:
        """Revoke hospital ``name``'s key: its vectors are refused from now on, with the reason; returns the
        revoked key's fingerprint."""
        if name not in self.keys:
            raise KeyringError(f"hospital {name!r} is not in the keyring ({', '.join(sorted(self.keys)) or 'empty'})")
        key = self.keys.pop(name)
        self._revoke(name, key, reason)
        return fingerprint(key)

    def _revoke(self, name: str, key: str, reason: str) -> None:
        self.revoked.append({"hospital": name, "public_key": key, "revoked_at": utcnow(), "reason": reason})

    def _revoked_signature(self, hospital: str, sig: bytes, message: bytes) -> dict | None:
        """The revocation of the hospital's key that made ``sig``, if one did."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        for r in self.revoked:
            if r["hospital"] != hospital:
                continue
            try:
                Ed25519PublicKey.from_public_bytes(base64.b64decode(r["public_key"])).verify(sig, message)
                return r
            except InvalidSignature:
                continue
        return None

    def verify(self, path: str | Path, meta: VectorMeta, content_sha256: str, header: dict) -> dict:
        """Check the signature block; raises :class:`InvalidVectorError` (checks: unsigned, unknown_hospital,
        impersonation, revoked, bad_signature)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        raw = header.get("signature")
        if not raw:
            raise InvalidVectorError(
                path, f"unsigned vector (hospital {meta.hospital!r}); the keyring requires signatures", "unsigned"
            )
        try:
            block = json.loads(raw)
            sig = base64.b64decode(block["sig"], validate=True)
            nonce, signer = str(block["nonce"]), str(block["signer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidVectorError(
                path, f"malformed signature block ({exc.__class__.__name__})", "bad_signature"
            ) from exc
        if signer != meta.hospital:
            raise InvalidVectorError(
                path, f"signed by {signer!r} but claims hospital {meta.hospital!r}", "impersonation"
            )
        message = payload(content_sha256, header["medvec"], nonce)
        key = self.keys.get(meta.hospital)
        if key is not None:
            try:
                Ed25519PublicKey.from_public_bytes(base64.b64decode(key)).verify(sig, message)
                return {"signer": signer, "nonce": nonce}
            except InvalidSignature:
                pass
        revoked = self._revoked_signature(meta.hospital, sig, message)
        if revoked is not None:
            what = f"{fingerprint(revoked['public_key'])}, revoked {revoked['revoked_at'][:19]}: {revoked['reason']}"
            raise InvalidVectorError(path, f"signed with hospital {meta.hospital!r}'s revoked key ({what})", "revoked")
        if key is None:
            raise InvalidVectorError(
                path,
                f"unknown hospital {meta.hospital!r}: not in the keyring ({', '.join(sorted(self.keys)) or 'empty'})",
                "unknown_hospital",
            )
        raise InvalidVectorError(
            path,
            f"signature does not verify with {meta.hospital!r}'s key (forged, or tensors/metadata changed)",
            "bad_signature",
        )

    def open_document(self, hospital: str, key: str, stored: Any) -> Any:
        """A document ``hospital`` signed for store key ``key`` (an evaluation answer), once its signature
        verifies with that hospital's key; :class:`DocumentRejected` (one line, with the check) otherwise."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if not is_signed(stored):
            raise DocumentRejected(f"{key} is not signed (hospital {hospital!r})", "unsigned")
        try:
            sig = base64.b64decode(stored[ENVELOPE]["sig"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"{key}: malformed signature block ({exc.__class__.__name__})"
            raise DocumentRejected(problem, "bad_signature") from exc
        message = document_payload(key, stored["doc"])
        public = self.keys.get(hospital)
        if public is not None:
            try:
                Ed25519PublicKey.from_public_bytes(base64.b64decode(public)).verify(sig, message)
                return stored["doc"]
            except InvalidSignature:
                pass
        revoked = self._revoked_signature(hospital, sig, message)
        if revoked is not None:
            what = f"{fingerprint(revoked['public_key'])}, revoked {revoked['revoked_at'][:19]}: {revoked['reason']}"
            raise DocumentRejected(f"{key} is signed with hospital {hospital!r}'s revoked key ({what})", "revoked")
        if public is None:
            raise DocumentRejected(f"{key}: unknown hospital {hospital!r}, not in the keyring", "unknown_hospital")
        who = stored[ENVELOPE].get("key", "?") if isinstance(stored[ENVELOPE], dict) else "?"
        raise DocumentRejected(
            f"{key} does not verify with hospital {hospital!r}'s key (signed by {who}, or changed)", "bad_signature"
        )


def read_header(path: str | Path) -> dict:
    """A vector file's safetensors metadata; InvalidVectorError when it is not a medvec vector."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
    if header.get("format") != FORMAT:
        raise InvalidVectorError(path, "not a medvec vector", "metadata")
    return header
