"""Ingest at scale and after trouble: compressed transfer syntaxes stored as received (DCMTK
compresses, storescu sends), studies split over associations and associations carrying several
studies, eight scanners at once, and start-up reconciliation after an unclean stop."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.models import Association, Instance, Study
from hrct_triage.db.session import transaction
from hrct_triage.listener.scp import Listener
from hrct_triage.listener.spool import content_hash
from tests.helpers.dicom_peers import require_tool, storescu
from tests.helpers.listeners import listener_settings, thin_series, wait_until_no_open_association


def _dcmtk(tool: str, *args: str | Path) -> None:
    require_tool(tool)
    result = subprocess.run(
        [tool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def _jpeg2000(source: Path, target: Path) -> None:
    """DCMTK here has no JPEG 2000 encoder; pydicom's (OpenJPEG) writes the same syntax."""
    dataset = pydicom.dcmread(source)
    dataset.compress(uid.JPEG2000Lossless, generate_instance_uid=False)
    dataset.save_as(target, enforce_file_format=True)


# (how the file is made, storescu's proposal, transfer syntax it must arrive and stay in)
ENCODINGS = [
    (("dcmcjpeg", "+e1"), "-xs", uid.JPEGLosslessSV1),
    (("dcmcjpls",), "-xt", uid.JPEGLSLossless),
    (("dcmcrle",), "-xr", uid.RLELossless),
    (("dcmconv", "+td"), "-xd", uid.DeflatedExplicitVRLittleEndian),
    (("dcmconv", "+tb"), "-xb", uid.ExplicitVRBigEndian),
    (("dcmconv", "+ti"), "-xi", uid.ImplicitVRLittleEndian),
    (("j2k",), "-xv", uid.JPEG2000Lossless),
]


@pytest.mark.dcmtk
def test_compressed_instances_are_stored_as_received(
    sqlite_listener: Listener,
    phantom_dir: Path,
    tmp_path: Path,
    sqlite_sessions: sessionmaker[Session],
) -> None:
    # given one CT slice encoded in each transfer syntax, each copy its own SOP instance
    source = thin_series(phantom_dir)[10]
    expected: dict[str, str] = {}
    for index, (tool, proposal, syntax) in enumerate(ENCODINGS):
        folder = tmp_path / f"enc{index}"
        folder.mkdir()
        twin = pydicom.dcmread(source)
        twin.SOPInstanceUID = uid.generate_uid()
        plain = folder / "plain.src"
        twin.save_as(plain, enforce_file_format=True)
        target = folder / "slice.dcm"
        if tool[0] == "j2k":
            _jpeg2000(plain, target)
        else:
            _dcmtk(tool[0], *tool[1:], plain, target)
        assert str(
            pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID
        ) == (syntax)
        # when storescu sends it proposing that transfer syntax
        result = storescu(sqlite_listener.port, folder, extra=(proposal,))
        assert result.returncode == 0, result.stderr
        expected[str(twin.SOPInstanceUID)] = syntax

    # then each is spooled in the syntax it was sent in, with that syntax in the File Meta
    with transaction(sqlite_sessions) as session:
        rows = session.scalars(select(Instance)).all()
    assert {row.sop_instance_uid: row.transfer_syntax_uid for row in rows} == expected
    for row in rows:
        meta = pydicom.dcmread(row.path, stop_before_pixels=True).file_meta
        assert str(meta.TransferSyntaxUID) == row.transfer_syntax_uid
    # and the lossless ones decode to the very pixels of the uncompressed original
    original = pydicom.dcmread(source).pixel_array
    for row in rows:
        if row.transfer_syntax_uid != uid.DeflatedExplicitVRLittleEndian:
            assert (pydicom.dcmread(row.path).pixel_array == original).all()


@pytest.mark.dcmtk
def test_one_study_over_several_associations_and_several_studies_in_one(
    listener: Listener, phantom_dir: Path, sessions: sessionmaker[Session]
) -> None:
    studies = sorted((phantom_dir / "studies").iterdir())
    first = sorted(studies[0].rglob("*.dcm"))
    second = sorted(studies[1].rglob("*.dcm"))
    # given the first study split in three parts, sent over three associations one after another
    parts = [first[0::3], first[1::3], first[2::3]]
    for part in parts:
        assert storescu(listener.port, *part).returncode == 0
    # and then both studies in a single association
    assert storescu(listener.port, studies[0], studies[1]).returncode == 0
    wait_until_no_open_association(sessions)
    # then every instance of both studies is recorded once, under the right study
    with transaction(sessions) as session:
        counts = {study.study_uid: len(study.instances) for study in session.scalars(select(Study))}
        audit = session.scalars(select(Association).order_by(Association.id)).all()
    uid_of = {
        path: str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        for path in (first[0], second[0])
    }
    assert counts == {uid_of[first[0]]: len(first), uid_of[second[0]]: len(second)}
    assert [row.instances for row in audit] == [len(p) for p in parts] + [len(first) + len(second)]
    # and the study completes once, when the last association has closed and it is quiet
    with transaction(sessions) as session:
        latest = max(
            s.last_instance_at for s in session.scalars(select(Study)) if s.last_instance_at
        )
    assert listener.dispatcher.run_once(now=latest + timedelta(seconds=60))[0] == 2


