"""Admin commands that change or check the installation: ``cancel``, ``purge``, ``doctor``.

Plain typer command functions, registered in ``hrct_triage.cli.app`` with one line each (like
``ops_cli``), so this module never imports the CLI. Exit codes are the CLI's: 0 ok, 1 a check
or an operation failed, 2 bad usage, 3 nothing matched.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.db import worklist
from hrct_triage.db.models import Study
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction

if TYPE_CHECKING:
    from hrct_triage.worker.delivery.outcomes import EchoResult

# Off a terminal (CI logs, pipes) rich would fold 64-character UIDs at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)
FAILED = 1
NOTHING_MATCHED = 3
# doctor waits this long for the broker and for worker replies: long enough for a broker on
# the hospital network, short enough for a health check run by cron or a load balancer.
DOCTOR_TIMEOUT_SECONDS = 3.0


def _sessions(settings: Settings) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(settings.resolved_database_url))


def echo_all(settings: Settings, timeout: float | None) -> list[EchoResult]:
    """C-ECHO each destination, clinical and shadow, with the calling AE and timeout a
    delivery would use."""
    from hrct_triage.worker.delivery.dimse import echo as c_echo

    return [
        c_echo(
            d,
            calling_ae=settings.listener.ae_title,
            timeout=timeout or settings.delivery.delivery_timeout_seconds,
            dicomweb_token=settings.delivery.dicomweb_token,
            dicomweb_ca=settings.delivery.dicomweb_ca,
        )
        for d in settings.delivery.every_destination_list
    ]


# --- cancel -----------------------------------------------------------------------------------


def cancel_command(
    study_uids: Annotated[list[str], typer.Argument(help="studies to stop")],
) -> None:
    """Stop studies: neither analysed nor delivered; they end failed, "cancelled by operator".

    Exit 3 when no UID names a study. A study already done, failed or not applicable is left
    as it is (``requeue`` undoes a cancel).
    """
    with transaction(_sessions(get_settings())) as session:
        studies = list(session.scalars(select(Study).where(Study.study_uid.in_(study_uids))))
        if not studies:
            console.print("no study matched")
            raise typer.Exit(NOTHING_MATCHED)
        now = datetime.now(UTC)
        for study in studies:
            previous = study.status
            if worklist.cancel(session, study, now=now):
                console.print(f"cancelled {study.study_uid} (was {previous})")
            else:
                console.print(f"already {previous}, left {study.study_uid}")
    unknown = sorted(set(study_uids) - {study.study_uid for study in studies})
    for uid in unknown:
        console.print(f"no study {uid}", style="yellow")


# --- purge ------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def purge_command(
    older_than: Annotated[
        float, typer.Option(help="days since the study last changed (and last instance)")
    ] = 30.0,
    status: Annotated[
        list[str] | None,
        typer.Option(help="final state(s) to purge [done, failed, not_applicable]"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, delete nothing")] = False,
) -> None:
    """Spool retention: delete the spooled instances and outputs of old finished studies.

    Only studies in a final state, untouched for ``--older-than`` days, with nothing left to
    deliver; only files under ``HRCT_DATA_DIR``. The worklist rows and events stay (with a
    "spool purged" event), so the worklist and statistics keep their history. Exit 3 when no
    study was eligible.
    """
    if older_than < 0:
        raise typer.BadParameter("--older-than must be 0 or more days")
    settings = get_settings()
    statuses = tuple(status) if status else worklist.PURGEABLE
    sessions = _sessions(settings)
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        try:
            candidates = worklist.purge_candidates(
                session, older_than=now - timedelta(days=older_than), statuses=statuses
            )
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error
    data_dir = settings.data_dir
    plan: list[tuple[worklist.PurgeCandidate, list[Path]]] = []
    outside = 0
    for candidate in candidates:
        files = []
        for text in candidate.paths:
            path = Path(text)
            if not _inside(path, data_dir):
                outside += 1  # never delete what this installation does not own
            elif path.is_file():
                files.append(path)
        if files:
            plan.append((candidate, files))
    if outside:
        console.print(f"{outside} paths outside {data_dir} left alone", style="yellow")
    if not plan:
        console.print("no study to purge")
        raise typer.Exit(NOTHING_MATCHED)
    total_files = sum(len(files) for _, files in plan)
    total_bytes = sum(path.stat().st_size for _, files in plan for path in files)
    if dry_run:
        for candidate, files in plan:
            size = sum(path.stat().st_size for path in files)
            console.print(
                f"would purge {candidate.study_uid} ({candidate.status}): "
                f"{len(files)} files, {size} bytes"
            )
        console.print(f"would delete {total_files} files, {total_bytes} bytes")
        return
    with Progress(console=console, transient=not console.is_terminal) as progress:
        task = progress.add_task("purging", total=total_files)
        for candidate, files in plan:
            size = 0
            for path in files:
                size += path.stat().st_size
                path.unlink(missing_ok=True)
                _remove_empty_parents(path.parent, stop=data_dir)
                progress.advance(task)
            with transaction(sessions) as session:
                worklist.record_purge(
                    session,
                    candidate.study_id,
                    files=len(files),
                    size_bytes=size,
                    now=datetime.now(UTC),
                )
    console.print(f"purged {len(plan)} studies: {total_files} files, {total_bytes} bytes")


def _remove_empty_parents(folder: Path, *, stop: Path) -> None:
    """Drop the study's now-empty series and study folders, never ``stop`` or above."""
    stop_resolved = stop.resolve()
    current = folder.resolve()
    while current != stop_resolved and _inside(current, stop_resolved):
        if current.parent == stop_resolved:  # spool/ and outputs/ themselves stay
            return
        try:
            current.rmdir()
        except OSError:
            return  # not empty, or gone already
        current = current.parent


