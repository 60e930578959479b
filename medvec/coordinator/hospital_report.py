"""``medvec hospital report``: a hospital's view of what the coordinator published about its vectors.

The coordinator writes, at the end of every merge, one entry per hospital whose vectors were in it
(:func:`merge_entries`, stored under ``reports/<hospital>/``); a hospital reads its own entries, its own
vectors and its own quarantine, all that its store identity may read (:func:`hospital_report`)."""

from __future__ import annotations

from medvec.coordinator.contribution import score_text
from medvec.record import ContributionScore


def _score_json(s: ContributionScore) -> dict:
    return s.model_dump(mode="json", exclude={"hospital"})


def hospital_report(store, hospital: str) -> dict:
    """A hospital's view of what the coordinator published: its vectors, the merges they went into, and its
    contribution to each.  Other hospitals' scores appear only where that merge's ``contribution.share`` was
    set; nothing else about another hospital (its sample counts, its data) is shown.  Reads only what a
    hospital's store identity may: its own folders, and the entries published for it."""
    own = [s for s in store.own_sidecars(hospital) if s["meta"]["hospital"] == hospital]
    vectors = [
        {
            "vector_id": s["meta"]["vector_id"],
            "status": "landed",
            "n_train": s["meta"]["n_train"],
            "created_at": s["meta"]["created_at"],
            "start_version": s["meta"].get("start_version", 0),
        }
        for s in own
    ]
    vectors += [
        {
            "vector_id": q.object.rsplit("/", 1)[-1].split(".")[0],
            "status": f"quarantined ({q.check})",
            "reason": q.problem,
        }
        for q in store.quarantined(hospital)
        if q.hospital_claimed == hospital
    ]
    merges = sorted(store.reports(hospital), key=lambda m: m["finished_at"], reverse=True)
    return {"hospital": hospital, "store": store.url, "vectors": vectors, "merges": merges}


def merge_entries(record) -> dict[str, dict]:
    """What each hospital with vectors in (or excluded from) ``record`` may see of it, by hospital."""
    scores = record.contribution
    hospitals = {i.hospital for i in record.inputs} | {s.hospital for s in (scores.excluded if scores else ())}
    entries = {h: _merge_entry(record, h) for h in sorted(hospitals)}
    return {h: e for h, e in entries.items() if e is not None}


def _at_site(record, hospital: str) -> dict[str, float] | None:
    """With the hospitals scoring: the AUC on ``hospital``'s own validation split of its own model, the merge and
    the champion the merge was gated against (what it may see of the cross-site matrix); None otherwise."""
    matrix = record.evaluation.matrix
    found = {name: matrix[key][hospital] for name, key in (("yours", hospital), ("merged", "merged"), ("champion", "champion")) if hospital in matrix.get(key, {})}  # fmt: skip
    return found or None


def _merge_entry(record, hospital: str) -> dict | None:
    """One merge as ``hospital`` may see it, or None when none of its vectors was in it (or excluded from it)."""
    scores = record.contribution
    mine = [i.vector_id for i in record.inputs if i.hospital == hospital]
    excluded = [s for s in (scores.excluded if scores else ()) if s.hospital == hospital]
    if not mine and not excluded:
        return None
    yours = []
    for vid in mine:
        s = scores.of(vid) if scores else None
        yours.append({"vector_id": vid, "in_merge": True} | (_score_json(s) if s else {}))
    yours += [{"in_merge": False} | _score_json(s) for s in excluded]
    share = record.params.contribution.share and scores is not None
    entry = {
        "merge_id": record.merge_id,
        "base_sha256": record.base_sha256,
        "finished_at": record.finished_at,
        "mode": record.mode,
        "method": record.method,
        "lambda": record.lam,
        "inputs": len(record.inputs),
        "metric": scores.metric if scores else record.params.evaluate.select_metric,
        "val": record.val.get(record.params.evaluate.select_metric),
        "promoted": _promoted(record),
        "at_your_site": _at_site(record, hospital),
        "yours": yours,
        "scored": scores is not None,
        "others": [
            {"hospital": s.hospital} | _score_json(s)
            for s in (*scores.scores, *scores.excluded)
            if s.hospital != hospital
        ]
        if share
        else None,
    }
    return entry


def _promoted(record) -> str:
    """The merge's fate: an async step's start-point version, else the MLflow gate's verdict."""
    if record.mode == "async":
        return f"v{record.version}" if record.version is not None else "not promoted"
    if record.registry is None:
        return "not registered"
    return f"version {record.registry.version}: {'champion' if record.registry.champion else 'not promoted'}"


def report_text(doc: dict) -> str:
    """``medvec hospital report`` as text."""
    lines = [f"hospital {doc['hospital']} in {doc['store']}", "", f"vectors ({len(doc['vectors'])}):"]
    for v in doc["vectors"]:
        extra = f"n_train {v['n_train']}  {v['created_at']}" if v["status"] == "landed" else v.get("reason", "")
        lines.append(f"  {v['vector_id']}  {v['status']}  {extra}")
    lines += ["", f"merges with its vectors ({len(doc['merges'])}), newest first:"]
    for m in doc["merges"]:
        val = "–" if m["val"] is None else f"{m['val']:.4f}"
        lines.append(
            f"  {m['merge_id']}  {m['finished_at'][:19]}  {m['mode']} {m['method']} λ={m['lambda']:g}"
            f"  {m['inputs']} inputs  val {m['metric']} {val}  {m['promoted']}"
        )
        if m.get("at_your_site"):
            site = "  ".join(f"{k} {v:.4f}" for k, v in m["at_your_site"].items())
            lines.append(f"    AUC on your validation split: {site}")
        for y in m["yours"]:
            lines.append(f"    {y['vector_id']}: {score_text(y) if 'loo' in y else 'not scored'}")
        if m["others"] is not None:
            lines += [f"    other: {o['hospital']} {o['vector_id']}: {score_text(o)}" for o in m["others"]]
    return "\n".join(lines)
