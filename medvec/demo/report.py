"""The comparison report: ``results.json``, ``results.md`` and plots.

``results.json`` schema::

    {"dataset": str, "model": str, "base_sha256": str, "split": {...},
     "results": [{"name": str, "kind": "single"|"merged"|"centralized"|"control"|"async",
                  "method": str|null, "lambda": float|null, "bn_restored": bool,
                  "selected": bool, "n_train": int,
                  "test": {"auc": float, "balanced_accuracy": float, "accuracy": float}}]}

Exactly one merged row has ``selected: true``: the one the validation split chose.
``async`` rows (``medvec demo --landings-per-hospital C``) describe the asynchronous
champion after each landing, with ``landings``, ``sim_time`` and ``version``;
the last one has ``final: true``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medvec.coordinator.contribution import markdown
from medvec.evaluate import (
    async_curve,
    bar_chart,
    confusion_plot,
    contribution_plot,
    fmt,
    lambda_curve,
    markdown_table,
    md_inert,
    results_frame,
)
from medvec.record import Contributions

KINDS = ("single", "merged", "centralized", "control", "async")


def validate_results(doc: dict) -> None:
    """Raise ``ValueError`` if ``doc`` does not follow the results.json schema."""
    for key, typ in (("dataset", str), ("model", str), ("base_sha256", str), ("split", dict), ("results", list)):
        if not isinstance(doc.get(key), typ):
            raise ValueError(f"results.json: {key!r} must be {typ.__name__}")
    selected = [r for r in doc["results"] if r.get("selected")]
    if len(selected) != 1 or selected[0]["kind"] != "merged":
        raise ValueError(f"results.json: exactly one merged row must be selected, found {len(selected)}")
    finals = [r for r in doc["results"] if r.get("kind") == "async" and r.get("final")]
    if any(r.get("kind") == "async" for r in doc["results"]) and len(finals) != 1:
        raise ValueError(f"results.json: exactly one async row must be final, found {len(finals)}")
    for r in doc["results"]:
        if r.get("kind") == "async" and not all(k in r for k in ("landings", "sim_time", "version")):
            raise ValueError(f"results.json: async row {r.get('name')!r} lacks landings, sim_time or version")
        if r.get("kind") not in KINDS:
            raise ValueError(f"results.json: row {r.get('name')!r} has kind {r.get('kind')!r}")
        for k in ("auc", "balanced_accuracy", "accuracy"):
            if not isinstance(r.get("test", {}).get(k), float):
                raise ValueError(f"results.json: row {r.get('name')!r} lacks test.{k}")


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _epochs(central: dict) -> str:
    """`` (best epoch 5 of 8, validation stopped it)`` for the converged reference; nothing for the other."""
    if "val_curve" not in central:
        return ""
    why = "validation stopped it" if central.get("stopped_early") else "the cap stopped it: not converged"
    return f" (best epoch {central['epochs']} of {len(central['val_curve'])}, {why})"


def summary_lines(rows: list[dict]) -> list[str]:
    """The report's headline: the selected merge's test AUC against the mean single hospital's, and its ratio
    to each centralized reference (equal compute, converged), where those rows exist."""
    singles = [r["test"]["auc"] for r in rows if r["kind"] == "single"]
    sel = next(r for r in rows if r.get("selected"))
    centrals = [r for r in rows if r["kind"] == "centralized"]
    lines = []
    if singles:
        mean_single = sum(singles) / len(singles)
        lines.append(
            f"selected merge `{sel['name']}` (λ={sel['lambda']}): test AUC {sel['test']['auc']:.3f} vs mean single hospital {mean_single:.3f} ({sel['test']['auc'] - mean_single:+.3f})"
        )
    for central in centrals:  # at equal compute, then trained to convergence
        lines.append(
            f"{central['name']}{_epochs(central)}: test AUC {central['test']['auc']:.3f}; merged / centralized = {sel['test']['auc'] / central['test']['auc']:.3f}"
        )
    return lines


@dataclass
class DemoReport:
    """What ``medvec demo`` found: the comparison's rows and what they were made from (``results.json``)."""

    dataset: str
    data: str
    model: str
    base_sha256: str
    image_size: int
    split: dict
    params: dict
    vectors: list[dict]
    seconds: float
    async_: dict | None
    results: list[dict]
    contribution: dict | None = None
    phases: dict = field(default_factory=dict)
    merge_id: str | None = None
    registry: dict | None = None

    def to_json(self) -> dict:
        """``results.json``: NaN metrics as null; the registry's fields only when a merge was registered."""
        doc = {("async" if k == "async_" else k): v for k, v in asdict(self).items()}
        if self.merge_id is None:
            del doc["merge_id"], doc["registry"]
        return _clean(doc)


