"""Ed25519 keys, and the documents the coordinator signs.

A hospital's key signs its vectors (:mod:`medvec.vectors.signing`); the coordinator's key signs what it
publishes: the current-base pointer, each base's labels, the start-point index, each merge record and
``latest.json`` (:class:`DocumentSigner`).  A hospital pins the coordinator's public key
(:class:`DocumentVerifier`) and refuses any such document that key did not sign.  A signature covers the
document *and the store key it is published at*, so a signed document copied elsewhere does not verify.
Weights are covered through the sha256 the signed documents name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvec.errors import Refusal, UserError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DOC_DOMAIN = b"medvec-coordinator-document/1\n"
ENVELOPE = "medvec_signed"  # the key of a signed document's signature block

PASSPHRASE_ENV = "MEDVEC_KEY_PASSPHRASE"  # where a worker finds the passphrase of a protected key


class SigningKeyError(UserError):
    """A key file that cannot be written or read as asked: it exists, it is protected, the passphrase is wrong."""


def fingerprint(public_key_b64: str) -> str:
    """A public key's fingerprint to compare out of band: ``SHA256:`` and the first 128 bits of its sha256, in
    groups of four hex digits."""
    digest = hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:32]
    return "SHA256:" + ":".join(digest[i : i + 4] for i in range(0, 32, 4))


def keygen(name: str, out_dir: str | Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.key`` (PKCS#8 PEM, mode 600; encrypted with ``passphrase`` when given) and
    ``out_dir/NAME.pub`` (raw base64 with the hospital's name).  Never overwrites: a key that exists is an error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for existing in (key_path, pub_path):
        if existing.exists():
            raise SigningKeyError(f"{existing} exists: keygen never overwrites a key (move it away to make a new one)")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    protection = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, protection)
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.chmod(key_path, 0o600)
    pub_path.write_text(
        json.dumps({"hospital": name, "alg": "ed25519", "public_key": base64.b64encode(pub).decode()}) + "\n"
    )
    return key_path, pub_path


def load_private(path: str | Path, passphrase: bytes | None = None):
    """The private key at ``path``; a protected one takes ``passphrase``, else ``$MEDVEC_KEY_PASSPHRASE``."""
    from cryptography.hazmat.primitives import serialization

    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    data = Path(path).read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # protected without a passphrase, or a passphrase for an open key
        if passphrase is None:
            raise SigningKeyError(
                f"{path} is passphrase-protected: set {PASSPHRASE_ENV} where the worker runs"
            ) from exc
        raise SigningKeyError(f"{path} is not passphrase-protected: unset {PASSPHRASE_ENV}") from exc
    except ValueError as exc:
        raise SigningKeyError(f"{path}: the passphrase does not open this key, or it is not a PEM private key") from exc


class UntrustedDocument(Refusal):
    """A document the coordinator should have signed that its pinned key does not verify."""


def canonical(doc: Any) -> bytes:
    """``doc`` as JSON with sorted keys and no spaces (what a signature covers)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def document_payload(key: str, doc: Any) -> bytes:
    """The bytes a coordinator's signature covers: the domain tag, the store key, the canonical document."""
    return DOC_DOMAIN + key.encode() + b"\n" + canonical(doc)


def is_signed(stored: Any) -> bool:
    """Whether a stored JSON document is a signed envelope ``{"medvec_signed": {...}, "doc": ...}``."""
    return isinstance(stored, dict) and set(stored) == {ENVELOPE, "doc"}


def unwrap(stored: Any) -> Any:
    """The document inside a signed envelope (not verified), or the stored document as it is."""
    return stored["doc"] if is_signed(stored) else stored


def public_key_of(pub_file: str | Path) -> str:
    """The base64 public key in a ``.pub`` file that :func:`keygen` wrote."""
    doc = json.loads(Path(pub_file).read_text())
    if doc.get("alg") != "ed25519" or "public_key" not in doc:
        raise SigningKeyError(f"{pub_file}: not an ed25519 public key file")
    return str(doc["public_key"])


@dataclass(frozen=True)
class DocumentVerifier:
    """The coordinator's public key, pinned by a hospital (or by the coordinator itself): what it opens must
    be signed by that key, for the store key it was read from."""

    public_key: str  # base64

    @classmethod
    def load(cls, pub_file: str | Path) -> DocumentVerifier:
        """The public key in ``pub_file`` (the coordinator's ``.pub``)."""
        return cls(public_key_of(pub_file))

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint, to compare out of band."""
        return fingerprint(self.public_key)

    def open(self, key: str, stored: Any) -> Any:
        """The document stored at ``key`` once its signature verifies; :class:`UntrustedDocument` otherwise."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if not is_signed(stored):
            raise UntrustedDocument(f"{key} is not signed by the coordinator (its key is {self.fingerprint})")
        block, doc = stored[ENVELOPE], stored["doc"]
        try:
            sig = base64.b64decode(block["sig"], validate=True)
            public = Ed25519PublicKey.from_public_bytes(base64.b64decode(self.public_key))
            public.verify(sig, document_payload(key, doc))
        except (InvalidSignature, KeyError, TypeError, ValueError) as exc:
            who = block.get("key", "?") if isinstance(block, dict) else "?"
            raise UntrustedDocument(
                f"{key} is not signed by the coordinator's key {self.fingerprint} (signed by {who}, or changed)"
            ) from exc
        return doc


@dataclass(frozen=True)
class DocumentSigner:
    """The coordinator's private key: every document it publishes goes out signed."""

    private: Ed25519PrivateKey

    @classmethod
    def load(cls, key_file: str | Path, passphrase: bytes | None = None) -> DocumentSigner:
        """The coordinator's private key (a protected one takes ``passphrase`` or ``$MEDVEC_KEY_PASSPHRASE``)."""
        return cls(load_private(key_file, passphrase))

    @property
    def verifier(self) -> DocumentVerifier:
        """The matching public key: the coordinator trusts only what it signed itself."""
        from cryptography.hazmat.primitives import serialization

        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return DocumentVerifier(base64.b64encode(raw).decode())

    def sign(self, key: str, doc: Any) -> dict:
        """The envelope to store at ``key``: the document (as JSON reads it back) and its signature."""
        doc = json.loads(json.dumps(doc, default=str))  # what a reader will see
        sig = self.private.sign(document_payload(key, doc))
        block = {"alg": "ed25519", "key": self.verifier.fingerprint, "sig": base64.b64encode(sig).decode()}
        return {ENVELOPE: block, "doc": doc}


def coordinator_keys(key_file: str | None) -> tuple[DocumentSigner | None, DocumentVerifier | None]:
    """The coordinator's signer and the verifier of its own documents, from ``coordinator.key`` (None: unsigned)."""
    if not key_file:
        return None, None
    signer = DocumentSigner.load(key_file)
    return signer, signer.verifier


def pinned_key(pub_file: str | None) -> DocumentVerifier | None:
    """The coordinator's public key a hospital pinned (``hospital.coordinator_key``), or None."""
    return DocumentVerifier.load(pub_file) if pub_file else None
