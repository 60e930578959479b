"""The hospitals' evaluation answers, simulated in one process (``medvec demo`` with ``evaluate.where:
hospitals``, and the tests): each hospital scores the candidates on its own local validation split with the
same code its ``hospital-evaluate`` flow runs (:func:`medvec.hospital.answer.answer`), and the coordinator
reads only the answers. Nothing is signed or stored: the distributed path (:class:`medvec.coordinator.judge.StoreAsk`)
does that."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from medvec.config import ConfigError, Params
from medvec.coordinator.judge import Asked, HospitalJudge
from medvec.data.images import ImageSet
from medvec.histograms import Grid
from medvec.hospital.answer import answer
from medvec.hospital.local import LocalData
from medvec.models import Base


@dataclass
class InProcessAsk:
    """Every present hospital answers each request from its validation split, at once."""

    splits: Mapping[str, ImageSet]  # hospital → its local validation split
    absent: set[str] = field(default_factory=set)  # hospitals whose worker is down: they never answer
    batch_size: int = 256

    def __call__(self, candidates: Mapping[str, Base], grid: Grid, min_count: int, wait_for: list[str]) -> Asked:
        """One request answered by every present hospital (in process, nobody is waited for)."""
        began = time.monotonic()
        request_id = f"eval-sim-{uuid.uuid4().hex[:8]}"
        models = {name: c.model for name, c in candidates.items()}
        spec = next(iter(candidates.values())).spec
        answers = [
            answer(request_id, "", h, models, val, val.sha256(), spec, grid, min_count, self.batch_size)
            for h, val in sorted(self.splits.items())
            if h not in self.absent
        ]
        return Asked(request_id, answers, [], time.monotonic() - began)


def simulated_judge(
    base: Base, local: Mapping[str, LocalData], params: Params, absent: set[str] | None = None
) -> HospitalJudge:
    """A judge whose hospitals answer in process from their local validation splits (those that have one)."""
    splits = {h: d.val for h, d in local.items() if d.val is not None and len(d.val)}
    if not splits:
        raise ConfigError(
            "evaluate.where: hospitals needs the hospitals' local validation splits: none has one "
            "(split.local_val_fraction is 0?); or set evaluate.where: coordinator"
        )
    ask = InProcessAsk(splits, absent or set(), params.evaluate.batch_size)
    weights = {h: len(d.train) for h, d in local.items()}
    return HospitalJudge(ask, base, sorted(local), params.evaluate, weights, vote_z=params.intake.vote_z)


__all__ = ["InProcessAsk", "simulated_judge"]
