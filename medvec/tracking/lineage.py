"""Lineage from the registry: model version → merge run → vectors → fine-tune runs → base."""

from __future__ import annotations

import json
from typing import Any

from medvec.errors import LineageError
from medvec.record import MergeRecord
from medvec.tracking.runs import find_hospital_run
from medvec.tracking.server import connect, tracking_uri


def resolve(ref: str):
    """``NAME@ALIAS`` or ``NAME/VERSION`` -> ModelVersion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    connect()
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        fetch = lambda: client.get_model_version_by_alias(name, alias)  # noqa: E731
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        fetch = lambda: client.get_model_version(name, version)  # noqa: E731
    else:
        raise LineageError(f"{ref!r}: expected NAME@ALIAS (e.g. medvec@champion) or NAME/VERSION")
    try:
        return fetch()
    except MlflowException as exc:
        raise LineageError(f"{ref}: {_missing_reason(client, name)} at {tracking_uri()}") from exc


def _missing_reason(client, name: str) -> str:
    """Why a model reference does not resolve: the model is unknown, or which aliases and versions exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return f"no registered model {name!r}"
    aliases = ", ".join(sorted(model.aliases)) or "none"
    latest = max((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), default=0)
    versions = f"versions 1..{latest}" if latest else "no versions"
    return f"model {name!r} has no such alias or version (aliases: {aliases}; {versions})"


def lineage(ref: str) -> dict:
    """model version → merge run → vectors (id, hospital, content sha256) → fine-tune runs → base."""
    from mlflow import MlflowClient

    connect()
    client = MlflowClient()
    mv = resolve(ref)
    merge_run = client.get_run(mv.run_id)
    tags = merge_run.data.tags
    vectors = []
    for i in json.loads(tags.get("medvec.inputs", "[]")):
        vid, hospital, content = i
        run_id = find_hospital_run(vid, hospital)
        entry: dict[str, Any] = {
            "vector_id": vid,
            "hospital": hospital,
            "content_sha256": content,
            "finetune_run": None,
        }
        if run_id:
            hr = client.get_run(run_id)
            entry["finetune_run"] = {
                "run_id": run_id,
                "params": dict(hr.data.params),
                "metrics": dict(hr.data.metrics),
                "content_sha256": hr.data.tags.get("medvec.content_sha256"),
            }
            entry["dp_epsilon"] = hr.data.metrics.get("dp_epsilon")
        vectors.append(entry)
    base_sha = tags.get("medvec.base_sha256")
    base_versions = [
        str(v.version)
        for v in client.search_model_versions(f"name = '{mv.name}-base'")
        if v.tags.get("medvec.base_sha256") == base_sha
    ]
    aliases = list(getattr(mv, "aliases", []) or [])
    return {
        "model": {"name": mv.name, "version": mv.version, "aliases": aliases, "tags": dict(mv.tags)},
        "merge_run": {
            "run_id": mv.run_id,
            "params": dict(merge_run.data.params),
            "metrics": dict(merge_run.data.metrics),
            "merge_id": tags.get("medvec.merge_id"),
            "merged_sha256": tags.get("medvec.merged_sha256"),
            "dvc_commit": tags.get("medvec.dvc_commit"),
        },
        "vectors": vectors,
        "base": {"sha256": base_sha, "registered_as": f"{mv.name}-base", "versions": base_versions},
    }


def add_contributions(tree: dict, record: MergeRecord) -> dict:
    """Each lineage vector's contribution score from the merge record, and the vectors excluded as harmful."""
    scores = record.contribution
    if scores is None:
        return tree
    for v in tree["vectors"]:
        s = scores.of(v["vector_id"])
        v["contribution"] = s.model_dump(mode="json") if s else None
    summary = scores.model_dump(mode="json", exclude={"scores"})
    tree["contribution"] = summary
    return tree


def _contribution_text(c: dict | None, metric: str) -> str:
    from medvec.coordinator.contribution import score_text

    return f"  contribution (val {metric}) {score_text(c, reasons=False)}" if c else ""


def lineage_text(tree: dict) -> str:
    """The lineage tree as indented text: the version, its merge run, each input vector with its fine-tune run,
    the base, vectors excluded as harmful and the async version chain."""
    m, r, b = tree["model"], tree["merge_run"], tree["base"]
    alias = f" @{','.join(m['aliases'])}" if m["aliases"] else ""
    lines = [f"{m['name']} v{m['version']}{alias}  merged sha256 {r.get('merged_sha256') or '?'}"]
    lines.append(
        f"└─ merge run {r['run_id']} ({r.get('merge_id')})  method={r['params'].get('method')} λ={r['params'].get('lambda')} bn={r['params'].get('bn_strategy')} from {r['params'].get('bn_source')}  val_auc={r['metrics'].get('val_auc', float('nan')):.4f}"
    )
    if r.get("dvc_commit"):
        lines.append(f"   ├─ DVC registry commit {r['dvc_commit']}")
    for n, v in enumerate(tree["vectors"]):
        last = n == len(tree["vectors"]) - 1
        lines.append(
            f"   {'└' if last else '├'}─ vector {v['vector_id']}  hospital={v['hospital']}  content sha256 {v['content_sha256']}"
            + (f"  DP ε={v['dp_epsilon']:.3f}" if v.get("dp_epsilon") is not None else "")
            + _contribution_text(v.get("contribution"), (tree.get("contribution") or {}).get("metric", ""))
        )
        fr = v["finetune_run"]
        pad = "      " if last else "   │  "
        if fr:
            p = fr["params"]
            lines.append(
                f"{pad}└─ fine-tune run {fr['run_id']}  epochs={p.get('finetune.epochs')} lr={p.get('finetune.lr')} seed={p.get('finetune.seed')}"
            )
        else:
            lines.append(f"{pad}└─ fine-tune run: not found in this tracking server")
    lines.append(f"   └─ base {b['sha256']}  registered as {b['registered_as']} v{','.join(b['versions']) or '?'}")
    for e in (tree.get("contribution") or {}).get("excluded", []):
        lines.append(f"   excluded as harmful: {e['vector_id']} ({e['hospital']}): {e['harmful']}")
    lines += _chain_text(tree.get("chain", []))
    return "\n".join(lines)


def _chain_text(chain: list[dict]) -> list[str]:
    """The async version chain back to θ_pre: each step with its vectors, staleness and weights."""
    if not chain:
        return []
    lines = ["version chain (θ_pre is v0):"]
    for step in chain:
        version = f"v{step['version']}" if step["version"] is not None else "not promoted"
        val = step["val"].get("auc", float("nan"))
        lines.append(
            f"  {version} ← v{step['parent_version']}  {step['merge_id']}  η={step['eta']:g}  bn={step['bn']}  val_auc={val:.4f}"
        )
        for v in step["vectors"]:
            weight = "-" if v["weight"] is None else f"{v['weight']:.4f}"
            lines.append(
                f"     {v['hospital']:>8}  {v['vector_id']}  from v{v['start_version']}  staleness {v['staleness']}  weight {weight}"
            )
    return lines


def merge_record(ref: str) -> MergeRecord:
    """The :class:`~medvec.record.MergeRecord` logged with a model version."""
    import mlflow
    from pydantic import ValidationError

    connect()
    mv = resolve(ref)
    doc = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/merge_record.json")
    try:
        return MergeRecord.model_validate(doc)
    except ValidationError as exc:
        raise LineageError(f"{ref}: its merge record (run {mv.run_id}) is not a medvec merge record: {exc}") from exc
