"""Which decision threshold and trim fraction an analysis applies.

One rule, for the worker and for ``evaluate`` alike: a value given explicitly wins (the worker's
``HRCT_THRESHOLD`` / ``HRCT_TRIM_FRACTION`` when set in the environment or ``.env``; evaluate's
``--threshold`` / ``--trim-fraction``, else those settings); otherwise the checkpoint's own value,
recorded with the weights it was tuned for; untrained weights carry the paper's values
(``common.paper``). The SR, the SC legend and the worklist state the values applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hrct_triage.worker.method.model import CheckpointMetadata

__all__ = ["DecisionRule", "decision_rule"]


@dataclass(frozen=True)
class DecisionRule:
    """Positive when the mean probability of the lung slices left after dropping
    ``trim_fraction`` of them at each end is at or above ``threshold``."""

    threshold: float
    trim_fraction: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")


def decision_rule(
    checkpoint: CheckpointMetadata,
    *,
    threshold: float | None = None,
    trim_fraction: float | None = None,
) -> DecisionRule:
    """``threshold`` and ``trim_fraction`` where given (not None), else the checkpoint's."""
    return DecisionRule(
        threshold=checkpoint.threshold if threshold is None else threshold,
        trim_fraction=checkpoint.trim_fraction if trim_fraction is None else trim_fraction,
    )
