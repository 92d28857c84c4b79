"""The destinations' capabilities as last checked: kept so that what a PACS accepts is known
before a study needs it, and shown beside a refusal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hrct_triage.db.models import DestinationCapabilities


def save_capabilities(
    session: Session,
    destination: str,
    *,
    answers: Sequence[dict[str, Any]],
    problem: str | None,
    now: datetime,
) -> None:
    """Record what ``destination`` answered at ``now``, replacing what it answered before."""
    row = session.scalar(
        select(DestinationCapabilities).where(DestinationCapabilities.destination == destination)
    )
    if row is None:
        row = DestinationCapabilities(destination=destination[:128])
        session.add(row)
    row.checked_at = now
    row.answers = [dict(answer) for answer in answers]
    row.problem = problem


def load_capabilities(session: Session, destination: str) -> DestinationCapabilities | None:
    """What ``destination`` answered when last checked, or None when it never was."""
    return session.scalar(
        select(DestinationCapabilities).where(DestinationCapabilities.destination == destination)
    )
