"""What Prefect's UI shows of a run: its name and tags, so runs can be told apart without opening them,
and the images its markdown artifacts embed.

Names say what ran (``hospital-finetune/st-marys 2026-11-30``, ``merge-20261130T…-3f2a1c``,
``demo pneumoniamnist seed 0``); tags carry the hospital, the base's sha256 prefix and
the merge id, for search.  Run names are set when the run is created (``flow_run_name``
callables below); what is only known during the run (the base a scheduled hospital run
resolved, the merge id) is added with :func:`label_run`.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from prefect.runtime import flow_run

SHA_CHARS = 12  # the base sha256 prefix a tag carries


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def hospital_run_name() -> str:
    """``hospital-finetune/<hospital> <date>``."""
    return f"{flow_run.flow_name}/{flow_run.parameters.get('hospital', '?')} {_today()}"


def merge_run_name() -> str:
    """``merge <date time>``, renamed to the merge id (``merge-<time>-<hex>``) once the merge has one."""
    return f"merge {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')}"


def demo_run_name() -> str:
    """``demo <dataset>``; the flow renames itself ``demo <dataset> seed <seed>`` once params are read."""
    data = flow_run.parameters.get("data")
    return f"demo {Path(str(data)).stem if data else _today()}"


def base_tag(sha256: str) -> str:
    return f"base:{sha256[:SHA_CHARS]}"


def label_run(name: str | None = None, tags: Iterable[str] = ()) -> None:
    """Rename the current flow run and add ``tags`` to it (outside a flow run: nothing)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.id
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags or []
        client.update_flow_run(run_id, name=name, tags=sorted(set(current) | set(tags)))


def embedded_image(png: Path, alt: str) -> str:
    """Markdown that shows ``png`` inline (a data URI: an artifact cannot reference a file)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"
