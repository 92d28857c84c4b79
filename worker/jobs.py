"""What a task does, as plain functions: claim the study, analyse, record, deliver.

Tasks take a study id and load everything else from the worklist, so a message never carries
state that the worklist may since have changed. They are safe to run twice: the claim lets one
worker analyse a study at a time, and every recording checks the claim, so a redelivered or
overtaken message records nothing.

Where the outputs go follows the mode the result is reached in (``HRCT_MODE``): a shadow
result only to the QA destinations, a live one only to the clinical ones. A study keeps the mode
of its first result through late waves, requeues and resends, so switching modes never sends
a shadow study to the PACS (``DeliverySettings.mode_for``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.charsets import substitutions
from hrct_triage.common.settings import Settings
from hrct_triage.db import stats, worklist
from hrct_triage.db.models import Output, Study, StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.worker import input_check
from hrct_triage.worker.delivery.backoff import delivery_backoff
from hrct_triage.worker.delivery_round import Pending, deliver_round
from hrct_triage.worker.method.results import NotApplicable

if TYPE_CHECKING:
    from hrct_triage.worker.method.model import LoadedModel
    from hrct_triage.worker.method.series import SelectedSeries

log = logging.getLogger("hrct.worker")

# A failed attempt is tried again after this long (a transient file-system or database fault).
RETRY_AFTER_SECONDS = 5.0
# If a worker dies after recording a result but before delivering it, another worker delivers
# once this much time has passed.
DELIVERY_GRACE_SECONDS = 60.0
# How long a worker waits for the worklist database to answer again (a restart, a fail-over)
# before the step fails; longer outages are left to the lease and the outbox.
DATABASE_WAIT_SECONDS = 120.0


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "-"


def process_identity() -> str:
    """``host:pid:pid-namespace`` of this process: the name its claims are recorded under.

    Taken when the context is built, in the pool process that runs the tasks (it used to be the
    pid of the worker's main process, the same for every pool process, which told nobody which
    process held a study).
    """
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_namespace()}"


def holder_is_gone(holder: str | None) -> bool:
    """True only when ``holder`` (a ``process_identity``) is a process of this host and pid
    namespace that no longer runs (or is a zombie waiting to be reaped).

    Anything else, another host or container, a name in another form, a pid that runs, is
    presumed alive: its hold then lapses with its lease, as before. A reused pid errs the same
    safe way.
    """
    if not holder:
        return False
    host, _, rest = holder.partition(":")
    pid_text, _, namespace = rest.partition(":")
    if host != socket.gethostname() or namespace != _pid_namespace() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    model: Callable[[], LoadedModel]
    name: str = field(default_factory=process_identity)


def _now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def _transaction(ctx: WorkerContext) -> Iterator[Session]:
    """``hrct_triage.db.session.transaction`` that first waits for the database to answer.

    A worker whose database restarted under it used to fail the step at hand: a result it could
    not record left the study ``processing`` under its claim until the lease lapsed (15 minutes
    by default), and a claim it could not take dropped the message (as
    ``test_postgresql_restarted_while_studies_arrive_and_results_are_written`` in tests/faults
    showed). The wait is for a connection (``pool_pre_ping`` replaces dead pooled ones), up to
    ``DATABASE_WAIT_SECONDS``; the body runs once, so a database lost mid-transaction still
    fails the step, which the step's own error handling records.
    """
    deadline = time.monotonic() + DATABASE_WAIT_SECONDS
    delay = 0.25
    while True:
        session = ctx.sessions()
        try:
            session.connection()  # checks a connection out and begins the transaction
            break
        except OperationalError as error:
            session.close()
            if time.monotonic() + delay > deadline:
                raise
            log.warning("worklist database unreachable (%s); waiting", type(error).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    with session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


def _take_over_from_gone_holder(ctx: WorkerContext, study_id: int) -> bool:
    """Lapse the study's claim or delivery hold when its holder is a process of ours that is
    gone (``worklist.release_holds``); True when the caller may try to take the study again.

    The usual way here: a pool process was killed mid-analysis (OOM killer, SIGKILL), Celery
    gave its message back (``task_reject_on_worker_lost``) and the replacement process gets it
    at once, while the dead process's lease would hold the study for ``HRCT_LEASE_SECONDS``.
    """
    with _transaction(ctx) as session:
        holder = worklist.live_holder(session, study_id, now=_now())
        if not holder_is_gone(holder):
            return False
        released = worklist.release_holds(session, [holder or ""], now=_now(), study_id=study_id)
    if released:
        log.warning("study %d: its holder %s is gone; taking it over", study_id, holder)
    return bool(released)


def release_gone_holders(sessions: sessionmaker[Session]) -> list[int]:
    """At worker start: lapse every hold of a gone process of this host and publish its studies
    again (the whole worker was killed; nobody holds their messages any more)."""
    with transaction(sessions) as session:
        now = _now()
        gone = [h for h in worklist.live_holders(session, now=now) if holder_is_gone(h)]
        released = worklist.release_holds(session, gone, now=now, republish=True)
    if released:
        log.warning(
            "%d studies held by gone processes of this host released: %s",
            len(released),
            ", ".join(gone),
        )
    return released


def _context(claim: worklist.Claim) -> dict[str, object]:
    """``extra=`` fields of a log line about a claimed study (see ``hrct_triage.common.logs``)."""
    return {"study_id": claim.study_id, "study_uid": claim.study_uid}


def run_triage(ctx: WorkerContext, study_id: int) -> str:
    """Analyse one study and deliver its outputs; returns the study's new status."""
    settings = ctx.settings
    claim = _claim(ctx, study_id)
    if claim is None and _take_over_from_gone_holder(ctx, study_id):
        claim = _claim(ctx, study_id)
    if claim is None:
        log.info("study %d is not waiting for analysis; message ignored", study_id)
        return "ignored"
    if claim.attempts > settings.analysis.max_attempts:
        with _transaction(ctx) as session:
            worklist.give_up(
                session,
                claim,
                now=_now(),
                reason=f"analysis did not finish in {settings.analysis.max_attempts} attempts "
                "(the worker was lost each time)",
            )
        return "failed"
    try:
        status = _analyse_and_record(ctx, claim)
    except NotApplicable as verdict:
        return _record_not_applicable(ctx, claim, verdict.reason)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"[:500]
        log.exception("analysis of study %d failed", study_id, extra=_context(claim))
        with _transaction(ctx) as session:
            outcome = worklist.fail_analysis(
                session,
                claim,
                reason=reason,
                max_attempts=settings.analysis.max_attempts,
                retry_after_seconds=RETRY_AFTER_SECONDS,
                now=_now(),
            )
        return outcome or "ignored"
    if status == "delivering":
        return run_delivery(ctx, study_id)
    return status


