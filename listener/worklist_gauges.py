"""Prometheus figures read from the worklist on each scrape: queue depth and the worker side.

Why from the database and not from counters inside the workers: a Celery prefork worker runs the
analyses in child processes its main process cannot see, and workers run on several hosts.
prometheus_client's multiprocess mode would need a shared directory per host, wiped at the right
moment, a scrape target per host, and it would still lose history on every restart. The worklist
already records every stage time and every delivery attempt, for every worker, durably, so one
collector served by the listener gives the same figures for the whole installation, and they are
right after any restart.

Each scrape runs a few aggregate queries (GROUP BYs over the study states and results,
single-row aggregates with the histogram buckets computed in SQL); no row is loaded into Python.
Results reached in shadow mode are counted apart (``hrct_results{mode="shadow"}``) and left out
of the time to notification, which is the clinical PACS's clock.
The histograms and counters are cumulative over the studies the worklist keeps: a purge makes
them drop, which Prometheus' ``rate()`` treats like a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Float, case, cast, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.models import Delivery, DeliveryState, Study, StudyStatus
from hrct_triage.db.session import transaction

log = logging.getLogger("hrct.metrics")

# Analysis of a study: seconds on a GPU, minutes on a CPU; 20 min is past the 900 s lease.
ANALYSIS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
# Last instance to results at the PACS: the 15 min target (HRCT_NOTIFICATION_TARGET_SECONDS
# default) sits on a bucket edge; the tail covers PACS outages of hours.
# ``Study.mode`` of a result reached in shadow mode.
SHADOW = "shadow"
NOTIFICATION_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)


def seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[float]:
    """``end - start`` in seconds as SQL, for the two backends the worklist runs on."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", end - start), Float)
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    raise ValueError(f"dialect {dialect!r} is neither postgresql nor sqlite")


def _histogram(
    session: Session,
    name: str,
    documentation: str,
    start: Any,
    end: Any,
    buckets: Sequence[float],
    *where: ColumnElement[bool],
) -> HistogramMetricFamily:
    seconds = seconds_between(session.get_bind().dialect.name, start, end)
    columns: list[ColumnElement[Any]] = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
    columns += [func.coalesce(func.sum(case((seconds <= edge, 1), else_=0)), 0) for edge in buckets]
    row = session.execute(
        select(*columns).where(start.is_not(None), end.is_not(None), *where)
    ).one()
    count, total, *cumulative = row
    pairs = [(repr(edge), int(n)) for edge, n in zip(buckets, cumulative, strict=True)]
    return HistogramMetricFamily(
        name,
        documentation,
        buckets=[*pairs, ("+Inf", int(count))],
        sum_value=float(total),
    )


class WorklistCollector(Collector):
    """Queue depth, studies by state, analysis duration, delivery failures and time to
    notification, computed from the worklist when Prometheus scrapes.

    A database that does not answer makes ``hrct_worklist_up`` 0 instead of failing the scrape,
    so the listener's own counters are still collected and an alert can fire on the gauge.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing until scraped: registering must not query the database

    def collect(self) -> Iterator[Metric]:
        try:
            figures = list(self._figures())
        except Exception as error:  # the listener must keep serving its own counters
            log.warning("worklist metrics unavailable: %s", type(error).__name__)
            figures = []
        up = GaugeMetricFamily(
            "hrct_worklist_up", "1 when the worklist answered this scrape, 0 otherwise."
        )
        up.add_metric([], 1.0 if figures else 0.0)
        yield up
        yield from figures

    def _figures(self) -> Iterator[Metric]:
        with transaction(self.sessions) as session:
            by_status = dict(
                session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
            )
            studies = GaugeMetricFamily("hrct_studies", "Studies by state.", labels=["status"])
            for status in StudyStatus.ALL:
                studies.add_metric([status], float(by_status.get(status, 0)))
            depth = GaugeMetricFamily(
                "hrct_queue_depth", "Studies complete and waiting for a worker (state queued)."
            )
            depth.add_metric([], float(by_status.get(StudyStatus.QUEUED, 0)))
            analysis = _histogram(
                session,
                "hrct_analysis_duration_seconds",
                "Analysis start to result recorded, per study.",
                Study.analysis_started_at,
                Study.analysed_at,
                ANALYSIS_BUCKETS,
            )
            notification = _histogram(
                session,
                "hrct_time_to_notification_seconds",
                "Last instance received to every output acknowledged by every destination, "
                "per study delivered (state done) with a live result.",
                # The last instance analysed: a late wave that changed nothing restarts nothing.
                func.coalesce(Study.input_received_at, Study.last_instance_at),
                Study.delivered_at,
                NOTIFICATION_BUCKETS,
                Study.status == StudyStatus.DONE,
                or_(Study.mode.is_(None), Study.mode != SHADOW),
            )
            results = _results(session)
            attempts, sent, given_up = session.execute(
                select(
                    func.coalesce(func.sum(Delivery.attempts), 0),
                    func.count().filter(Delivery.state == DeliveryState.SENT),
                    func.count().filter(Delivery.state == DeliveryState.FAILED),
                )
            ).one()
        failures = CounterMetricFamily(
            "hrct_delivery_failed_attempts",
            "C-STOREs of an output to a destination that failed (each retry counts).",
        )
        failures.add_metric([], float(int(attempts) - int(sent)))
        abandoned = CounterMetricFamily(
            "hrct_deliveries_given_up",
            "Deliveries abandoned after HRCT_DELIVERY_ATTEMPTS failed tries.",
        )
        abandoned.add_metric([], float(given_up))
        yield from (studies, depth, results, analysis, notification, failures, abandoned)


def _results(session: Session) -> GaugeMetricFamily:
    """Analysed studies by the mode their result was reached in and by that result."""
    mode = func.coalesce(Study.mode, "live")
    counts = {
        (str(m), bool(p)): int(n)
        for m, p, n in session.execute(
            select(mode, Study.positive, func.count())
            .where(Study.positive.is_not(None))
            .group_by(mode, Study.positive)
        ).all()
    }
    gauge = GaugeMetricFamily(
        "hrct_results",
        "Studies with an AI result, by mode (live, or shadow: sent to no clinical destination, "
        "never prioritised) and result.",
        labels=["mode", "result"],
    )
    for name in ("live", SHADOW):
        for positive in (True, False):
            value = counts.get((name, positive), 0)
            gauge.add_metric([name, "positive" if positive else "negative"], float(value))
    return gauge
