"""What a delivery attempt and a destination check report, whatever the protocol (DIMSE or
DICOMweb), so the worklist records both the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hrct_triage.common.settings import Destination


@dataclass(frozen=True)
class Outgoing:
    """One object to send, and the SOP classes it may be sent as, most specific first.

    ``classes`` empty: only as stored. ``write_as`` gives the file written as another of
    ``classes`` (the caller knows how; delivery only asks for the one the destination takes).
    """

    path: Path
    classes: tuple[str, ...] = ()
    write_as: Callable[[str], Path] | None = None


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # the PACS's answer, None when it never answered
    error: str | None  # None when delivered (success or warning)
    # Retrying cannot help (association rejected permanently, no class accepted): the delivery
    # ends at once instead of after its attempts.
    permanent: bool = False
    # What was sent: the SOP class the destination took and the instance of that class.
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    # The classes the destination refused this object in (presentation context or status),
    # whether or not another class then went through.
    refused_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EchoResult:
    destination: Destination
    ok: bool
    status: int | None  # the C-ECHO status (HTTP status for DICOMweb), None when no answer
    detail: str
    seconds: float


@dataclass(frozen=True)
class ContextAnswer:
    """One proposed (SOP class, transfer syntax) pair and the destination's answer."""

    sop_class_uid: str
    transfer_syntax_uid: str
    accepted: bool
    detail: str  # "accepted" or why not (e.g. "abstract syntax not supported")


@dataclass(frozen=True)
class Capabilities:
    """What a destination accepts of the classes and transfer syntaxes we may send it.

    ``problem`` is set when no answer could be had (the association was not established);
    ``answers`` is then empty.
    """

    destination: Destination
    answers: tuple[ContextAnswer, ...]
    problem: str | None
    seconds: float

    def accepts(self, sop_class_uid: str) -> bool:
        return any(a.accepted and a.sop_class_uid == sop_class_uid for a in self.answers)
