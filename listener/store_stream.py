"""C-STOREs of an established association read straight off the socket, in the DUL's thread.

Why: pynetdicom reads a PDU 4 KiB per ``recv`` call, decodes every PDV into objects, and hands
each DIMSE message from its DUL thread to the association's thread through queues both threads
poll with 1 ms sleeps. For a 512 KiB CT slice that costs more than the durable work we do with it
(fsync and commit), and it is what kept the listener at a fifth of DCMTK's ``storescp``.

What: ``StreamingDUL`` is pynetdicom's DUL service provider with its PDU reader replaced while
the association is established (state Sta6). A message whose command is a C-STORE-RQ with a data
set, on an accepted presentation context, is assembled here with whole-PDU reads, stored by
``handlers.store_instance`` and answered with its C-STORE-RSP written straight to the socket.
Every other PDU goes to pynetdicom unchanged (release, abort, C-ECHO and any other DIMSE
message, whole messages at a time), so its state machine and DIMSE provider see exactly what
they would have seen. Sending and receiving P-DATA leave the state machine in Sta6 (PS3.8 9.2,
actions DT-1 and DT-2), so nothing there needs to know which path a C-STORE took.

A peer that breaks the protocol in the middle of a C-STORE (a command, or another context's
fragment, before the data set's last fragment) gets an A-ABORT through the state machine (event
Evt19, invalid PDU), and the partial instance, never acknowledged, is dropped.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom.transport import AssociationSocket, RequestHandler

from hrct_triage.common.dicom_elements import uid_value
from hrct_triage.common.errors import ListenerError
from hrct_triage.listener.handlers import StoreRequest
from hrct_triage.listener.pynetdicom_patches import WakingDUL, make_waking
from hrct_triage.listener.spool import Streaming

log = logging.getLogger("hrct.listener")


@dataclass(frozen=True)
class DataPhase:
    """What the reader needs from the listener, one per server (``server.data_phase``)."""

    # ``handlers.store_instance``: the request, the data set kept, its size, its streamed file
    store: Callable[[StoreRequest, memoryview, int, Streaming | None], int]
    begin: Callable[[StoreRequest], Streaming | None]  # ``handlers.begin_instance``
    # Called after each answer, while the peer gets its next instance ready: readies what the
    # next ``begin`` takes (``handlers.prepare_instance``).
    prepare: Callable[[], None]
    # Called with the association and the reason just before the reader aborts it, so that the
    # audit row says why (``handlers.record_abort``).
    aborting: Callable[[Any, str], None]
    keep_at_most: int  # data set bytes kept per instance: HRCT_MAX_INSTANCE_BYTES


_P_DATA_TF = 0x04
_PDU_TYPES = range(0x01, 0x08)
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_PROCESSING_FAILURE = 0xC211  # what pynetdicom answers when a handler raises
# PDUs longer than our maximum PDU length (or this, when that is unlimited) are refused.
_LARGEST_PDU = 64 * 1024 * 1024
# How long the first C-STORE waits for the association's thread to finish accepting (its
# EVT_ACCEPTED handler opens the audit row the instance is counted in).
_ACCEPT_WAIT_SECONDS = 30.0


class ProtocolViolation(ListenerError):
    """P-DATA that cannot belong to the message being received."""


@dataclass(frozen=True)
class Fragment:
    """One PDV of a P-DATA-TF: ``start``/``end`` index its value in the PDU's bytes."""

    context_id: int
    is_command: bool
    is_last: bool
    start: int
    end: int


def fragments(pdu: memoryview) -> list[Fragment]:
    """The PDVs of a P-DATA-TF PDU (6-byte PDU header included in ``pdu``)."""
    found = []
    offset, end = 6, len(pdu)
    while offset < end:
        if offset + 6 > end:
            raise ProtocolViolation("truncated presentation data value item")
        length, context_id, control = struct.unpack_from(">LBB", pdu, offset)
        value_end = offset + 4 + length
        if length < 2 or value_end > end:
            raise ProtocolViolation("presentation data value item overruns its PDU")
        found.append(
            Fragment(context_id, bool(control & 0x01), bool(control & 0x02), offset + 6, value_end)
        )
        offset = value_end
    return found


