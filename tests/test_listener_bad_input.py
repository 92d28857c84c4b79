"""Bad input over a real association: each bad instance gets a failure status (or, for a changed
duplicate, an audit record), the good instances around it in the same association still succeed,
and the listener keeps serving. The client is pynetdicom as SCU; raw or broken bodies are sent
with its chunked file sender, which puts the file's bytes on the wire undecoded."""

from __future__ import annotations

import copy
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association as ClientAssociation
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.models import Association, Instance, InstanceReplacement, Refusal
from hrct_triage.db.session import transaction
from hrct_triage.listener import spool
from hrct_triage.listener.scp import Listener
from tests.helpers.listeners import listener_settings, thin_series, wait_until_no_open_association

MAX_INSTANCE_BYTES = 2_000_000  # a 512x512 CT slice (~0.5 MB) fits, a 3 MB private element not


@pytest.fixture
def small_listener(
    tmp_path: Path, sqlite_url: str, sqlite_sessions: sessionmaker[Session]
) -> Iterator[Listener]:
    settings = listener_settings(
        tmp_path / "var", sqlite_url, max_instance_bytes=MAX_INSTANCE_BYTES
    )
    scp = Listener(settings, sqlite_sessions, run_dispatcher=False)
    scp.start()
    yield scp
    scp.stop()


def _raw_file(path: Path, template: Dataset, body: bytes) -> Path:
    """A Part 10 file whose File Meta is valid and whose data set is ``body``, verbatim."""
    buffer = path.with_suffix(".meta")
    meta_only = Dataset()
    meta_only.file_meta = template.file_meta
    dcmwrite(buffer, meta_only, enforce_file_format=True)
    path.write_bytes(buffer.read_bytes() + body)
    return path


def _body(path: Path) -> bytes:
    """The data set bytes of a file, after its File Meta."""
    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[meta_end:]


