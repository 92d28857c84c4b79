"""Start-up reconciliation of the spool with the worklist.

Acknowledged means "row committed" (success is answered only after that), so the worklist is the
list of what must never be forgotten. A crash can leave three kinds of file the worklist does not
name, and each is settled before the listener accepts an association:

* a hidden temporary file (killed mid-write): incomplete, removed;
* a finished file whose SOP instance the worklist does not know (killed between the fsync and
  the commit, so the sender never heard success): when its content still hashes to the hash in
  its name, the bytes are whole, so the instance is *adopted*, recorded as if it had just
  arrived. A sender that retries then sends an identical instance, which changes nothing; one
  that does not retry loses nothing. One whose content does not match its name (a power cut
  before its fsync, see ``hrct_triage.listener.spool``) was never acknowledged and is removed;
* a finished file of an instance the worklist knows under another file: either the version a
  committed replacement superseded (its removal was interrupted) or an unacknowledged change;
  removed, since the worklist's version is the one acknowledged last.

And one kind of row: the listener commits an instance's row while its file's fsyncs run
(``listener.spool``), so a power cut can leave a row whose file is partial or missing. Its C-STORE
was never answered, its association was open, so its study is still receiving: every file of the
studies still receiving is hashed, and a row whose file does not match its hash is deleted with
the file (the scanner, told nothing, sends the instance again).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.charsets import decoded
from hrct_triage.common.storage import validate_uid
from hrct_triage.db import worklist
from hrct_triage.db.models import Instance
from hrct_triage.db.session import transaction
from hrct_triage.listener.spool import name_matches_content, remove_partial_files, spooled_files

log = logging.getLogger("hrct.listener")


@dataclass(frozen=True)
class Reconciliation:
    partial_removed: int = 0
    associations_orphaned: int = 0
    adopted: int = 0
    stale_removed: int = 0
    unsynced_forgotten: int = 0

    @property
    def anything(self) -> bool:
        return any(
            (
                self.partial_removed,
                self.associations_orphaned,
                self.adopted,
                self.stale_removed,
                self.unsynced_forgotten,
            )
        )


def reconcile(spool_dir: Path, sessions: sessionmaker[Session]) -> Reconciliation:
    """Settle what an unclean stop left behind (see the module docstring)."""
    now = datetime.now(UTC)
    partial = remove_partial_files(spool_dir)
    with transaction(sessions) as session:
        orphaned = worklist.close_orphaned_associations(session, now=now)
    forgotten = _forget_unsynced(sessions)
    with transaction(sessions) as session:
        known = {str(Path(path).resolve()) for path in worklist.spooled_paths(session)}
    adopted = stale = 0
    for path in spooled_files(spool_dir):
        if str(path.resolve()) in known:
            continue
        try:
            if _adopt(path, sessions):
                adopted += 1
                continue
        except Exception as error:  # unreadable: it was never acknowledged, so drop it
            log.warning("spool file %s cannot be adopted (%s)", path.name, type(error).__name__)
        path.unlink(missing_ok=True)
        stale += 1
    result = Reconciliation(partial, orphaned, adopted, stale, forgotten)
    if result.anything:
        log.warning(
            "recovered from an unclean stop: %d partial files removed, %d associations closed, "
            "%d unacknowledged instances adopted, %d stale files removed, "
            "%d unacknowledged rows whose file did not reach the disk forgotten",
            partial,
            orphaned,
            adopted,
            stale,
            forgotten,
        )
    return result


def _forget_unsynced(sessions: sessionmaker[Session]) -> int:
    """Delete the rows of receiving studies whose file is missing or not what the row hashed."""
    with transaction(sessions) as session:
        rows = worklist.receiving_instances(session)
    lost = [(sop, path, sha256) for sop, path, sha256 in rows if not _whole(Path(path), sha256)]
    for sop, path, sha256 in lost:
        with transaction(sessions) as session:
            worklist.forget_instance(session, sop, sha256)
        Path(path).unlink(missing_ok=True)
        log.warning("instance %s was never acknowledged and its file is not whole: forgotten", sop)
    return len(lost)


def _whole(path: Path, sha256: str) -> bool:
    try:
        with path.open("rb") as spooled:
            return hashlib.file_digest(spooled, "sha256").hexdigest() == sha256
    except OSError:
        return False


def _adopt(path: Path, sessions: sessionmaker[Session]) -> bool:
    """Record a whole, unacknowledged instance; False when its SOP instance is already known."""
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    if not name_matches_content(path, sha256):
        raise ValueError("content does not match the hash in the file name")
    header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    sop_uid = validate_uid(header.get("SOPInstanceUID"), "SOPInstanceUID")
    facts = worklist.InstanceFacts(
        study_uid=validate_uid(header.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_uid=validate_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_instance_uid=sop_uid,
        sop_class_uid=validate_uid(header.get("SOPClassUID"), "SOPClassUID"),
        transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
        path=str(path.resolve()),
        size_bytes=len(data),
        sha256=sha256,
        modality=str(header.get("Modality", "") or "")[:16] or None,
        series_description=str(decoded(header).get("SeriesDescription", "") or "")[:64] or None,
    )
    with transaction(sessions) as session:
        if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid)):
            return False
        worklist.record_instance(session, facts, association_id=None, now=datetime.now(UTC))
    log.info("adopted unacknowledged instance %s", sop_uid)
    return True
