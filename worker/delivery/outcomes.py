"""What a delivery attempt and a destination check report, whatever the protocol (DIMSE or
DICOMweb), so the worklist records both the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hrct_triage.common.settings import Destination


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # the PACS's answer, None when it never answered
    error: str | None  # None when delivered (success or warning)


@dataclass(frozen=True)
class EchoResult:
    destination: Destination
    ok: bool
    status: int | None  # the C-ECHO status (HTTP status for DICOMweb), None when no answer
    detail: str
    seconds: float
