"""Worklist rows made by hand: instance facts, a study queued for analysis, reading a row back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.models import Study
from hrct_triage.db.session import transaction

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def facts(sop: str, *, study: str = "1.2.3", sha: str = "a" * 64) -> worklist.InstanceFacts:
    return worklist.InstanceFacts(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/spool/{sop}.dcm",
        size_bytes=10,
        sha256=sha,
        modality="CT",
        calling_ae="CT1",
    )


def study_row(sessions: sessionmaker[Session], key: int | str = "1.2.3") -> Study:
    """The study by id (int) or by Study Instance UID (str), detached from its session."""
    with transaction(sessions) as session:
        if isinstance(key, int):
            study = session.get(Study, key)
            assert study is not None, f"no study {key}"
        else:
            study = session.scalars(select(Study).where(Study.study_uid == key)).one()
        session.expunge(study)
        return study


def complete(sessions: sessionmaker[Session], now: datetime, quiet: float = 10) -> list[int]:
    with transaction(sessions) as session:
        return worklist.complete_ready_studies(session, quiet_seconds=quiet, now=now)


def queued_study(sessions: sessionmaker[Session]) -> int:
    """One instance recorded at ``T0``, its study completed ten seconds later: its id."""
    with transaction(sessions) as session:
        worklist.record_instance(session, facts("1.2.3.1.1"), association_id=None, now=T0)
    return complete(sessions, T0 + timedelta(seconds=10))[0]
