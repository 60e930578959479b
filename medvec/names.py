"""Hospital names: they become store prefixes, pool and deployment names, identities and permission scopes,
so only a plain, short name is accepted (no ``/``, ``*``, spaces or leading dots)."""

from __future__ import annotations

import re

from medvec.errors import UserError

HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


class HospitalNameError(UserError, ValueError):
    """A hospital name that cannot be used as a store prefix, pool name or permission scope."""


def hospital_name(name: str) -> str:
    """``name`` when it is a usable hospital name; a one-line error that says what is allowed otherwise."""
    if not HOSPITAL_NAME.fullmatch(name):
        raise HospitalNameError(
            f"hospital name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


__all__ = ["HOSPITAL_NAME", "HospitalNameError", "hospital_name"]
