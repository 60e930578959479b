"""Score histograms: how a hospital reports a model's quality on its own validation images without any
per-image value, and how the coordinator pools the reports into metrics.

A hospital scores a candidate on its validation split and counts, for every *column* the selection metric
reads, the predicted scores of its positives and of its negatives in fixed bins:

* binary tasks: one column, P(class 1), positives are the images of class 1;
* multi-class tasks: one column per class k, P(k) (one-vs-rest), positives are the images of class k;
* multi-label tasks: one column per label, its sigmoid, positives are the images with that label.

The bins are a fixed :class:`Grid` on the logit scale, the same at every site, so histograms add up: the pooled
histogram is exactly the histogram of the union of the sites' images. The AUC of a column is then the
Mann-Whitney statistic over bins (a positive and a negative in the same bin count one half), the ROC is read at
the bin edges, and the operating point is chosen among those edges by the same rules as
:func:`medvec.evaluate.choose_threshold`.

What a site sends is a :class:`ScoreReport`: each row (a column's positives, or its negatives) as groups of
neighbouring bins ``(first, last, images, bin_sum)``. With ``min_count`` k, neighbouring non-empty bins are merged
left to right until each group counts at least k images (a short tail joins the last group), so no reported count
describes fewer than k patients; a row with fewer than k images in all is withheld (reported empty and named
in ``withheld``), and the column's other row is still reported: its images still pair with the other sites'
(the withheld row's count follows from the split's size, a count of the site's class, not of a patient's
score). ``bin_sum`` is the sum of the group's images' bin indices, so the coordinator
knows each group's mean bin. With k = 1 every group is one bin and the report is the exact histogram.
The coordinator reads a group as two point masses, at its first and at its last bin, weighted so that their mean
is the group's (:meth:`ScoreReport.histograms`). A group is most often a cluster and an outlier: a model that
saturates puts most images at one end of the grid and its few confident mistakes at the other, and a group
that holds such a mistake reaches across to the cluster. Spread evenly over its bins, the group would carry the
mistake to the middle, where it ranks right, and inflate the AUC of exactly the models that saturate (up to
+0.1 on simulated sites of 30–180 images); read at its ends with its mean, it stays where it was
(``tests/test_hospital_eval.py`` bounds the cost on real images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medvec.evaluate import pick_threshold

NEGATIVE, POSITIVE = 0, 1


@dataclass(frozen=True)
class Grid:
    """``bins`` equal bins of the logit log(p / (1 − p)) over [−limit, limit]; scores beyond fall in the end bins."""

    bins: int = 10000
    limit: float = 16.0

    def __post_init__(self):
        if self.bins < 100:
            raise ValueError(f"a score grid needs at least 100 bins, not {self.bins}")
        if not self.limit > 0:
            raise ValueError(f"the grid's logit limit must be positive, not {self.limit}")

    def index(self, p: np.ndarray) -> np.ndarray:
        """The bin of each probability (0 … bins − 1): bin b holds lower_edges[b] ≤ p < lower_edges[b + 1]."""
        p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
        return np.searchsorted(self.lower_edges(), p, side="right").astype(np.int64) - 1

    def lower_edges(self) -> np.ndarray:
        """The probability at which each bin starts (0 for the first bin)."""
        logit = -self.limit + 2 * self.limit * np.arange(self.bins) / self.bins
        edges = 1.0 / (1.0 + np.exp(-logit))
        edges[0] = 0.0
        return edges


def columns(proba: np.ndarray, labels: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores N×C, positives N×C) of the columns the AUC reads (see the module's docstring)."""
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(labels)
    if task == "multilabel":
        return proba, labels.astype(bool)
    y = labels.reshape(-1).astype(np.int64)
    if proba.shape[1] == 2:
        return proba[:, 1:], (y == 1)[:, None]
    return proba, y[:, None] == np.arange(proba.shape[1])[None, :]


def summed_loss(proba: np.ndarray, labels: np.ndarray, task: str, eps: float = 1e-7) -> float:
    """Σ over images of the cross-entropy (multi-label: the binary cross-entropy summed over labels)."""
    p = np.clip(np.asarray(proba, dtype=np.float64), eps, 1 - eps)
    if task == "multilabel":
        y = np.asarray(labels, dtype=np.float64)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum())
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    return float(-np.log(p[np.arange(len(y)), y]).sum())


