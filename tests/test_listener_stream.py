"""The listener's own reader of C-STOREs (``listener.store_stream``) against pynetdicom as the
peer: its encoder builds what we read, its decoder reads what we answer, and P-DATA laid out in
ways pynetdicom's SCU never sends (command and data set in one PDU, a command in the middle of a
data set) goes over a real association as raw PDUs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association as ClientAssociation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db.models import Association, Instance
from hrct_triage.db.session import transaction
from hrct_triage.listener.scp import Listener
from hrct_triage.listener.store_stream import (
    ProtocolViolation,
    c_store_rsp,
    fragments,
    parse_command,
)
from tests.helpers.listeners import (
    nameless_files_open,
    thin_series,
    wait_until_no_open_association,
)


def _client(listener: Listener) -> ClientAssociation:
    ae = AE(ae_title="STREAMTEST")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.settings.listener.ae_title)
    assert assoc.is_established
    return assoc


def _ct_context_id(assoc: ClientAssociation) -> int:
    return next(
        int(cx.context_id)
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == CTImageStorage and cx.context_id is not None
    )


def _command(dataset: Dataset, message_id: int) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = dataset.SOPClassUID
    command.CommandField = 0x0001
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    encoded = encode(command, True, True)
    assert encoded is not None
    group_length = len(encoded).to_bytes(4, "little")
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + group_length + encoded


def _data_set(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _p_data(*items: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context id, message control header, value) items."""
    primitive = P_DATA()
    # pynetdicom checks for [id, value] lists at run time; its annotation says tuples
    pdvs: Any = [[context_id, bytes([control]) + value] for context_id, control, value in items]
    primitive.presentation_data_value_list = pdvs
    return P_DATA_TF(primitive).encode()


def _send_raw(assoc: ClientAssociation, *pdus: bytes, answer: bool = True) -> C_STORE | None:
    """Put raw PDUs on the association and take the answer off its DIMSE queue, the client's
    reactor held as pynetdicom's own ``send_*`` methods hold it."""
    assoc._reactor_checkpoint.clear()
    time.sleep(0.02)  # past the reactor's own 1 ms loop: now it waits at its checkpoint
    assert assoc._is_paused
    try:
        for pdu in pdus:
            assoc.dul.socket.send(pdu)  # type: ignore[union-attr]
        if not answer:
            return None
        _, response = assoc.dimse.get_msg(block=True)
        assert isinstance(response, C_STORE)
        return response
    finally:
        assoc._reactor_checkpoint.set()


@pytest.fixture
def slices(phantom_dir: Path) -> Iterator[list[Dataset]]:
    yield [pydicom.dcmread(path) for path in thin_series(phantom_dir)[:4]]


def _stored(sessions: sessionmaker[Session]) -> dict[str, Path]:
    with transaction(sessions) as session:
        return {row.sop_instance_uid: Path(row.path) for row in session.scalars(select(Instance))}


def test_echoes_between_stores_go_to_pynetdicom_and_every_store_is_kept(
    sqlite_listener: Listener, sqlite_sessions: sessionmaker[Session], slices: list[Dataset]
) -> None:
    # given one association that mixes C-ECHO (pynetdicom's) and C-STORE (ours)
    assoc = _client(sqlite_listener)
    statuses = [assoc.send_c_echo().Status]
    for dataset in slices[:3]:
        statuses.append(assoc.send_c_store(dataset).Status)
        statuses.append(assoc.send_c_echo().Status)
    assoc.release()

    # then every message got success, the three instances are kept and counted on the audit row
    assert statuses == [0x0000] * 7
    wait_until_no_open_association(sqlite_sessions)
    assert set(_stored(sqlite_sessions)) == {str(d.SOPInstanceUID) for d in slices[:3]}
    with transaction(sqlite_sessions) as session:
        audit = session.scalars(select(Association)).one()
        assert (audit.instances, audit.state) == (3, "released")


