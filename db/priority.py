"""Worklist priority (bigger is more urgent) and the rule that sends a study to the urgent queue.

Priority bands, highest first; ties are broken by time waiting (first instance, oldest first):

=============  =============================  ================================================
band           value                          studies
=============  =============================  ================================================
positive       ``POSITIVE_BASE`` + 1000 * p   the AI found COVID-19: by probability ``p``
unanswered     ``UNANSWERED``                 the AI has not (yet) answered: still arriving,
                                              waiting, in analysis, failed or not applicable;
                                              a radiologist must read these without help
negative       ``NEGATIVE``                   the AI found no COVID-19
=============  =============================  ================================================

``failed`` and ``not_applicable`` are in the middle band on purpose: they are never hidden below
the negatives, since nobody else will look at them.

The urgent queue (``db.queue.URGENT_QUEUE``) is a different question, asked when the dispatcher
publishes a study: before analysis nothing is known about the result, so urgency comes from
where the study came from and from the operator. See ``is_urgent``.
"""

from __future__ import annotations

from collections.abc import Collection

from db.models import StudyStatus

POSITIVE_BASE = 2000
UNANSWERED = 1000
NEGATIVE = 0

# Written into the event detail of an operator's ``requeue --urgent``; the dispatcher reads it
# back, so the flag survives a broker outage and a republish without a column of its own.
URGENT_MARK = "[urgent]"


def priority_for(status: str, positive: bool | None, probability: float | None) -> int:
    """The worklist priority of a study in ``status`` with this result (see the bands above)."""
    if status in (StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE) or positive is None:
        return UNANSWERED
    if positive:
        return POSITIVE_BASE + round(1000 * (probability or 0.0))
    return NEGATIVE


def is_urgent(
    *,
    task: str,
    calling_ae: str | None,
    positive: bool | None,
    operator_urgent: bool,
    urgent_aets: Collection[str],
) -> str | None:
    """Why this outbox message goes to the urgent queue, or None for the routine queue.

    In this order: the operator asked for it (``requeue --urgent``); the study came from a
    scanner named in ``HRCT_URGENT_AETS`` (emergency department, ICU: their patients are
    waiting for the answer); or it is the delivery of a positive result (the SR that puts the
    study at the top of the radiologist's list must not wait behind routine analyses).
    """
    if operator_urgent:
        return "operator"
    if calling_ae is not None and calling_ae.strip() in urgent_aets:
        return f"scanner {calling_ae.strip()}"
    if task == "deliver" and positive:
        return "positive result"
    return None
