"""Turnaround statistics of the worklist: time to notification and per-stage durations.

*Time to notification* is the clock a radiologist cares about: from the moment the listener
acknowledged the last instance of what the study's latest analysis generation analysed
(``input_received_at``; ``last_instance_at`` before the study completes) to the moment the PACS
acknowledged the study's AI result, i.e. the ``acknowledged_at`` of that generation's SR. With
several destinations the notification counts when the last of them acknowledged it: a PACS that
has not got the SR has not notified anyone.

The per-stage durations split that clock where the worklist stamps a study:

====================  ==========================================================================
stage                 from -> to
====================  ==========================================================================
``receiving``         first instance -> last instance (how long the scanner took to send)
``quiet``             last instance -> complete (the quiet period plus any association left open)
``waiting``           queued -> analysis started (queue depth, no free worker)
``analysis``          analysis started -> analysed (the last attempt only)
``delivery``          analysed -> SR acknowledged by the PACS
====================  ==========================================================================

Everything is computed in Python over plain rows, not with SQL percentile functions, so the same
code gives the same answer on SQLite and PostgreSQL; a day of studies is a few thousand rows.
Percentiles are numpy's default (linear interpolation), the ones a spreadsheet would give.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from hrct_triage.db.models import Delivery, DeliveryState, Output, Study, StudyStatus

log = logging.getLogger(__name__)

#: The stages of the table above, in flow order: ``(name, start column, end column)``. The
#: ``delivery`` end is not a column (it is the SR acknowledgement) and is filled in separately.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("receiving", "first_instance_at", "last_instance_at"),
    ("quiet", "last_instance_at", "completed_at"),
    ("waiting", "queued_at", "analysis_started_at"),
    ("analysis", "analysis_started_at", "analysed_at"),
    ("delivery", "analysed_at", "sr_acknowledged_at"),
)
STAGE_NAMES: tuple[str, ...] = tuple(name for name, _, _ in STAGES)
TIME_TO_NOTIFICATION = "time_to_notification"
#: Target time to notification when no setting names one. Fifteen minutes: a chest CT is usually
#: opened by a radiologist within the hour, and the triage only helps if a positive study jumps
#: the reading queue well before that; the CPU analysis of a 500-slice study takes a few minutes.
DEFAULT_TARGET_SECONDS = 900.0
UNKNOWN_SCANNER = "(unknown)"

#: Studies that will never owe a notification unless an SR of theirs exists: a not-applicable
#: study whose not-analysed SR is switched off, a study analysed with no destination configured.
_NOTHING_OWED = (StudyStatus.DONE, StudyStatus.NOT_APPLICABLE)


@dataclass(frozen=True)
class StudyTimeline:
    """One study's stamps and the durations derived from them (seconds; None when unknown)."""

    study_uid: str
    status: str
    calling_ae: str | None
    accession_number: str | None
    first_instance_at: datetime | None
    last_instance_at: datetime | None
    completed_at: datetime | None
    queued_at: datetime | None
    analysis_started_at: datetime | None
    analysed_at: datetime | None
    sr_acknowledged_at: datetime | None
    sr_deliveries: int  # deliveries of the latest SR; 0 when none is owed

    @property
    def scanner(self) -> str:
        return self.calling_ae or UNKNOWN_SCANNER

    @property
    def day(self) -> date | None:
        """The UTC day the study finished arriving: the day its clock started."""
        return self.last_instance_at.date() if self.last_instance_at else None

    @property
    def time_to_notification(self) -> float | None:
        return seconds_between(self.last_instance_at, self.sr_acknowledged_at)

    @property
    def stages(self) -> dict[str, float | None]:
        """Duration of every stage; None where a stamp is missing or the stamps run backwards
        (a study re-opened by a late instance has a ``last_instance_at`` after its old
        ``completed_at`` until it completes again)."""
        return {name: seconds_between(getattr(self, a), getattr(self, b)) for name, a, b in STAGES}

    @property
    def owes_notification(self) -> bool:
        """Whether the PACS should get (or has got) an SR for this study at all."""
        return self.sr_deliveries > 0 or self.status not in _NOTHING_OWED

    def waiting_seconds(self, now: datetime) -> float | None:
        """Time to notification so far: finished, or still running at ``now``."""
        if self.sr_acknowledged_at is not None:
            return self.time_to_notification
        return seconds_between(self.last_instance_at, now)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``show --json`` and the web API."""
        return {
            "sr_acknowledged_at": _iso(self.sr_acknowledged_at),
            "time_to_notification_seconds": self.time_to_notification,
            "stage_seconds": self.stages,
        }


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    """Seconds from ``start`` to ``end``; None when either is missing or they run backwards."""
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


def format_seconds(seconds: float | None) -> str:
    """A compact duration for a table cell: ``42 s``, ``3 min 05 s``, ``15 min``, ``2 h 07 min``."""
    if seconds is None:
        return "—"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest:02d} s" if rest else f"{minutes} min"
    if whole < 86400:
        hours, rest = divmod(whole, 3600)
        return f"{hours} h {rest // 60:02d} min" if rest // 60 else f"{hours} h"
    days, rest = divmod(whole, 86400)
    return f"{days} d {rest // 3600} h" if rest // 3600 else f"{days} d"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- loading ------------------------------------------------------------------------------------


def load_timelines(
    session: Session, *, since: datetime | None = None, study_uids: Sequence[str] | None = None
) -> list[StudyTimeline]:
    """Every study (whose last instance arrived at or after ``since``), with its SR stamp.

    Two plain queries and a join in Python: no window functions or ``DISTINCT ON``, which
    SQLite and PostgreSQL spell differently.
    """
    query = select(Study).order_by(Study.id)
    if since is not None:
        query = query.where(Study.last_instance_at >= since)
    if study_uids is not None:
        query = query.where(Study.study_uid.in_(list(study_uids)))
    studies = session.scalars(query).all()
    acks = _latest_sr_acknowledgements(session, {s.id: s.generation for s in studies})
    return [_timeline(study, *acks.get(study.id, (None, 0))) for study in studies]


def load_timeline(session: Session, study_uid: str) -> StudyTimeline | None:
    """One study's timeline, for ``show`` and the study page."""
    found = load_timelines(session, study_uids=[study_uid])
    return found[0] if found else None