# --- doctor -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``: ``ok`` True, False, or None when it cannot be known here."""

    name: str
    ok: bool | None
    detail: str


def _check_database(settings: Settings) -> Check:
    from hrct_triage.db.migrate import current_revision, head_revision

    try:
        current = current_revision(settings.resolved_database_url)
    except Exception as error:
        return Check("database", False, f"unreachable: {type(error).__name__}: {error}")
    head = head_revision()
    if current != head:
        return Check(
            "database", False, f"schema at {current}, newest {head}: run hrct-triage db upgrade"
        )
    return Check("database", True, f"reachable, schema at newest revision {head}")


def _embedded_broker(url: str) -> bool:
    return url.startswith("sqla+")


def _check_broker(settings: Settings, timeout: float) -> Check:
    from kombu import Connection

    url = settings.resolved_broker_url
    scheme = url.split("://", 1)[0]
    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            connection.default_channel  # noqa: B018 -- opens the channel: the real round trip
    except Exception as error:
        return Check("broker", False, f"{scheme}: unreachable: {type(error).__name__}: {error}")
    return Check("broker", True, f"{scheme}: reachable")


def _check_workers(settings: Settings, timeout: float) -> Check:
    """Ping workers over the broker; unknown on the embedded broker, which cannot broadcast."""
    url = settings.resolved_broker_url
    if _embedded_broker(url):
        return Check(
            "workers",
            None,
            "unknown: the embedded broker carries no broadcasts; see the worker processes",
        )
    from hrct_triage.listener.dispatch import publisher_app

    app = publisher_app(settings)
    try:
        replies = app.control.ping(timeout=timeout)
    except Exception as error:
        return Check("workers", False, f"ping failed: {type(error).__name__}: {error}")
    finally:
        app.close()
    if not replies:
        return Check("workers", False, f"no worker answered within {timeout:g} s")
    names = sorted(name for reply in replies for name in reply)
    return Check("workers", True, f"{len(names)} alive: {', '.join(names)}")


def _check_destinations(settings: Settings, timeout: float | None) -> list[Check]:
    if not settings.delivery.every_destination_list:
        return [Check("destinations", None, "none configured (HRCT_DESTINATIONS)")]
    return [
        Check(
            f"{'shadow ' if settings.delivery.is_shadow_only(result.destination) else ''}"
            f"destination {result.destination}",
            result.ok,
            f"C-ECHO {result.detail} in {result.seconds:.2f} s",
        )
        for result in echo_all(settings, timeout)
    ]


def _check_mode(settings: Settings) -> Check:
    """Which mode new studies are analysed in, and where their results go."""
    if settings.delivery.mode == "live":
        return Check("mode", True, "live: results go to HRCT_DESTINATIONS and order the worklist")
    qa = ", ".join(str(d) for d in settings.delivery.shadow_destination_list) or "nowhere"
    return Check(
        "mode",
        True,
        f"shadow: results go to {qa} (HRCT_SHADOW_DESTINATIONS) only, none to "
        "HRCT_DESTINATIONS; nothing is prioritised",
    )


def _check_disk(settings: Settings) -> Check:
    folder = settings.spool_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # not made yet: the file system it will be made on
    free = shutil.disk_usage(folder).free
    wanted = settings.listener.min_free_disk_bytes
    detail = f"{free / 2**30:.1f} GiB free at {folder}, listener refuses below {wanted / 2**30:.1f}"
    return Check("disk", free >= wanted, detail)


def _check_model(settings: Settings) -> Check:
    """Load the model as a worker would (on the CPU: the GPU belongs to the workers)."""
    try:
        from hrct_triage.worker.method.checkpoints import default_checkpoint
        from hrct_triage.worker.method.model import load_model

        loaded = load_model(
            settings.analysis.model_path or default_checkpoint(),
            allow_untrained=settings.analysis.allow_untrained,
            device="cpu",
        )
    except Exception as error:
        return Check("model", False, f"does not load: {type(error).__name__}: {error}")
    info = loaded.info
    return Check(
        "model",
        True,
        f"{info.name} {info.version}, sha256 {info.sha256 or 'none (untrained)'}",
    )


def doctor_command(
    timeout: Annotated[
        float, typer.Option(help="seconds for the broker, worker ping and each C-ECHO")
    ] = DOCTOR_TIMEOUT_SECONDS,
    model: Annotated[bool, typer.Option(help="load the model (takes a few seconds)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """Check the installation: database, broker, workers, destinations, disk, model.

    Exit 1 when a check failed; a check that cannot be decided here ("unknown") does not fail.
    """
    settings = get_settings()
    checks = [
        _check_database(settings),
        _check_broker(settings, timeout),
        _check_workers(settings, timeout),
        _check_mode(settings),
        *_check_destinations(settings, timeout),
        _check_disk(settings),
    ]
    if model:
        checks.append(_check_model(settings))
    healthy = all(check.ok is not False for check in checks)
    if as_json:
        typer.echo(json.dumps({"ok": healthy, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        table = Table(title="hrct-triage doctor")
        for column in ("check", "result", "detail"):
            table.add_column(column, overflow="fold")
        for check in checks:
            result = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "[yellow]unknown[/]"}
            table.add_row(check.name, result[check.ok], check.detail)
        console.print(table)
    if not healthy:
        raise typer.Exit(FAILED)
