"""Shadow mode end to end over real sockets: ``hrct-triage up`` in shadow mode, DCMTK storescu
as the scanner, two DCMTK storescp as the clinical PACS and the QA archive; then the same
gateway restarted in live mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from hrct_triage.db.models import Delivery, OutboxRow, Output, StudyStatus
from hrct_triage.db.session import transaction
from tests.helpers.databases import REDIS_URL
from tests.helpers.dicom_peers import StoreSCP, storescu
from tests.test_e2e import SC_CLASS, SR_CLASS, _pacs_objects, _start_gateway, _stop_gateway, _uid


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    "backend", ["embedded", pytest.param("postgresql", marks=pytest.mark.services)]
)
def test_shadow_results_reach_the_qa_archive_and_going_live_resends_none(
    tmp_path: Path, phantom_dir: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    database_url = broker_url = None
    if backend == "postgresql":
        database_url = request.getfixturevalue("postgresql_url")
        broker_url = f"{REDIS_URL}/12"
        redis.Redis.from_url(broker_url).flushdb()
    clinical = StoreSCP(tmp_path / "clinical", ae_title="PACS").start()
    qa = StoreSCP(tmp_path / "qa", ae_title="QA_ARCHIVE").start()
    covid_dir = next((phantom_dir / "studies").glob("covid_*"))
    healthy_dir = next((phantom_dir / "studies").glob("healthy_*"))
    covid_uid, healthy_uid = (
        _uid(next(covid_dir.rglob("*.dcm"))),
        _uid(next(healthy_dir.rglob("*.dcm"))),
    )
    try:
        # given the gateway in shadow mode, with the clinical PACS and a QA archive configured
        shadow = {"HRCT_MODE": "shadow", "HRCT_SHADOW_DESTINATIONS": qa.destination}
        gateway = _start_gateway(tmp_path, clinical, database_url, broker_url, shadow)
        try:
            # when a scanner sends a COVID-like study
            sent = storescu(gateway.settings.listener.port, covid_dir)
            assert sent.returncode == 0, sent.stderr
            study = gateway.wait_for([covid_uid])[covid_uid]
            # then it is analysed and done, recorded as a shadow result
            assert (study.status, study.mode, study.positive) == (StudyStatus.DONE, "shadow", True)
            listed = gateway.cli("worklist")
            assert "(shadow)" in listed.stdout, listed.stdout + listed.stderr
        finally:
            _stop_gateway(gateway)
        # and the QA archive holds its SR and heat maps, the clinical PACS nothing at all
        in_qa = _pacs_objects(qa, covid_uid)
        assert (len(in_qa[SR_CLASS]), len(in_qa[SC_CLASS])) == (1, 2)
        assert clinical.files() == []
        qa_files = qa.files()

        # when the gateway is restarted in live mode and a new study arrives
        live = {"HRCT_MODE": "live", "HRCT_SHADOW_DESTINATIONS": qa.destination}
        gateway = _start_gateway(tmp_path, clinical, database_url, broker_url, live)
        try:
            sent = storescu(gateway.settings.listener.port, healthy_dir)
            assert sent.returncode == 0, sent.stderr
            new = gateway.wait_for([healthy_uid])[healthy_uid]
            assert (new.status, new.mode) == (StudyStatus.DONE, "live")
            with transaction(gateway.sessions) as session:
                destinations = set(
                    session.scalars(
                        select(Delivery.destination).join(Output).where(Output.study_id == study.id)
                    )
                )
                owed = session.scalars(
                    select(OutboxRow.id).where(
                        OutboxRow.study_id == study.id, OutboxRow.done_at.is_(None)
                    )
                ).all()
        finally:
            _stop_gateway(gateway)
        # then the new study's results reach the clinical PACS, and the shadow study's never do
        in_pacs = _pacs_objects(clinical, healthy_uid)
        assert (len(in_pacs[SR_CLASS]), len(in_pacs[SC_CLASS])) == (1, 2)
        assert _pacs_objects(clinical, covid_uid) == {SR_CLASS: [], SC_CLASS: []}
        assert len(clinical.files()) == 3
        # and the QA archive got nothing more: the shadow study owes nothing to anyone
        assert qa.files() == qa_files
        assert destinations == {qa.destination} and owed == []
    finally:
        clinical.stop()
        qa.stop()