def _latest_sr_acknowledgements(
    session: Session, generations: dict[int, int]
) -> dict[int, tuple[datetime | None, int]]:
    """Per study id: when the last destination acknowledged the latest-generation SR (None
    while one has not), and how many deliveries that SR has."""
    if not generations:
        return {}
    rows = session.execute(
        select(Output.study_id, Output.generation, Delivery.state, Delivery.acknowledged_at)
        .join(Delivery, Delivery.output_id == Output.id)
        .where(Output.kind == "sr", Output.study_id.in_(list(generations)))
    ).all()
    by_study: dict[int, list[tuple[str, datetime | None]]] = defaultdict(list)
    for study_id, generation, state, acknowledged_at in rows:
        if generation == generations[study_id]:
            by_study[study_id].append((state, acknowledged_at))
    return {study_id: _last_acknowledgement(acks) for study_id, acks in by_study.items()}


def _last_acknowledgement(acks: list[tuple[str, datetime | None]]) -> tuple[datetime | None, int]:
    stamps = [at for state, at in acks if state == DeliveryState.SENT and at is not None]
    if len(stamps) < len(acks):
        return None, len(acks)  # a destination still waits for it (or gave up)
    return max(stamps), len(acks)


def _timeline(
    study: Study, sr_acknowledged_at: datetime | None, sr_deliveries: int
) -> StudyTimeline:
    return StudyTimeline(
        study_uid=study.study_uid,
        status=study.status,
        calling_ae=study.calling_ae,
        accession_number=study.accession_number,
        first_instance_at=study.first_instance_at,
        # The clock starts at the last instance of what was analysed: a late wave that changed
        # nothing (a dose report, a reformat) neither re-analyses the study nor restarts it.
        last_instance_at=study.input_received_at or study.last_instance_at,
        completed_at=study.completed_at,
        queued_at=study.queued_at,
        analysis_started_at=study.analysis_started_at,
        analysed_at=study.analysed_at,
        sr_acknowledged_at=sr_acknowledged_at,
        sr_deliveries=sr_deliveries,
    )


# --- summaries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Percentiles:
    """p50 and p95 of one measure over a group of studies (None when none was measured)."""

    count: int
    p50: float | None
    p95: float | None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Percentiles:
        measured = np.asarray([v for v in values if v is not None], dtype=np.float64)
        if measured.size == 0:
            return cls(0, None, None)
        p50, p95 = np.percentile(measured, [50, 95])
        return cls(int(measured.size), float(p50), float(p95))

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "p50": self.p50, "p95": self.p95}


@dataclass(frozen=True)
class GroupSummary:
    """Turnaround of the studies of one day or one scanner."""

    key: str
    studies: int
    notified: int
    time_to_notification: Percentiles
    stages: dict[str, Percentiles] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "studies": self.studies,
            "notified": self.notified,
            TIME_TO_NOTIFICATION: self.time_to_notification.as_dict(),
            "stages": {name: p.as_dict() for name, p in self.stages.items()},
        }


