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

from medvec.vectors.checks import load_vector
from medvec.vectors.format import FORMAT, InvalidVectorError, write_safetensors
from medvec.vectors.vector import VectorMeta

DOMAIN = b"medvec-vector-signature/1\n"


def keygen(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.key`` (PKCS#8 PEM, mode 600) and ``out_dir/NAME.pub`` (raw base64)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.chmod(key_path, 0o600)
    pub_path.write_text(
        json.dumps({"hospital": name, "alg": "ed25519", "public_key": base64.b64encode(pub).decode()}) + "\n"
    )
    return key_path, pub_path


def _load_private(path: str | Path):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)


def payload(content_sha256: str, meta_json: str, nonce: str) -> bytes:
    """The bytes a signature covers: the domain tag, the content sha256, the metadata JSON in canonical form
    (sorted keys, no spaces) and the nonce, a line each."""
    meta = json.dumps(json.loads(meta_json), sort_keys=True, separators=(",", ":"))
    return DOMAIN + content_sha256.encode() + b"\n" + meta.encode() + b"\n" + nonce.encode()


def sign_file(path: str | Path, key_path: str | Path, signer: str | None = None) -> dict:
    """Sign a vector file in place (atomically rewritten); returns the signature block."""
    from safetensors import safe_open

    path = Path(path)
    vf = load_vector(path)  # validate before signing
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    nonce = secrets.token_hex(16)
    key = _load_private(key_path)
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


class Keyring:
    """Allowed hospitals and their public keys (a JSON file ``{"hospitals": {name: base64}}``)."""

    def __init__(self, keys: dict[str, str] | None = None):
        self.keys = dict(keys or {})

    @classmethod
    def load(cls, path: str | Path) -> "Keyring":
        """The keyring in the JSON file at ``path``; an empty one (no hospital allowed) when there is no such file."""
        p = Path(path)
        if not p.exists():
            return cls()
        return cls(json.loads(p.read_text()).get("hospitals", {}))

    def save(self, path: str | Path) -> None:
        """Write the keyring to ``path`` atomically (temporary file, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps({"hospitals": self.keys}, indent=2, sort_keys=True))
        os.replace(tmp, p)

    def add(self, name: str, pub_file: str | Path) -> None:
        """Allow hospital ``name`` with the key in ``pub_file`` (as :func:`keygen` writes it), replacing any it had."""
        doc = json.loads(Path(pub_file).read_text())
        if doc.get("alg") != "ed25519":
            raise ValueError(f"{pub_file}: not an ed25519 public key file")
        self.keys[name] = doc["public_key"]

    def verify(self, path: str | Path, meta: VectorMeta, content_sha256: str, header: dict) -> dict:
        """Check the signature block; raises :class:`InvalidVectorError` (checks: unsigned,
        unknown_hospital, impersonation, bad_signature)."""
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
        if meta.hospital not in self.keys:
            raise InvalidVectorError(
                path,
                f"unknown hospital {meta.hospital!r}: not in the keyring ({', '.join(sorted(self.keys)) or 'empty'})",
                "unknown_hospital",
            )
        if signer != meta.hospital:
            raise InvalidVectorError(
                path, f"signed by {signer!r} but claims hospital {meta.hospital!r}", "impersonation"
            )
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(self.keys[meta.hospital]))
        try:
            pub.verify(sig, payload(content_sha256, header["medvec"], nonce))
        except InvalidSignature as exc:
            raise InvalidVectorError(
                path,
                f"signature does not verify with {meta.hospital!r}'s key (forged, or tensors/metadata changed)",
                "bad_signature",
            ) from exc
        return {"signer": signer, "nonce": nonce}


def read_header(path: str | Path) -> dict:
    """A vector file's safetensors metadata; InvalidVectorError when it is not a medvec vector."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
    if header.get("format") != FORMAT:
        raise InvalidVectorError(path, "not a medvec vector", "metadata")
    return header
