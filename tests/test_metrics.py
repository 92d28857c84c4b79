"""Prometheus metrics: the listener's /metrics over real HTTP after real C-STOREs, and the
worklist collector on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.models import Delivery, DeliveryState, Output, Study, StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.listener.scp import Listener
from hrct_triage.listener.worklist_gauges import WorklistCollector
from tests.helpers.dicom_peers import storescu
from tests.helpers.listeners import (
    listener_settings,
    scrape,
    thin_series,
    wait_until_no_open_association,
)
from tests.helpers.ports import free_port

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def metered_listener(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> Iterator[Listener]:
    settings = listener_settings(tmp_path / "var", database_url, metrics_port=free_port())
    scp = Listener(settings, sessions, run_dispatcher=False)
    scp.start()
    yield scp
    scp.stop()


@pytest.mark.dcmtk
def test_metrics_endpoint_counts_a_real_store_and_a_rejection(
    metered_listener: Listener, phantom_dir: Path, sessions: sessionmaker[Session]
) -> None:
    # given five CT slices of a phantom study
    files = thin_series(phantom_dir)[:5]
    size = sum(path.stat().st_size for path in files)
    port = metered_listener.metrics_server.port if metered_listener.metrics_server else None
    assert port is not None
    # when a scanner stores them, and another calls us by the wrong AE title
    assert storescu(metered_listener.port, *files).returncode == 0
    assert storescu(metered_listener.port, files[0], called="NOT_US").returncode != 0
    wait_until_no_open_association(sessions)
    samples = scrape(port)
    # then the counters moved by exactly that much
    assert samples[("hrct_instances_received_total", ())] == 5
    # data set bytes exclude each file's 128-byte preamble, "DICM" and file meta
    assert 0.9 * size < samples[("hrct_received_bytes_total", ())] < size
    assert samples[("hrct_associations_total", (("outcome", "released"),))] == 1
    assert samples[("hrct_associations_total", (("outcome", "rejected"),))] == 1
    assert samples[("hrct_association_rejections_total", (("reason", "called_ae"),))] == 1
    assert samples[("hrct_associations_open", ())] == 0
    # and the worklist figures come through the same endpoint
    assert samples[("hrct_worklist_up", ())] == 1
    assert samples[("hrct_studies", (("status", "receiving"),))] == 1
    assert samples[("hrct_queue_depth", ())] == 0


@pytest.mark.dcmtk
def test_refused_store_is_counted_by_status_and_reason(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session], phantom_dir: Path
) -> None:
    # given a listener whose spool has less room than it must keep free
    settings = listener_settings(
        tmp_path / "var", database_url, metrics_port=free_port(), min_free_disk_bytes=1 << 62
    )
    scp = Listener(settings, sessions, run_dispatcher=False)
    scp.start()
    try:
        # when a scanner stores a slice
        storescu(scp.port, thin_series(phantom_dir)[0])
        wait_until_no_open_association(sessions)
        assert scp.metrics_server is not None and scp.metrics_server.port is not None
        samples = scrape(scp.metrics_server.port)
    finally:
        scp.stop()
    # then it is a refusal with 0xA700 for a full disk, and does not count as received
    key = ("hrct_store_refusals_total", (("reason", "disk_full"), ("status", "0xA700")))
    assert samples[key] == 1
    assert samples[("hrct_instances_received_total", ())] == 0


def test_metrics_port_zero_serves_nothing(tmp_path: Path, database_url: str) -> None:
    settings = listener_settings(tmp_path / "var", database_url, metrics_port=0)
    assert Listener(settings, run_dispatcher=False).metrics_server is None


def _study(session: Session, uid: str, status: str, **stamps: datetime) -> Study:
    study = Study(study_uid=uid, status=status, **stamps)
    session.add(study)
    session.flush()
    return study


def _delivery(session: Session, study: Study, n: int, state: str, attempts: int) -> None:
    output = Output(
        study_id=study.id,
        generation=1,
        kind="sr",
        sop_instance_uid=f"{study.study_uid}.{n}",
        sop_class_uid=SR_CLASS,
        series_uid=f"{study.study_uid}.9",
        path=f"/outputs/{study.study_uid}.{n}.dcm",
    )
    session.add(output)
    session.flush()
    session.add(
        Delivery(output_id=output.id, destination="PACS@pacs:104", state=state, attempts=attempts)
    )


def test_worklist_collector_reads_queue_depth_durations_and_failures(
    sessions: sessionmaker[Session],
) -> None:
    # given two queued studies, one done (analysis 3 s, notification 100 s), one that failed
    # delivery, one analysed in 45 s still delivering
    t0 = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    with transaction(sessions) as session:
        _study(session, "1.2.3.1", StudyStatus.QUEUED, last_instance_at=t0)
        _study(session, "1.2.3.2", StudyStatus.QUEUED, last_instance_at=t0)
        done = _study(
            session,
            "1.2.3.3",
            StudyStatus.DONE,
            last_instance_at=t0,
            analysis_started_at=t0 + timedelta(seconds=20),
            analysed_at=t0 + timedelta(seconds=23),
            delivered_at=t0 + timedelta(seconds=100),
        )
        _delivery(session, done, 1, DeliveryState.SENT, attempts=3)  # two failed tries first
        failed = _study(session, "1.2.3.4", StudyStatus.FAILED, last_instance_at=t0)
        _delivery(session, failed, 1, DeliveryState.FAILED, attempts=12)
        _study(
            session,
            "1.2.3.5",
            StudyStatus.DELIVERING,
            last_instance_at=t0,
            analysis_started_at=t0,
            analysed_at=t0 + timedelta(seconds=45),
        )
    registry = CollectorRegistry()
    registry.register(WorklistCollector(sessions))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # then queue depth and states are counts of the worklist
    assert value("hrct_worklist_up") == 1
    assert value("hrct_queue_depth") == 2
    assert value("hrct_studies", status="done") == 1
    assert value("hrct_studies", status="processing") == 0
    # and analysis durations fall in their buckets (3 s and 45 s)
    assert value("hrct_analysis_duration_seconds_count") == 2
    assert value("hrct_analysis_duration_seconds_sum") == pytest.approx(48, abs=0.01)
    assert value("hrct_analysis_duration_seconds_bucket", le="2.0") == 0
    assert value("hrct_analysis_duration_seconds_bucket", le="5.0") == 1
    assert value("hrct_analysis_duration_seconds_bucket", le="60.0") == 2
    assert value("hrct_analysis_duration_seconds_bucket", le="+Inf") == 2
    # and time to notification counts only the study delivered
    assert value("hrct_time_to_notification_seconds_count") == 1
    assert value("hrct_time_to_notification_seconds_sum") == pytest.approx(100, abs=0.01)
    assert value("hrct_time_to_notification_seconds_bucket", le="60.0") == 0
    assert value("hrct_time_to_notification_seconds_bucket", le="120.0") == 1
    # and every failed try counts, the successful one does not
    assert value("hrct_delivery_failed_attempts_total") == 2 + 12
    assert value("hrct_deliveries_given_up_total") == 1


def test_worklist_collector_reports_an_unreachable_database(tmp_path: Path) -> None:
    # given a worklist URL where no database was ever created (no tables)
    from hrct_triage.db.session import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    registry = CollectorRegistry()
    registry.register(WorklistCollector(make_sessionmaker(engine)))
    # then the scrape still answers, saying the worklist is down
    assert registry.get_sample_value("hrct_worklist_up") == 0
    assert registry.get_sample_value("hrct_queue_depth") is None
    engine.dispose()
