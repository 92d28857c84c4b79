"""A worklist, a worker and a study whose outputs are owed to peers: delivery driven the way
production drives it, without a model."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.db import worklist
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.models import Delivery, Output
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.worker.jobs import WorkerContext
from hrct_triage.worker.outputs import Analysed, write_outputs
from tests.helpers.fake_study import WHEN, ct_series, make_analysis
from tests.helpers.worklist import T0


def sessions_for(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_sessionmaker(make_engine(url))


def settings_for(tmp_path: Path, url: str, **overrides: Any) -> Settings:
    """Short backoff and few attempts, so a test drives every round itself."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "database_url": url,
        "allow_untrained": True,
        "delivery_attempts": 3,
        "delivery_backoff_seconds": 0.5,
        "delivery_timeout_seconds": 5,
        "heatmaps": 2,
        "min_slices": 16,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def no_model() -> Any:
    raise AssertionError("delivery must not need the model")


def worker_context(settings: Settings, model: Callable[[], Any] = no_model) -> WorkerContext:
    """A worker as ``worker.tasks`` builds one: its own engine, settings and model loader."""
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    return WorkerContext(settings=settings, sessions=sessions, model=model, name="test-worker")


def analysed_study(
    sessions: sessionmaker[Session], out_dir: Path, destinations: list[str]
) -> tuple[int, list[worklist.OutputRecord]]:
    """A study analysed by hand (fake CT, no model) whose SR and SCs are owed to
    ``destinations``; returns its id and its output records."""
    headers = ct_series(20, 32, pixels=False)
    records = write_outputs(
        Analysed(make_analysis(headers), headers),
        generation=1,
        content_datetime=WHEN,
        predecessor=None,
        out_dir=out_dir,
    )
    uid = str(headers[0].StudyInstanceUID)
    with transaction(sessions) as session:
        facts = worklist.InstanceFacts(
            study_uid=uid,
            series_uid=str(headers[0].SeriesInstanceUID),
            sop_instance_uid=str(headers[0].SOPInstanceUID),
            sop_class_uid=str(headers[0].SOPClassUID),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="/spool/not-read.dcm",
            size_bytes=1,
            sha256=hashlib.sha256(b"").hexdigest(),
        )
        worklist.record_instance(session, facts, association_id=None, now=T0)
    with transaction(sessions) as session:
        (study_id,) = worklist.complete_ready_studies(session, quiet_seconds=0, now=T0)
    with transaction(sessions) as session:
        claim = worklist.claim(session, study_id, worker="w", lease_seconds=60, now=T0)
        assert claim is not None
        assert worklist.finish_analysis(
            session,
            claim,
            analysis=worklist.AnalysisRecord(0.93, True, 0.8, "v", uid, [], {}),
            outputs=records,
            destinations=destinations,
            now=T0,
            delivery_grace_seconds=60,
        )
    return study_id, records


def delivery_rows(sessions: sessionmaker[Session], study_id: int) -> dict[str, list[Delivery]]:
    """The study's deliveries by output kind ("sr", "sc")."""
    rows: dict[str, list[Delivery]] = {"sr": [], "sc": []}
    with transaction(sessions) as session:
        for delivery, kind in session.execute(
            select(Delivery, Output.kind).join(Output).where(Output.study_id == study_id)
        ).all():
            rows[kind].append(delivery)
        session.expunge_all()
    return rows


def deliveries_of(sessions: sessionmaker[Session], study_id: int) -> list[Delivery]:
    """The study's deliveries, every kind."""
    return [delivery for rows in delivery_rows(sessions, study_id).values() for delivery in rows]


def sop_classes_of(paths: list[Path]) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths)


def queued_from_files(sessions: sessionmaker[Session], paths: list[Path]) -> int:
    """Store-side bookkeeping of real DICOM files as the listener does it, then completion: the
    id of the queued study."""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        facts = worklist.InstanceFacts(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=str(path),
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            modality=ds.get("Modality"),
        )
        with transaction(sessions) as session:
            worklist.record_instance(session, facts, association_id=None, now=T0)
    with transaction(sessions) as session:
        (study_id,) = worklist.complete_ready_studies(
            session, quiet_seconds=0, now=T0 + timedelta(seconds=1)
        )
    return study_id