@pytest.mark.dcmtk
def test_eight_scanners_at_once(
    listener: Listener, phantom_dir: Path, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    # given eight scanners, each with its own study (a phantom copied under new UIDs)
    source = thin_series(phantom_dir)[:12]
    folders = []
    for scanner in range(8):
        folder = tmp_path / f"scanner{scanner}"
        folder.mkdir()
        study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for index, path in enumerate(source):
            dataset = pydicom.dcmread(path)
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
            dataset.SOPInstanceUID = pydicom.uid.generate_uid()
            dataset.save_as(folder / f"{index:03d}.dcm", enforce_file_format=True)
        folders.append(folder)
    # when all eight send at the same time, each over its own association
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            pool.map(lambda f: storescu(listener.port, f, calling=f"CT_{f.name[-1]}"), folders)
        )
    # then every send succeeded and every instance is in the worklist under its own study
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    wait_until_no_open_association(sessions)
    with transaction(sessions) as session:
        per_study = [len(study.instances) for study in session.scalars(select(Study))]
        audit = session.scalars(select(Association)).all()
    assert sorted(per_study) == [len(source)] * 8
    assert sorted(row.instances for row in audit) == [len(source)] * 8
    assert {row.state for row in audit} == {"released"}


@pytest.mark.dcmtk
def test_restart_reconciles_the_spool_with_the_worklist(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session], phantom_dir: Path
) -> None:
    # given a listener that stored a few slices and then died uncleanly
    settings = listener_settings(tmp_path / "var", database_url)
    first_run = Listener(settings, sessions, run_dispatcher=False)
    first_run.start()
    files = thin_series(phantom_dir)
    assert storescu(first_run.port, *files[:3]).returncode == 0
    first_run.stop()
    wait_until_no_open_association(sessions)
    with transaction(sessions) as session:
        acknowledged = {row.sop_instance_uid: row.path for row in session.scalars(select(Instance))}
        dead_association = worklist.open_association(
            session,
            calling_ae="CT_SCANNER",
            called_ae="HRCT_TRIAGE",
            peer_address="127.0.0.1",
            peer_port=1,
            now=datetime.now(UTC),
        )
    some_uid, some_file = next(iter(acknowledged.items()))
    some_path = Path(some_file)
    series_dir = some_path.parent
    # ... leaving a half-written temporary file,
    partial = series_dir / ".x.dcm.0123.partial"
    partial.write_bytes(b"half")
    # ... an instance fsynced but never committed (its sender never heard success),
    unacknowledged = pydicom.dcmread(files[5])
    unacknowledged_uid = str(unacknowledged.SOPInstanceUID)
    unacknowledged.save_as(tmp_path / "u.dcm", enforce_file_format=True)
    data = (tmp_path / "u.dcm").read_bytes()
    digest = content_hash(b"", data)
    shutil.copy(tmp_path / "u.dcm", series_dir / f"{unacknowledged_uid}.{digest[:16]}.dcm")
    # ... and an old version of an acknowledged instance whose removal was interrupted
    stale = some_path.with_name(f"{some_uid}.{'0' * 16}.dcm")
    shutil.copy(some_path, stale)

    # when the listener starts again
    second_run = Listener(settings, sessions, run_dispatcher=False)
    second_run.start()
    second_run.stop()

    # then nothing acknowledged is forgotten, the unacknowledged instance is adopted,
    # and the partial and stale files are gone
    recovered = second_run.reconciliation
    assert (recovered.partial_removed, recovered.adopted, recovered.stale_removed) == (1, 1, 1)
    assert recovered.associations_orphaned == 1
    with transaction(sessions) as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        dead = session.get(Association, dead_association)
    assert set(rows) == {*acknowledged, unacknowledged_uid}
    for sop_uid, path in acknowledged.items():
        assert rows[sop_uid].path == path and Path(path).is_file()
    assert Path(rows[unacknowledged_uid].path).is_file()
    assert not partial.exists() and not stale.exists()
    assert dead is not None and dead.state == "orphaned"
