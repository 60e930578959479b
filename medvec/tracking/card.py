"""The model card of a registered version: markdown built from its merge record, never from hand-written text.

It is every registered version's description (written when the gate has decided) and what ``medvec card
NAME@alias`` prints: intended use and classes, the training data (aggregates only), the merge, validation at the
operating point, test, DP ε per input, the signer, the gate and the limits.

Every member reads the registry, so what is one site's to tell (its name beside its vector, counts, label mix,
ε and AUC) is in the card only where the network shares per-site figures (``contribution.share``, as
``medvec hospital report`` does); otherwise the card gives the network's totals and each input by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medvec.evaluate import md_inert
from medvec.record import MergeRecord

SECTIONS = (
    "Intended use",
    "Training data",
    "Merge",
    "Validation",
    "Test",
    "Privacy",
    "Signature",
    "Gate",
    "Limits",
)


@dataclass(frozen=True)
class Registration:
    """What the registry holds about a version beside its merge record (its tags)."""

    name: str
    version: str
    classes: tuple[str, ...]
    task: str
    verdict: str
    reason: str
    signed_by: str | None = None
    input_shape: tuple[int, int, int] | None = None  # C, H, W the model takes

    @classmethod
    def of(cls, name: str, version: str, tags: dict[str, str]) -> "Registration":
        """The registration a version's MLflow tags describe."""
        import json

        return cls(
            name,
            str(version),
            tuple(json.loads(tags.get("medvec.classes") or "[]")),
            tags.get("medvec.task") or "multiclass",
            tags.get("medvec.gate", "undecided"),
            tags.get("medvec.gate_reason", ""),
            tags.get("medvec.signed_by"),
            tuple(int(n) for n in tags["medvec.input_shape"].split("x")) if tags.get("medvec.input_shape") else None,  # type: ignore[arg-type]
        )


def _num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _class_names(record: MergeRecord, reg: Registration) -> list[str]:
    k = max((len(i.label_counts) for i in record.inputs), default=0) or len(reg.classes)
    return list(reg.classes) or [str(c) for c in range(k)]


def _intended_use(record: MergeRecord, reg: Registration) -> list[str]:
    classes = _class_names(record, reg)
    named = ", ".join(f"{c} = {md_inert(n)}" for c, n in enumerate(classes))
    threshold = record.operating_point.get("threshold")
    if reg.task == "multilabel":
        rule = "each label is present when its own sigmoid probability `p_c` ≥ 0.5"
    elif threshold is not None and len(classes) == 2:
        rule = f"the label is 1 when `p_1` ≥ {threshold:.6g}, the operating point chosen on validation"
    else:
        rule = "the label is the most probable class"
    return [
        f"Decision support for {reg.task} classification of medical images into {len(classes)} classes ({named}),"
        f" by clinicians at the member hospitals; its output is probabilities, not a diagnosis. {rule[0].upper()}{rule[1:]}."
    ]


def _mix(counts, classes: list[str]) -> str:
    return ", ".join(f"{md_inert(classes[c]) if c < len(classes) else c}: {n}" for c, n in enumerate(counts)) or "–"


def _training_data(record: MergeRecord, reg: Registration) -> list[str]:
    """Images and label mix: per site where the network shares per-site figures (``contribution.share``), else
    the network's totals only (no member learns another's counts from the card). Site names, vector ids and each
    site's ε and AUC follow the same rule."""
    classes = _class_names(record, reg)
    total = sum(i.n_train for i in record.inputs)
    sites = len({i.hospital for i in record.inputs})
    width = max((len(i.label_counts) for i in record.inputs), default=0)
    pooled = [sum(i.label_counts[c] for i in record.inputs if c < len(i.label_counts)) for c in range(width)]
    lines = [
        f"{total} training images at {sites} sites (label mix: {_mix(pooled, classes)}); counts only, no image left a site."
    ]
    if not record.params.contribution.share:
        return lines + ["Per-site counts are not shown: `contribution.share` is off."]
    lines += ["", "| site | vector | images | label mix |", "|---|---|---:|---|"]
    for i in record.inputs:
        lines.append(f"| {md_inert(i.hospital)} | `{i.vector_id}` | {i.n_train} | {_mix(i.label_counts, classes)} |")
    return lines


def _merge_section(record: MergeRecord) -> list[str]:
    scale = "λ" if record.mode == "oneshot" else "η"
    line = (
        f"`{record.merge_id}` ({record.mode}): {record.method}, {scale} = {record.lam:g}, batch norm"
        f" {record.bn_strategy} from {record.bn_source}, from base `{record.base_sha256[:12]}`"
    )
    if record.mode == "async":
        line += f", parent start point v{record.parent_version}"
    return [line + f"; finished {record.finished_at}."]


