"""Metrics, tables and plots (scikit-learn's metrics, not our own).

ROC-AUC (binary, or one-vs-rest macro for multi-class), balanced accuracy,
accuracy, per-class recall and the confusion matrix. A model's AUC ranks its
images by each class's log-odds (:func:`log_odds`), not by the float32
probability, which saturates at 1 once a margin passes about 17.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from medvec.data.images import ImageSet
from medvec.models import ModelSpec
from medvec.preprocess import batches
from medvec.timing import timed

if TYPE_CHECKING:
    import pandas as pd  # imported where a frame is made: 1.7 s that a flow opening the store need not pay


def probabilities(logits: torch.Tensor, task: str = "multiclass") -> torch.Tensor:
    """Class probabilities of logits, in float64: a softmax over classes, or for multi-label one sigmoid per label.
    float64, because a float32 probability is 1 exactly once the margin passes about 17, and a threshold on it (the
    operating point, the registered model's label) then cannot tell those images apart; float64 holds them apart up
    to a margin of about 37 (the AUC ranks by :func:`log_odds`, which never ties them)."""
    z = logits.double()
    return torch.sigmoid(z) if task == "multilabel" else torch.softmax(z, dim=1)


def log_odds(logits: torch.Tensor, task: str = "multiclass") -> np.ndarray:
    """Each column's log-odds log(p / (1 − p)), N×K in float64, from the logits: z_c − logsumexp_{j≠c} z_j under
    a softmax (z₁ − z₀ for two classes), z itself under per-label sigmoids. They rank the images as the
    probabilities do, without saturating: a float32 softmax gives p = 1 exactly once the margin passes about 17
    (float64: 37), and the AUC then scores those images as ties. A DP head's merged margins reach 90 (issue 28)."""
    z = logits.detach().double().cpu()
    if task == "multilabel" or z.shape[1] < 2:
        return z.numpy()
    others = z.unsqueeze(1).expand(-1, z.shape[1], -1).clone()  # [n, c, j] = z_j
    others.diagonal(dim1=1, dim2=2).fill_(-math.inf)  # leave out j = c
    return (z - torch.logsumexp(others, dim=2)).numpy()


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: ImageSet, spec: ModelSpec, batch_size: int = 256, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The model's logits, N×K on the CPU, in eval mode."""
    model.eval()
    model.to(device)
    out = [model(x.to(device)).float().cpu() for x, _ in batches(data, spec, batch_size)]
    return torch.cat(out) if out else torch.zeros((0, data.num_classes))


def predict(
    model: nn.Module, data: ImageSet, spec: ModelSpec, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Class probabilities, N×K, with the model in eval mode (per-label sigmoids for a multi-label set)."""
    return probabilities(predict_logits(model, data, spec, batch_size, device), data.task).numpy()


def multilabel_metrics(y_true: np.ndarray, proba: np.ndarray, ranks: np.ndarray | None = None) -> dict:
    """Per-label AUC (of ``ranks``, the log-odds, where given) and their macro mean, and per-label balanced
    accuracy, accuracy and recall at p ≥ 0.5.

    A label whose AUC is undefined here (no positives, or no negatives) is left out of the macro mean, and
    ``auc_labels`` counts those that were in it; the mean is NaN only when no label has an AUC.
    """
    from sklearn.metrics import recall_score

    pred = (proba >= 0.5).astype(int)
    auc = per_label_auc(y_true, proba if ranks is None else ranks)
    return {
        "auc": macro_auc(auc),
        "auc_per_label": auc,
        "auc_labels": sum(not math.isnan(a) for a in auc),
        "balanced_accuracy": _multilabel_score(y_true, proba, "balanced_accuracy"),
        "accuracy": _multilabel_score(y_true, proba, "accuracy"),
        "recall": [float(recall_score(y_true[:, c], pred[:, c], zero_division=0)) for c in range(y_true.shape[1])],
        "n": len(y_true),
    }


def per_label_auc(y_true: np.ndarray, proba: np.ndarray) -> list[float]:
    """The ROC-AUC of each label column; NaN for a label with one class in ``y_true`` or non-finite probabilities."""
    return [_binary_or_nan(y_true[:, c], proba[:, c]) for c in range(y_true.shape[1])]


def macro_auc(aucs: list[float]) -> float:
    """The mean of the per-label AUCs that are defined; NaN when none is."""
    defined = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def _multilabel_score(y_true: np.ndarray, proba: np.ndarray, metric: str) -> float:
    """The mean over labels of one metric: AUC (labels where it is defined), or (balanced) accuracy at p ≥ 0.5."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if metric == "auc":
        return macro_auc(per_label_auc(y_true, proba))
    pred = (proba >= 0.5).astype(int)
    score = balanced_accuracy_score if metric == "balanced_accuracy" else accuracy_score
    with warnings.catch_warnings():  # a label without positives in y_true: sklearn warns and scores the negatives
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(np.mean([score(y_true[:, c], pred[:, c]) for c in range(y_true.shape[1])]))


def _binary_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 and np.isfinite(p).all() else float("nan")


def metrics(
    y_true: np.ndarray, proba: np.ndarray, num_classes: int | None = None, ranks: np.ndarray | None = None
) -> dict:
    """AUC, balanced accuracy, accuracy, per-class recall and confusion matrix (multi-label: per label, no
    confusion matrix). The AUC ranks by ``ranks`` (:func:`log_odds`) where given, else by ``proba``."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, recall_score

    if np.ndim(y_true) == 2 and np.shape(y_true)[1] > 1:
        return multilabel_metrics(np.asarray(y_true), proba, ranks)
    y_true = np.asarray(y_true).reshape(-1)
    k = num_classes or proba.shape[1]
    labels = list(range(k))
    pred = proba.argmax(1)
    return {
        "auc": metric_value(y_true, proba, "auc", ranks),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "recall": [float(r) for r in recall_score(y_true, pred, labels=labels, average=None, zero_division=0)],
        "confusion": confusion_matrix(y_true, pred, labels=labels).astype(int).tolist(),
        "n": len(y_true),
    }


def choose_threshold(
    y_true: np.ndarray, scores: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.9
) -> float:
    """A binary decision threshold on the positive-class probability, chosen on validation data.

    ``youden``: the ROC point that maximises J = sensitivity + specificity − 1;
    ``sensitivity``: the highest threshold whose sensitivity reaches ``target_sensitivity``.
    """
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true).reshape(-1)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    finite = np.isfinite(thresholds)
    return pick_threshold(fpr[finite], tpr[finite], thresholds[finite], rule, target_sensitivity)


def pick_threshold(
    fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.9
) -> float:
    """The operating point on an ROC (highest threshold first) by ``rule``: ``youden`` maximises
    sensitivity + specificity − 1; ``sensitivity`` is the highest threshold whose sensitivity reaches the target."""
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if rule == "sensitivity":
        ok = np.nonzero(tpr >= target_sensitivity)[0]
        return float(thresholds[ok[0]]) if len(ok) else float(thresholds[-1])
    raise ValueError(f"unknown threshold rule {rule!r}: valid are youden, sensitivity")


def at_threshold(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, balanced accuracy and accuracy of ``scores >= threshold``."""
    y_true = np.asarray(y_true).reshape(-1).astype(bool)
    pred = np.asarray(scores) >= threshold
    pos, neg = y_true.sum(), (~y_true).sum()
    sens = float((pred & y_true).sum() / pos) if pos else float("nan")
    spec = float((~pred & ~y_true).sum() / neg) if neg else float("nan")
    return {
        "threshold": float(threshold),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
        "accuracy": float((pred == y_true).mean()) if len(y_true) else float("nan"),
    }


def operating_point(
    val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], rule: str = "youden", target: float = 0.9
) -> dict:
    """Choose the threshold on (labels, P(positive)) of validation; report at it on test."""
    threshold = choose_threshold(val[0], val[1], rule, target)
    return at_threshold(test[0], test[1], threshold)


@timed("evaluate")
def evaluate_model(
    model: nn.Module, data: ImageSet, spec: ModelSpec, batch_size: int = 256, device: str | torch.device = "cpu"
) -> dict:
    """:func:`metrics` of the model on ``data`` (the AUC of the log-odds), with ``proba``, ``log_odds`` and
    ``labels`` (a paired bootstrap resamples them); binary tasks also keep ``scores``, P(positive), for an
    operating point."""
    logits = predict_logits(model, data, spec, batch_size, device)
    proba, ranks = probabilities(logits, data.task).numpy(), log_odds(logits, data.task)
    out = metrics(data.labels, proba, data.num_classes, ranks)
    out |= {"proba": proba, "log_odds": ranks, "labels": np.asarray(data.labels)}
    if data.multilabel:
        out["auc_by_label"] = dict(zip(data.classes, out["auc_per_label"], strict=True))
    elif proba.shape[1] == 2:
        out["scores"] = proba[:, 1]
    return out


def metric_value(y_true: np.ndarray, proba: np.ndarray, metric: str, ranks: np.ndarray | None = None) -> float:
    """One selection metric (``auc``, ``balanced_accuracy`` or ``accuracy``) of class probabilities, the AUC of
    ``ranks`` (:func:`log_odds`) where given; NaN if undefined."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    if np.ndim(y_true) == 2 and np.shape(y_true)[1] > 1:
        if metric not in ("auc", "balanced_accuracy", "accuracy"):
            raise ValueError(f"unknown metric {metric!r}: valid are auc, balanced_accuracy, accuracy")
        return _multilabel_score(np.asarray(y_true), proba if metric != "auc" or ranks is None else ranks, metric)
    y_true = np.asarray(y_true).reshape(-1)
    if metric == "auc":
        scores = proba if ranks is None else ranks
        if len(np.unique(y_true)) < 2 or not np.isfinite(scores).all():
            return float("nan")
        if scores.shape[1] == 2:
            return float(roc_auc_score(y_true, scores[:, 1]))
        labels = list(range(scores.shape[1]))
        if len(np.unique(y_true)) < len(labels):  # a class without examples: its one-vs-rest AUC is undefined
            return float("nan")
        # the macro mean of the one-vs-rest AUCs, as roc_auc_score(multi_class="ovr") (which takes probabilities)
        return float(np.mean([roc_auc_score(y_true == c, scores[:, c]) for c in labels]))
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(y_true, proba.argmax(1)))
    if metric == "accuracy":
        return float(accuracy_score(y_true, proba.argmax(1)))
    raise ValueError(f"unknown metric {metric!r}: valid are auc, balanced_accuracy, accuracy")


def with_operating_point(val: dict, test: dict | None, rule: str = "youden", target: float = 0.9) -> dict | None:
    """Add ``op`` to the test metrics: the threshold chosen on validation scores, applied to the test scores."""
    if test is None or "scores" not in test:
        return test
    if val.get("threshold") is not None:  # chosen on the hospitals' pooled validation ROC (issue 25)
        return test | {"op": at_threshold(test["labels"], test["scores"], val["threshold"])}
    if "scores" not in val:
        return test
    return test | {
        "op": operating_point((val["labels"], val["scores"]), (test["labels"], test["scores"]), rule, target)
    }


def results_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Flatten result rows (``{"name", "kind", ..., "test": {...}}``) into a table."""
    import pandas as pd

    flat = []
    for r in rows:
        d = {k: v for k, v in r.items() if not isinstance(v, dict)}
        for split in ("val", "test"):
            for k, v in (r.get(split) or {}).items():
                if isinstance(v, (int, float)):
                    d[f"{split}_{k}"] = v
            for k, v in ((r.get(split) or {}).get("op") or {}).items():
                d[f"{split}_op_{k}"] = v
            for k, v in ((r.get(split) or {}).get("auc_by_label") or {}).items():
                d[f"{split}_auc:{k}"] = v
        flat.append(d)
    return pd.DataFrame(flat)


def fmt(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; an en dash for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def md_inert(text: object) -> str:
    """A value from outside (a hospital's name) made inert in a markdown table: no link, no markup, one line."""
    out = " ".join(str(text).split())
    for ch in "\\`*_[]|<>#":
        out = out.replace(ch, "\\" + ch)
    return out


def markdown_table(df: pd.DataFrame, columns: list[str], headers: list[str] | None = None) -> str:
    """``df``'s ``columns`` as a markdown table under ``headers`` (default: the column names).

    Floats are written by :func:`fmt`, None as an empty cell; cells are not escaped (see :func:`md_inert`)."""
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(
                fmt(v)
                if isinstance(v, float)
                else ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_KIND_COLOURS = {
    "single": "#9aa5b1",
    "merged": "#2f6fdd",
    "centralized": "#1b9e77",
    "control": "#d95f02",
    "async": "#7570b3",
}


def _legend_outside(ax, handles=None) -> None:
    """The legend to the right of the axes, where it covers no data."""
    kwargs = {"handles": handles} if handles is not None else {}
    ax.legend(**kwargs, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def bar_chart(df: pd.DataFrame, path: str | Path, metric: str = "test_auc", title: str = "") -> Path:
    """Horizontal bars of ``metric`` per row, coloured by kind; the selected row is starred.

    ``metric`` is ``<split>_<name>`` (``test_auc``); the default title names the split.
    """
    plt = _plt()
    path = Path(path)
    labels = [f"{'★ ' if r.get('selected') else ''}{r['name']}" for _, r in df.iterrows()]
    fig, ax = plt.subplots(figsize=(9.5, 0.32 * len(df) + 1.4))
    ax.barh(range(len(df)), df[metric], color=[_KIND_COLOURS.get(k, "#777") for k in df["kind"]])
    ax.set_yticks(range(len(df)), labels, fontsize=8)
    ax.invert_yaxis()
    lo = np.nanmin(df[metric].to_numpy(dtype=float)) if len(df) else 0.0
    ax.set_xlim(max(0.0, lo - 0.05), 1.0)
    split, _, name = metric.partition("_")
    name = "AUC" if name == "auc" else name.replace("_", " ")
    ax.set_xlabel(f"{name} on the {split} split")
    ax.set_title(title or f"{name} by model ({split} split)")
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in _KIND_COLOURS.items() if k in set(df["kind"])]
    singles = df.loc[df["kind"] == "single", metric]
    if len(singles):
        ax.axvline(float(singles.mean()), color="#555", linestyle="--", linewidth=1)
        handles.append(plt.Line2D([], [], color="#555", linestyle="--", label="mean single"))
    _legend_outside(ax, handles)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def contribution_plot(scores, path: str | Path, title: str) -> Path:
    """Horizontal bars of each input's leave-one-out score (± standard error), and its Shapley value when scored.

    ``scores`` is a :class:`medvec.record.Contributions`; vectors the harmful rule fired on are red.
    """
    plt = _plt()
    path = Path(path)
    rows = [*scores.scores, *scores.excluded]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(rows) + 1.6))
    height = 0.38 if scores.method == "shapley" else 0.6
    colours = ["#d62728" if s.harmful else "#2f6fdd" for s in rows]
    err = [s.loo_se or 0.0 for s in rows]
    ax.barh(
        y - (height / 2 if scores.method == "shapley" else 0),
        [s.loo for s in rows],
        height,
        xerr=err,
        color=colours,
        ecolor="#333",
        capsize=3,
        label="leave-one-out ± SE",
    )
    if scores.method == "shapley":
        ax.barh(
            y + height / 2,
            [s.shapley or 0.0 for s in rows],
            height,
            xerr=[s.shapley_se or 0.0 for s in rows],
            color="#9ecae1",
            ecolor="#333",
            capsize=3,
            label="Shapley ± SE",
        )
    excluded = {s.vector_id for s in scores.excluded}
    labels = [f"{s.hospital} {s.vector_id[-8:]}{' (excluded)' if s.vector_id in excluded else ''}" for s in rows]
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="#555", linewidth=1)
    ax.set_xlabel(f"contribution: change in validation {scores.metric} (positive: it helped)")
    ax.set_title(title)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lambda_curve(
    curves: dict[str, list[tuple[float, float]]],
    path: str | Path,
    metric: str = "AUC",
    chosen: dict[str, float] | None = None,
    selected: str | None = None,
    title: str = "",
) -> Path:
    """One line per method: the validation metric against λ.

    ``chosen`` marks each method's chosen λ (a ringed point); ``selected`` names the
    method promoted, whose chosen point is a star.  λ is chosen on validation, so the
    plot shows the validation split only.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, pts in curves.items():
        if not pts:
            continue
        xs, ys = zip(*sorted(pts))
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4 if name == selected else 1.0, label=name)
        lam = (chosen or {}).get(name)
        if lam is None:
            continue
        y = dict(zip(xs, ys)).get(lam)
        if y is None:
            continue
        star = name == selected
        ax.plot(
            [lam],
            [y],
            color=line.get_color(),  # given explicitly, so the marker does not advance the colour cycle
            marker="*" if star else "o",
            markersize=16 if star else 9,
            markerfacecolor=line.get_color() if star else "none",
            markeredgecolor="black" if star else line.get_color(),
            linestyle="none",
            zorder=5,
        )
    ax.plot([], [], marker="o", markerfacecolor="none", markeredgecolor="#555", linestyle="none", label="chosen λ")
    if selected:
        ax.plot([], [], marker="*", markersize=12, color="#555", linestyle="none", label="selected for promotion")
    ax.set_xlabel("λ (θ = θ_pre + λ·merged τ)")
    ax.set_ylabel(f"{metric} on the validation split")
    ax.set_title(title or f"{metric} against λ (validation split)")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def async_curve(rows: list[dict], path: str | Path, references: dict[str, float] | None = None) -> Path:
    """The async champion's test AUC against landings and against simulated time, beside reference lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    auc = [r["test"]["auc"] for r in rows]
    for ax, key, label in (
        (axes[0], "landings", "landings"),
        (axes[1], "sim_time", "simulated time (1000-image epochs)"),
    ):
        ax.step(
            [r[key] for r in rows], auc, where="post", marker="o", color=_KIND_COLOURS["async"], label="async champion"
        )
        for (name, value), style in zip((references or {}).items(), ("--", ":", "-.")):
            ax.axhline(value, linestyle=style, color="#555", linewidth=1, label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUC on the test split")
    _legend_outside(axes[1])
    fig.suptitle("asynchronous refinement: the champion after each landing (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def confusion_figure(m: dict, classes: list[str], path: str | Path, title: str) -> Path | None:
    """The confusion plot of evaluation metrics ``m``: the K×K matrix, or for multi-label one 2×2 per label;
    ``title`` names the model and split (n is added).  None when ``m`` holds neither."""
    if m.get("confusion"):
        return confusion_plot(m["confusion"], classes, path, f"{title} (n={sum(map(sum, m['confusion']))})")
    labels = np.asarray(m.get("labels", []))
    if labels.ndim == 2 and "proba" in m:
        return label_confusion_plot(labels, m["proba"], classes, path, title)
    return None


def label_confusion_plot(
    y_true: np.ndarray, proba: np.ndarray, classes: list[str], path: str | Path, title: str
) -> Path:
    """Multi-label: for each label, counts of true (rows) against predicted (columns, p ≥ 0.5) absent/present."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.4), squeeze=False)
    for c, ax in enumerate(axes[0]):
        cm = np.zeros((2, 2), dtype=int)
        np.add.at(cm, (y_true[:, c].astype(int), (proba[:, c] >= 0.5).astype(int)), 1)
        ax.imshow(cm, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(
                    j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
                )
        ax.set_xticks([0, 1], ["absent", "present"], fontsize=8)
        ax.set_yticks([0, 1], ["absent", "present"], fontsize=8)
        ax.set_xlabel("predicted (p ≥ 0.5)")
        ax.set_ylabel("true")
        ax.set_title(textwrap.fill(classes[c], 24), fontsize=9)
    fig.suptitle(f"{title} (n={len(y_true)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def confusion_plot(confusion: list[list[int]], classes: list[str], path: str | Path, title: str) -> Path:
    """Counts of true (rows) against predicted (columns) class; ``title`` must name the model and split."""
    plt = _plt()
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            dark = cm[i, j] > cm.max() / 2
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if dark else "black")
    names = [textwrap.fill(c, 14) for c in classes]
    ax.set_xticks(range(len(classes)), names, fontsize=8)
    ax.set_yticks(range(len(classes)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(textwrap.fill(title, 48), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
