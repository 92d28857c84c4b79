"""Event handlers of the Storage SCP, bound to a ``ListenerState`` in ``hrct_triage.listener.scp``.

The C-STORE contract (pynetdicom's ``doc_handle_store`` has the rest): the handler returns a
status; success (0x0000) only once the instance is fsynced in the spool *and* its row is committed
in the worklist. Every other outcome is a failure status the scanner sees and may retry; the
listener itself keeps serving and the other instances of the association are unaffected.
Patient identifiers never reach a log line: the handler never even decodes them (it reads only
the attributes in ``listener.dicom_header.WANTED``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from pynetdicom import events
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings
from hrct_triage.common.storage import InvalidUID, validate_uid
from hrct_triage.db import worklist
from hrct_triage.db.session import transaction
from hrct_triage.listener.access import AccessPolicy
from hrct_triage.listener.backlog import Backlog
from hrct_triage.listener.dicom_header import (
    ACCESSION_NUMBER,
    MODALITY,
    SERIES_DESCRIPTION,
    SERIES_INSTANCE_UID,
    SERIES_NUMBER,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    Header,
    MalformedDataSet,
    read_header,
    read_partial_header,
)
from hrct_triage.listener.group_commit import GroupCommit, Outcome
from hrct_triage.listener.metrics import ListenerMetrics, rejection_kind
from hrct_triage.listener.refusal_audit import (
    Identifiers,
    RefusalRecord,
    readable_identifiers,
    record_refusal,
)
from hrct_triage.listener.spool import (
    Streaming,
    Syncing,
    file_meta,
    free_bytes,
    fsync_dir,
    instance_dir,
    start_instance,
)

log = logging.getLogger("hrct.listener")

SUCCESS = 0x0000  # Success: on disk (fsync) and in the worklist
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk, database, or larger than allowed)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: data set does not match SOP class / request
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (truncated or not a DICOM data set)
INVALID_UID = 0xC001  # Error: cannot understand (a UID is missing or invalid; never a file name)
# Not returned here: what pynetdicom and ``listener.store_stream`` answer when storing raised.
PROCESSING_FAILURE = 0xC211  # Error: processing failure (a fault of ours, in the log)

# A-ASSOCIATE-RJ diagnostics pynetdicom itself may send (PS3.8 9.3.4), for the audit row.
_REJECT_REASONS = {
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "user identity not accepted",
    (3, 1): "temporary congestion",
    (3, 2): "too many associations (HRCT_MAX_ASSOCIATIONS)",
}


@dataclass
class _Open:
    row_id: int
    tally: worklist.AssociationTally = field(default_factory=worklist.AssociationTally)
    abort_reason: str | None = None  # set when we abort it for breaking the protocol


@dataclass
class ListenerState:
    """What the handlers need, shared by the association threads."""

    settings: Settings
    sessions: sessionmaker[Session]
    policy: AccessPolicy
    spool_dir: Path  # absolute, so worklist paths do not depend on the working folder
    tls: bool = False
    associations: dict[int, _Open] = field(default_factory=dict)
    metrics: ListenerMetrics = field(default_factory=ListenerMetrics)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # C-STOREs of this process being stored right now (``store_instance``), under ``lock``.
    storing: int = 0
    commits: GroupCommit = field(init=False)
    # Closes and refusals the worklist could not take when they happened (listener.backlog).
    backlog: Backlog = field(init=False)

    def __post_init__(self) -> None:
        self.commits = GroupCommit(self.sessions)
        self.backlog = Backlog(self.sessions)

    def opened(self, assoc: Any) -> _Open | None:
        with self.lock:
            return self.associations.get(id(assoc))


class _Refused(Exception):
    """A C-STORE that ends in a failure status, with the reason for the log and the audit, and
    ``kind``: a short fixed name of the reason, for metric labels (the reason text carries
    sizes and UIDs, which would make a new time series per refusal)."""

    def __init__(self, status: int, reason: str, kind: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind
        self.transient = transient
        # Set once the instance is identified; until then the audit reads what it can.
        self.identifiers: Identifiers | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _peer(assoc: Any) -> tuple[str, int]:
    return str(assoc.requestor.address), int(assoc.requestor.port)


def _titles(assoc: Any) -> tuple[str, str]:
    """(calling, called) AE titles as the peer asked for them."""
    request = assoc.requestor.primitive
    return str(request.calling_ae_title).strip(), str(request.called_ae_title).strip()


def handle_echo(event: events.Event) -> int:
    return SUCCESS  # Verification: we are alive


def handle_requested(event: events.Event, state: ListenerState) -> None:
    """Apply the access policy before negotiation; a refused peer gets A-ASSOCIATE-RJ."""
    assoc = event.assoc
    calling, called = _titles(assoc)
    address, port = _peer(assoc)
    rejection = state.policy.check(calling, called, address)
    if rejection is None:
        return
    assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
    _record_rejection(
        state,
        calling,
        called,
        address,
        port,
        rejection.reason,
        rejection_kind(rejection.source, rejection.diagnostic),
    )
    assoc.kill()  # as pynetdicom does after its own rejections: waits until the RJ is sent


def handle_rejected(event: events.Event, state: ListenerState) -> None:
    """pynetdicom's own rejections (association limit, user identity)."""
    assoc = event.assoc
    calling, called = _titles(assoc)
    answer = assoc.acceptor.primitive
    key = (
        int(getattr(answer, "result_source", 0) or 0),
        int(getattr(answer, "diagnostic", 0) or 0),
    )
    reason = _REJECT_REASONS.get(key, f"rejected (source {key[0]}, diagnostic {key[1]})")
    address, port = _peer(assoc)
    _record_rejection(state, calling, called, address, port, reason, rejection_kind(*key))


