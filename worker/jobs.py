"""What a task does, as plain functions: claim the study, analyse, record, deliver.

Tasks take a study id and load everything else from the worklist (STYLE habit 7). They are safe
to run twice: the claim lets one worker analyse a study at a time, and every recording checks the
claim, so a redelivered or overtaken message records nothing.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import worklist
from db.models import Output, Study
from db.session import transaction
from db.settings import Destination, Settings
from worker.delivery import send_files
from worker.results import NotApplicable

if TYPE_CHECKING:
    from worker.model import LoadedModel

log = logging.getLogger("hrct.worker")

# A failed attempt is tried again after this long (a transient file-system or database fault).
RETRY_AFTER_SECONDS = 5.0
# If a worker dies after recording a result but before delivering it, another worker delivers
# once this much time has passed.
DELIVERY_GRACE_SECONDS = 60.0
# Longest wait between delivery rounds, however long the destination has been down.
DELIVERY_BACKOFF_MAX_SECONDS = 3600.0


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    model: Callable[[], LoadedModel]
    name: str = f"{socket.gethostname()}:{os.getpid()}"


def _now() -> datetime:
    return datetime.now(UTC)


def run_triage(ctx: WorkerContext, study_id: int) -> str:
    """Analyse one study and deliver its outputs; returns the study's new status."""
    settings = ctx.settings
    with transaction(ctx.sessions) as session:
        claim = worklist.claim(
            session, study_id, worker=ctx.name, lease_seconds=settings.lease_seconds, now=_now()
        )
    if claim is None:
        log.info("study %d is not waiting for analysis; message ignored", study_id)
        return "ignored"
    if claim.attempts > settings.max_attempts:
        with transaction(ctx.sessions) as session:
            worklist.give_up(
                session,
                claim,
                now=_now(),
                reason=f"analysis did not finish in {settings.max_attempts} attempts "
                "(the worker was lost each time)",
            )
        return "failed"
    try:
        status = _analyse_and_record(ctx, claim)
    except NotApplicable as verdict:
        with transaction(ctx.sessions) as session:
            worklist.mark_not_applicable(session, claim, reason=verdict.reason, now=_now())
        log.info("study %d not applicable: %s", study_id, verdict.reason)
        return "not_applicable"
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"[:500]
        log.exception("analysis of study %d failed", study_id)
        with transaction(ctx.sessions) as session:
            outcome = worklist.fail_analysis(
                session,
                claim,
                reason=reason,
                max_attempts=settings.max_attempts,
                retry_after_seconds=RETRY_AFTER_SECONDS,
                now=_now(),
            )
        return outcome or "ignored"
    if status == "delivering":
        return run_delivery(ctx, study_id)
    return status


def _analyse_and_record(ctx: WorkerContext, claim: worklist.Claim) -> str:
    from worker.artifacts import build_study_outputs
    from worker.pipeline import analyse_study

    settings = ctx.settings
    with transaction(ctx.sessions) as session:
        inputs = worklist.analysis_inputs(session, claim.study_id)
        study = session.get(Study, claim.study_id)
        assert study is not None
        content_datetime = study.queued_at or _now()
        predecessor = _previous_sr_path(session, claim)
    model = ctx.model()
    analysis, headers = analyse_study(
        claim.study_uid,
        [Path(path) for path, _ in inputs],
        model,
        threshold=settings.threshold,
        trim_fraction=settings.trim_fraction,
        heatmaps=settings.heatmaps,
        min_slices=settings.min_slices,
        batch_size=settings.batch_size,
    )
    records = build_study_outputs(
        analysis,
        headers,
        generation=claim.generation,
        content_datetime=content_datetime,
        predecessor=dcmread(predecessor) if predecessor else None,
        out_dir=settings.outputs_dir / claim.study_uid,
    )
    record = worklist.AnalysisRecord(
        probability=analysis.probability,
        positive=analysis.positive,
        threshold=analysis.threshold,
        model_version=analysis.model.version,
        series_uid=analysis.series_uid,
        slice_probabilities=[
            [s.sop_instance_uid, round(s.probability, 6)] for s in analysis.slices
        ],
        timings={k: round(v, 4) for k, v in analysis.timings.items()},
    )
    with transaction(ctx.sessions) as session:
        recorded = worklist.finish_analysis(
            session,
            claim,
            analysis=record,
            outputs=records,
            destinations=[str(d) for d in settings.destination_list],
            now=_now(),
            delivery_grace_seconds=DELIVERY_GRACE_SECONDS,
        )
        if not recorded:
            log.info("study %d changed during analysis; result discarded", claim.study_id)
            return "ignored"
        status = session.get(Study, claim.study_id)
        assert status is not None
        log.info(
            "study %d analysed: p=%.3f %s",
            claim.study_id,
            analysis.probability,
            "POSITIVE" if analysis.positive else "negative",
        )
        return status.status


def _previous_sr_path(session: Session, claim: worklist.Claim) -> Path | None:
    """The SR of the latest earlier analysis, which a new SR names as its predecessor."""
    path = session.scalar(
        select(Output.path)
        .where(
            Output.study_id == claim.study_id,
            Output.kind == "sr",
            Output.generation < claim.generation,
        )
        .order_by(Output.generation.desc())
        .limit(1)
    )
    return Path(path) if path and Path(path).exists() else None


def run_delivery(ctx: WorkerContext, study_id: int) -> str:
    """Send every pending output of the study's latest analysis; schedule a retry if needed."""
    settings = ctx.settings
    with transaction(ctx.sessions) as session:
        pending = [
            (delivery.id, delivery.destination, delivery.attempts, Path(output.path))
            for delivery, output in worklist.pending_deliveries(session, study_id)
        ]
    by_destination: dict[str, list[tuple[int, int, Path]]] = defaultdict(list)
    for delivery_id, destination, attempts, path in pending:
        by_destination[destination].append((delivery_id, attempts, path))
    most_attempts = 0
    for destination, items in by_destination.items():
        results = send_files(
            Destination.parse(destination),
            [path for _, _, path in items],
            calling_ae=settings.ae_title,
            timeout=settings.delivery_timeout_seconds,
        )
        with transaction(ctx.sessions) as session:
            for (delivery_id, attempts, _), result in zip(items, results, strict=True):
                worklist.record_delivery(
                    session,
                    delivery_id,
                    status_code=result.status,
                    error=result.error,
                    max_attempts=settings.delivery_attempts,
                    now=_now(),
                )
                if result.error:
                    most_attempts = max(most_attempts, attempts + 1)
                    log.warning("delivery of study %d: %s", study_id, result.error)
    delay = min(
        DELIVERY_BACKOFF_MAX_SECONDS,
        settings.delivery_backoff_seconds * 2 ** max(most_attempts - 1, 0),
    )
    retry_at = _now() + timedelta(seconds=delay * random.uniform(0.8, 1.2))
    with transaction(ctx.sessions) as session:
        outcome = worklist.settle_delivery(session, study_id, now=_now(), retry_at=retry_at)
    return outcome or "ignored"
