"""Drift at a hospital: do new local images still look like the images the model was validated on?

``medvec hospital monitor NAME --data NEW`` scores the champion on the new images and on the hospital's own
validation split (the reference), and compares, feature by feature, the two distributions with the
population stability index

    PSI = Σ_b (q_b − p_b) · ln(q_b / p_b)

over B bins cut at the reference's quantiles (p: the reference's share in bin b, q: the new data's; an empty
bin counts as a share of 1e-4; B = 10, fewer for a reference of under 100 images, so that each bin holds about 10).
Two samples of the same population still differ: with no shift at all, PSI is about (B − 1)(1/n + 1/m) for n
reference and m new images (its chi-square approximation), 0.35 for 24 against 624 images in 10 bins, so the
reading is of the PSI above that noise floor. The features are the model's scores (P(class c) for each class; one for a binary
model, P(positive)) and two image statistics, each image's mean intensity and its contrast (the standard
deviation of its pixels), on the uint8 pixels as decoded. The usual reading: PSI < 0.1 stable, 0.1–0.25 a
moderate shift, > 0.25 drift. Per-image values stay in memory; only the bin edges, the bin counts and the PSI
leave this module (:func:`medvec.tracking.runs.log_monitor` logs them to the hospital's own MLflow experiment).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from medvec.hospital.predict import CHUNK, Source, check_unreadable, score
from medvec.serving import Registered

BINS = 10
FLOOR = 1e-4  # the share an empty bin counts as
STABLE, MODERATE = 0.1, 0.25


def psi(reference: np.ndarray, new: np.ndarray, bins: int = BINS) -> tuple[float, list[float], list[int], list[int]]:
    """(PSI, the interior bin edges, the reference's counts, the new data's counts): bins cut at the reference's
    quantiles (repeated edges merged), a value equal to an edge counted in the bin above it."""
    reference, new = np.asarray(reference, dtype=np.float64), np.asarray(new, dtype=np.float64)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    new_counts = np.bincount(np.searchsorted(edges, new, side="right"), minlength=len(edges) + 1)
    p = np.maximum(ref_counts / max(len(reference), 1), FLOOR)
    q = np.maximum(new_counts / max(len(new), 1), FLOOR)
    return float(np.sum((q - p) * np.log(q / p))), edges.tolist(), ref_counts.tolist(), new_counts.tolist()


def bins_for(n_reference: int) -> int:
    """Decile bins, fewer for a small reference (about 10 reference images per bin, at least 2 bins)."""
    return max(2, min(BINS, n_reference // 10))


def noise_floor(bins: int, n_reference: int, n_new: int) -> float:
    """The PSI two samples of one population show on average: (bins − 1)(1/n + 1/m)."""
    return (bins - 1) * (1 / max(n_reference, 1) + 1 / max(n_new, 1))


def verdict(value: float) -> str:
    """The usual reading of a PSI."""
    return "stable" if value < STABLE else "moderate shift" if value < MODERATE else "drift"


@dataclass(frozen=True)
class Feature:
    """One feature's comparison: its PSI and the aggregates it was computed from."""

    name: str
    psi: float
    noise: float  # the PSI expected with no shift (noise_floor); the verdict reads psi − noise
    verdict: str
    edges: list[float]
    reference_counts: list[int]
    new_counts: list[int]


@dataclass(frozen=True)
class DriftReport:
    """What ``medvec hospital monitor`` found: per feature, the PSI of the new images against the reference."""

    hospital: str
    model: str
    n_reference: int
    n_new: int
    features: list[Feature]

    @property
    def worst(self) -> Feature:
        """The feature that moved most beyond its noise floor."""
        return max(self.features, key=lambda f: f.psi - f.noise)

    def to_json(self) -> dict:
        """The report as JSON: aggregates only (edges, counts, PSI)."""
        return asdict(self)


def _score_names(model: Registered, k: int) -> list[str]:
    return ["score"] if k == 2 and model.task != "multilabel" else [f"score_{c}" for c in range(k)]


def profile(
    model: Registered, source: Source, device: torch.device, max_bad_fraction: float, progress: bool, desc: str
) -> dict[str, np.ndarray]:
    """Per-image features of ``source`` (kept in memory only): the model's scores, mean intensity and contrast."""
    cols: dict[str, list[np.ndarray]] = {}
    rows = 0
    for batch in score(model, source, device, CHUNK, progress, desc):
        names = _score_names(model, batch.p.shape[1])
        scores = [batch.p[:, 1]] if names == ["score"] else [batch.p[:, c] for c in range(batch.p.shape[1])]
        for name, values in zip(names, scores, strict=True):
            cols.setdefault(name, []).append(values)
        cols.setdefault("mean intensity", []).append(np.array([im.mean() for im in batch.images]))
        cols.setdefault("contrast", []).append(np.array([im.std() for im in batch.images]))
        rows += len(batch.ids)
    check_unreadable(source, rows, max_bad_fraction, "too few images to compare")
    return {name: np.concatenate(parts) for name, parts in cols.items()}


def compare(hospital: str, model: str, reference: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> DriftReport:
    """The PSI of each feature of ``new`` against ``reference``."""
    n_ref, n_new = (len(next(iter(d.values()))) for d in (reference, new))
    features = []
    for name, ref_values in reference.items():
        value, edges, ref_counts, new_counts = psi(ref_values, new[name], bins_for(n_ref))
        noise = noise_floor(len(edges) + 1, n_ref, n_new)
        features.append(Feature(name, value, noise, verdict(value - noise), edges, ref_counts, new_counts))
    return DriftReport(hospital, model, n_ref, n_new, features)


def report_text(report: DriftReport) -> str:
    """The report as the command prints it."""
    lines = [
        f"{report.hospital}: {report.n_new} new image(s) against {report.n_reference} reference image(s),"
        f" model {report.model}",
        f"{'feature':<16} {'PSI':>7} {'noise':>7}  reading (PSI above the noise)",
    ]
    lines += [f"{f.name:<16} {f.psi:7.3f} {f.noise:7.3f}  {f.verdict}" for f in report.features]
    worst = report.worst
    lines.append(
        f"most moved: {worst.name} (PSI {worst.psi:.3f} over a noise floor of {worst.noise:.3f}, {worst.verdict})"
    )
    return "\n".join(lines)