def record_failed_handshake(state: ListenerState, address: str, port: int, reason: str) -> None:
    """A TLS client that never got as far as asking for an association (``listener.tls``)."""
    _record_rejection(state, "", "", address, port, reason, "tls_handshake")


def _record_rejection(
    state: ListenerState,
    calling: str,
    called: str,
    address: str,
    port: int,
    reason: str,
    kind: str,
) -> None:
    state.metrics.associations.labels(outcome="rejected").inc()
    state.metrics.rejections.labels(reason=kind).inc()
    log.warning(
        "association rejected from %s@%s:%d (called %s): %s",
        calling,
        address,
        port,
        called,
        reason,
        extra={"reason_kind": kind},
    )
    try:
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
                tls=state.tls,
            )
    except Exception as error:
        log.error("could not record the rejection: %s", type(error).__name__)


def handle_accepted(event: events.Event, state: ListenerState) -> None:
    assoc = event.assoc
    calling = str(assoc.requestor.ae_title).strip()
    called = str(assoc.acceptor.ae_title).strip()
    address, port = _peer(assoc)
    with transaction(state.sessions) as session:
        row_id = worklist.open_association(
            session,
            calling_ae=calling,
            called_ae=called,
            peer_address=address,
            peer_port=port,
            now=_now(),
            tls=state.tls,
        )
    with state.lock:
        state.associations[id(assoc)] = _Open(row_id)
    log.info(
        "association %d accepted from %s@%s:%d",
        row_id,
        calling,
        address,
        port,
        extra={"association": row_id},
    )


def handle_closed(event: events.Event, state: ListenerState, how: str) -> None:
    """Released, aborted or dropped: what was acknowledged stays; the study may now complete."""
    if how == "closed" and event.assoc.is_released:  # the close overtook EVT_RELEASED
        how = "released"
    with state.lock:
        opened = state.associations.pop(id(event.assoc), None)
    if opened is None:
        return
    reason = opened.abort_reason
    if reason is not None:  # our A-ABORT: pynetdicom reports it as the connection closing
        how = "aborted"
    state.metrics.associations.labels(outcome=how).inc()
    now, tally = _now(), opened.tally
    # Through the backlog: a close lost to a database outage would hold its studies for good.
    state.backlog.write(
        f"close of association {opened.row_id}",
        lambda session: worklist.close_association(
            session, opened.row_id, state=how, now=now, tally=tally, reason=reason
        ),
    )
    log.info(
        "association %d %s after %d instances (%d refused)%s",
        opened.row_id,
        how,
        opened.tally.instances,
        opened.tally.failures,
        f" by us: {reason}" if reason else "",
        extra={"association": opened.row_id},
    )


