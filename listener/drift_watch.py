"""The periodic drift check of the primary listener: an alarm line in the log and Prometheus
gauges, every ``HRCT_DRIFT_CHECK_SECONDS``.

It runs here because the primary listener already runs the gateway's periodic work (the
dispatcher) exactly once per installation; the workers are many and short-lived. The gauges are
served from the last check rather than computed on each scrape: a check reads weeks of studies
and runs a Kolmogorov-Smirnov test per group and quantity, too much for every 15 s scrape.
Label values are scanner and protocol names (a bounded set per site), never UIDs or patient data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.db import drift
from hrct_triage.db.session import transaction

log = logging.getLogger("hrct.drift")

GROUP_LABELS = ["calling_ae", "station", "kernel", "thickness"]


class DriftWatch:
    """Checks for drift, logs each alarm, and keeps the last report for the gauges."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.latest: drift.DriftReport | None = None

    def run_once(self) -> drift.DriftReport:
        """One check: the report, one WARNING line per alarming quantity."""
        with transaction(self.sessions) as session:
            report = drift.drift_report(session, self.settings, now=self.clock())
        self.latest = report
        count = drift.log_drift_alarms(report, logger=log)
        log.info(
            "drift check: %d groups, %d alarms (next in %.0f s)",
            len(report.groups),
            count,
            self.settings.worklist.drift_check_seconds,
        )
        return report

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # the listener must go on receiving studies
                log.exception("drift check failed; trying again at the next one")
            stop.wait(self.settings.worklist.drift_check_seconds)


class DriftCollector(Collector):
    """The last drift check as gauges (nothing before the first check)."""

    def __init__(self, watch: DriftWatch) -> None:
        self.watch = watch

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        report = self.watch.latest
        if report is None:
            return
        labels = [*GROUP_LABELS, "quantity"]
        statistic = GaugeMetricFamily(
            "hrct_drift_statistic",
            "Two-sample Kolmogorov-Smirnov D of a quantity, recent studies vs the baseline.",
            labels=labels,
        )
        p_value = GaugeMetricFamily(
            "hrct_drift_p_value", "p-value of hrct_drift_statistic.", labels=labels
        )
        alarm = GaugeMetricFamily(
            "hrct_drift_alarm",
            "1 when a quantity of the scanner and protocol drifted (HRCT_DRIFT_THRESHOLD, "
            "HRCT_DRIFT_ALPHA), else 0.",
            labels=GROUP_LABELS,
        )
        recent = GaugeMetricFamily(
            "hrct_drift_recent_studies",
            "Studies of the scanner and protocol in the recent window (HRCT_DRIFT_WINDOW_DAYS).",
            labels=GROUP_LABELS,
        )
        for group in report.groups:
            values = list(group.key.as_dict().values())
            alarm.add_metric(values, 1.0 if group.alarms else 0.0)
            recent.add_metric(values, float(group.recent))
            for q in group.quantities:
                if q.statistic is not None and q.p_value is not None:
                    statistic.add_metric([*values, q.quantity], q.statistic)
                    p_value.add_metric([*values, q.quantity], q.p_value)
        checked = GaugeMetricFamily(
            "hrct_drift_checked_timestamp_seconds", "When the last drift check ran (Unix time)."
        )
        checked.add_metric([], report.now.timestamp())
        yield from (statistic, p_value, alarm, recent, checked)