def _send_file(assoc: ClientAssociation, path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as patch:
        patch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        return int(assoc.send_c_store(path).Status)


def test_bad_instances_fail_and_the_good_ones_around_them_succeed(
    small_listener: Listener,
    phantom_dir: Path,
    tmp_path: Path,
    sqlite_sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given good CT slices and one broken variant of each kind
    files = thin_series(phantom_dir)
    good = [pydicom.dcmread(path) for path in files[:8]]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()

    not_dicom = _raw_file(bad_dir / "noise.dcm", good[0], os.urandom(40_000))
    truncated = _raw_file(bad_dir / "cut.dcm", good[1], _body(files[1])[:-1000])

    missing_series = pydicom.dcmread(files[2])
    del missing_series.SeriesInstanceUID

    wrong_class = pydicom.dcmread(
        files[3]
    )  # sent on the CT context, but says it is a Secondary Capture
    wrong_class.SOPClassUID = SecondaryCaptureImageStorage
    wrong_class_file = bad_dir / "wrong_class.dcm"
    wrong_class.save_as(wrong_class_file, enforce_file_format=True)
    mismatched = _raw_file(bad_dir / "mismatch.dcm", good[3], _body(wrong_class_file))

    zero_padded = pydicom.dcmread(files[4])
    zero_padded.SOPInstanceUID = "1.2.840.0123.4"
    too_long = pydicom.dcmread(files[5])
    too_long_file = bad_dir / "long.dcm"
    too_long.SOPInstanceUID = "1." + "2" * 70
    too_long.save_as(too_long_file, enforce_file_format=True)
    long_body = _raw_file(bad_dir / "long_body.dcm", good[5], _body(too_long_file))

    huge_private = pydicom.dcmread(files[6])
    block = huge_private.private_block(0x0009, "HRCT TEST", create=True)
    block.add_new(0x01, "OB", b"\0" * 3_000_000)

    changed = pydicom.dcmread(files[7])  # same SOP Instance UID as good[7], different bytes
    changed.SeriesDescription = "CHEST 1.0 LUNG (corrected)"

    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(good[0].SOPClassUID, good[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", small_listener.port, ae_title="HRCT_TRIAGE")
    assert assoc.is_established

    # when they are sent interleaved with good ones in one association
    statuses = {
        "good0": int(assoc.send_c_store(good[0]).Status),
        "not_dicom": _send_file(assoc, not_dicom, monkeypatch),
        "good1": int(assoc.send_c_store(good[1]).Status),
        "truncated": _send_file(assoc, truncated, monkeypatch),
        "missing_series_uid": int(assoc.send_c_store(missing_series).Status),
        "good2": int(assoc.send_c_store(good[2]).Status),
        "sop_class_mismatch": _send_file(assoc, mismatched, monkeypatch),
        "zero_padded_uid": int(assoc.send_c_store(zero_padded).Status),
        "uid_over_64": _send_file(assoc, long_body, monkeypatch),
        "good3": int(assoc.send_c_store(good[3]).Status),
        "huge_private": int(assoc.send_c_store(huge_private).Status),
        "good7": int(assoc.send_c_store(good[7]).Status),
        "changed7": int(assoc.send_c_store(changed).Status),
    }
    assoc.release()

    # then each bad one got its failure status and every good one succeeded
    assert statuses == {
        "good0": 0x0000,
        "not_dicom": 0xC000,
        "good1": 0x0000,
        "truncated": 0xC000,
        "missing_series_uid": 0xC001,
        "good2": 0x0000,
        "sop_class_mismatch": 0xA900,
        "zero_padded_uid": 0xC001,
        "uid_over_64": 0xC001,
        "good3": 0x0000,
        "huge_private": 0xA700,
        "good7": 0x0000,
        "changed7": 0x0000,
    }
    wait_until_no_open_association(sqlite_sessions)
    with transaction(sqlite_sessions) as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        audit = session.scalars(select(Association)).one()
        replacements = session.scalars(select(InstanceReplacement)).all()
    # and only the good instances are in the worklist, each whole on disk
    assert set(rows) == {str(good[i].SOPInstanceUID) for i in (0, 1, 2, 3, 7)}
    spool_dir = small_listener.settings.spool_dir.resolve()
    on_disk = sorted(p for p in spool_dir.rglob("*") if p.is_file())
    assert sorted(Path(row.path) for row in rows.values()) == on_disk
    # and the association audit counts what happened
    assert (audit.instances, audit.failures) == (6, 7)
    assert audit.statuses == {
        "0x0000": 6,
        "0xC000": 2,
        "0xC001": 3,
        "0xA900": 1,
        "0xA700": 1,
    }
    # and the changed duplicate kept the newest bytes and recorded both versions
    newest = rows[str(good[7].SOPInstanceUID)]
    assert pydicom.dcmread(newest.path).SeriesDescription == "CHEST 1.0 LUNG (corrected)"
    (replaced,) = replacements
    assert replaced.sop_instance_uid == str(good[7].SOPInstanceUID)
    assert replaced.new_sha256 == newest.sha256 and replaced.old_sha256 != newest.sha256
    assert not Path(replaced.old_path).exists()
    # and the listener still serves a new association
    again = AE(ae_title="CT_SCANNER")
    again.add_requested_context("1.2.840.10008.1.1")
    check = again.associate("127.0.0.1", small_listener.port, ae_title="HRCT_TRIAGE")
    assert check.is_established and check.send_c_echo().Status == 0x0000
    check.release()


def test_low_disk_refuses_before_writing_and_holds_the_study_open(
    small_listener: Listener, phantom_dir: Path, sqlite_sessions: sessionmaker[Session]
) -> None:
    # given a study whose first slice was stored
    first, second = (pydicom.dcmread(path) for path in thin_series(phantom_dir)[:2])
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", small_listener.port, ae_title="HRCT_TRIAGE")
    assert assoc.send_c_store(first).Status == 0x0000
    # when the spool's free space falls below HRCT_MIN_FREE_DISK_BYTES
    small_listener.settings.listener.min_free_disk_bytes = 1 << 62
    refused = assoc.send_c_store(second).Status
    assoc.release()
    wait_until_no_open_association(sqlite_sessions)
    # then the next slice is refused with 0xA700 and nothing of it is written
    assert refused == 0xA700
    assert len(list(small_listener.settings.spool_dir.rglob("*.dcm"))) == 1
    # and the study is not completed on its partial set, however long it stays quiet
    with transaction(sqlite_sessions) as session:
        last = session.scalars(select(Instance)).one().received_at
    from datetime import timedelta

    much_later = last + timedelta(hours=1)
    assert small_listener.dispatcher.run_once(now=much_later)[0] == 0
    # until the scanner's retry is stored, once there is room again
    small_listener.settings.listener.min_free_disk_bytes = 0
    retry = AE(ae_title="CT_SCANNER")
    retry.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = retry.associate("127.0.0.1", small_listener.port, ae_title="HRCT_TRIAGE")
    assert assoc.send_c_store(second).Status == 0x0000
    assoc.release()
    wait_until_no_open_association(sqlite_sessions)
    assert small_listener.dispatcher.run_once(now=much_later + timedelta(hours=1))[0] == 1


def test_aborted_association_keeps_what_it_acknowledged(
    small_listener: Listener, phantom_dir: Path, sqlite_sessions: sessionmaker[Session]
) -> None:
    # given a scanner that stores three slices and then aborts
    slices = [pydicom.dcmread(path) for path in thin_series(phantom_dir)[:3]]
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(slices[0].SOPClassUID, slices[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", small_listener.port, ae_title="HRCT_TRIAGE")
    assert [assoc.send_c_store(ds).Status for ds in slices] == [0, 0, 0]
    # when it aborts halfway through its study
    assoc.abort()
    wait_until_no_open_association(sqlite_sessions)
    # then the three acknowledged instances are kept and the audit says aborted
    with transaction(sqlite_sessions) as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
        audit = session.scalars(select(Association)).one()
    assert uids == {str(ds.SOPInstanceUID) for ds in slices}
    assert audit.state in {"aborted", "closed"} and audit.instances == 3
    # and the listener serves the next association
    again = ae.associate("127.0.0.1", small_listener.port, ae_title="HRCT_TRIAGE")
    fresh = copy.deepcopy(slices[0])
    fresh.SOPInstanceUID = generate_uid()
    assert again.send_c_store(fresh).Status == 0x0000
    again.release()


@pytest.mark.parametrize("beside_another_store", [False, True], ids=["alone", "beside"])
def test_an_instance_whose_file_fails_to_reach_the_disk_is_refused_and_forgotten(
    small_listener: Listener,
    phantom_dir: Path,
    sqlite_sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    beside_another_store: bool,
) -> None:
    # given three slices, and a disk that fails the flush of the second one's file (alone, its
    # row is committed while that fsync runs in another thread; beside another C-STORE of the
    # process, the fsync runs in the association's thread after the commit)
    if beside_another_store:
        with small_listener.state.lock:
            small_listener.state.storing += 1  # as if another association's store were running
    slices = [pydicom.dcmread(path) for path in thin_series(phantom_dir)[:3]]
    failing = str(slices[1].SOPInstanceUID)
    flush = spool._fsync_and_close
    flushes = []

    def failing_flush(fd: int) -> None:  # one file flush per instance, sent one at a time
        flushes.append(fd)
        if len(flushes) == 2:
            os.close(fd)
            raise OSError(errno.EIO, "Input/output error")
        flush(fd)

    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(slices[0].SOPClassUID, slices[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", small_listener.port, ae_title="HRCT_TRIAGE")
    assert assoc.is_established
    # when they are sent in one association
    with monkeypatch.context() as patch:
        patch.setattr(spool, "_fsync_and_close", failing_flush)
        statuses = [int(assoc.send_c_store(dataset).Status) for dataset in slices]
    # then only that one fails, out of resources, so the scanner keeps it and sends it again
    assert statuses == [0x0000, 0xA700, 0x0000]
    with transaction(sqlite_sessions) as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
        refusal = session.scalars(select(Refusal)).one()
    # and the worklist does not name its file (the row committed meanwhile is taken back)
    assert recorded == {str(slices[0].SOPInstanceUID), str(slices[2].SOPInstanceUID)}
    assert (refusal.sop_instance_uid, refusal.status, refusal.transient) == (failing, 0xA700, True)
    assert "Input/output error" in refusal.reason
    # and when the scanner sends it again to a healthy disk, it is stored
    assert int(assoc.send_c_store(slices[1]).Status) == 0x0000
    assoc.release()
    if beside_another_store:
        with small_listener.state.lock:
            small_listener.state.storing -= 1
    with transaction(sqlite_sessions) as session:
        assert (
            session.scalar(select(Instance.path).where(Instance.sop_instance_uid == failing))
            is not None
        )
