"""``db.raw_statements.Prepared`` runs a Core statement on the DBAPI cursor with SQLAlchemy's own
parameter handling: the type processors apply, a missing parameter is refused. (The listener's
ingest statements, the users of it, are covered on both backends by tests/test_worklist.py.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.models import Study, UTCDateTime
from hrct_triage.db.raw_statements import Prepared
from hrct_triage.db.session import transaction
from tests.helpers.worklist import T0, facts


def test_a_missing_parameter_is_refused_before_the_database_sees_it(
    sessions: sessionmaker[Session],
) -> None:
    statement = select(Study.id).where(Study.study_uid == bindparam("study_uid"))
    with transaction(sessions) as session:
        prepared = Prepared.of(statement, session.connection().dialect)
        with pytest.raises(ValueError, match="study_uid"):
            prepared.one(session.connection(), {})


def test_type_processors_apply_as_through_sqlalchemy(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        worklist.record_instance(session, facts("1.2.3.1.1"), association_id=None, now=T0)
    # a time given in another zone finds the row stored in UTC (UTCDateTime's processor ran)
    elsewhere = T0.astimezone(timezone(timedelta(hours=5)))
    statement = select(Study.study_uid).where(
        Study.last_instance_at == bindparam("at", type_=UTCDateTime())
    )
    with transaction(sessions) as session:
        connection = session.connection()
        prepared = Prepared.of(statement, connection.dialect)
        assert prepared.one(connection, {"at": elsewhere}) == ("1.2.3",)
        assert prepared.one(connection, {"at": datetime(2027, 1, 1, tzinfo=UTC)}) is None
