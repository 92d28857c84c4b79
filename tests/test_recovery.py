"""Unit tests of the fixes the fault suite (tests/faults) forced: holds of gone processes, the
quiet period after a listener crash, the listener's write backlog, the broker's timings."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.common.task_queue import celery_config
from hrct_triage.db import worklist
from hrct_triage.db.models import Association, Event, OutboxRow, Refusal, StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.listener.backlog import Backlog
from hrct_triage.worker.jobs import holder_is_gone, process_identity
from tests.helpers.worklist import T0, facts, queued_study, study_row


def _identity(pid: int) -> str:
    host, _, namespace = process_identity().split(":")
    return f"{host}:{pid}:{namespace}"


def test_holder_is_gone_only_for_a_dead_process_of_this_host_and_namespace() -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    running = subprocess.Popen(["sleep", "30"])
    try:
        assert holder_is_gone(_identity(finished.pid))
        assert not holder_is_gone(_identity(running.pid))
        assert not holder_is_gone(process_identity())  # this very process
        host, pid, namespace = _identity(finished.pid).split(":")
        assert not holder_is_gone(f"elsewhere-{host}:{pid}:{namespace}")  # another host
        assert not holder_is_gone(f"{host}:{pid}:1")  # another pid namespace
        assert not holder_is_gone("w1") and not holder_is_gone(None)
    finally:
        running.kill()
        running.wait()
    assert process_identity().split(":")[:2] == [socket.gethostname(), str(os.getpid())]


def test_released_hold_lets_the_study_be_claimed_at_once_and_published_again(
    sessions: sessionmaker[Session],
) -> None:
    study_id = queued_study(sessions)
    now = T0 + timedelta(seconds=11)
    with transaction(sessions) as session:
        worklist.mark_published(session, [session.scalars(select(OutboxRow.id)).one()], now=now)
        first = worklist.claim(session, study_id, worker="gone:1:x", lease_seconds=900, now=now)
    assert first is not None
    with transaction(sessions) as session:
        assert worklist.live_holder(session, study_id, now=now) == "gone:1:x"
        assert worklist.live_holders(session, now=now) == ["gone:1:x"]
        assert worklist.claim(session, study_id, worker="w2", lease_seconds=900, now=now) is None
        assert worklist.release_holds(session, ["other:2:x"], now=now) == []
        released = worklist.release_holds(session, ["gone:1:x"], now=now, republish=True)
    assert released == [study_id]
    with transaction(sessions) as session:
        # the outbox row is due again at once (a worker that restarted holds no message)
        row = session.scalars(select(OutboxRow).where(OutboxRow.done_at.is_(None))).one()
        assert row.published_at is None
        assert worklist.due_publications(session, now=now, republish_seconds=120)
        again = worklist.claim(session, study_id, worker="w2", lease_seconds=900, now=now)
        details = session.scalars(select(Event.detail).where(Event.study_id == study_id)).all()
    assert again is not None and again.attempts == 2
    assert any("gone:1:x released" in (d or "") for d in details)
    # the gone holder's late result records nothing
    record = worklist.AnalysisRecord(0.9, True, 0.8, "v", "1.2.3.1", [], {})
    with transaction(sessions) as session:
        assert not worklist.finish_analysis(
            session,
            first,
            analysis=record,
            outputs=[],
            destinations=[],
            now=now,
            delivery_grace_seconds=60,
        )


def test_listener_restart_gives_a_cut_off_study_a_fresh_quiet_period(
    sessions: sessionmaker[Session],
) -> None:
    with transaction(sessions) as session:
        association = worklist.open_association(
            session, calling_ae="CT", called_ae="HRCT", peer_address="a", peer_port=1, now=T0
        )
        worklist.record_instance(session, facts("1.2.3.1.1"), association_id=association, now=T0)
    restart = T0 + timedelta(minutes=5)
    with transaction(sessions) as session:
        assert worklist.close_orphaned_associations(session, now=restart) == 1
        assert session.get(Association, association).state == "orphaned"  # type: ignore[union-attr]
    assert study_row(sessions).last_instance_at == restart
    with transaction(sessions) as session:
        assert (
            worklist.complete_ready_studies(
                session, quiet_seconds=10, now=restart + timedelta(seconds=5)
            )
            == []
        )
        assert worklist.complete_ready_studies(
            session, quiet_seconds=10, now=restart + timedelta(seconds=10)
        )
    assert study_row(sessions).status == StudyStatus.QUEUED


def test_backlog_keeps_writes_in_order_until_the_database_answers(
    sqlite_sessions: sessionmaker[Session],
) -> None:
    backlog = Backlog(sqlite_sessions)
    database_down = [True]

    def refusal(sop: str) -> Callable[[Session], None]:
        def write(session: Session) -> None:
            if database_down[0]:
                raise ConnectionError("database unreachable")
            worklist.record_refusal(
                session,
                association_id=None,
                study_uid="1.2.3",
                sop_instance_uid=sop,
                status=0xA700,
                transient=True,
                reason="database",
                now=T0,
            )

        return write

    assert not backlog.write("first", refusal("1.1"))
    database_down[0] = False
    # the database answers again, but a later write must not overtake the waiting one
    assert not backlog.write("second", refusal("1.2"))
    deadline = time.monotonic() + 10
    while len(backlog) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(backlog) == 0
    assert backlog.write("third", refusal("1.3"))
    with transaction(sqlite_sessions) as session:
        order = session.scalars(select(Refusal.sop_instance_uid).order_by(Refusal.id)).all()
    assert order == ["1.1", "1.2", "1.3"]


@pytest.mark.parametrize(("lease", "timeout", "sweep"), [(900, 960, 10), (5, 10, 5), (0.5, 1, 1)])
def test_redis_hands_a_message_on_a_margin_after_the_lease(
    lease: float, timeout: int, sweep: float
) -> None:
    config = celery_config(
        Settings(_env_file=None, broker_url="redis://127.0.0.1:6379/0", lease_seconds=lease)  # type: ignore[call-arg]
    )
    options = config["broker_transport_options"]
    assert options["visibility_timeout"] == timeout
    assert options["unacked_restore_interval"] == sweep
    assert options["unacked_restore_throttle"] == 1
    assert config["worker_proc_alive_timeout"] >= 60
