"""A DVC-tracked registry of merged vectors: one git commit per merge.

The registry is a git repository whose ``.dvc`` files point into a DVC remote
(a local folder or S3).  For every merge the coordinator copies the input
vectors to ``vectors/<hospital>/<vector-id>.safetensors``, ``dvc add``s them,
writes ``merges/<merge-id>.json`` and commits; ``dvc push`` sends the bytes to
the remote.  ``git checkout <commit> && dvc pull`` in any clone then restores
exactly the vectors behind that merged model.  The MLflow merge run stores the
commit (tag ``medvec.dvc_commit``).

Uses the ``git`` and ``dvc`` command-line tools (no DVC import in the core).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from medvec.errors import UserError
from medvec.record import MergeRecord


class RegistryError(UserError, RuntimeError):
    """A git or dvc command in the registry failed; the message carries its output."""


def _dvc() -> str:
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env.setdefault("GIT_AUTHOR_NAME", "medvec-coordinator")
    env.setdefault("GIT_AUTHOR_EMAIL", "medvec@localhost")
    env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"{' '.join(cmd)} failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ensure_registry(path: str | Path, remote: str, endpoint_url: str | None = None) -> Path:
    """Create the registry repository (git + dvc, default remote) if it does not exist."""
    repo = Path(path)
    if (repo / ".dvc").is_dir():
        return repo
    repo.mkdir(parents=True, exist_ok=True)
    _run(["git", "init", "-q"], repo)
    _run([_dvc(), "init", "-q"], repo)
    _run([_dvc(), "config", "core.analytics", "false"], repo)
    _run([_dvc(), "remote", "add", "-d", "-f", "store", remote], repo)
    if endpoint_url:
        _run([_dvc(), "remote", "modify", "store", "endpointurl", endpoint_url], repo)
    (repo / "README.md").write_text(
        "# medvec vector registry\n\nOne commit per merge. `git checkout <commit> && dvc pull` restores the vectors behind that merged model.\n"
    )
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "medvec vector registry"], repo)
    return repo


def record_merge(
    path: str | Path, remote: str, record: MergeRecord, vector_files: dict[str, Path], endpoint_url: str | None = None
) -> str:
    """Track the merge's input vectors, commit, push; returns the commit sha.

    ``vector_files`` maps vector id to a local file holding its bytes.
    """
    repo = ensure_registry(path, remote, endpoint_url)
    added = []
    for item in record.inputs:
        rel = Path("vectors") / item.hospital / f"{item.vector_id}.safetensors"
        dst = repo / rel
        if not (repo / f"{rel}.dvc").exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(vector_files[item.vector_id], dst)
            added.append(str(rel))
    if added:
        _run([_dvc(), "add", "-q", *added], repo)
    merges = repo / "merges"
    merges.mkdir(exist_ok=True)
    (merges / f"{record.merge_id}.json").write_text(json.dumps(record.to_json(), indent=2))
    _run(["git", "add", "-A"], repo)
    hospitals = ", ".join(f"{i.hospital}:{i.vector_id}" for i in record.inputs)
    _run(["git", "commit", "-qm", f"merge {record.merge_id}: {hospitals}"], repo)
    _run([_dvc(), "push", "-q"], repo)
    return _run(["git", "rev-parse", "HEAD"], repo).strip()
