"""MLflow users for hospitals, on a tracking server started with ``--app-name basic-auth``.

Run as the coordinator (the server's admin: ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``).  Each hospital gets
a user with EDIT on its own experiment of fine-tune runs (``medvec-hospitals/<name>``, created here, by the
admin, so no other member can own it) and READ on the registered model; with the server's
``default_permission = NO_PERMISSIONS`` it can read nothing else: not the merge runs (every input's scores),
not another hospital's runs.  Moving the ``champion`` alias needs EDIT on the registered model, which only
the admin holds.
"""

from __future__ import annotations

import contextlib

from medvec.errors import UserError
from medvec.names import hospital_name
from medvec.tracking.server import connect, experiment_id, hospital_experiment


class MlflowAccessError(UserError, RuntimeError):
    """An MLflow user or permission that could not be created."""


def _auth_client():
    import mlflow
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=mlflow.get_tracking_uri())


def _usernames(auth) -> list[str]:
    from mlflow.server.auth.routes import LIST_USERS

    return [u["username"] for u in auth._request(LIST_USERS, "GET").get("users", [])]


def add_hospital_user(hospital: str, password: str, model_name: str) -> str:
    """Create (or reset the password of) hospital ``hospital``'s MLflow user, with EDIT on its own experiment,
    which no other user may hold, and READ on ``model_name``; returns the experiment id."""
    from mlflow.exceptions import MlflowException, RestException

    name = hospital_name(hospital)
    connect()
    auth = _auth_client()
    try:
        try:
            auth.create_user(name, password)
        except RestException as exc:
            if "already exists" not in str(exc) and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
            auth.update_user_password(name, password)
        exp = experiment_id(hospital_experiment(name))
        for other in _usernames(auth):
            if other != name and not auth.get_user(other).is_admin:
                with contextlib.suppress(RestException):  # it held none
                    auth.revoke_user_permission(other, "experiment", exp)
        auth.grant_user_permission(name, "experiment", exp, "EDIT")
        auth.grant_user_permission(name, "registered_model", model_name, "READ")
    except MlflowException as exc:
        raise MlflowAccessError(f"MLflow user for {name}: {exc.message.splitlines()[0]}") from None
    return exp


__all__ = ["MlflowAccessError", "add_hospital_user"]