def _claim(ctx: WorkerContext, study_id: int) -> worklist.Claim | None:
    with _transaction(ctx) as session:
        return worklist.claim(
            session,
            study_id,
            worker=ctx.name,
            lease_seconds=ctx.settings.analysis.lease_seconds,
            now=_now(),
        )


def _analyse_and_record(ctx: WorkerContext, claim: worklist.Claim) -> str:
    """Decide what to analyse (``worker.input_check``: a late wave's check may keep the
    verdict), analyse it, and record the result unless the input changed meanwhile."""
    settings = ctx.settings
    tx = partial(_transaction, ctx)
    started = time.perf_counter()
    view = input_check.read_input(tx, claim.study_id, min_slices=settings.analysis.min_slices)
    if claim.analysed_input is not None:
        checked = input_check.check_late_wave(
            tx, claim, view, min_slices=settings.analysis.min_slices, now=_now
        )
        if isinstance(checked, str):
            return checked
        claim, view = checked
    if view.selected is None:
        return _record_not_applicable(ctx, claim, view.reason or "no series fits", view)
    try:
        record, outputs, notes = _analyse(ctx, claim, view.selected, time.perf_counter() - started)
    except NotApplicable as verdict:
        return _record_not_applicable(ctx, claim, verdict.reason, view)
    record = dataclasses.replace(record, input_digest=view.digest)

    def record_result(session: Session) -> str:
        for note in notes:
            worklist.note_analysis(session, claim, detail=note, now=_now())
        recorded = worklist.finish_analysis(
            session,
            claim,
            analysis=record,
            outputs=outputs,
            destinations=[
                str(d) for d in settings.delivery.destinations_for(record.mode or "live")
            ],
            now=_now(),
            delivery_grace_seconds=DELIVERY_GRACE_SECONDS,
        )
        if not recorded:
            log.info(
                "study %d changed during analysis; result discarded",
                claim.study_id,
                extra=_context(claim),
            )
            return "ignored"
        status = session.get(Study, claim.study_id)
        assert status is not None
        log.info(
            "study %d analysed: p=%.3f %s%s",
            claim.study_id,
            record.probability,
            "POSITIVE" if record.positive else "negative",
            " (shadow mode)" if record.mode == "shadow" else "",
            extra=_context(claim),
        )
        return status.status

    return input_check.record_if_unchanged(
        tx, claim, view, record_result, settings=settings, now=_now
    )


