"""Worklist priority: bigger is more urgent.

Positive studies first, by probability; then studies the AI has not (yet) answered for -- still
arriving, waiting, in analysis, failed or not applicable -- since a radiologist must read those
without help; then negatives. Ties are broken by time waiting (first instance, oldest first).
"""

from __future__ import annotations

from db.models import StudyStatus

POSITIVE_BASE = 2000
UNANSWERED = 1000
NEGATIVE = 0


def priority_for(status: str, positive: bool | None, probability: float | None) -> int:
    if status in (StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE) or positive is None:
        return UNANSWERED
    if positive:
        return POSITIVE_BASE + round(1000 * (probability or 0.0))
    return NEGATIVE
