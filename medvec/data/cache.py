"""The hospital's cache of decoded files (``data.cache``): each file's decoded, squared and shrunk pixels, kept on
the hospital's own disk so that a second read decodes nothing that has not changed.

An entry is keyed by the sha256 of the file's bytes and the settings that shaped the pixels (``data.decode_size``,
``data.resize`` and :data:`VERSION`, the decoding rules'), so a changed file or setting is a miss, never a stale
hit. Hashing a 2,048² DICOM file costs more than reading its entry, so a small link, named by the file's path,
size and modification time, remembers each file's content key: a file whose path, size and time are unchanged is
not read at all; any change to them reads and hashes it again. An entry holds the uint8 pixels, the file's kind, its size as stored and its DICOM PatientID: it is patient
data, so the folder is created private (mode 700) and nothing reads it but this module; it never leaves the
hospital. Entries are written atomically, so two processes reading the same export do not corrupt each other's.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 2  # bump when decoding or shrinking changes what a file decodes to


@dataclass(frozen=True)
class Entry:
    """A cached decode: the pixels as training keeps them, the kind, the stored size (W, H) and the patient."""

    pixels: np.ndarray
    kind: str
    native: tuple[int, int]
    patient: str


@dataclass(frozen=True)
class DecodeCache:
    """Decoded files under ``folder``, one ``.npz`` per (content, settings)."""

    folder: Path

    def key(self, data: bytes, decode_size: int | None, resize: str) -> str:
        """The entry's name: the sha256 of the file's bytes and of the settings that shaped its pixels."""
        h = hashlib.sha256(data)
        h.update(f"|v{VERSION}|{decode_size}|{resize}".encode())
        return h.hexdigest()

    def content_key(self, path: Path, decode_size: int | None, resize: str) -> str:
        """:meth:`key` of the file at ``path``, through its link when its path, size and time are unchanged."""
        st = path.stat()
        stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{VERSION}|{decode_size}|{resize}"
        link = self.folder / "links" / hashlib.sha256(stamp.encode()).hexdigest()
        try:
            return link.read_text()
        except OSError:
            key = self.key(path.read_bytes(), decode_size, resize)
            link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = link.with_name(f"{link.name}.{os.getpid()}.tmp")
            tmp.write_text(key)
            os.replace(tmp, link)
            return key

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, key: str) -> Entry | None:
        """The entry, or None when there is none (or it cannot be read: it is then decoded again)."""
        try:
            with np.load(self._path(key), allow_pickle=False) as z:
                w, h = (int(v) for v in z["native"])
                return Entry(z["pixels"], str(z["kind"]), (w, h), str(z["patient"]))
        except (OSError, KeyError, ValueError):
            return None

    def put(self, key: str, entry: Entry) -> None:
        """Store an entry atomically (a temporary file renamed into place)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        buf = io.BytesIO()
        np.savez(buf, pixels=entry.pixels, kind=entry.kind, native=np.asarray(entry.native), patient=entry.patient)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    def size(self) -> tuple[int, int]:
        """(entries, bytes) held, the links too."""
        files = [f for f in self.folder.rglob("*") if f.is_file()] if self.folder.is_dir() else []
        return sum(f.suffix == ".npz" for f in files), sum(f.stat().st_size for f in files)
