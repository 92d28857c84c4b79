"""The urgent queue on real Redis: the dispatcher routes by the urgency rule, and a consumer
configured like a worker drains ``hrct.urgent`` before ``hrct``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from kombu import Connection, Queue
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.common.task_queue import CONSUME_ORDER, QUEUE, URGENT_QUEUE, celery_config
from hrct_triage.db import worklist
from hrct_triage.db.priority import URGENT_MARK
from hrct_triage.db.session import transaction
from hrct_triage.listener.dispatch import Dispatcher
from tests.helpers.databases import REDIS_URL

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
pytestmark = pytest.mark.services  # the machine's Redis is the broker

REDIS_DB = 12  # this file's own database number, flushed before and after


@pytest.fixture
def broker_url() -> Iterator[str]:
    url = f"{REDIS_URL}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def record(sessions: sessionmaker[Session], study_uid: str, scanner: str) -> None:
    with transaction(sessions) as session:
        worklist.record_instance(
            session,
            worklist.InstanceFacts(
                study_uid=study_uid,
                series_uid=f"{study_uid}.1",
                sop_instance_uid=f"{study_uid}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"/spool/{study_uid}.dcm",
                size_bytes=10,
                sha256="a" * 64,
                modality="CT",
                calling_ae=scanner,
            ),
            association_id=None,
            now=T0,
        )


def queued_study_ids(client: redis.Redis, queue: str) -> list[int]:
    messages: list[Any] = client.lrange(queue, 0, -1)
    return [int(json.loads(json.loads(m)["headers"]["argsrepr"])[0]) for m in messages]


def test_dispatcher_routes_urgent_scanner_and_operator_requeue(
    sessions: sessionmaker[Session], broker_url: str
) -> None:
    # given one study from the emergency department's scanner and two from a routine one
    settings = Settings(
        database_url=str(sessions.kw["bind"].url.render_as_string(hide_password=False)),
        broker_url=broker_url,
        urgent_aets=["ER_CT"],
    )
    for uid, scanner in (("1.1", "CT1"), ("1.2", "ER_CT"), ("1.3", "CT1")):
        record(sessions, uid, scanner)
    dispatcher = Dispatcher(settings, sessions)
    client = redis.Redis.from_url(broker_url)
    # when they complete and the dispatcher publishes them
    completed, published = dispatcher.run_once(T0 + timedelta(seconds=60))
    # then the emergency study is in the urgent list, the others in the routine one
    assert (completed, published) == (3, 3)
    ids = {uid: worklist_id(sessions, uid) for uid in ("1.1", "1.2", "1.3")}
    assert client.llen(URGENT_QUEUE) == 1 and client.llen(QUEUE) == 2
    assert queued_study_ids(client, URGENT_QUEUE) == [ids["1.2"]]
    # when the operator requeues a routine study as urgent, and another one plainly
    client.flushdb()
    with transaction(sessions) as session:
        for uid, detail in (("1.1", f"requeued by operator {URGENT_MARK}"), ("1.3", "requeued")):
            study = worklist_study(session, uid)
            worklist.requeue(session, study, now=T0 + timedelta(seconds=90), detail=detail)
    dispatcher.run_once(T0 + timedelta(seconds=91))
    # then only the urgent requeue jumps the queue
    assert queued_study_ids(client, URGENT_QUEUE) == [ids["1.1"]]
    assert queued_study_ids(client, QUEUE) == [ids["1.3"]]
    client.close()


def worklist_study(session: Session, uid: str) -> Any:
    from hrct_triage.db.queries import find_study

    study = find_study(session, uid)
    assert study is not None
    return study


def worklist_id(sessions: sessionmaker[Session], uid: str) -> int:
    with transaction(sessions) as session:
        return int(worklist_study(session, uid).id)


def test_worker_transport_options_drain_urgent_queue_first(broker_url: str) -> None:
    # given two routine messages published before two urgent ones
    options = celery_config(Settings(broker_url=broker_url))["broker_transport_options"]
    assert options["queue_order_strategy"] == "priority"
    with Connection(broker_url, transport_options=options) as connection:
        for queue, body in (
            (QUEUE, "r1"),
            (QUEUE, "r2"),
            (URGENT_QUEUE, "u1"),
            (URGENT_QUEUE, "u2"),
        ):
            connection.SimpleQueue(queue).put(body)
        # when a consumer of CONSUME_ORDER takes one message at a time, as a worker does
        received: list[str] = []

        def take(body: Any, message: Any) -> None:
            received.append(str(body))
            message.ack()

        with connection.Consumer(
            [Queue(name, routing_key=name) for name in CONSUME_ORDER],
            callbacks=[take],
            prefetch_count=1,
        ):
            while len(received) < 4:
                connection.drain_events(timeout=5)
    # then both urgent messages come before any routine one (round robin would interleave)
    assert received == ["u1", "u2", "r1", "r2"]