Reading = Literal["ends", "maxent", "even"]
Group = tuple[int, int, int, int]
"""Neighbouring bins ``first … last`` of one row, the images that scored in them, and the sum of their bins."""


def _spread(width: int, mean: float, reading: Reading) -> np.ndarray:
    """How a group's images fall over its ``width + 1`` bins (shares summing to 1), given their mean offset from
    the first bin: see :meth:`ScoreReport.histograms`."""
    shares = np.zeros(width + 1, dtype=np.float64)
    if width == 0:
        shares[0] = 1.0
    elif reading == "even":
        shares[:] = 1.0 / (width + 1)
    elif reading == "ends":
        shares[-1] = mean / width
        shares[0] = 1.0 - shares[-1]
    else:
        rate = _maxent_rate(width, mean)
        k = np.arange(width + 1, dtype=np.float64)
        shares = np.exp(rate * (k - (width if rate > 0 else 0)))
        shares /= shares.sum()
    return shares


def _geometric_mean_offset(width: int, rate: float) -> float:
    """The mean of k over 0 … width with weights e^(rate·k)."""
    if rate > 0:
        return width - _geometric_mean_offset(width, -rate)
    if abs(rate) * (width + 1) < 1e-6:  # near uniform: the series, where the closed form cancels
        return width / 2 + rate * width * (width + 2) / 12
    tail = -rate * (width + 1)
    return float(1 / np.expm1(-rate) - ((width + 1) / np.expm1(tail) if tail < 700 else 0.0))


def _maxent_rate(width: int, mean: float) -> float:
    """The rate of the most-entropy spread over 0 … width with this mean (a truncated geometric), by bisection:
    the mean rises with the rate, from 0 (all at the first bin) to width (all at the last)."""
    lo, hi = -60.0, 60.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _geometric_mean_offset(width, mid) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class ScoreHistograms:
    """``counts[c, NEGATIVE | POSITIVE, b]``: images of column ``c`` scoring in bin ``b``, by their truth (a
    group of a coarsened report spread evenly over its bins, so counts may be fractional)."""

    grid: Grid
    counts: np.ndarray

    @classmethod
    def of(cls, proba: np.ndarray, labels: np.ndarray, task: str, grid: Grid) -> "ScoreHistograms":
        """The exact histograms of one set of predictions."""
        scores, positives = columns(proba, labels, task)
        counts = np.zeros((scores.shape[1], 2, grid.bins), dtype=np.float64)
        bins = grid.index(scores)
        for c in range(scores.shape[1]):
            for truth in (NEGATIVE, POSITIVE):
                chosen = positives[:, c] == bool(truth)
                counts[c, truth] = np.bincount(bins[chosen, c], minlength=grid.bins)
        return cls(grid, counts)

    def __add__(self, other: "ScoreHistograms") -> "ScoreHistograms":
        if other.grid != self.grid or other.counts.shape != self.counts.shape:
            raise ValueError(f"histograms on different grids or columns: {self.grid} {other.grid}")
        return ScoreHistograms(self.grid, self.counts + other.counts)

    def column_auc(self, c: int) -> float:
        """The Mann-Whitney AUC of column ``c`` (ties within a bin count one half); NaN without both truths."""
        neg, pos = self.counts[c, NEGATIVE], self.counts[c, POSITIVE]
        n_neg, n_pos = neg.sum(), pos.sum()
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def auc(self, task: str) -> float:
        """The task's AUC: the one column (binary); the mean over classes, NaN if one is undefined
        (multi-class, as scikit-learn's one-vs-rest macro); the mean over defined labels (multi-label)."""
        aucs = [self.column_auc(c) for c in range(self.counts.shape[0])]
        if task == "multilabel":
            defined = [a for a in aucs if not math.isnan(a)]
            return float(np.mean(defined)) if defined else float("nan")
        return float("nan") if any(math.isnan(a) for a in aucs) else float(np.mean(aucs))

    def auc_se(self, task: str) -> float:
        """The Hanley–McNeil standard error of :meth:`auc` from the counts alone; for several columns, that of
        their mean, taking the columns as independent."""
        ses = []
        for c in range(self.counts.shape[0]):
            n_pos, n_neg = round(self.counts[c, POSITIVE].sum()), round(self.counts[c, NEGATIVE].sum())
            a = self.column_auc(c)
            if not math.isnan(a):
                ses.append(hanley_mcneil_se(a, n_pos, n_neg))
            elif task != "multilabel":
                return float("nan")
        return float(math.sqrt(sum(s * s for s in ses)) / len(ses)) if ses else float("nan")

    def roc(self, c: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, threshold) of ``scores ≥ threshold`` at every bin's lower edge, highest threshold first."""
        neg, pos = self.counts[c, NEGATIVE], self.counts[c, POSITIVE]
        tp = np.cumsum(pos[::-1])[::-1]  # positives at or above each bin
        fp = np.cumsum(neg[::-1])[::-1]
        tpr = tp / max(pos.sum(), 1.0)
        fpr = fp / max(neg.sum(), 1.0)
        thresholds = self.grid.lower_edges()
        return fpr[::-1], tpr[::-1], thresholds[::-1]

    def threshold(self, rule: str = "youden", target_sensitivity: float = 0.9, c: int = 0) -> float:
        """The operating point on column ``c`` by ``rule`` (as :func:`medvec.evaluate.choose_threshold`), among
        the bins' lower edges: ``youden`` maximises sensitivity + specificity − 1; ``sensitivity`` is the highest
        threshold whose sensitivity reaches the target."""
        if self.counts[c, POSITIVE].sum() == 0 or self.counts[c, NEGATIVE].sum() == 0:
            return 0.5
        return pick_threshold(*self.roc(c), rule, target_sensitivity)

    def at_threshold(self, threshold: float, c: int = 0) -> dict:
        """Sensitivity, specificity, balanced accuracy and accuracy of ``scores ≥ threshold``, exact when the
        threshold is a bin's lower edge (any other counts the bin that holds it as below)."""
        first = int(np.searchsorted(self.grid.lower_edges(), threshold, side="left"))  # bins counted positive
        neg, pos = self.counts[c, NEGATIVE], self.counts[c, POSITIVE]
        tp, fn = float(pos[first:].sum()), float(pos[:first].sum())
        tn, fp = float(neg[:first].sum()), float(neg[first:].sum())
        sens = tp / (tp + fn) if tp + fn else float("nan")
        spec = tn / (tn + fp) if tn + fp else float("nan")
        total = tp + fn + tn + fp
        return {
            "threshold": float(threshold),
            "sensitivity": sens,
            "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2,
            "accuracy": (tp + tn) / total if total else float("nan"),
        }


