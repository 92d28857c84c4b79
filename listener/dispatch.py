"""The outbox dispatcher and the completion tracker: one round every ``HRCT_POLL_SECONDS``.

A study is queued in the same transaction that writes its outbox row; publishing to the broker
happens afterwards and is marked only once the broker took the message. A broker outage therefore
delays a study but never loses it, and a message the broker lost is published again after
``HRCT_REPUBLISH_SECONDS`` (the worklist claim makes a second copy harmless).

Due rows are published most urgent first: those ``db.priority.is_urgent`` picks (operator
``requeue --urgent``, a scanner in ``HRCT_URGENT_AETS``, a positive result's delivery) to
``hrct.urgent``, the rest by worklist priority to ``hrct``. Workers drain ``hrct.urgent`` first.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.common.task_queue import QUEUE, TASK_FOR_OUTBOX, URGENT_QUEUE, celery_config
from hrct_triage.db import worklist
from hrct_triage.db.session import transaction

log = logging.getLogger("hrct.dispatch")


def publisher_app(settings: Settings) -> Celery:
    """A Celery app that only publishes by task name: the listener never imports the worker."""
    app = Celery("hrct-listener")
    app.conf.update(celery_config(settings))
    return app


class Dispatcher:
    """Completes quiet studies and publishes due outbox rows."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.app = publisher_app(settings)
        self._broker_down_since: datetime | None = None

    def run_once(self, now: datetime | None = None) -> tuple[int, int]:
        """One round; returns (studies completed, messages published)."""
        now = now or datetime.now(UTC)
        with transaction(self.sessions) as session:
            completed = worklist.complete_ready_studies(
                session,
                quiet_seconds=self.settings.listener.quiet_seconds,
                quiet_seconds_by_aet=self.settings.listener.quiet_seconds_by_aet,
                now=now,
            )
        for study_id in completed:
            log.info("study %d complete, queued for analysis", study_id)
        with transaction(self.sessions) as session:
            due = worklist.due_publications(
                session, now=now, republish_seconds=self.settings.listener.republish_seconds
            )
            urgent = worklist.urgent_publications(
                session, due, urgent_aets=self.settings.worklist.urgent_aets
            )
        # Urgent first; within each group the worklist priority order of ``due_publications``.
        due.sort(key=lambda publication: publication.outbox_id not in urgent)
        published: list[int] = []
        for publication in due:
            queue = URGENT_QUEUE if publication.outbox_id in urgent else QUEUE
            try:
                self.app.send_task(
                    TASK_FOR_OUTBOX[publication.task], args=[publication.study_id], queue=queue
                )
            except Exception as error:
                if self._broker_down_since is None:
                    self._broker_down_since = now
                    log.error(
                        "broker unreachable (%s); %d messages wait in the outbox",
                        type(error).__name__,
                        len(due) - len(published),
                    )
                break
            if queue == URGENT_QUEUE:
                log.info(
                    "study %d (%s) to the urgent queue: %s",
                    publication.study_id,
                    publication.task,
                    urgent[publication.outbox_id],
                )
            published.append(publication.outbox_id)
        if published:
            if self._broker_down_since is not None:
                log.warning("broker reachable again")
                self._broker_down_since = None
            with transaction(self.sessions) as session:
                worklist.mark_published(session, published, now=now)
        return len(completed), len(published)

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("dispatcher round failed; trying again")
            stop.wait(self.settings.listener.poll_seconds)
