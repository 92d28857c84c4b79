"""Read models for the CLI: worklist rows and a study's full record, as plain JSON-ready dicts.

Keys are the worklist's public names (``study_uid``, ``status``, ``reason``, ``probability``, ...),
the same in the CLI's JSON and the web API. No patient
name, ID or birth date is stored, so none can be shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from hrct_triage.common.sop_classes import sop_class_name
from hrct_triage.db.models import Delivery, Instance, Output, Study


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _outputs(study: Study, latest_only: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for output in study.outputs:
        if latest_only and output.generation != study.generation:
            continue
        for delivery in output.deliveries:
            rows.append(
                {
                    "sop_instance_uid": output.sop_instance_uid,
                    "kind": output.kind,
                    "destination": delivery.destination,
                    "state": delivery.state,
                    "status_code": delivery.status_code,
                    "attempts": delivery.attempts,
                    "generation": output.generation,
                    "path": output.path,
                    "acknowledged_at": _iso(delivery.acknowledged_at),
                    "error": delivery.error,
                    # What went out, when it differs from the output (an SR in another class).
                    "sent_as": _sent_as(output, delivery),
                }
            )
        if not output.deliveries:
            rows.append(
                {
                    "sop_instance_uid": output.sop_instance_uid,
                    "kind": output.kind,
                    "destination": None,
                    "state": "stored",
                    "status_code": None,
                    "attempts": 0,
                    "generation": output.generation,
                    "path": output.path,
                    "acknowledged_at": None,
                    "error": None,
                    "sent_as": None,
                }
            )
    return rows


def _sent_as(output: Output, delivery: Delivery) -> dict[str, str] | None:
    """``{"sop_class", "sop_class_uid", "sop_instance_uid"}`` of what a destination was sent in
    place of the output (an SR rewritten in a class it accepts); None when it got the output."""
    if delivery.sop_class_uid is None or delivery.sop_instance_uid == output.sop_instance_uid:
        return None
    return {
        "sop_class": sop_class_name(delivery.sop_class_uid),
        "sop_class_uid": delivery.sop_class_uid,
        "sop_instance_uid": delivery.sop_instance_uid or "",
    }


OUT_OF_DOMAIN = "outside validated domain"


def result_text(
    positive: bool | None, in_domain: bool | None, mode: str | None = None
) -> str | None:
    """``POSITIVE``/``negative``, with "(shadow)" after a result reached in shadow mode and
    "(outside validated domain)" where the domain guard said the input lies outside it; None
    when there is no result."""
    if positive is None:
        return None
    text = "POSITIVE" if positive else "negative"
    if mode == "shadow":
        text += " (shadow)"
    return f"{text} ({OUT_OF_DOMAIN})" if in_domain is False else text


def _row(study: Study, instances: int) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "status": study.status,
        "reason": study.reason,
        "probability": study.probability,
        "positive": study.positive,
        # "shadow": reached in shadow mode, sent to no clinical destination, never prioritised.
        "mode": study.mode,
        # How far the input lies from the model's training inputs (1.0 = cut-off) and whether it
        # lies inside the validated domain; None when the checkpoint has no domain reference.
        "domain_score": study.domain_score,
        "in_domain": study.in_domain,
        "result": result_text(study.positive, study.in_domain, study.mode),
        "threshold": study.threshold,
        "trim_fraction": study.trim_fraction,
        "priority": study.priority,
        "model_version": study.model_version,
        "instances": instances,
        "calling_ae": study.calling_ae,
        "accession_number": study.accession_number,
        "generation": study.generation,
        "attempts": study.attempts,
        "first_instance_at": _iso(study.first_instance_at),
        "last_instance_at": _iso(study.last_instance_at),
        "completed_at": _iso(study.completed_at),
        "queued_at": _iso(study.queued_at),
        "analysis_started_at": _iso(study.analysis_started_at),
        "analysed_at": _iso(study.analysed_at),
        "delivered_at": _iso(study.delivered_at),
        "outputs": _outputs(study, latest_only=True),
    }


def _instance_counts(session: Session, study_ids: Sequence[int]) -> dict[int, int]:
    if not study_ids:
        return {}
    rows = session.execute(
        select(Instance.study_id, func.count())
        .where(Instance.study_id.in_(study_ids))
        .group_by(Instance.study_id)
    ).all()
    return {study_id: count for study_id, count in rows}


def worklist_rows(
    session: Session,
    *,
    status: str | None = None,
    limit: int | None = None,
    positive: bool | None = None,
    since: datetime | None = None,
    scanner: str | None = None,
    accession: str | None = None,
) -> list[dict[str, Any]]:
    """Studies, urgent first; ties by time waiting (oldest first).

    Filters combine with AND: ``positive`` True/False keeps analysed studies with that result
    (None: any, analysed or not); ``since`` keeps studies whose first instance arrived at or
    after it; ``scanner`` is the calling AE title, exactly; ``accession`` a case-insensitive
    part of the accession number (what a radiologist reads off the RIS).
    """
    query = (
        select(Study)
        .options(selectinload(Study.outputs).selectinload(Output.deliveries))
        .order_by(Study.priority.desc(), Study.first_instance_at.asc(), Study.id)
    )
    if status:
        query = query.where(Study.status == status)
    if positive is not None:
        query = query.where(Study.positive.is_(positive))
    if since is not None:
        query = query.where(Study.first_instance_at >= since)
    if scanner:
        query = query.where(Study.calling_ae == scanner)
    if accession:
        query = query.where(Study.accession_number.icontains(accession, autoescape=True))
    if limit:
        query = query.limit(limit)
    studies = session.scalars(query).all()
    counts = _instance_counts(session, [s.id for s in studies])
    return [_row(study, counts.get(study.id, 0)) for study in studies]


def find_study(session: Session, study_uid: str) -> Study | None:
    return session.scalar(select(Study).where(Study.study_uid == study_uid))


def study_detail(session: Session, study_uid: str) -> dict[str, Any] | None:
    """Everything about one study: series, result, outputs of every analysis, events."""
    study = session.scalar(
        select(Study)
        .where(Study.study_uid == study_uid)
        .options(
            selectinload(Study.outputs).selectinload(Output.deliveries),
            selectinload(Study.events),
            selectinload(Study.series),
        )
    )
    if study is None:
        return None
    per_series = {
        series_id: (count, last)
        for series_id, count, last in session.execute(
            select(Instance.series_id, func.count(), func.max(Instance.received_at))
            .where(Instance.study_id == study.id)
            .group_by(Instance.series_id)
        ).all()
    }
    detail = _row(study, sum(count for count, _ in per_series.values()))
    detail["series"] = [
        {
            "series_uid": s.series_uid,
            "modality": s.modality,
            "series_number": s.series_number,
            "description": s.description,
            "instances": per_series.get(s.id, (0, None))[0],
            # When its last instance arrived: a series sent after the study was answered shows
            # as such (the events say whether it was analysed again, and why).
            "last_received_at": _iso(per_series.get(s.id, (0, None))[1]),
            "analysed": s.series_uid == study.analysed_series_uid,
        }
        for s in study.series
    ]
    detail["analysed_series_uid"] = study.analysed_series_uid
    detail["slice_probabilities"] = study.slice_probabilities
    detail["timings"] = study.timings
    detail["all_outputs"] = _outputs(study, latest_only=False)
    detail["events"] = [
        {"at": _iso(e.at), "from": e.from_status, "to": e.to_status, "detail": e.detail}
        for e in study.events
    ]
    return detail