def _analyse(
    ctx: WorkerContext, claim: worklist.Claim, series: SelectedSeries, looked: float
) -> tuple[worklist.AnalysisRecord, list[worklist.OutputRecord], list[str]]:
    """The method on the chosen series' files (selection chooses it again, the same), the
    outputs built from its result, and what the analysis did that its result does not show
    (text read in a substituted character set); ``looked`` is the time the input check took."""
    from hrct_triage.worker.method.pipeline import analyse_study
    from hrct_triage.worker.outputs import Analysed, SeriesLabels, write_outputs

    settings = ctx.settings
    with _transaction(ctx) as session:
        study = session.get(Study, claim.study_id)
        assert study is not None
        content_datetime = study.queued_at or _now()
        predecessor = _previous_sr_path(session, claim)
        mode = settings.delivery.mode_for(_recorded_mode(study))
    model = ctx.model()
    analysis, headers = analyse_study(
        claim.study_uid,
        list(series.paths),
        model,
        threshold=settings.analysis.threshold_override,
        trim_fraction=settings.analysis.trim_fraction_override,
        heatmaps=settings.analysis.heatmaps,
        min_slices=settings.analysis.min_slices,
        batch_size=settings.analysis.batch_size,
    )
    records = write_outputs(
        Analysed(analysis, headers),
        generation=claim.generation,
        content_datetime=content_datetime,
        predecessor=dcmread(predecessor) if predecessor else None,
        out_dir=settings.outputs_dir / claim.study_uid,
        labels=SeriesLabels.from_settings(settings).for_mode(mode),
    )
    record = worklist.AnalysisRecord(
        probability=analysis.probability,
        positive=analysis.positive,
        threshold=analysis.threshold,
        trim_fraction=analysis.trim_fraction,
        model_version=analysis.model.version,
        series_uid=analysis.series_uid,
        slice_probabilities=[
            [s.sop_instance_uid, round(s.probability, 6)] for s in analysis.slices
        ],
        timings={
            "input": round(looked, 4),
            **{k: round(v, 4) for k, v in analysis.timings.items()},
        },
        mode=mode,
        input_stats=analysis.input_stats,
        station_name=analysis.station_name,
        convolution_kernel=(analysis.convolution_kernel or "")[:64] or None,
        slice_thickness=analysis.slice_thickness,
        domain_score=analysis.domain_score,
        in_domain=analysis.in_domain,
    )
    notes = substitutions(headers)
    for note in notes:
        log.warning("study %d: %s", claim.study_id, note, extra=_context(claim))
    return record, records, notes


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


def _record_not_applicable(
    ctx: WorkerContext,
    claim: worklist.Claim,
    reason: str,
    view: input_check.InputView | None = None,
) -> str:
    """End the study not_applicable, with its not-analysed SR when ``HRCT_NOT_ANALYSED_SR``
    asks for one (and deliver it); returns the study's state.

    The SR is a courtesy to the reader: if it cannot be built, the verdict is recorded without
    it rather than turning a clear "not applicable" into a failed analysis. ``view`` is the
    input the verdict was reached on, recorded unless instances arrived that change it.
    """
    settings = ctx.settings
    mode = _mode_of(ctx, claim.study_id)
    destinations = [str(d) for d in settings.delivery.destinations_for(mode)]
    outputs: list[worklist.OutputRecord] = []
    if settings.outputs.not_analysed_sr and destinations:
        try:
            outputs = _not_analysed_outputs(ctx, claim, reason, mode)
        except Exception:
            log.exception(
                "study %d: not-analysed SR could not be built",
                claim.study_id,
                extra=_context(claim),
            )

    def record(session: Session) -> str:
        recorded = worklist.mark_not_applicable(
            session,
            claim,
            reason=reason,
            now=_now(),
            outputs=outputs,
            destinations=destinations,
            delivery_grace_seconds=DELIVERY_GRACE_SECONDS,
            input_digest=view.digest if view is not None else None,
            mode=mode,
        )
        return StudyStatus.NOT_APPLICABLE if recorded else "ignored"

    if view is None:
        with _transaction(ctx) as session:
            status = record(session)
    else:
        status = input_check.record_if_unchanged(
            partial(_transaction, ctx), claim, view, record, settings=settings, now=_now
        )
    if status == StudyStatus.NOT_APPLICABLE:
        log.info("study %d not applicable: %s", claim.study_id, reason, extra=_context(claim))
        if outputs:
            run_delivery(ctx, claim.study_id)
    return status