def parse_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """A DIMSE command set (group 0000, Implicit VR Little Endian) as element -> value bytes."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise ProtocolViolation("truncated command element")
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise ProtocolViolation("command element outside group 0000 or overrunning")
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ui(elements: dict[int, bytes], element: int) -> str | None:
    value = elements.get(element)
    if value is None:
        return None
    return value.decode("ascii", errors="replace").rstrip("\x00 ")


def c_store_rsp(
    context_id: int, sop_class_uid: str, message_id: int, status: int, sop_instance_uid: str
) -> bytes:
    """The P-DATA-TF PDU of a C-STORE-RSP (PS3.7 9.3.1.2), command in one fragment."""
    elements = [
        (0x0002, uid_value(sop_class_uid, errors="replace")),
        (0x0100, struct.pack("<H", _C_STORE_RSP)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", _NO_DATA_SET)),
        (0x0900, struct.pack("<H", status)),
        (0x1000, uid_value(sop_instance_uid, errors="replace")),
    ]
    body = b"".join(
        struct.pack("<HHL", 0, element, len(value)) + value for element, value in elements
    )
    command = struct.pack("<HHLL", 0, 0, 4, len(body)) + body
    item = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", _P_DATA_TF, 0, len(item)) + item


@dataclass
class _Store:
    """A C-STORE-RQ whose data set is being received."""

    context_id: int
    request: StoreRequest
    sop_class_uid: str
    message_id: int
    keep_at_most: int
    data: bytearray
    # The spool file the data set is written to as it arrives (``handlers.begin_instance``);
    # the store publishes or drops it.
    streamed: Streaming | None
    size: int = 0

    def add(self, value: memoryview) -> None:
        self.size += len(value)
        if self.size <= self.keep_at_most:  # beyond the limit only the size is still counted
            self.data += value
            if self.streamed is not None:
                self.streamed.add(value)
        else:  # it will be refused: free its file's space now
            self.drop()

    def drop(self) -> None:
        """Close its file unless stored: broken off before its end (abort, protocol error,
        closed connection), over the size limit, or answered."""
        if self.streamed is not None:
            self.streamed.close()
            self.streamed = None


class _MessageTracker:
    """Follows a message handed to pynetdicom, to know when the next one starts."""

    def __init__(self) -> None:
        self.command = bytearray()
        self.command_done = False
        self.done = False

    def add(self, pdu: memoryview, fragment: Fragment) -> None:
        if fragment.is_command:
            self.command += pdu[fragment.start : fragment.end]
            if fragment.is_last:
                self.command_done = True
                try:
                    data_set_type = _us(parse_command(self.command), 0x0800)
                except ProtocolViolation:
                    data_set_type = _NO_DATA_SET  # pynetdicom will refuse it; start afresh
                self.done = data_set_type == _NO_DATA_SET
        elif fragment.is_last and self.command_done:
            self.done = True


class StreamingDUL(WakingDUL):
    """pynetdicom's DUL (with the waking loop of ``listener.pynetdicom_patches``) whose C-STOREs of
    the established association are read by ``_read_pdu_data`` below; see ``install``."""

    _data_phase: DataPhase
    _contexts: dict[int, tuple[str, str]] | None
    _storing: _Store | None
    _handing_over: _MessageTracker | None
    _buffer: bytearray

    def _read_pdu_data(self) -> None:
        """One PDU, or while a C-STORE's data set is arriving, every PDU up to its end: nothing
        but the rest of that data set may come next from the peer, so the PDUs are read one
        after the other here rather than each after a turn of the reactor's loop and a
        ``select`` (four of each per 512 KiB slice at a 128 KiB PDU). Whatever our side queues
        meanwhile (an abort at shutdown) waits for the end of that instance at most."""
        if self.state_machine.current_state != "Sta6":
            super()._read_pdu_data()
            return
        pdu = self._receive_pdu()
        while pdu is not None:
            self._on_pdu(pdu)
            if self._storing is None or self._kill_thread:
                return  # the loop of hrct_triage.listener.pynetdicom_patches waits for the next PDU
            pdu = self._receive_pdu()

    def _receive_pdu(self) -> memoryview | None:
        """The next whole PDU (header included), or None once the peer's connection is gone or
        sent something that is no PDU (an event for the state machine is queued either way)."""
        if not self._receive(0, 6):
            return None
        pdu_type, _, length = struct.unpack_from(">BBL", self._buffer, 0)
        largest = int(self.assoc.acceptor.maximum_length or 0) or _LARGEST_PDU
        if pdu_type not in _PDU_TYPES:
            self._abort(f"unknown PDU type 0x{pdu_type:02X}")
            return None
        if length > max(largest, 1024):
            self._abort(f"PDU of {length} bytes, over the maximum length of {largest}")
            return None
        if len(self._buffer) < 6 + length:  # a new buffer: views of the old one may live on
            grown = bytearray(6 + length)
            grown[:6] = self._buffer[:6]
            self._buffer = grown
        if not self._receive(6, length):
            return None
        return memoryview(self._buffer)[: 6 + length]

    def _receive(self, offset: int, length: int) -> bool:
        """Fill ``_buffer[offset:offset + length]`` from the socket."""
        needed = offset + length
        sock = cast(AssociationSocket, self.socket).socket
        with memoryview(self._buffer) as view:
            while offset < needed:
                try:
                    received = sock.recv_into(view[offset:needed]) if sock is not None else 0
                except (OSError, TimeoutError):
                    received = 0
                if received == 0:  # closed, reset or silent past the network timeout
                    self.event_queue.put("Evt17")  # as pynetdicom: transport connection closed
                    self._drop_storing()
                    return False
                offset += received
        return True

    def _drop_storing(self) -> None:
        """Forget the instance being received, never to be acknowledged; its file goes too."""
        if self._storing is not None:
            self._storing.drop()
            self._storing = None

    def _on_pdu(self, pdu: memoryview) -> None:
        """Store with this PDU, or hand it to pynetdicom's state machine."""
        if pdu[0] != _P_DATA_TF:  # release, abort: pynetdicom's; a partial instance is dropped
            self._drop_storing()
            self._hand_over(pdu)
            return
        try:
            found = fragments(pdu)
            if self._storing is not None:
                self._continue_store(pdu, found)
                return
            if self._handing_over is None and self._start_store(pdu, found):
                return
        except ProtocolViolation as error:
            self._abort(f"P-DATA-TF refused: {error}")
            return
        self._track_handed_over(pdu, found)
        self._hand_over(pdu)

    def _start_store(self, pdu: memoryview, found: list[Fragment]) -> bool:
        """Take the PDU when it opens a C-STORE we store here; False leaves it to pynetdicom."""
        first = found[0] if found else None
        if first is None or not (first.is_command and first.is_last):
            return False
        context = self._accepted_contexts().get(first.context_id)
        command = parse_command(pdu[first.start : first.end])
        sop_class = _ui(command, 0x0002)
        sop_instance = _ui(command, 0x1000)
        message_id = _us(command, 0x0110)
        if (
            context is None
            or _us(command, 0x0100) != _C_STORE_RQ
            or _us(command, 0x0800) in (None, _NO_DATA_SET)
            or not sop_class
            or sop_instance is None
            or message_id is None
        ):
            return False
        if not _all_data_of(found[1:], first.context_id) or not self._accepted():
            return False
        abstract_syntax, transfer_syntax = context
        request = StoreRequest(self.assoc, abstract_syntax, transfer_syntax, sop_instance)
        self._storing = _Store(
            first.context_id,
            request,
            sop_class,
            message_id,
            self._data_phase.keep_at_most,
            bytearray(),
            self._data_phase.begin(request),
        )
        self._add_data(pdu, found[1:])
        return True

    def _continue_store(self, pdu: memoryview, found: list[Fragment]) -> None:
        storing = cast(_Store, self._storing)
        if not _all_data_of(found, storing.context_id):
            raise ProtocolViolation("a fragment of another message before the data set ended")
        self._add_data(pdu, found)

    def _add_data(self, pdu: memoryview, found: list[Fragment]) -> None:
        storing = cast(_Store, self._storing)
        for fragment in found:
            storing.add(pdu[fragment.start : fragment.end])
        if found and found[-1].is_last:
            self._storing = None
            self._answer(storing)

    def _answer(self, storing: _Store) -> None:
        try:
            status = self._data_phase.store(
                storing.request, memoryview(storing.data), storing.size, storing.streamed
            )
        except Exception:  # a bug of ours must not take the association down
            log.exception("C-STORE handling failed")
            status = _PROCESSING_FAILURE
        finally:
            storing.drop()
        response = c_store_rsp(
            storing.context_id,
            storing.sop_class_uid,
            storing.message_id,
            status,
            storing.request.requested_sop_uid,
        )
        cast(AssociationSocket, self.socket).send(response)
        self._data_phase.prepare()

    def _accepted(self) -> bool:
        """Wait until the association's thread has finished accepting: the peer may send its
        first C-STORE as soon as our A-ASSOCIATE-AC is out, before the EVT_ACCEPTED handler
        has opened the association's audit row."""
        deadline = time.monotonic() + _ACCEPT_WAIT_SECONDS
        while not self.assoc.is_established:
            if self._kill_thread or self.assoc.is_aborted or time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True

    def _track_handed_over(self, pdu: memoryview, found: list[Fragment]) -> None:
        for fragment in found:
            if self._handing_over is None:
                self._handing_over = _MessageTracker()
            self._handing_over.add(pdu, fragment)
            if self._handing_over.done:
                self._handing_over = None

    def _hand_over(self, pdu: memoryview) -> None:
        """What pynetdicom's own reader does with a PDU it has read."""
        try:
            decoded, event = self._decode_pdu(bytearray(pdu))
        except Exception as error:
            self._abort(f"undecodable PDU ({type(error).__name__})")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _abort(self, reason: str) -> None:
        """Drop any partial instance, record why, and let the state machine send the A-ABORT
        (event Evt19: invalid PDU)."""
        log.error("aborting the association: %s", reason)
        self._drop_storing()
        try:
            self._accepted()  # the audit row the reason goes to is open by then
            self._data_phase.aborting(self.assoc, reason)
        except Exception:  # the abort must go out whatever the audit does
            log.exception("could not note the reason for the abort")
        self.event_queue.put("Evt19")

    def _accepted_contexts(self) -> dict[int, tuple[str, str]]:
        if self._contexts is None:
            self._contexts = {
                int(context.context_id): (
                    str(context.abstract_syntax),
                    str(context.transfer_syntax[0]),
                )
                for context in self.assoc.accepted_contexts
                if context.context_id is not None and context.transfer_syntax
            }
        return self._contexts


def _all_data_of(found: list[Fragment], context_id: int) -> bool:
    """Data set fragments of one context, only the final one possibly the last."""
    return all(
        not fragment.is_command
        and fragment.context_id == context_id
        and (not fragment.is_last or index == len(found) - 1)
        for index, fragment in enumerate(found)
    )


def install(assoc: Any, data_phase: DataPhase) -> None:
    """Make ``assoc``'s DUL a ``StreamingDUL`` working with ``data_phase``, and its loops the
    waking ones of ``hrct_triage.listener.pynetdicom_patches``; before ``assoc.start``.

    The DUL keeps every attribute pynetdicom gave it (queues, timers, state machine); only the
    class changes, which adds the reader and its state.
    """
    make_waking(assoc, StreamingDUL)
    dul = assoc.dul
    dul._data_phase = data_phase
    dul._contexts = None
    dul._storing = None
    dul._handing_over = None
    dul._buffer = bytearray(64 * 1024)


class StreamingRequestHandler(RequestHandler):
    """pynetdicom's request handler whose associations get a ``StreamingDUL``, working with the
    server's ``data_phase`` (set by ``hrct_triage.listener.scp``)."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        install(assoc, cast(Any, self.server).data_phase)
        return assoc
