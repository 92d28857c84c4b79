"""Associations to a destination, and what went wrong with one in words an operator acts on.

pynetdicom reports a refused connection, a timeout and an abort alike (``is_aborted``), and
keeps an A-ASSOCIATE-RJ's reason in its log only. A ``Witness`` bound to the association sees
what the network did (connection opened, PDUs received, contexts negotiated), from which
``not_established`` and ``no_response`` tell these apart. Words follow PS3.8 (9.3.4 A-ASSOCIATE-RJ,
9.3.8 A-ABORT) and PS3.4 (C-STORE statuses, Annex B.2.3).

Which problems are permanent (retrying cannot help until someone changes a configuration):
an association rejected permanently, and a destination that accepts no class an object can be
sent as. Everything else (refused connection, timeout, abort, transient rejection, a failure
status) is retried with the usual backoff.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category

from hrct_triage.common.settings import Destination
from hrct_triage.common.sop_classes import sop_class_name

_RJ_RESULTS = {1: "permanently", 2: "transiently"}
_RJ_SOURCES = {
    1: "service user",
    2: "service provider (ACSE)",
    3: "service provider (presentation)",
}
_RJ_REASONS = {
    1: {
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AE title not recognised",
        7: "called AE title not recognised",
    },
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}
_ABORT_REASONS = {
    0: "no reason given",
    1: "unrecognised PDU",
    2: "unexpected PDU",
    4: "unrecognised PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}
_CONTEXT_RESULTS = {
    1: "rejected by the user",
    2: "rejected by the provider, no reason given",
    3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}
# PS3.4 B.2.3 and PS3.7 C: the C-STORE statuses a PACS may answer, in its words.
_STORE_STATUSES = {
    0x0001: "Warning: Requested optional attributes are not supported",
    0x0107: "Warning: Attribute list error",
    0x0116: "Warning: Attribute value out of range",
    0x0117: "Failure: Invalid object instance",
    0x0122: "Refused: SOP Class not supported",
    0x0124: "Refused: Not authorized",
    0x0210: "Failure: Duplicate invocation",
    0x0211: "Failure: Unrecognized operation",
    0x0212: "Failure: Mistyped argument",
    0xB000: "Warning: Coercion of data elements",
    0xB006: "Warning: Elements discarded",
    0xB007: "Warning: Data set does not match SOP Class",
}
_STORE_RANGES = (
    (0xA700, 0xA7FF, "Refused: Out of resources"),
    (0xA900, 0xA9FF, "Error: Data set does not match SOP Class"),
    (0xC000, 0xCFFF, "Error: Cannot understand"),
)
#: Statuses that refuse the object's SOP class or its fit to it, not the moment: another class
#: the object can be sent as is tried on the same association.
CLASS_REFUSALS = frozenset({0x0122, *range(0xA900, 0xAA00)})
#: Statuses that no retry can change until someone changes the PACS's configuration.
PERMANENT_STATUSES = frozenset({0x0124})


@dataclass(frozen=True)
class Problem:
    """What went wrong, in words; ``permanent`` when retrying cannot help."""

    words: str
    permanent: bool = False


@dataclass
class Witness:
    """What the network did on one association, noted by pynetdicom event handlers."""

    started: float = field(default_factory=time.monotonic)
    connected: bool = False
    negotiated: bool = False  # an A-ASSOCIATE-AC arrived (maybe with no context accepted)
    rejection: A_ASSOCIATE_RJ | None = None
    abort: A_ABORT_RQ | None = None
    lookup_error: OSError | None = None

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_PDU_RECV, self._received),
        ]

    def _opened(self, event: Any) -> None:
        self.connected = True

    def _accepted(self, event: Any) -> None:
        self.negotiated = True

    def _received(self, event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            self.rejection = event.pdu
        elif isinstance(event.pdu, A_ABORT_RQ):
            self.abort = event.pdu

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def make_ae(calling_ae: str, timeout: float) -> AE:
    """An SCU application entity whose every wait is bounded by ``timeout``."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def associate(ae: AE, destination: Destination) -> tuple[Any | None, Witness]:
    """Request an association with the contexts already added to ``ae``; the witness says
    what happened whether or not it was established. None when the host name does not
    resolve (pynetdicom looks it up before connecting, and raises)."""
    witness = Witness()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=witness.handlers(),
        )
    except OSError as error:
        witness.lookup_error = error
        return None, witness
    return assoc, witness