def _metrics_line(m: dict[str, float]) -> str:
    names = [("auc", "AUC"), ("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy")]
    return ", ".join(f"{label} {_num(m.get(key))}" for key, label in names if key in m)


def _validation(record: MergeRecord) -> list[str]:
    ev = record.evaluation
    if ev.where == "hospitals":
        n = max((r.n for r in ev.rounds), default=0)
        sites = ", ".join(ev.sites()) if record.params.contribution.share else f"{len(ev.sites())} sites"
        where = f"the hospitals' own validation splits ({sites or 'none'}; {n} images), pooled"
    else:
        where = f"the coordinator's set `{md_inert(record.eval_set.source)}` ({record.eval_set.size} images)"
    lines = [f"On {where}: {_metrics_line(record.val) or 'no metrics'}."]
    threshold = record.operating_point.get("threshold")
    if threshold is not None:
        lines.append(f"Operating point: threshold {threshold:.6g} on `p_1` ({record.params.evaluate.threshold} rule).")
    merged = ev.matrix.get("merged", {})
    if merged and not record.params.contribution.share:
        lines.append(f"Scored at {len(merged)} sites; per-site figures are not shown (`contribution.share` is off).")
    elif merged:
        se = ev.matrix_se.get("merged", {})
        lines += ["", "| site | AUC | ± SE |", "|---|---:|---:|"]
        lines += [f"| {md_inert(site)} | {_num(auc)} | {_num(se.get(site))} |" for site, auc in sorted(merged.items())]
    return lines


def _test_section(record: MergeRecord) -> list[str]:
    if not record.test:
        return ["No test split was scored (the hospitals hold their test images)."]
    lines = [f"{_metrics_line(record.test)}."]
    op = record.operating_point
    if "sensitivity" in op:
        lines.append(
            f"At the operating point (threshold {op['threshold']:.6g}): sensitivity {_num(op['sensitivity'])},"
            f" specificity {_num(op.get('specificity'))}."
        )
    return lines


def _privacy(record: MergeRecord) -> list[str]:
    """DP ε per input: named by site and vector with ``contribution.share``, else by position only (which site
    trained with which budget is that site's to tell)."""
    shared = record.params.contribution.share
    lines = [
        (f"- {md_inert(i.hospital)} `{i.vector_id}`: " if shared else f"- input {n}: ")
        + (f"DP-SGD, ε = {i.epsilon:.3g}" if i.epsilon is not None else "trained without DP")
        for n, i in enumerate(record.inputs, 1)
    ]
    return lines or ["No inputs."]


def _signature(reg: Registration) -> list[str]:
    if reg.signed_by:
        return [f"The coordinator signed these weights' sha256 with key `{reg.signed_by}` (tag `medvec.signature`)."]
    return ["Not signed: the coordinator had no signing key."]


def _limits(record: MergeRecord, reg: Registration) -> list[str]:
    chans, size, _ = reg.input_shape or (0, 0, 0)
    channels = "grey images repeated to 3 channels" if chans == 3 else f"{chans} channel(s)"
    names = sorted({md_inert(i.hospital) for i in record.inputs})
    sites = ", ".join(names) if record.params.contribution.share else f"the network's {len(names)} contributing sites"
    resize = f"resized to {size} × {size} ({channels})" if size else "resized to the model's input size"
    return [
        f"- Input: every image is {resize}; fine detail in larger images is lost.",
        f"- Trained at {sites} only, on the image types those sites hold; not validated on other sites,"
        " scanners, modalities or populations.",
        "- Probabilities are not calibrated per site; a site should check the operating point on its own data"
        " (`medvec predict` on a labelled local split).",
    ]


def model_card(record: MergeRecord, reg: Registration) -> str:
    """The card of version ``reg`` made by ``record``: every section of :data:`SECTIONS`, in that order."""
    body = {
        "Intended use": _intended_use(record, reg),
        "Training data": _training_data(record, reg),
        "Merge": _merge_section(record),
        "Validation": _validation(record),
        "Test": _test_section(record),
        "Privacy": _privacy(record),
        "Signature": _signature(reg),
        "Gate": [f"**{reg.verdict}**: {md_inert(reg.reason)}."],
        "Limits": _limits(record, reg),
    }
    out = [f"# {reg.name} v{reg.version}: model card", ""]
    for title in SECTIONS:
        out += [f"## {title}", "", *body[title], ""]
    return "\n".join(out).rstrip() + "\n"