def record_abort(state: ListenerState, assoc: Any, reason: str) -> None:
    """The reason we are about to abort ``assoc`` (``listener.store_stream``), for its audit row
    when it closes."""
    opened = state.opened(assoc)
    if opened is not None:
        opened.abort_reason = reason


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE as it arrived: the association it came on, its presentation context and the
    SOP Instance UID its command named, whichever path read it (pynetdicom's ``handle_store`` or
    the data-phase reader of ``hrct_triage.listener.store_stream``)."""

    assoc: Any
    abstract_syntax: str
    transfer_syntax: str
    requested_sop_uid: str


def handle_store(event: events.Event, state: ListenerState) -> int:
    """A C-STORE that pynetdicom assembled (see ``listener.store_stream`` for the usual path)."""
    request = StoreRequest(
        event.assoc,
        str(event.context.abstract_syntax),
        str(event.context.transfer_syntax),
        str(getattr(event.request, "AffectedSOPInstanceUID", "") or ""),
    )
    received: BytesIO = event.request.DataSet  # type: ignore[union-attr,assignment]
    with received.getbuffer() as data:  # the bytes as received, no copy
        return store_instance(state, request, data, len(data))


def begin_instance(state: ListenerState, request: StoreRequest) -> Streaming | None:
    """Start writing a C-STORE's data set to the spool as it arrives (``spool.Streaming``), or
    None to have it written whole once received: when its request's UIDs could not name the
    file, the spool is short of space (``store_instance`` then refuses it), or the file system
    cannot make a nameless file. Nothing here refuses anything; ``store_instance`` decides."""
    try:
        sop_uid = validate_uid(request.requested_sop_uid, "SOPInstanceUID")
        sop_class = validate_uid(request.abstract_syntax, "SOPClassUID")
        if free_bytes(state.spool_dir) < state.settings.listener.min_free_disk_bytes:
            return None
    except (InvalidUID, OSError):
        return None
    return Streaming.open(state.spool_dir, file_meta(sop_class, sop_uid, request.transfer_syntax))


def prepare_instance(state: ListenerState) -> None:
    """Ready a spool file for the association's next C-STORE (``spool.Streaming.prepare``)."""
    Streaming.prepare(state.spool_dir)


def store_instance(
    state: ListenerState,
    request: StoreRequest,
    data: memoryview,
    size: int,
    streamed: Streaming | None = None,
) -> int:
    """Store one received data set and return the C-STORE status for it.

    ``size`` is the data set's length as received; it exceeds ``len(data)`` when the reader
    stopped keeping the bytes of a data set already over ``HRCT_MAX_INSTANCE_BYTES``.
    ``streamed`` is the file ``begin_instance`` started for it, which this publishes or drops.
    """
    with state.lock:
        opened = state.associations.get(id(request.assoc))
        state.storing += 1
        alone = state.storing == 1
    association_id = opened.row_id if opened else None
    try:
        status = _store(request, state, data, size, association_id, alone=alone, streamed=streamed)
    except _Refused as refusal:
        status = refusal.status
        state.metrics.refusals.labels(status=f"0x{status:04X}", reason=refusal.kind).inc()
        identifiers = refusal.identifiers or _readable(request, data)
        log.warning(
            "C-STORE refused with 0x%04X: %s",
            status,
            refusal.reason,
            extra={
                "association": association_id,
                "study_uid": identifiers.study_uid,
                "status": f"0x{status:04X}",
                "reason_kind": refusal.kind,
            },
        )
        _audit(state, request, association_id, identifiers, refusal)
    except Exception as error:  # a fault of ours: answered 0xC211 by the caller, audited here
        failure = _Refused(
            PROCESSING_FAILURE, f"internal error ({type(error).__name__})", "internal_error"
        )
        _audit(state, request, association_id, _readable(request, data), failure)
        raise
    else:
        state.metrics.instances.inc()
        state.metrics.received_bytes.inc(size)
    finally:
        with state.lock:
            state.storing -= 1
        if streamed is not None:
            streamed.close()  # a file not published is dropped
    if opened is not None:
        opened.tally.count(status, size)
    return status