def _recorded_mode(study: Study) -> str | None:
    """The mode of the study's verdicts so far; one recorded before modes were (no ``mode``,
    an ``analysed_at``) was live, the only mode there was."""
    if study.mode is None and study.analysed_at is not None:
        return "live"
    return study.mode


def _mode_of(ctx: WorkerContext, study_id: int) -> str:
    """The mode the study's next verdict is reached in (``DeliverySettings.mode_for``)."""
    with _transaction(ctx) as session:
        study = session.get(Study, study_id)
        return ctx.settings.delivery.mode_for(_recorded_mode(study) if study else None)


def _not_analysed_outputs(
    ctx: WorkerContext, claim: worklist.Claim, reason: str, mode: str
) -> list[worklist.OutputRecord]:
    """Build and file the not-analysed SR, dated like an analysis' outputs (queue time)."""
    from hrct_triage.worker.outputs import NotAnalysed, SeriesLabels, write_outputs

    with _transaction(ctx) as session:
        inputs = worklist.analysis_inputs(session, claim.study_id)
        study = session.get(Study, claim.study_id)
        assert study is not None
        content_datetime = study.queued_at or _now()
        predecessor = _previous_sr_path(session, claim)
    return write_outputs(
        NotAnalysed([Path(path) for path, _ in inputs], reason, ctx.model().info),
        generation=claim.generation,
        content_datetime=content_datetime,
        predecessor=dcmread(predecessor) if predecessor else None,
        out_dir=ctx.settings.outputs_dir / claim.study_uid,
        labels=SeriesLabels.from_settings(ctx.settings).for_mode(mode),
    )


def run_delivery(ctx: WorkerContext, study_id: int) -> str:
    """Send every pending output of the study's latest analysis; schedule a retry if needed.

    The round holds the study's delivery (``worklist.claim_delivery``): a second worker handed
    the same study meanwhile sends nothing and returns "ignored". The next round's time is an
    outbox row, so retries survive worker restarts. Returns the study's status afterwards.
    """
    settings = ctx.settings
    token, pending = _hold_delivery(ctx, study_id)
    if token is None and _take_over_from_gone_holder(ctx, study_id):
        token, pending = _hold_delivery(ctx, study_id)
    if token is None:
        log.info("study %d: delivery held by another worker or nothing to deliver", study_id)
        return "ignored"
    try:
        failed_attempts = _deliver_round(ctx, study_id, pending)
    except BaseException:
        with _transaction(ctx) as session:
            worklist.release_delivery(session, study_id, token)
        raise
    delay = delivery_backoff(
        failed_attempts,
        base=settings.delivery.delivery_backoff_seconds,
        maximum=settings.delivery.delivery_backoff_max_seconds,
    )
    with _transaction(ctx) as session:
        outcome = worklist.settle_delivery(
            session,
            study_id,
            now=_now(),
            retry_at=_now() + timedelta(seconds=delay),
            token=token,
        )
        if outcome in (StudyStatus.DONE, StudyStatus.FAILED):
            _alarm_if_slow(session, study_id, settings.worklist.notification_target_seconds)
    return outcome or "ignored"


def _hold_delivery(ctx: WorkerContext, study_id: int) -> tuple[str | None, list[Pending]]:
    """The study's delivery hold and what it owes, or (None, []) when it is not ours."""
    with _transaction(ctx) as session:
        token = worklist.claim_delivery(
            session,
            study_id,
            worker=ctx.name,
            lease_seconds=ctx.settings.delivery.delivery_lease_seconds,
            now=_now(),
        )
        if token is None:
            return None, []
        return token, [
            Pending(
                delivery.id,
                delivery.destination,
                delivery.attempts,
                Path(output.path),
                output.kind,
                output.sop_class_uid,
            )
            for delivery, output in worklist.pending_deliveries(session, study_id)
        ]


def _alarm_if_slow(session: Session, study_id: int, target_seconds: float) -> None:
    """Log the time-to-notification alarm when it happens, not at the operator's next `stats`."""
    study = session.get(Study, study_id)
    if study is None:
        return
    alarm = stats.alarm_for_study(
        session, study.study_uid, target_seconds=target_seconds, now=_now()
    )
    if alarm is not None:
        stats.log_alarms([alarm], target_seconds=target_seconds, logger=log)


def _deliver_round(ctx: WorkerContext, study_id: int, pending: list[Pending]) -> int:
    """One association per destination; every answer recorded as it comes. Returns the most
    attempts any still-failing delivery has had (0: all delivered), which sets the backoff."""
    return deliver_round(ctx.settings, lambda: _transaction(ctx), study_id, pending, _now)
