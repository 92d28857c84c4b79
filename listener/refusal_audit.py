"""The audit row of every refused C-STORE: what could be read of it, where it came from, why.

Most refusals happen before an instance's UIDs are known (a missing or invalid UID, a malformed
or oversized data set, a path-traversal attempt), so each UID is kept only when it is valid: an
invalid value is named in the reason text alone, never stored where a path could be built from
it. The row is written through the listener's backlog (``listener.backlog``), like an
association's close, so a database outage delays it without changing the answer the scanner
gets; and nothing here may raise into the C-STORE path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from hrct_triage.common.storage import InvalidUID, validate_uid
from hrct_triage.db import worklist
from hrct_triage.listener.backlog import Backlog
from hrct_triage.listener.dicom_header import (
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    Header,
)

log = logging.getLogger("hrct.listener")


@dataclass(frozen=True)
class Identifiers:
    """The UIDs of a refused instance that could be read and are valid; None for the others."""

    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None


def valid_or_none(value: str | None) -> str | None:
    """``value`` when it is a valid UID (one that may name a file), else None."""
    if value is None:
        return None
    try:
        return validate_uid(value, "UID")
    except InvalidUID:
        return None


def readable_identifiers(header: Header | None, requested_sop_uid: str) -> Identifiers:
    """What the data set's header (read whole or in part) and the request's SOP Instance UID
    tell of a refused instance, each UID checked on its own."""
    if header is None:
        return Identifiers(sop_instance_uid=valid_or_none(requested_sop_uid))
    return Identifiers(
        study_uid=valid_or_none(header.uid(STUDY_INSTANCE_UID)),
        series_uid=valid_or_none(header.uid(SERIES_INSTANCE_UID)),
        sop_instance_uid=(
            valid_or_none(header.uid(SOP_INSTANCE_UID)) or valid_or_none(requested_sop_uid)
        ),
    )


def printable(text: str) -> str:
    """``text`` with control characters replaced: a reason may quote a peer's bytes, and is
    shown in terminals and web pages."""
    return "".join(char if char.isprintable() else "?" for char in text)


@dataclass(frozen=True)
class RefusalRecord:
    """One refused C-STORE as the audit keeps it."""

    identifiers: Identifiers
    association_id: int | None  # the association's audit row; None when it could not be opened
    calling_ae: str | None
    peer_address: str | None
    status: int
    kind: str  # a short fixed name of the reason, as in the listener's metrics
    transient: bool
    reason: str
    at: datetime


def record_refusal(backlog: Backlog, refusal: RefusalRecord) -> None:
    """Write ``refusal`` now, or once the worklist answers again; never raises."""
    ids = refusal.identifiers

    def write(session: Session) -> None:
        worklist.record_refusal(
            session,
            association_id=refusal.association_id,
            study_uid=ids.study_uid,
            series_uid=ids.series_uid,
            sop_instance_uid=ids.sop_instance_uid,
            calling_ae=refusal.calling_ae,
            peer_address=refusal.peer_address,
            status=refusal.status,
            kind=refusal.kind,
            transient=refusal.transient,
            reason=printable(refusal.reason),
            now=refusal.at,
        )

    try:
        # In the backlog's order: before the association's close, which comes later.
        backlog.write(f"refusal of {ids.sop_instance_uid or 'an unidentified instance'}", write)
    except Exception:  # the scanner's answer must not depend on the audit
        log.exception("could not keep the refusal for the audit")
