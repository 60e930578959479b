"""A hospital's hand-out kit: everything the operator gives a joining hospital, in one folder.

``medvec coordinator add-hospital NAME --kit DIR`` writes ``DIR/NAME/`` (mode 700, every file 600):

* ``README.md``: who it is for, what each credential reaches, the coordinator key's fingerprint to check
  out of band, and the commands to join;
* ``params.yaml``: the coordinator's settings (model, fine-tune, store URL, …) without its own section
  (its evaluation set's path is nothing a hospital needs);
* ``coordinator.pub``: the key to pin with ``--coordinator-key``;
* ``store.env``: the hospital's own store identity (S3 keys scoped to its prefixes), when one was created;
* ``store-policy.json``: that scope as an AWS IAM policy (what the identity may read, list and write);
* ``prefect.env``: the Prefect API URL and its auth string;
* ``mlflow.env``: the MLflow address and the hospital's own user, when one was created.

The ``*.env`` files are ``KEY=value`` lines: ``set -a; . prefect.env; set +a`` in a shell, or systemd's
``EnvironmentFile=``.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medvec.config import CoordinatorConfig, IntakeConfig, Params
from medvec.errors import UserError
from medvec.keys import DocumentVerifier


class KitError(UserError, FileExistsError):
    """A kit folder that already holds files (credentials are never overwritten)."""


@dataclass
class Kit:
    """The files of one hospital's kit, by name, and what the README says about each."""

    hospital: str
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_env(self, name: str, values: dict[str, str], note: str) -> None:
        """A ``KEY=value`` file (values shell-quoted) and its line in the README."""
        self.files[name] = "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
        self.notes.append(f"- `{name}`: {note}")

    def add_file(self, name: str, text: str, note: str) -> None:
        """Any other file and its line in the README."""
        self.files[name] = text
        self.notes.append(f"- `{name}`: {note}")

    def write(self, root: Path, readme: str) -> Path:
        """Write ``root/<hospital>/`` (700; files 600); an existing non-empty folder is an error."""
        folder = Path(root) / self.hospital
        if folder.exists() and any(folder.iterdir()):
            raise KitError(f"{folder} exists and is not empty: a kit is never overwritten (move it away first)")
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        for name, text in {**self.files, "README.md": readme}.items():
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        return folder


def hospital_params(params: Params) -> str:
    """The coordinator's settings as a hospital's ``params.yaml``: the coordinator's own sections (its
    evaluation set, keyring and DVC registry) left at their defaults, and no pinned key path (the hospital
    passes ``--coordinator-key``)."""
    doc = params.model_dump(mode="json")
    doc["coordinator"] = CoordinatorConfig().model_dump(mode="json")
    doc["intake"] = IntakeConfig().model_dump(mode="json")  # the coordinator's keyring path stays with it
    doc["registry"].update(dvc_repo=None, dvc_remote=None, dvc_endpoint_url=None)
    doc["hospital"]["coordinator_key"] = None
    return yaml.safe_dump(doc, sort_keys=False)


def public_key_file(verifier: DocumentVerifier) -> str:
    """The coordinator's ``.pub`` file (the format ``medvec coordinator keygen`` writes)."""
    return json.dumps({"hospital": "coordinator", "alg": "ed25519", "public_key": verifier.public_key}) + "\n"


def readme(kit: Kit, fingerprint: str | None, store_url: str) -> str:
    """The kit's README: what is in it, what it reaches, what to check, how to join."""
    pin = "--coordinator-key coordinator.pub " if fingerprint else ""
    check = (
        f"Check the coordinator's key before you join: `medvec hospital join` prints its fingerprint, which must "
        f"read `{fingerprint}` (the operator tells you this value by another channel than this kit)."
        if fingerprint
        else "The coordinator has no signing key: nothing it publishes can be checked. Ask the operator for one."
    )
    envs = " ".join(f". {n};" for n in sorted(kit.files) if n.endswith(".env"))
    return "\n".join(
        [
            f"# medvec: the hand-out kit of hospital `{kit.hospital}`",
            "",
            "Keep this folder private: it holds credentials that are yours alone.",
            "",
            *kit.notes,
            "",
            "What these credentials reach: the store, only for reading the bases, start points and merged models "
            f"everyone shares and your own folders, and for writing your own vectors ({store_url}); MLflow, only "
            "your own fine-tune runs and the registered model (read); Prefect, the shared server, where your "
            "medvec worker runs nothing but your own fine-tune.",
            "",
            check,
            "",
            "Join (from a medvec checkout, with your data folder, a CSV manifest or an .npz):",
            "",
            "```bash",
            f"set -a; {envs} set +a",
            f"medvec hospital keygen {kit.hospital} --out keys/     # send keys/{kit.hospital}.pub to the operator",
            f"medvec hospital join {kit.hospital} --data /path/to/your/data --params params.yaml {pin}"
            f"--key keys/{kit.hospital}.key",
            "```",
            "",
        ]
    )


__all__ = ["Kit", "KitError", "hospital_params", "public_key_file", "readme"]