def _store(
    request: StoreRequest,
    state: ListenerState,
    data: memoryview,
    size: int,
    association_id: int | None,
    *,
    alone: bool,
    streamed: Streaming | None,
) -> int:
    settings = state.settings
    if size > settings.listener.max_instance_bytes:  # the reader keeps no more than that of it
        raise _Refused(
            OUT_OF_RESOURCES,
            f"data set of {size} bytes exceeds HRCT_MAX_INSTANCE_BYTES "
            f"({settings.listener.max_instance_bytes})",
            "too_large",
        )
    transfer_syntax = request.transfer_syntax
    try:
        header = read_header(data, transfer_syntax)
    except MalformedDataSet as error:
        raise _Refused(
            CANNOT_UNDERSTAND, f"not a whole DICOM data set: {error}", "malformed"
        ) from None
    study_uid, series_uid, sop_uid, sop_class = _identify(header, request)

    try:
        meta = file_meta(sop_class, sop_uid, transfer_syntax)
        if streamed is not None and streamed.meta != meta:
            streamed.close()  # cannot happen once _identify passed; written whole instead
            streamed = None
        # A streamed file already takes its space on the disk.
        _check_free_space(state, 0 if streamed is not None else len(data))
        folder = instance_dir(state.spool_dir, study_uid, series_uid)
        try:
            # Alone, the fsyncs overlap the commit (and the hash the write, when written
            # whole); beside other C-STOREs they run in this thread (see ``start_instance``).
            syncing = (
                streamed.publish(folder, sop_uid, overlap=alone) if streamed is not None else None
            )
            if syncing is None:
                syncing = start_instance(folder, sop_uid, meta, data, overlap=alone)
        except OSError as error:
            raise _spool_write_failed(error) from None
        # Alone, the row is committed while the file's fsyncs run; beside other C-STOREs, before
        # they run (listener.spool). Either way ``_synced`` waits for them, and closes the file.
        try:
            path, sha256 = syncing.spooled.path, syncing.spooled.sha256
            facts = worklist.InstanceFacts(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                transfer_syntax_uid=transfer_syntax,
                path=str(path),
                size_bytes=syncing.spooled.size_bytes,
                sha256=sha256,
                modality=_clipped(header.text(MODALITY), 16),
                series_number=header.integer(SERIES_NUMBER),
                series_description=_clipped(header.text(SERIES_DESCRIPTION), 64),
                accession_number=_clipped(header.text(ACCESSION_NUMBER), 16),
                calling_ae=str(request.assoc.requestor.ae_title).strip(),
            )
            outcome = _record(state, facts, association_id, syncing.wait)
        finally:
            sync_error = _synced(syncing)
        if sync_error is not None:
            _forget_unsynced(state, facts, outcome)
            raise _spool_write_failed(sync_error)
    except _Refused as refusal:
        refusal.identifiers = Identifiers(study_uid, series_uid, sop_uid)
        raise
    if outcome.superseded is not None and outcome.superseded != str(path):
        _remove_superseded(Path(outcome.superseded))
    if outcome.recorded is worklist.Recorded.IDENTICAL:
        _tally_resend(state, request.assoc, study_uid)
    return SUCCESS


def _tally_resend(state: ListenerState, assoc: Any, study_uid: str) -> None:
    """Count an identical resend; the association's close records it as the study's event."""
    opened = state.opened(assoc)
    if opened is not None:
        opened.tally.resend(study_uid)


def _spool_write_failed(error: OSError) -> _Refused:
    return _Refused(
        OUT_OF_RESOURCES, f"spool write failed: {error.strerror}", "spool_write", transient=True
    )


def _synced(syncing: Syncing) -> OSError | None:
    """Wait for the file's fsyncs; the error that kept it off the disk, if one did."""
    try:
        syncing.wait()
    except OSError as error:
        return error
    return None


def _forget_unsynced(state: ListenerState, facts: worklist.InstanceFacts, outcome: Outcome) -> None:
    """The row was committed but its file's fsync failed: take a new row back, so the worklist
    names no file the scanner was not told is safe (it will send it again)."""
    if outcome.recorded is not worklist.Recorded.NEW:
        return  # an identical resend: the row names the version acknowledged before

    def forget(session: Session) -> None:
        worklist.forget_instance(session, facts.sop_instance_uid, facts.sha256)

    state.backlog.write(f"withdrawal of {facts.sop_instance_uid}", forget)


