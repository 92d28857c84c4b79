"""Associations: their audit rows, refusals, and what the spool holds (for reconciliation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from hrct_triage.db.models import (
    Association,
    Instance,
    InstanceReplacement,
    Refusal,
    Study,
    StudyStatus,
)
from hrct_triage.db.worklist.states import _note


def open_association(
    session: Session,
    *,
    calling_ae: str,
    called_ae: str,
    peer_address: str,
    peer_port: int,
    now: datetime,
    state: str = "open",
    rejection_reason: str | None = None,
    tls: bool = False,
) -> int:
    row = Association(
        calling_ae=calling_ae[:16],
        called_ae=called_ae[:16],
        peer_address=peer_address[:64],
        peer_port=peer_port,
        state=state,
        started_at=now,
        rejection_reason=rejection_reason,
        ended_at=now if state != "open" else None,
        tls=tls,
    )
    session.add(row)
    session.flush()
    return row.id


@dataclass
class AssociationTally:
    """What one association did, kept in the listener's memory and written when it closes
    (one UPDATE per association instead of one per instance)."""

    instances: int = 0
    bytes: int = 0
    failures: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    # Study Instance UID -> instances stored before that this association sent again unchanged.
    resent: dict[str, int] = field(default_factory=dict)

    def count(self, status: int, size: int) -> None:
        key = f"0x{status:04X}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if status == 0:
            self.instances += 1
            self.bytes += size
        else:
            self.failures += 1

    def resend(self, study_uid: str) -> None:
        """An identical resend: it changes nothing, and the close says so in the study's events."""
        self.resent[study_uid] = self.resent.get(study_uid, 0) + 1


def close_association(
    session: Session,
    association_id: int,
    *,
    state: str,
    now: datetime,
    tally: AssociationTally | None = None,
    reason: str | None = None,
) -> None:
    """``reason``: why we aborted it, kept in ``rejection_reason`` as a refusal's would be."""
    values: dict[str, Any] = {"state": state, "ended_at": now}
    if reason is not None:
        values["rejection_reason"] = reason
    if tally is not None:
        values.update(
            instances=tally.instances,
            bytes=tally.bytes,
            failures=tally.failures,
            statuses=dict(tally.statuses),
        )
    closed = session.execute(
        update(Association)
        .where(Association.id == association_id, Association.state == "open")
        .values(**values)
    )
    if tally is not None and tally.resent and getattr(closed, "rowcount", 0) == 1:
        _note_resends(session, association_id, tally.resent, now)


def _note_resends(
    session: Session, association_id: int, resent: dict[str, int], now: datetime
) -> None:
    """One event per study past its first reception that this association sent instances of
    again, unchanged: the late wave that re-opened nothing."""
    calling_ae = session.scalar(
        select(Association.calling_ae).where(Association.id == association_id)
    )
    studies = session.scalars(select(Study).where(Study.study_uid.in_(list(resent)))).all()
    for study in studies:
        if study.status == StudyStatus.RECEIVING and study.reopened_from is None:
            continue  # still its first reception: a sender's retry, not a late wave
        count = resent[study.study_uid]
        _note(
            session,
            study,
            now,
            f"late wave: {count} instance{'s' if count != 1 else ''} sent again unchanged by "
            f"{calling_ae or 'an unnamed AE'} (association {association_id}); nothing to "
            "analyse, not re-opened",
        )


def close_orphaned_associations(session: Session, *, now: datetime) -> int:
    """At listener start: associations still 'open' belonged to a process that died. Their
    instance counts are rebuilt from the instance rows they committed."""
    orphans = session.scalars(select(Association.id).where(Association.state == "open")).all()
    for association_id in orphans:
        count, size = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0)).where(
                Instance.association_id == association_id
            )
        ).one()
        session.execute(
            update(Association)
            .where(Association.id == association_id)
            .values(state="orphaned", ended_at=now, instances=int(count), bytes=int(size))
        )
    if orphans:
        # Their senders were cut off mid-transfer and could not go on while the listener was
        # down: the quiet period of a study they fed starts now, not at its last instance before
        # the crash, so a scanner that sends again at once is in before the study completes.
        # It used to complete at the first dispatcher round after the restart, on a partial set,
        # and again after the resend (tests/faults:
        # test_listener_killed_mid_association_and_the_scanner_sends_again).
        fed = select(Instance.study_id).where(Instance.association_id.in_(orphans))
        session.execute(
            update(Study)
            .where(Study.id.in_(fed), Study.status == StudyStatus.RECEIVING)
            .values(last_instance_at=now)
            .execution_options(synchronize_session=False)
        )
    return len(orphans)


def record_refusal(
    session: Session,
    *,
    association_id: int | None,
    study_uid: str | None,
    sop_instance_uid: str | None,
    status: int,
    transient: bool,
    reason: str,
    now: datetime,
    series_uid: str | None = None,
    calling_ae: str | None = None,
    peer_address: str | None = None,
    kind: str | None = None,
) -> None:
    """Keep a refused C-STORE with whatever identified it; a transient one holds its study open.

    The UIDs must be valid ones or None (the listener never passes on an invalid value)."""
    session.add(
        Refusal(
            association_id=association_id,
            calling_ae=calling_ae[:16] if calling_ae is not None else None,
            peer_address=peer_address[:64] if peer_address is not None else None,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_instance_uid,
            status=status,
            kind=kind[:32] if kind is not None else None,
            transient=transient,
            reason=reason[:2000],
            at=now,
        )
    )


def spooled_paths(session: Session) -> set[str]:
    """Every spool path the worklist knows, for the listener's start-up reconciliation."""
    return set(session.scalars(select(Instance.path)))


def receiving_instances(session: Session) -> list[tuple[str, str, str]]:
    """(SOP Instance UID, path, SHA-256) of every instance of the studies still receiving: the
    only rows a power cut can leave naming a file that never reached the disk (``listener.spool``).
    """
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.path, Instance.sha256)
        .join(Study, Study.id == Instance.study_id)
        .where(Study.status == StudyStatus.RECEIVING)
    )
    return [(sop, path, sha256) for sop, path, sha256 in rows]


def replaced_path(session: Session, sop_instance_uid: str) -> str | None:
    """The file of the version most recently replaced for this SOP instance, if any."""
    return session.scalar(
        select(InstanceReplacement.old_path)
        .where(InstanceReplacement.sop_instance_uid == sop_instance_uid)
        .order_by(InstanceReplacement.id.desc())
        .limit(1)
    )