def not_established(destination: Destination, witness: Witness, timeout: float) -> Problem:
    """Why an association was not established. Call only when it was not, and not because no
    context was accepted (``witness.negotiated``; see ``context_refusal``)."""
    if witness.lookup_error is not None:
        error = witness.lookup_error
        return Problem(
            f"association with {destination} not established: host name "
            f"{destination.host!r} not resolved ({getattr(error, 'strerror', None) or error})"
        )
    if witness.rejection is not None:
        return _rejected(destination, witness.rejection)
    if witness.abort is not None:
        return Problem(f"{destination} aborted the association request ({_abort(witness.abort)})")
    prefix = f"association with {destination} not established"
    if not witness.connected:
        return Problem(f"{prefix}: {_connection_failure(destination, witness, timeout)}")
    if witness.elapsed >= timeout * 0.9:
        return Problem(f"{prefix}: no answer to the association request within {timeout:g} s")
    return Problem(f"{prefix}: the peer closed the connection during association negotiation")


def no_response(
    destination: Destination, assoc: Any, witness: Witness, timeout: float, started: float
) -> Problem:
    """Why a DIMSE request on an established association got no response."""
    if witness.abort is not None:
        return Problem(f"{destination} aborted the association ({_abort(witness.abort)})")
    if assoc.acse.is_aborted("a-abort"):
        return Problem(f"{destination} aborted the association")
    if time.monotonic() - started >= timeout * 0.9:
        return Problem(f"no response from {destination} within {timeout:g} s; association aborted")
    return Problem(f"{destination} closed the connection before answering")


def context_words(context: PresentationContext) -> str:
    """``"Comprehensive 3D SR (abstract syntax not supported)"`` for a rejected context."""
    result = _CONTEXT_RESULTS.get(int(context.result or 0), f"result {context.result}")
    return f"{sop_class_name(str(context.abstract_syntax))} ({result})"


def status_words(code: int) -> str:
    """``"0xA700 (Refused: Out of resources)"``: a status and what PS3.4 says it means."""
    meaning = _STORE_STATUSES.get(code)
    if meaning is None:
        for low, high, words in _STORE_RANGES:
            if low <= code <= high:
                meaning = words
                break
    if meaning is None:
        meaning = code_to_category(code)
    return f"0x{code:04X} ({meaning})"


def _rejected(destination: Destination, pdu: A_ASSOCIATE_RJ) -> Problem:
    code, origin, why = int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0)
    result = _RJ_RESULTS.get(code, f"(result {code})")
    source = _RJ_SOURCES.get(origin, f"source {origin}")
    reason = _RJ_REASONS.get(origin, {}).get(why) or f"reason {why}"
    return Problem(
        f"{destination} rejected the association {result} "
        f"(A-ASSOCIATE-RJ from the {source}: {reason})",
        permanent=code == 1,
    )


def _abort(pdu: A_ABORT_RQ) -> str:
    if pdu.source == 2:
        why = int(pdu.reason_diagnostic or 0)
        reason = _ABORT_REASONS.get(why, f"reason {why}")
        return f"A-ABORT from the service provider: {reason}"
    return "A-ABORT from the service user"


def _connection_failure(destination: Destination, witness: Witness, timeout: float) -> str:
    """Why the TCP connection failed: pynetdicom logs the error but keeps nothing of it, so a
    failure well inside the timeout is reproduced with one plain connection attempt."""
    address = f"{destination.host}:{destination.port}"
    if witness.elapsed >= timeout * 0.9:
        return f"no TCP connection to {address} within {timeout:g} s (connection timed out)"
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout):
            return f"the TCP connection to {address} failed once, then opened on a check"
    except ConnectionRefusedError:
        return f"connection refused (nothing listens on {address})"
    except socket.gaierror as error:
        return f"host name {destination.host!r} not resolved ({error.strerror or error})"
    except TimeoutError:
        return f"no TCP connection to {address} within {timeout:g} s (connection timed out)"
    except OSError as error:
        return f"no TCP connection to {address} ({error.strerror or type(error).__name__})"