def _check_free_space(state: ListenerState, size: int) -> None:
    try:
        free = free_bytes(state.spool_dir)
    except OSError as error:
        raise _Refused(
            OUT_OF_RESOURCES,
            f"spool unavailable: {error.strerror}",
            "spool_unavailable",
            transient=True,
        ) from None
    if free - size < state.settings.listener.min_free_disk_bytes:
        raise _Refused(
            OUT_OF_RESOURCES,
            f"spool has {free} bytes free, below HRCT_MIN_FREE_DISK_BYTES after this instance",
            "disk_full",
            transient=True,
        )


def _record(
    state: ListenerState,
    facts: worklist.InstanceFacts,
    association_id: int | None,
    durable: Callable[[], object],
) -> Outcome:
    """Commit the instance row (``durable`` waits for its file, before a row that replaces an
    acknowledged version is committed)."""
    try:  # committed with the rows of other associations' C-STOREs (listener.group_commit)
        outcome = state.commits.record(facts, association_id, _now(), durable)
    except OSError as error:  # the file of a changed version did not reach the disk
        raise _spool_write_failed(error) from None
    except Exception as error:  # database unreachable: the scanner must keep its copy
        raise _Refused(
            OUT_OF_RESOURCES,
            f"worklist write failed: {type(error).__name__}",
            "database",
            transient=True,
        ) from None
    if outcome.recorded is worklist.Recorded.REPLACED:
        log.warning(
            "SOP instance %s received again with different content; newest kept",
            facts.sop_instance_uid,
            extra={"study_uid": facts.study_uid, "association": association_id},
        )
    return outcome


def _readable(request: StoreRequest, data: memoryview) -> Identifiers:
    """The valid UIDs that can be read of a data set refused before it was identified."""
    try:
        header = read_partial_header(data, request.transfer_syntax)
    except Exception:  # naming it is best effort; refusing it is what matters
        header = None
    return readable_identifiers(header, request.requested_sop_uid)


def _audit(
    state: ListenerState,
    request: StoreRequest,
    association_id: int | None,
    identifiers: Identifiers,
    refusal: _Refused,
) -> None:
    """Keep the refusal in the worklist's ``refusals`` (``listener.refusal_audit``), before the
    answer. Through the backlog: a transient refusal keeps its study from completing without the
    instance the scanner will send again, so it must be written even when the database is what
    refused it (and before the association's close, which the backlog keeps in order)."""
    calling: str | None
    address: str | None
    try:
        calling = str(request.assoc.requestor.ae_title).strip()
        address = _peer(request.assoc)[0]
    except Exception:  # a half-made association object: the row says less, nothing fails
        calling = address = None
    record_refusal(
        state.backlog,
        RefusalRecord(
            identifiers=identifiers,
            association_id=association_id,
            calling_ae=calling,
            peer_address=address,
            status=refusal.status,
            kind=refusal.kind,
            transient=refusal.transient,
            reason=refusal.reason,
            at=_now(),
        ),
    )


def _remove_superseded(path: Path) -> None:
    """Best effort: a file left behind is removed by the next start-up reconciliation."""
    try:
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except OSError as error:
        log.warning("could not remove a superseded spool file: %s", error.strerror)


def _identify(header: Header, request: StoreRequest) -> tuple[str, str, str, str]:
    """Study, series, SOP instance and SOP class UIDs, checked against the request."""
    try:
        sop_uid = validate_uid(header.uid(SOP_INSTANCE_UID), "SOPInstanceUID")
        sop_class = validate_uid(header.uid(SOP_CLASS_UID), "SOPClassUID")
        study_uid = validate_uid(header.uid(STUDY_INSTANCE_UID), "StudyInstanceUID")
        series_uid = validate_uid(header.uid(SERIES_INSTANCE_UID), "SeriesInstanceUID")
    except InvalidUID as error:
        raise _Refused(INVALID_UID, str(error), "invalid_uid") from None
    if sop_class != request.abstract_syntax:
        raise _Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOP Class {sop_class} differs from the presentation context's "
            f"{request.abstract_syntax}",
            "sop_class_mismatch",
        )
    requested = request.requested_sop_uid
    if requested and requested != sop_uid:
        raise _Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPInstanceUID {sop_uid} differs from the request's {requested[:64]}",
            "sop_instance_mismatch",
        )
    return study_uid, series_uid, sop_uid, sop_class


def _clipped(value: str | None, limit: int) -> str | None:
    return value[:limit] if value is not None else None
