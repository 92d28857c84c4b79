"""Worklist priority (bigger is more urgent) and the rule that sends a study to the urgent queue.

Every study is in one of three bands; ``HRCT_PRIORITY_BANDS`` orders them, most urgent first
(default ``positive,unanswered,negative``). Within a band, a higher probability comes first; ties
are broken by time waiting (first instance, oldest first):

=============  ================================================================================
band           studies
=============  ================================================================================
positive       the AI found COVID-19
unanswered     the AI has not (yet) answered: still arriving, waiting, in analysis, failed or
               not applicable; a radiologist must read these without help
negative       the AI found no COVID-19 (a 0.7 comes before a 0.1)
=============  ================================================================================

Two results are not allowed to move a study: one reached in shadow mode (``HRCT_MODE=shadow``:
the hospital is trying the model silently, so every study keeps the place an unanswered one
has), and a positive on input outside the model's validated domain (unanswered, unless
``HRCT_TRUST_OUT_OF_DOMAIN=1``); an out-of-domain negative stays negative, as it would without AI.

``failed`` and ``not_applicable`` are unanswered on purpose: with the default order they are
never hidden below the negatives, since nobody else will look at them. Priorities are stored
with each study; ``reprioritise`` recomputes them when the listener starts, so a changed order
applies to the whole worklist.

The urgent queue (``common.task_queue.URGENT_QUEUE``) is a different question, asked when the
dispatcher publishes a study: before analysis nothing is known about the result, so urgency comes
from where the study came from and from the operator. See ``is_urgent``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from hrct_triage.db.models import Study, StudyStatus

BANDS = ("positive", "unanswered", "negative")
# Room for 1000 probability steps inside each band, so bands never overlap.
_BAND_WIDTH = 2000

# Written into the event detail of an operator's ``requeue --urgent``; the dispatcher reads it
# back, so the flag survives a broker outage and a republish without a column of its own.
URGENT_MARK = "[urgent]"


def band_of(
    status: str,
    positive: bool | None,
    *,
    mode: str | None = None,
    in_domain: bool | None = None,
    trust_out_of_domain: bool = False,
) -> str:
    if status in (StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE) or positive is None:
        return "unanswered"
    if mode == "shadow":
        return "unanswered"
    if positive and in_domain is False and not trust_out_of_domain:
        return "unanswered"
    return "positive" if positive else "negative"


def trusts_out_of_domain() -> bool:
    """This process's ``HRCT_TRUST_OUT_OF_DOMAIN``."""
    from hrct_triage.common.settings import get_settings

    return get_settings().worklist.trust_out_of_domain


def configured_bands() -> tuple[str, ...]:
    """The band order of this process's settings (``HRCT_PRIORITY_BANDS``)."""
    from hrct_triage.common.settings import get_settings

    return tuple(get_settings().worklist.priority_bands)


def priority_for(
    status: str,
    positive: bool | None,
    probability: float | None,
    bands: Sequence[str] | None = None,
    *,
    mode: str | None = None,
    in_domain: bool | None = None,
    trust_out_of_domain: bool | None = None,
) -> int:
    """The worklist priority of a study in ``status`` with this result (see the bands above)."""
    order = tuple(bands) if bands is not None else configured_bands()
    if trust_out_of_domain is None:
        trust_out_of_domain = in_domain is False and trusts_out_of_domain()
    band = band_of(
        status,
        positive,
        mode=mode,
        in_domain=in_domain,
        trust_out_of_domain=trust_out_of_domain,
    )
    base = (len(order) - 1 - order.index(band)) * _BAND_WIDTH
    if band == "unanswered":
        return base
    return base + round(1000 * (probability or 0.0))


def reprioritise(session: Session, bands: Sequence[str] | None = None) -> int:
    """Recompute every study's stored priority (after ``HRCT_PRIORITY_BANDS`` changed);
    returns how many changed."""
    changed = 0
    for study in session.scalars(select(Study)):
        value = priority_for(
            study.status,
            study.positive,
            study.probability,
            bands,
            mode=study.mode,
            in_domain=study.in_domain,
        )
        if value != study.priority:
            study.priority = value
            changed += 1
    return changed


def is_urgent(
    *,
    task: str,
    calling_ae: str | None,
    positive: bool | None,
    operator_urgent: bool,
    urgent_aets: Collection[str],
    mode: str | None = None,
) -> str | None:
    """Why this outbox message goes to the urgent queue, or None for the routine queue.

    In this order: the operator asked for it (``requeue --urgent``); the study came from a
    scanner named in ``HRCT_URGENT_AETS`` (emergency department, ICU: their patients are
    waiting for the answer); or it is the delivery of a positive result (the SR that puts the
    study at the top of the radiologist's list must not wait behind routine analyses), unless
    the result was reached in shadow mode (its SR puts nothing at the top of any list).
    """
    if operator_urgent:
        return "operator"
    if calling_ae is not None and calling_ae.strip() in urgent_aets:
        return f"scanner {calling_ae.strip()}"
    if task == "deliver" and positive and mode != "shadow":
        return "positive result"
    return None