def test_data_set_in_uneven_fragments_some_beside_the_command_is_stored_as_received(
    sqlite_listener: Listener, sqlite_sessions: sessionmaker[Session], slices: list[Dataset]
) -> None:
    # given a C-STORE whose command shares its PDU with the data set's first fragments, and
    # whose data set is cut into fragments of uneven size, two to a PDU (none over 128 KiB)
    dataset = slices[0]
    body = _data_set(dataset)
    cuts = [0, 1, 7, 4096, 4100, 60_000, *range(100_000, len(body), 50_000), len(body)]
    parts = [body[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    assoc = _client(sqlite_listener)
    context_id = _ct_context_id(assoc)
    items = [(context_id, 0x00, part) for part in parts]
    items[-1] = (context_id, 0x02, parts[-1])
    pdus = [_p_data((context_id, 0x03, _command(dataset, 7)), *items[:2])]
    pdus += [_p_data(*items[index : index + 2]) for index in range(2, len(items), 2)]

    response = _send_raw(assoc, *pdus)
    assoc.release()

    # then the answer names the message and the instance, and the file holds every byte as sent
    assert response is not None
    assert (response.Status, response.MessageIDBeingRespondedTo) == (0x0000, 7)
    assert response.AffectedSOPInstanceUID == dataset.SOPInstanceUID
    spooled = _stored(sqlite_sessions)[str(dataset.SOPInstanceUID)]
    assert spooled.read_bytes().endswith(body)
    assert pydicom.dcmread(spooled).SOPInstanceUID == dataset.SOPInstanceUID


def test_a_command_in_two_fragments_goes_to_pynetdicom_and_the_next_store_to_us(
    sqlite_listener: Listener, sqlite_sessions: sessionmaker[Session], slices: list[Dataset]
) -> None:
    # given a C-STORE whose command comes in two fragments (our reader leaves that message to
    # pynetdicom, whole), then an ordinary C-STORE on the same association
    split, ordinary = slices[2], slices[3]
    body = _data_set(split)
    command = _command(split, 3)
    assoc = _client(sqlite_listener)
    context_id = _ct_context_id(assoc)
    first = _send_raw(
        assoc,
        _p_data((context_id, 0x01, command[:20])),
        _p_data((context_id, 0x03, command[20:])),
        *(
            _p_data((context_id, 0x02 if end >= len(body) else 0x00, body[start:end]))
            for start, end in ((a, a + 100_000) for a in range(0, len(body), 100_000))
        ),
    )
    second = assoc.send_c_store(ordinary)
    assoc.release()

    # then both are stored and answered, each through its own path
    assert first is not None
    assert (first.Status, first.MessageIDBeingRespondedTo) == (0x0000, 3)
    assert second.Status == 0x0000
    stored = _stored(sqlite_sessions)
    assert stored[str(split.SOPInstanceUID)].read_bytes().endswith(body)
    assert set(stored) == {str(split.SOPInstanceUID), str(ordinary.SOPInstanceUID)}


def test_a_pdu_over_our_maximum_length_aborts_the_association(
    sqlite_listener: Listener, sqlite_sessions: sessionmaker[Session], slices: list[Dataset]
) -> None:
    # given a peer that ignores the maximum PDU length we offered (128 KiB)
    dataset = slices[1]
    body = _data_set(dataset)
    assoc = _client(sqlite_listener)
    context_id = _ct_context_id(assoc)
    _send_raw(
        assoc,
        _p_data((context_id, 0x03, _command(dataset, 1)), (context_id, 0x02, body)),
        answer=False,
    )

    # then the association is aborted, its audit row says why, and nothing is stored
    _assert_aborted_with_nothing_stored(assoc, sqlite_sessions, "over the maximum length of 131072")


def _assert_aborted_with_nothing_stored(
    assoc: ClientAssociation, sessions: sessionmaker[Session], reason: str
) -> None:
    """The listener aborted ``assoc``, stored nothing, and audited it as aborted for ``reason``."""
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    wait_until_no_open_association(sessions)
    assert _stored(sessions) == {}
    with transaction(sessions) as session:
        audit = session.scalars(select(Association)).one()
        assert audit.state == "aborted"
        assert reason in (audit.rejection_reason or "")


def test_a_command_inside_a_data_set_aborts_that_association_only(
    sqlite_listener: Listener, sqlite_sessions: sessionmaker[Session], slices: list[Dataset]
) -> None:
    # given a C-STORE whose data set is interrupted by the next command
    first, second = slices[2], slices[3]
    body = _data_set(first)
    assoc = _client(sqlite_listener)
    context_id = _ct_context_id(assoc)
    _send_raw(
        assoc,
        _p_data((context_id, 0x03, _command(first, 1))),
        _p_data((context_id, 0x00, body[:10_000])),
        _p_data((context_id, 0x03, _command(second, 2))),
        answer=False,
    )

    # then the listener aborts that association and stores nothing of it: the file the first
    # data set was being written to as it arrived is dropped, never named
    _assert_aborted_with_nothing_stored(assoc, sqlite_sessions, "fragment of another message")
    spool_dir = sqlite_listener.settings.spool_dir.resolve()
    assert nameless_files_open(spool_dir) == []
    assert not [path for path in spool_dir.rglob("*") if path.is_file()]

    # and the next association is served as usual
    again = _client(sqlite_listener)
    assert again.send_c_store(second).Status == 0x0000
    again.release()
    assert set(_stored(sqlite_sessions)) == {str(second.SOPInstanceUID)}


def test_response_encoding_is_what_pynetdicom_decodes() -> None:
    # given our C-STORE-RSP PDU for a refused instance
    raw = c_store_rsp(5, "1.2.840.10008.5.1.4.1.1.2", 513, 0xA700, "1.2.3.4.5")

    # when pynetdicom decodes it as a P-DATA-TF and its one command
    pdu = P_DATA_TF()
    pdu.decode(raw)
    [item] = pdu.presentation_data_value_items
    context_id, value = int(item.context_id or 0), bytes(item.data or b"")
    command = parse_command(value[1:])
    decoded = decode(BytesIO(value[1:]), True, True)

    # then every field is the one we meant, in a command fragment that is the last
    assert (context_id, value[0]) == (5, 0x03)
    assert decoded.CommandField == 0x8001
    assert decoded.MessageIDBeingRespondedTo == 513
    assert decoded.Status == 0xA700
    assert decoded.CommandDataSetType == 0x0101
    assert decoded.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert decoded.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert int.from_bytes(command[0x0000], "little") == len(value) - 1 - 12


def test_malformed_p_data_is_a_protocol_violation() -> None:
    header = b"\x04\x00" + (10).to_bytes(4, "big")
    with pytest.raises(ProtocolViolation):
        fragments(memoryview(header + (100).to_bytes(4, "big") + b"\x01\x03" + b"\x00" * 4))
    with pytest.raises(ProtocolViolation):
        fragments(memoryview(header[:2] + (3).to_bytes(4, "big") + b"\x00\x00\x00"))
    with pytest.raises(ProtocolViolation):
        parse_command(b"\x08\x00\x00\x00\x02\x00\x00\x00ab")  # group 0008 in a command
    with pytest.raises(ProtocolViolation):
        parse_command(b"\x00\x00\x00\x01\x08\x00\x00\x00ab")  # value overruns
