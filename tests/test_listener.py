"""The listener over real sockets: DCMTK's echoscu/storescu and a pynetdicom client talk to it;
the spool and the worklist (SQLite and PostgreSQL) are checked directly."""

from __future__ import annotations

import copy
import hashlib
import subprocess
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.models import Association, Instance, Study, StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.listener.scp import Listener, SupportedContexts
from tests.helpers.dicom_peers import dcmtk_env, require_tool, storescu
from tests.helpers.listeners import thin_series, wait_until_no_open_association


@pytest.mark.dcmtk
def test_echo_answers(listener: Listener) -> None:
    require_tool("echoscu")
    result = subprocess.run(
        ["echoscu", "-aec", "HRCT_TRIAGE", "127.0.0.1", str(listener.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.dcmtk
def test_every_acknowledged_instance_is_on_disk_and_in_the_worklist(
    listener: Listener, phantom_dir: Path, sessions: sessionmaker[Session]
) -> None:
    # given a phantom study (thin lung series, localizer, soft-tissue series)
    files = [p for p in thin_series(phantom_dir) if p.suffix == ".dcm"]
    study_dirs = sorted((phantom_dir / "studies").iterdir())
    sent = sorted(p for p in study_dirs[0].rglob("*.dcm"))
    # when storescu sends it
    result = storescu(listener.port, study_dirs[0])
    # then storescu saw success for each, and each SOP instance is spooled byte-identical in
    # content and recorded in the worklist
    assert result.returncode == 0, result.stderr
    with transaction(sessions) as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
    assert len(rows) == len(sent) == len(files)
    for path in sent:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = rows[uid]
        spooled = Path(row.path)
        assert spooled.is_file() and spooled.is_relative_to(listener.settings.spool_dir)
        assert hashlib.sha256(spooled.read_bytes()).hexdigest() == row.sha256
        assert pydicom.dcmread(spooled).SOPInstanceUID == uid
    # and a resend changes nothing: no second row, the study still waits for its quiet period
    assert storescu(listener.port, study_dirs[0]).returncode == 0
    wait_until_no_open_association(sessions)
    with transaction(sessions) as session:
        assert len(session.scalars(select(Instance)).all()) == len(sent)
        study = session.scalars(select(Study)).one()
        assert study.status == StudyStatus.RECEIVING
        audit = session.scalars(select(Association).order_by(Association.id)).all()
        assert [a.state for a in audit] == ["released", "released"]
        assert audit[0].instances == len(sent)


@pytest.mark.dcmtk
def test_study_completes_only_after_the_quiet_period(
    listener: Listener, phantom_dir: Path, sessions: sessionmaker[Session]
) -> None:
    study_dir = sorted((phantom_dir / "studies").iterdir())[1]
    assert storescu(listener.port, study_dir).returncode == 0
    with transaction(sessions) as session:
        last = session.scalars(select(Study)).one().last_instance_at
    assert last is not None
    quiet = listener.settings.listener.quiet_seconds
    assert listener.dispatcher.run_once(now=last + timedelta(seconds=quiet - 0.5))[0] == 0
    assert listener.dispatcher.run_once(now=last + timedelta(seconds=quiet + 0.5))[0] == 1
    with transaction(sessions) as session:
        assert session.scalars(select(Study)).one().status == StudyStatus.QUEUED


def test_open_association_keeps_its_study_receiving(
    listener: Listener, phantom_dir: Path, sessions: sessionmaker[Session]
) -> None:
    # given a scanner that sent one instance and keeps its association open
    path = thin_series(phantom_dir)[0]
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="HRCT_TRIAGE")
    assert assoc.is_established
    assert assoc.send_c_store(dataset).Status == 0x0000
    with transaction(sessions) as session:
        last = session.scalars(select(Study)).one().last_instance_at
    assert last is not None
    far_later = last + timedelta(hours=1)
    # then the study does not complete while the association is open, and does once released
    assert listener.dispatcher.run_once(now=far_later)[0] == 0
    assoc.release()
    wait_until_no_open_association(sessions)
    assert listener.dispatcher.run_once(now=far_later)[0] == 1


def test_uid_that_would_escape_the_spool_is_refused(
    listener: Listener, phantom_dir: Path, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    good = pydicom.dcmread(thin_series(phantom_dir)[0])
    bad = pydicom.dcmread(thin_series(phantom_dir)[1])
    bad.SOPInstanceUID = "../../x"
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(good.SOPClassUID, good.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="HRCT_TRIAGE")
    statuses = [assoc.send_c_store(bad).Status, assoc.send_c_store(good).Status]
    assoc.release()
    # the bad one fails, the good one in the same association still succeeds
    assert statuses[0] >= 0xA000 and statuses[1] == 0x0000
    assert not list(tmp_path.rglob("x.dcm")) and not (tmp_path / "x.dcm").exists()
    with transaction(sessions) as session:
        assert len(session.scalars(select(Instance)).all()) == 1


def test_each_association_gets_its_own_copy_of_the_supported_contexts(
    listener: Listener,
) -> None:
    # given the running server's supported contexts
    server = listener._server
    contexts = server.contexts
    assert isinstance(contexts, SupportedContexts)  # our cheap copy, not pynetdicom's
    # when pynetdicom copies them for an association (it calls deepcopy)
    copied = copy.deepcopy(contexts)
    # then every context is there, equal, and nothing an association could change is shared
    assert [c.as_tuple for c in copied] == [c.as_tuple for c in contexts]
    assert len(copied) > 100
    for original, duplicate in zip(contexts, copied, strict=True):
        assert duplicate is not original
        assert duplicate._transfer_syntax is not original._transfer_syntax
    copied[0].add_transfer_syntax("1.2.840.10008.1.2.4.100")
    assert "1.2.840.10008.1.2.4.100" not in contexts[0].transfer_syntax
