"""The ``medvec.vector.landed`` event: only flows emit or consume events."""

from __future__ import annotations

VECTOR_LANDED = "medvec.vector.landed"


def landed_event(summary: dict) -> dict:
    """The fields of ``medvec.vector.landed`` for a published vector (ids, hashes, counts only)."""
    return dict(
        event=VECTOR_LANDED,
        resource={
            "prefect.resource.id": f"medvec.vector.{summary['vector_id']}",
            "prefect.resource.name": summary["vector_id"],
            "medvec.content_sha256": summary["content_sha256"],
            "medvec.hospital": summary["hospital"],
            "medvec.base_sha256": summary["base_sha256"],
        },
        related=[
            {"prefect.resource.id": f"medvec.hospital.{summary['hospital']}", "prefect.resource.role": "hospital"},
            {"prefect.resource.id": f"medvec.base.{summary['base_sha256']}", "prefect.resource.role": "base"},
        ],
        payload={"n_train": summary.get("n_train"), "key": summary.get("key"), "store": summary.get("store")},
    )


def emit_vector_landed(summary: dict):
    """Emit ``medvec.vector.landed`` for a published vector; returns the event (or None)."""
    from prefect.events import emit_event

    return emit_event(**landed_event(summary))
