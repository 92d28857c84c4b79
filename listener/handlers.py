"""Event handlers of the Storage SCP, bound to a ``ListenerState`` in ``listener.scp``.

The C-STORE contract (pynetdicom's ``doc_handle_store`` has the rest): the handler returns a
status; success (0x0000) only once the instance is fsynced in the spool *and* its row is committed
in the worklist. Every other outcome is a failure status the scanner sees and may retry; the
listener itself keeps serving. Patient identifiers never reach a log line.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import events
from sqlalchemy.orm import Session, sessionmaker

from db import worklist
from db.session import transaction
from db.settings import Settings
from db.storage import InvalidUID, validate_uid, write_durably
from listener.spool import instance_path

log = logging.getLogger("hrct.listener")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk or database unavailable)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (undecodable data set)
INVALID_UID = 0xC001  # Error: cannot understand (a UID is missing or invalid)


@dataclass
class ListenerState:
    """What the handlers need, shared by the association threads."""

    settings: Settings
    sessions: sessionmaker[Session]
    association_ids: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def association_id(self, assoc: Any) -> int | None:
        with self.lock:
            return self.association_ids.get(id(assoc))


def _now() -> datetime:
    return datetime.now(UTC)


def _peer(assoc: Any) -> tuple[str, str, int, str]:
    requestor = assoc.requestor
    return (
        str(requestor.ae_title).strip(),
        str(requestor.address),
        int(requestor.port),
        str(assoc.acceptor.ae_title).strip(),
    )


def handle_echo(event: events.Event) -> int:
    return SUCCESS  # Verification: we are alive


def handle_accepted(event: events.Event, state: ListenerState) -> None:
    calling, address, port, called = _peer(event.assoc)
    with transaction(state.sessions) as session:
        row_id = worklist.open_association(
            session,
            calling_ae=calling,
            called_ae=called,
            peer_address=address,
            peer_port=port,
            now=_now(),
        )
    with state.lock:
        state.association_ids[id(event.assoc)] = row_id
    log.info("association %d accepted from %s@%s:%d", row_id, calling, address, port)


def handle_rejected(event: events.Event, state: ListenerState) -> None:
    calling, address, port, called = _peer(event.assoc)
    reason = "calling or called AE title not allowed"
    with transaction(state.sessions) as session:
        worklist.open_association(
            session,
            calling_ae=calling,
            called_ae=called,
            peer_address=address,
            peer_port=port,
            now=_now(),
            state="rejected",
            rejection_reason=reason,
        )
    log.warning(
        "association rejected from %s@%s:%d (called %s): %s", calling, address, port, called, reason
    )


def handle_closed(event: events.Event, state: ListenerState, how: str) -> None:
    with state.lock:
        row_id = state.association_ids.pop(id(event.assoc), None)
    if row_id is None:
        return
    with transaction(state.sessions) as session:
        worklist.close_association(session, row_id, state=how, now=_now())
    log.info("association %d %s", row_id, how)


def handle_store(event: events.Event, state: ListenerState) -> int:
    association_id = state.association_id(event.assoc)
    try:
        dataset: Dataset = event.dataset
        identity = _identify(dataset, event)
    except InvalidUID as error:
        return _refuse(state, association_id, INVALID_UID, str(error))
    except _Mismatch as error:
        return _refuse(state, association_id, DATASET_DOES_NOT_MATCH_SOP_CLASS, str(error))
    except Exception as error:  # a data set pydicom cannot decode
        return _refuse(
            state,
            association_id,
            CANNOT_UNDERSTAND,
            f"undecodable data set ({type(error).__name__})",
        )

    study_uid, series_uid, sop_uid, sop_class = identity
    path = instance_path(state.settings.spool_dir, study_uid, series_uid, sop_uid)
    try:
        spooled = write_durably(path, event.encoded_dataset(include_meta=True))
    except OSError as error:
        return _refuse(
            state,
            association_id,
            OUT_OF_RESOURCES,
            f"spool write failed for {sop_uid}: {error.strerror}",
        )

    facts = worklist.InstanceFacts(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        path=str(spooled.path),
        size_bytes=spooled.size_bytes,
        sha256=spooled.sha256,
        modality=_text(dataset, "Modality", 16),
        series_number=_int(dataset, "SeriesNumber"),
        series_description=_text(dataset, "SeriesDescription", 64),
        accession_number=_text(dataset, "AccessionNumber", 16),
        calling_ae=str(event.assoc.requestor.ae_title).strip(),
    )
    try:
        with transaction(state.sessions) as session:
            outcome = worklist.record_instance(
                session, facts, association_id=association_id, now=_now()
            )
            worklist.count_store(session, association_id, size=spooled.size_bytes, ok=True)
    except Exception as error:  # database unreachable: the scanner must keep its copy
        log.error("worklist write failed for %s: %s", sop_uid, type(error).__name__)
        return OUT_OF_RESOURCES
    log.debug("stored %s (%s)", sop_uid, outcome.value)
    return SUCCESS


class _Mismatch(ValueError):
    pass


def _identify(dataset: Dataset, event: events.Event) -> tuple[str, str, str, str]:
    sop_uid = validate_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
    sop_class = validate_uid(dataset.get("SOPClassUID"), "SOPClassUID")
    study_uid = validate_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = validate_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
    if sop_class != str(event.context.abstract_syntax):
        raise _Mismatch(
            f"SOP Class {sop_class} differs from the presentation context's "
            f"{event.context.abstract_syntax}"
        )
    requested = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    if requested and requested != sop_uid:
        raise _Mismatch(f"SOPInstanceUID {sop_uid} differs from the request's {requested[:64]}")
    return study_uid, series_uid, sop_uid, sop_class


def _refuse(state: ListenerState, association_id: int | None, status: int, reason: str) -> int:
    log.warning("C-STORE refused with 0x%04X: %s", status, reason)
    try:
        with transaction(state.sessions) as session:
            worklist.count_store(session, association_id, size=0, ok=False)
    except Exception as error:
        log.error("could not record the refusal: %s", type(error).__name__)
    return status


def _text(dataset: Dataset, keyword: str, limit: int) -> str | None:
    value = dataset.get(keyword)
    return str(value)[:limit] if value not in (None, "") else None


def _int(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
