"""Refused C-STOREs per scanner, for ``hrct-triage stats`` and the web worklist: why a scanner's
images did not arrive, without reading the listener's log.

A refusal's scanner is the calling AE title it came with (its own column, else its
association's); the counts are grouped in SQL, the same statement on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hrct_triage.db.models import Association, Refusal
from hrct_triage.db.stats import UNKNOWN_SCANNER

# Rows written before the reason kind was recorded.
UNRECORDED_KIND = "unrecorded"


@dataclass
class ScannerRefusals:
    """The refusals of one scanner: how many, by DICOM status and reason kind, and the latest."""

    scanner: str
    refusals: int = 0
    transient: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "0xC001" -> count
    kinds: dict[str, int] = field(default_factory=dict)  # "invalid_uid" -> count
    last_at: datetime | None = None
    last_reason: str | None = None
    last_peer_address: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scanner": self.scanner,
            "refusals": self.refusals,
            "transient": self.transient,
            "statuses": dict(sorted(self.statuses.items())),
            "kinds": dict(sorted(self.kinds.items(), key=lambda item: (-item[1], item[0]))),
            "last_at": self.last_at.isoformat() if self.last_at else None,
            "last_reason": self.last_reason,
            "last_peer_address": self.last_peer_address,
        }


def refusals_by_scanner(
    session: Session, *, since: datetime | None = None
) -> list[ScannerRefusals]:
    """Every scanner with a refusal (at or after ``since``), the most refused first."""
    # An empty calling AE title names no scanner either.
    scanner = func.coalesce(
        func.nullif(Refusal.calling_ae, ""), func.nullif(Association.calling_ae, "")
    )
    joined = select(Refusal).outerjoin(Association, Association.id == Refusal.association_id)
    if since is not None:
        joined = joined.where(Refusal.at >= since)
    counted = joined.with_only_columns(
        scanner,
        Refusal.status,
        Refusal.kind,
        Refusal.transient,
        func.count(Refusal.id),
        func.max(Refusal.at),
    ).group_by(scanner, Refusal.status, Refusal.kind, Refusal.transient)
    found: dict[str, ScannerRefusals] = defaultdict(lambda: ScannerRefusals(""))
    for name, status, kind, transient, count, last_at in session.execute(counted):
        key = name or UNKNOWN_SCANNER
        summary = found[key]
        summary.scanner = key
        summary.refusals += count
        summary.transient += count if transient else 0
        status_key = f"0x{status:04X}"
        summary.statuses[status_key] = summary.statuses.get(status_key, 0) + count
        kind_key = kind or UNRECORDED_KIND
        summary.kinds[kind_key] = summary.kinds.get(kind_key, 0) + count
        if summary.last_at is None or last_at > summary.last_at:
            summary.last_at = last_at
    for summary in found.values():
        _add_latest(session, joined, scanner, summary)
    return sorted(found.values(), key=lambda s: (-s.refusals, s.scanner))


def _add_latest(session: Session, joined: Any, scanner: Any, summary: ScannerRefusals) -> None:
    """The reason and address of the scanner's latest refusal (one row; scanners are few)."""
    where = scanner.is_(None) if summary.scanner == UNKNOWN_SCANNER else scanner == summary.scanner
    latest = session.execute(
        joined.with_only_columns(Refusal.reason, Refusal.peer_address, Association.peer_address)
        .where(where)
        .order_by(Refusal.at.desc(), Refusal.id.desc())
        .limit(1)
    ).first()
    if latest is not None:
        summary.last_reason = latest[0]
        summary.last_peer_address = latest[1] or latest[2]