def draw_plots(out: str | Path, report: DemoReport, curves: dict | None, classes: list[str] | None) -> dict[str, Path]:
    """The report's figures: AUC by model (``results.png``), the async champion, each vector's contribution, the
    λ curves and the selected model's confusion matrix, as far as the report has them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = report.to_json()
    rows, dataset = doc["results"], doc["dataset"]
    sel = next(r for r in rows if r.get("selected"))
    paths = {"bars": out / "results.png"}
    bars = [r for r in rows if r["kind"] != "async" or r.get("final")]
    bar_chart(results_frame(bars), paths["bars"], "test_auc", f"{dataset}: AUC by model (test split)")
    steps = [r for r in rows if r["kind"] == "async"]
    if steps:
        refs = {"one-shot merge (selected)": sel["test"]["auc"]}
        for central in (r for r in rows if r["kind"] == "centralized"):
            refs[central["name"]] = central["test"]["auc"]
        paths["async"] = async_curve(steps, out / "async.png", refs)
    if report.contribution:
        scores = Contributions.model_validate(report.contribution)
        title = f"{dataset}: each vector's contribution to the registered merge (validation split)"
        paths["contribution"] = contribution_plot(scores, out / "contributions.png", title)
    if curves:
        chosen = {r["name"]: r["lambda"] for r in rows if r["name"] in curves}
        title = f"{dataset}: validation AUC against λ (validation split)"
        paths["lambda"] = lambda_curve(curves, out / "lambda.png", chosen=chosen, selected=sel["name"], title=title)
    if sel.get("confusion") and classes:
        title = f"{dataset}, selected {sel['name']}: test split (n={sum(map(sum, sel['confusion']))})"
        paths["confusion"] = confusion_plot(sel["confusion"], classes, out / "confusion.png", title)
    return paths


def write_report(out: str | Path, report: DemoReport, plots: dict[str, Path]) -> dict[str, Path]:
    """Write results.json and results.md (which shows ``plots``, :func:`draw_plots`); returns every path."""
    out = Path(out)
    doc = report.to_json()
    validate_results(doc)
    paths = {**plots, "json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(doc, indent=2))
    paths["md"].write_text("\n".join(_markdown(doc, plots)))
    return paths


def _markdown(doc: dict, plots: dict[str, Path]) -> list[str]:
    """results.md: the summary, the table of every model, and the figures."""
    df = results_frame(doc["results"])
    df["lambda"] = df["lambda"].map(lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:g}")
    df["selected"] = df["selected"].map(lambda s: "★" if s else "")
    columns = {
        "name": "model", "kind": "kind", "lambda": "λ", "selected": "sel", "n_train": "n train", "val_auc": "val AUC",
        "test_auc": "test AUC", "test_balanced_accuracy": "test bal. acc", "test_accuracy": "test acc",
        "test_op_sensitivity": "sens @op", "test_op_specificity": "spec @op", "test_op_balanced_accuracy": "bal. acc @op",
    }  # fmt: skip
    columns |= {c: f"test AUC {md_inert(c.split(':', 1)[1])}" for c in df.columns if c.startswith("test_auc:")}
    shown = [c for c in columns if c in df]
    md = [
        f"# medvec comparison: {doc['dataset']}",
        "",
        f"Base model `{doc['model']}` (sha256 `{doc['base_sha256'][:16]}…`).",
        "",
    ]
    md += [f"- {line}" for line in summary_lines(doc["results"])]
    md += [
        "",
        markdown_table(df, shown, [columns[c] for c in shown]),
        "",
        "★ = chosen on the validation split for promotion; test figures are reported, never used to choose.",
    ]
    if any(c.startswith("test_auc:") for c in df.columns):
        md += ["Multi-label: test AUC is the macro mean of the per-label AUCs (one sigmoid per label)."]
    md += [
        "@op = at the decision threshold chosen on the validation split (`evaluate.threshold`), applied to test.",
        "",
    ]
    if "async" in plots:
        md += ["", "![async champion after each landing](async.png)", ""]
    if doc.get("contribution"):
        scores = Contributions.model_validate(doc["contribution"])
        md += [
            "",
            "## What each hospital contributed",
            "",
            *markdown(scores),
            "",
            "![contributions](contributions.png)",
            "",
        ]
    return md


def render_table(doc: dict) -> str:
    """The comparison as a terminal table (text)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"medvec: {doc['dataset']} ({doc['model']})")
    per_label = list((doc["results"][0]["test"].get("auc_by_label") or {}) if doc["results"] else [])
    for col in ("model", "kind", "λ", "n train", "val AUC", "test AUC", "test bal.acc", "test acc"):
        t.add_column(col, justify="right" if col not in ("model", "kind") else "left")
    for label in per_label:
        t.add_column(f"AUC {label}", justify="right")
    for r in doc["results"]:
        val = (r.get("val") or {}).get("auc")
        t.add_row(
            ("★ " if r.get("selected") else "") + r["name"],
            r["kind"],
            "" if r.get("lambda") is None else f"{r['lambda']:g}",
            str(r.get("n_train", "")),
            fmt(val),
            f"{r['test']['auc']:.3f}",
            f"{r['test']['balanced_accuracy']:.3f}",
            f"{r['test']['accuracy']:.3f}",
            *(fmt(r["test"].get("auc_by_label", {}).get(label)) for label in per_label),
        )
    console = Console(width=120)
    with console.capture() as cap:
        console.print(t)
        for line in summary_lines(doc["results"]):
            console.print(line)
    return cap.get()