@dataclass(frozen=True)
class ScoreReport:
    """What one site reports of one model: per column, its negatives' and its positives' groups."""

    grid: Grid
    rows: tuple[tuple[tuple[Group, ...], tuple[Group, ...]], ...]
    withheld: tuple[tuple[int, int], ...] = ()  # (column, NEGATIVE | POSITIVE) of each row withheld

    @classmethod
    def of(cls, proba: np.ndarray, labels: np.ndarray, task: str, grid: Grid, min_count: int = 1) -> "ScoreReport":
        """The report of one set of predictions, every group counting at least ``min_count`` images."""
        exact = ScoreHistograms.of(proba, labels, task, grid).counts.astype(np.int64)
        rows: list[tuple[tuple[Group, ...], tuple[Group, ...]]] = []
        withheld: list[tuple[int, int]] = []
        for c in range(exact.shape[0]):
            sides = [groups(exact[c, truth], min_count) for truth in (NEGATIVE, POSITIVE)]
            withheld += [(c, truth) for truth, side in enumerate(sides) if side is None]
            neg, pos = (tuple(side or ()) for side in sides)
            rows.append((neg, pos))
        return cls(grid, tuple(rows), tuple(withheld))

    def histograms(self, reading: Reading = "ends") -> ScoreHistograms:
        """The report as histograms, each group of bins read by ``reading``: ``ends`` (its images at its first
        and last bin, in the shares that give its mean bin: what the pooled figures read), ``maxent`` (over its
        bins, the spread of most entropy whose mean is the group's mean bin: even when that mean is the middle,
        leaning to one end as the mean does; what each site's own AUC reads) or ``even`` (spread evenly, the
        mean unused); ``benchmarks/pooled_auc.py`` compares them."""
        counts = np.zeros((len(self.rows), 2, self.grid.bins), dtype=np.float64)
        for c, row in enumerate(self.rows):
            for truth in (NEGATIVE, POSITIVE):
                for first, last, n, bin_sum in row[truth]:
                    counts[c, truth, first : last + 1] += n * _spread(last - first, bin_sum / n - first, reading)
        return ScoreHistograms(self.grid, counts)

    def smallest_group(self) -> int | None:
        """The fewest images any reported group counts (None when nothing is reported)."""
        sizes = [g[2] for row in self.rows for side in row for g in side]
        return min(sizes) if sizes else None

    def images(self, c: int = 0) -> int:
        """Images reported in column ``c`` (negatives and positives)."""
        return sum(g[2] for side in self.rows[c] for g in side)

    def to_json(self) -> dict:
        """The report as JSON: the grid, each column's groups ``[first, last, images, bin_sum]``, the withheld
        rows ``[column, 0 | 1]``."""
        rows = [{"negative": [list(g) for g in neg], "positive": [list(g) for g in pos]} for neg, pos in self.rows]
        return {
            "grid": {"bins": self.grid.bins, "limit": self.grid.limit},
            "columns": rows,
            "withheld": [list(w) for w in self.withheld],
        }

    @classmethod
    def from_json(cls, doc: dict) -> "ScoreReport":
        """The inverse of :meth:`to_json`; a group outside the grid, overlapping another, empty or with a bin sum
        its bins cannot make is a ValueError."""
        grid = Grid(int(doc["grid"]["bins"]), float(doc["grid"]["limit"]))
        rows = []
        for c, row in enumerate(doc["columns"]):
            sides = []
            for truth in ("negative", "positive"):
                side = tuple(_group(g, f"column {c} {truth}") for g in row.get(truth, []))
                _check_groups(side, grid, f"column {c} {truth}")
                sides.append(side)
            rows.append((sides[0], sides[1]))
        return cls(grid, tuple(rows), tuple(_withheld(w, len(rows)) for w in doc.get("withheld", ())))


