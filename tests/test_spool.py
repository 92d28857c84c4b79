"""The spool's write path: a final name only ever holds whole content and is never swapped for a
copy not yet on disk, and start-up reconciliation tells a file whose content never reached the
disk (power cut before its fsync) from an unacknowledged but whole one, including the files of
rows committed while their fsyncs ran."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.storage import TEMP_SUFFIX, InvalidUID
from hrct_triage.db import worklist
from hrct_triage.db.models import Instance
from hrct_triage.db.session import transaction
from hrct_triage.listener import spool
from hrct_triage.listener.group_commit import GroupCommit
from hrct_triage.listener.reconcile import reconcile
from tests.helpers.listeners import nameless_files_open, thin_series
from tests.helpers.worklist import T0
from tests.helpers.worklist import facts as _facts

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.10.2", "1.2.826.0.1.3680043.10.2.1", "1.2.3.4.5"
T_QUIET = timedelta(seconds=1)


def _write(spool_dir: Path, dataset: bytes) -> spool.SpooledFile:
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    return spool.write_instance(spool.instance_dir(spool_dir, STUDY, SERIES), SOP, meta, dataset)


@pytest.mark.parametrize("sop_uid", [SOP, SOP + "6"])  # padded, and not
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_the_file_meta_pydicom_writes(sop_uid: str, syntax: str) -> None:
    # given the File Meta that pydicom's writer makes for a received CT image
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        "1.2.840.10008.5.1.4.1.1.2",
        sop_uid,
    )
    meta.TransferSyntaxUID, meta.ImplementationClassUID = syntax, spool.IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = spool.IMPLEMENTATION_VERSION
    written = DicomBytesIO()
    write_file_meta_info(written, meta, enforce_standard=True)
    # then the spool's own bytes are those, after the preamble
    built = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", sop_uid, syntax)
    assert built == b"\x00" * 128 + b"DICM" + written.getvalue()


def test_an_identical_resend_leaves_the_stored_file_in_place(tmp_path: Path) -> None:
    # given an instance in the spool
    first = _write(tmp_path, b"\x08\x00\x18\x00" + b"x" * 4096)
    inode = first.path.stat().st_ino
    # when the same bytes arrive again
    again = _write(tmp_path, b"\x08\x00\x18\x00" + b"x" * 4096)
    # then they name the same file, which is the one stored before (not a fresh copy that
    # might not be on disk yet), whole, with no temporary file left behind
    assert again.path == first.path
    assert first.path.stat().st_ino == inode
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256
    assert spool.name_matches_content(first.path, first.sha256)
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))


def test_without_overlap_the_same_file_is_made_and_a_failed_flush_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given an instance written with the hash and the fsyncs overlapped (a C-STORE alone)
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    body = b"\x08\x00\x18\x00" + bytes(range(256)) * 300
    alone = spool.start_instance(tmp_path / "a", SOP, meta, body).wait()
    # when the same bytes are written without overlap (beside other C-STOREs)
    beside = spool.start_instance(tmp_path / "b", SOP, meta, body, overlap=False).wait()
    # then the file has the same name, bytes and hash
    assert beside.path.name == alone.path.name
    assert beside.path.read_bytes() == alone.path.read_bytes() == meta + body
    assert beside.sha256 == alone.sha256 == hashlib.sha256(meta + body).hexdigest()
    # and a flush that fails in wait() is raised there, and again by any later wait()
    flushed: list[int] = []

    def failing_flush(fd: int) -> None:
        flushed.append(fd)
        os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool, "_fsync_and_close", failing_flush)
    syncing = spool.start_instance(tmp_path / "c", SOP, meta, body, overlap=False)
    assert flushed == []  # deferred: nothing flushed before the caller waits
    for _ in range(2):
        with pytest.raises(OSError, match="Input/output error"):
            syncing.wait()
    assert len(flushed) == 1


def _streamed(spool_dir: Path, meta: bytes, body: bytes, piece: int) -> spool.Streaming:
    streaming = spool.Streaming.open(spool_dir, meta)
    assert streaming is not None  # ext4 and tmpfs make nameless files
    for start in range(0, len(body), piece):
        streaming.add(memoryview(body)[start : start + piece])
    return streaming


@pytest.mark.parametrize("overlap", [True, False], ids=["alone", "beside"])
def test_a_streamed_instance_is_the_file_written_whole(tmp_path: Path, overlap: bool) -> None:
    # given an instance written whole
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    body = b"\x08\x00\x18\x00" + bytes(range(256)) * 3000
    whole = spool.start_instance(tmp_path / "whole", SOP, meta, body).wait()
    # when the same bytes are streamed in uneven fragments and published
    (tmp_path / "spool").mkdir()
    streaming = _streamed(tmp_path / "spool", meta, body, 70_001)
    folder = spool.instance_dir(tmp_path / "spool", STUDY, SERIES)
    syncing = streaming.publish(folder, SOP, overlap=overlap)
    assert syncing is not None
    streamed = syncing.wait()
    # then the file has the same name, bytes, size and hash
    assert streamed.path.name == whole.path.name
    assert streamed.path.read_bytes() == whole.path.read_bytes() == meta + body
    assert (streamed.sha256, streamed.size_bytes) == (whole.sha256, whole.size_bytes)
    # and an identical resend streamed again keeps the file stored before
    inode = streamed.path.stat().st_ino
    again = _streamed(tmp_path / "spool", meta, body, 16_384).publish(folder, SOP, overlap=overlap)
    assert again is not None and again.wait().path == streamed.path
    assert streamed.path.stat().st_ino == inode
    # and no nameless file is left open, nothing else is in the spool
    assert nameless_files_open(tmp_path / "spool") == []
    assert [p.name for p in (tmp_path / "spool").rglob("*") if p.is_file()] == [whole.path.name]


def test_the_next_instance_takes_a_nameless_file_prepared_ahead(tmp_path: Path) -> None:
    # given nameless files prepared ahead (after each answer), more times than are kept
    for _ in range(spool._SPARES_KEPT + 2):
        spool.Streaming.prepare(tmp_path)
    assert len(nameless_files_open(tmp_path)) == spool._SPARES_KEPT
    # when the next instance is streamed
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    body = b"\x08\x00\x18\x00" + bytes(range(256)) * 1000
    streaming = _streamed(tmp_path, meta, body, 70_001)
    # then it is written to one of them rather than to a file made for it
    assert len(nameless_files_open(tmp_path)) == spool._SPARES_KEPT
    # and is published whole under its content's name
    syncing = streaming.publish(spool.instance_dir(tmp_path, STUDY, SERIES), SOP, overlap=False)
    assert syncing is not None
    stored = syncing.wait()
    assert stored.path.read_bytes() == meta + body
    assert stored.sha256 == hashlib.sha256(meta + body).hexdigest()
    # and the listener's stop closes the rest, which leave nothing behind
    spool.close_spares(tmp_path)
    assert nameless_files_open(tmp_path) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [stored.path]


def test_a_streamed_instance_never_published_leaves_nothing(tmp_path: Path) -> None:
    # given an instance being streamed
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    streaming = _streamed(tmp_path, meta, b"\x08\x00\x18\x00" + b"x" * 100_000, 30_000)
    assert len(nameless_files_open(tmp_path)) == 1
    # when it is dropped (refused, or its association broke off)
    streaming.close()
    streaming.close()  # twice is harmless: the store and the reader both drop it
    # then its file is gone: it never had a name, and it is no longer open
    assert nameless_files_open(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_a_streamed_write_that_failed_is_raised_when_published(tmp_path: Path) -> None:
    # given a file size limit (RLIMIT_FSIZE): writes past it fail with EFBIG, as a full disk
    # fails them with ENOSPC
    import resource
    import signal

    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        streaming = _streamed(tmp_path, meta, b"\x08\x00\x18\x00" + b"x" * 100_000, 30_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    # when it is published
    folder = spool.instance_dir(tmp_path, STUDY, SERIES)
    with pytest.raises(OSError) as raised:
        streaming.publish(folder, SOP, overlap=False)
    # then the write's error is raised and nothing is named or left open
    assert raised.value.errno == errno.EFBIG
    assert not folder.exists() or list(folder.iterdir()) == []
    assert nameless_files_open(tmp_path) == []


def test_a_streamed_instance_that_cannot_be_linked_there_is_dropped_for_a_whole_write(
    tmp_path: Path,
) -> None:
    # given a streamed instance, and a target folder on another file system (no link can
    # reach it: EXDEV, as a file system without hard links refuses one)
    other = Path("/dev/shm")
    assert other.stat().st_dev != tmp_path.stat().st_dev, "needs /dev/shm apart from tmp_path"
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    streaming = _streamed(tmp_path, meta, b"\x08\x00\x18\x00" + b"x" * 1000, 300)
    folder = Path(tempfile.mkdtemp(dir=other)) / STUDY / SERIES
    try:
        # when it is published there
        published = streaming.publish(folder, SOP, overlap=True)
        # then it says so (the caller writes the instance whole) and its file is dropped
        assert published is None
        assert nameless_files_open(tmp_path) == []
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(folder.parent.parent)


def test_a_changed_version_gets_its_own_file(tmp_path: Path) -> None:
    first = _write(tmp_path, b"\x08\x00\x18\x00" + b"x" * 64)
    second = _write(tmp_path, b"\x08\x00\x18\x00" + b"y" * 64)
    assert first.path != second.path
    assert first.path.parent == second.path.parent
    assert first.path.is_file() and second.path.is_file()


def test_a_spool_folder_removed_since_is_made_again(tmp_path: Path) -> None:
    first = _write(tmp_path, b"\x08\x00\x18\x00" + b"x" * 64)
    for path in first.path.parent.iterdir():
        path.unlink()
    first.path.parent.rmdir()  # `purge` removes emptied folders
    again = _write(tmp_path, b"\x08\x00\x18\x00" + b"x" * 64)
    assert again.path.is_file()


def test_reconciliation_drops_a_file_whose_content_never_reached_the_disk(
    tmp_path: Path, sqlite_sessions: sessionmaker[Session], phantom_dir: Path
) -> None:
    # given two unacknowledged files under final names: one whole, one whose content does not
    # match the hash in its name (a power cut between its link and its fsync)
    spool_dir = tmp_path / "spool"
    whole, damaged = (pydicom.dcmread(path) for path in thin_series(phantom_dir)[:2])
    paths = []
    for dataset, keep in ((whole, True), (damaged, False)):
        scratch = tmp_path / "scratch.dcm"
        dataset.save_as(scratch, enforce_file_format=True)
        data = scratch.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        folder = spool_dir / str(dataset.StudyInstanceUID) / str(dataset.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{dataset.SOPInstanceUID}.{digest[:16]}.dcm"
        path.write_bytes(data if keep else data[: len(data) // 2] + bytes(len(data) // 2))
        paths.append(path)
    # when the listener starts
    result = reconcile(spool_dir, sqlite_sessions)
    # then the whole one is adopted and the damaged one removed, never recorded
    assert (result.adopted, result.stale_removed) == (1, 1)
    with transaction(sqlite_sessions) as session:
        recorded = [row.sop_instance_uid for row in session.scalars(select(Instance))]
    assert recorded == [str(whole.SOPInstanceUID)]
    assert paths[0].is_file() and not paths[1].exists()


def _recorded(
    sessions: sessionmaker[Session], spool_dir: Path, study: str, sop: str, body: bytes
) -> spool.SpooledFile:
    """An instance written to the spool and its row committed, as the listener does."""
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", sop, "1.2.840.10008.1.2.1")
    folder = spool.instance_dir(spool_dir, study, f"{study}.1")
    spooled = spool.write_instance(folder, sop, meta, body)
    facts = replace(_facts(sop, study=study, sha=spooled.sha256), path=str(spooled.path))
    with transaction(sessions) as session:
        worklist.record_instance(session, facts, association_id=None, now=T0)
    return spooled


def test_reconciliation_forgets_a_receiving_studys_row_whose_file_never_reached_the_disk(
    tmp_path: Path, sqlite_sessions: sessionmaker[Session]
) -> None:
    # given a study that completed long ago (its instances were acknowledged)
    spool_dir = tmp_path / "spool"
    done = "1.2.826.0.1.3680043.10.8"
    old = _recorded(sqlite_sessions, spool_dir, done, f"{done}.1.1", b"d" * 4096)
    with transaction(sqlite_sessions) as session:
        assert worklist.complete_ready_studies(session, quiet_seconds=0, now=T0 + T_QUIET)
    # and a study still receiving whose rows were committed while their files' fsyncs ran
    receiving = "1.2.826.0.1.3680043.10.7"
    kept = _recorded(sqlite_sessions, spool_dir, receiving, f"{receiving}.1.1", b"a" * 4096)
    damaged = _recorded(sqlite_sessions, spool_dir, receiving, f"{receiving}.1.2", b"b" * 4096)
    missing = _recorded(sqlite_sessions, spool_dir, receiving, f"{receiving}.1.3", b"c" * 4096)
    # when a power cut leaves one file with other content and another not at all (and the old
    # study's file is damaged too)
    damaged.path.write_bytes(bytes(damaged.size_bytes))
    missing.path.unlink()
    old.path.write_bytes(bytes(old.size_bytes))
    # and the listener starts
    result = reconcile(spool_dir, sqlite_sessions)
    # then the receiving study's two rows are forgotten with their files (their senders never
    # heard success); the whole one stays, and the completed study is not the start-up's to judge
    assert result.unsynced_forgotten == 2
    with transaction(sqlite_sessions) as session:
        recorded = sorted(session.scalars(select(Instance.sop_instance_uid)))
    assert recorded == [f"{receiving}.1.1", f"{done}.1.1"]
    assert kept.path.is_file() and old.path.is_file()
    assert not damaged.path.exists() and not missing.path.exists()


def test_a_replacing_row_waits_for_its_file_and_a_new_row_does_not(
    sqlite_sessions: sessionmaker[Session],
) -> None:
    def disk_failed() -> None:
        raise OSError(errno.EIO, "Input/output error")

    group = GroupCommit(sqlite_sessions)
    try:
        # a new instance's row commits without waiting for its file (its fsync runs meanwhile)
        new = group.record(_facts("1.2.3.1.1", sha="a" * 64), None, T0, disk_failed)
        assert new.recorded is worklist.Recorded.NEW
        # a changed version's row waits for its file, and a file that failed changes nothing
        with pytest.raises(OSError):
            group.record(_facts("1.2.3.1.1", sha="b" * 64), None, T0, disk_failed)
        with transaction(sqlite_sessions) as session:
            assert session.scalars(select(Instance.sha256)).one() == "a" * 64
        changed = group.record(_facts("1.2.3.1.1", sha="b" * 64), None, T0, lambda: None)
        assert changed.recorded is worklist.Recorded.REPLACED
    finally:
        group.close()


def test_a_uid_that_could_not_name_a_file_is_refused_before_any_file_is_made(
    tmp_path: Path,
) -> None:
    meta = spool.file_meta("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1")
    folder = spool.instance_dir(tmp_path, STUDY, SERIES)
    for bad in ("../../x", "1." + "2" * 70, ""):
        with pytest.raises(InvalidUID):
            spool.start_instance(folder, bad, meta, b"\x08\x00\x18\x00")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