def summarise(timelines: Sequence[StudyTimeline], key: str) -> GroupSummary:
    """p50/p95 of the time to notification and of every stage over ``timelines``."""
    return GroupSummary(
        key=key,
        studies=len(timelines),
        notified=sum(1 for t in timelines if t.time_to_notification is not None),
        time_to_notification=Percentiles.of(t.time_to_notification for t in timelines),
        stages={name: Percentiles.of(t.stages[name] for t in timelines) for name in STAGE_NAMES},
    )


def summarise_by(
    timelines: Iterable[StudyTimeline], key: Callable[[StudyTimeline], str]
) -> list[GroupSummary]:
    """One summary per distinct ``key(timeline)``, in key order."""
    groups: dict[str, list[StudyTimeline]] = defaultdict(list)
    for timeline in timelines:
        groups[key(timeline)].append(timeline)
    return [summarise(groups[name], name) for name in sorted(groups)]


def by_day(timeline: StudyTimeline) -> str:
    return timeline.day.isoformat() if timeline.day else "(no instance)"


def by_scanner(timeline: StudyTimeline) -> str:
    return timeline.scanner


# --- alarms -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alarm:
    """A study whose notification took, or is taking, longer than the target."""

    study_uid: str
    status: str
    scanner: str
    accession_number: str | None
    seconds: float
    notified: bool  # False: the PACS still has no SR, the clock is still running

    def message(self, target_seconds: float) -> str:
        """The log line: study UID and scanner, never a patient identifier."""
        verb = "took" if self.notified else "still waiting after"
        return (
            f"time to notification over target: study {self.study_uid} from {self.scanner} "
            f"({self.status}) {verb} {self.seconds:.0f} s, target {target_seconds:.0f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "status": self.status,
            "scanner": self.scanner,
            "accession_number": self.accession_number,
            "seconds": self.seconds,
            "notified": self.notified,
        }


def alarms(
    timelines: Iterable[StudyTimeline], *, target_seconds: float, now: datetime
) -> list[Alarm]:
    """Studies over the target, slowest first: those notified too late, and those owed a
    notification whose clock has already run past the target (the ones someone can still
    help). Studies that owe no SR (not applicable without a not-analysed SR, no destination
    configured) are left out: their clock never stops."""
    found: list[Alarm] = []
    for timeline in timelines:
        if not timeline.owes_notification:
            continue
        seconds = timeline.waiting_seconds(now)
        if seconds is None or seconds <= target_seconds:
            continue
        found.append(
            Alarm(
                study_uid=timeline.study_uid,
                status=timeline.status,
                scanner=timeline.scanner,
                accession_number=timeline.accession_number,
                seconds=seconds,
                notified=timeline.sr_acknowledged_at is not None,
            )
        )
    return sorted(found, key=lambda alarm: -alarm.seconds)


def log_alarms(
    found: Iterable[Alarm], *, target_seconds: float, logger: logging.Logger = log
) -> int:
    """One WARNING line per alarm (what an operator's log monitoring matches); returns the
    count."""
    count = 0
    for alarm in found:
        logger.warning(alarm.message(target_seconds))
        count += 1
    return count


def alarm_for_study(
    session: Session, study_uid: str, *, target_seconds: float, now: datetime
) -> Alarm | None:
    """The alarm of one study, if it is over the target: for the worker to log right after a
    delivery round settles, so the alarm line appears when it happens, not at the next
    ``stats``."""
    timeline = load_timeline(session, study_uid)
    if timeline is None:
        return None
    found = alarms([timeline], target_seconds=target_seconds, now=now)
    return found[0] if found else None


# --- the report the CLI prints ------------------------------------------------------------------


@dataclass(frozen=True)
class StatsReport:
    """Everything ``hrct-triage stats`` shows."""

    since: datetime | None
    target_seconds: float
    overall: GroupSummary
    days: list[GroupSummary]
    scanners: list[GroupSummary]
    alarms: list[Alarm]

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": _iso(self.since),
            "target_seconds": self.target_seconds,
            "overall": self.overall.as_dict(),
            "by_day": [g.as_dict() for g in self.days],
            "by_scanner": [g.as_dict() for g in self.scanners],
            "alarms": [a.as_dict() for a in self.alarms],
        }


def build_report(
    timelines: Sequence[StudyTimeline],
    *,
    target_seconds: float,
    now: datetime,
    since: datetime | None = None,
) -> StatsReport:
    """Summaries overall, per day and per scanner, and the alarm list."""
    return StatsReport(
        since=since,
        target_seconds=target_seconds,
        overall=summarise(timelines, "all"),
        days=summarise_by(timelines, by_day),
        scanners=summarise_by(timelines, by_scanner),
        alarms=alarms(timelines, target_seconds=target_seconds, now=now),
    )