def _withheld(doc: list, columns: int) -> tuple[int, int]:
    column, row = (int(x) for x in doc)
    if not (0 <= column < columns and row in (NEGATIVE, POSITIVE)):
        raise ValueError(f"withheld row {doc} is not [column, 0 (negatives) | 1 (positives)]")
    return column, row


def _group(doc: list, where: str) -> Group:
    if len(doc) != 4:
        raise ValueError(f"{where}: a group is [first, last, images, bin_sum], not {doc}")
    first, last, n, bin_sum = (int(x) for x in doc)
    return first, last, n, bin_sum


def _check_groups(side: tuple[Group, ...], grid: Grid, where: str) -> None:
    end = -1
    for first, last, n, bin_sum in side:
        if not end < first <= last < grid.bins or n < 1:
            raise ValueError(f"{where}: group [{first}, {last}, {n}] is outside the grid, overlaps another or is empty")
        # the first and the last bin each hold at least one image, the others lie between
        low, high = (first * (n - 1) + last, first + last * (n - 1)) if last > first else (n * first, n * first)
        if not low <= bin_sum <= high:
            raise ValueError(f"{where}: group [{first}, {last}, {n}] cannot sum its bins to {bin_sum}")
        end = last


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """The standard error of an AUC from ``n_pos`` positives and ``n_neg`` negatives (Hanley & McNeil, 1982):
    √[(A(1−A) + (n₁−1)(Q₁−A²) + (n₂−1)(Q₂−A²)) / (n₁n₂)], Q₁ = A/(2−A), Q₂ = 2A²/(1+A)."""
    if n_pos < 1 or n_neg < 1 or math.isnan(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def groups(row: np.ndarray, min_count: int = 1) -> list[Group] | None:
    """``row``'s non-empty bins merged left to right into groups of at least ``min_count`` images (a short tail
    joins the last group), each with the sum of its images' bins; None when the whole row holds fewer than
    ``min_count`` images, but some."""
    total = int(row.sum())
    if total == 0:
        return []
    if total < min_count:
        return None
    out: list[list[int]] = []
    current: list[int] = []
    for b in np.nonzero(row)[0]:
        current.append(int(b))
        if int(row[current].sum()) >= min_count:
            out.append(current)
            current = []
    if current:
        out[-1].extend(current)
    return [(g[0], g[-1], int(row[g].sum()), int((row[g] * np.asarray(g)).sum())) for g in out]


__all__ = [
    "Grid",
    "Group",
    "Reading",
    "ScoreHistograms",
    "ScoreReport",
    "columns",
    "groups",
    "hanley_mcneil_se",
    "summed_loss",
]
