"""Operations commands: ``stats`` (turnaround summary) and ``web`` (the web worklist).

Plain typer command functions, registered in ``hrct_triage.cli.app`` with one line each, so that
this module never imports the CLI (and the CLI stays the one composition root).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hrct_triage.cli.drift import print_drift
from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.db import stats
from hrct_triage.db.refusal_summary import ScannerRefusals, refusals_by_scanner
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction

# Off a terminal (CI logs, pipes) rich would fold 64-character UIDs at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)
BAD_USAGE = 2


def _target_seconds(given: float | None, settings: Settings) -> float:
    """The option, else HRCT_NOTIFICATION_TARGET_SECONDS."""
    return given if given is not None else settings.worklist.notification_target_seconds


def _aware(moment: datetime | None) -> datetime | None:
    """typer parses ``--since`` without a zone; the worklist's clock is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


_cell = stats.format_seconds


def render_summaries(title: str, group: str, groups: list[stats.GroupSummary]) -> Table:
    """One row per group: studies, notified, and p50/p95 of the clock and of each stage."""
    table = Table(title=title, title_justify="left")
    table.add_column(group, overflow="fold")
    for column in ("studies", "notified", "TTN p50", "TTN p95"):
        table.add_column(column, justify="right")
    for name in stats.STAGE_NAMES:
        table.add_column(f"{name} p50/p95", justify="right")
    for summary in groups:
        ttn = summary.time_to_notification
        table.add_row(
            summary.key,
            str(summary.studies),
            str(summary.notified),
            _cell(ttn.p50),
            _cell(ttn.p95),
            *(f"{_cell(p.p50)} / {_cell(p.p95)}" for p in summary.stages.values()),
        )
    return table


def render_alarms(found: list[stats.Alarm], target_seconds: float) -> Table:
    """Studies over the target, slowest first."""
    table = Table(
        title=f"Over the {_cell(target_seconds)} target ({len(found)})",
        title_justify="left",
        title_style="bold red" if found else "green",
    )
    for column in ("study_uid", "accession", "scanner", "status", "time", "notified"):
        table.add_column(column, overflow="fold")
    for alarm in found:
        table.add_row(
            alarm.study_uid,
            alarm.accession_number or "",
            alarm.scanner,
            alarm.status,
            _cell(alarm.seconds),
            "yes" if alarm.notified else "[bold]not yet[/]",
        )
    return table


def _counted(counts: dict[str, int]) -> str:
    """``{"0xC001": 4, "0xA700": 1}`` as ``0xC001: 4, 0xA700: 1``, the largest first."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name}: {count}" for name, count in ordered)


def render_refusals(found: list[ScannerRefusals]) -> Table:
    """Refused C-STOREs per scanner: how many, which statuses, why, and the latest reason."""
    table = Table(
        title=f"Refused instances by scanner ({sum(s.refusals for s in found)})",
        title_justify="left",
        title_style="bold red" if found else "green",
    )
    table.add_column("scanner", overflow="fold")
    for column in ("refused", "transient"):
        table.add_column(column, justify="right")
    for column in ("statuses", "reasons", "last", "last reason"):
        table.add_column(column, overflow="fold")
    for summary in found:
        address = f" ({summary.last_peer_address})" if summary.last_peer_address else ""
        table.add_row(
            Text(summary.scanner + address),  # Text: a peer's words are never rich markup
            str(summary.refusals),
            str(summary.transient),
            _counted(summary.statuses),
            _counted(summary.kinds),
            summary.last_at.isoformat(timespec="seconds") if summary.last_at else "",
            Text(summary.last_reason or ""),
        )
    return table


def stats_command(
    since: Annotated[
        datetime | None,
        typer.Option(help="only studies whose last image arrived at or after this (UTC)"),
    ] = None,
    target_seconds: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="time to notification target [HRCT_NOTIFICATION_TARGET_SECONDS]",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    show_drift: Annotated[
        bool,
        typer.Option(
            "--drift", help="drift of inputs and results per scanner and protocol instead"
        ),
    ] = False,
) -> None:
    """Time to notification (last image -> SR acknowledged by the PACS) and per-stage
    durations: p50/p95 per day and per scanner, the studies over the target, and the instances
    each scanner sent that the listener refused. With --drift: per scanner and protocol, the
    recent studies against the baseline, and the drift alarms."""
    settings = get_settings()
    if show_drift:
        print_drift(settings, as_json=as_json, console=console)
        return
    target = _target_seconds(target_seconds, settings)
    moment = _aware(since)
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            timelines = stats.load_timelines(session, since=moment)
            refused = refusals_by_scanner(session, since=moment)
    finally:
        engine.dispose()
    report = stats.build_report(
        timelines, target_seconds=target, now=datetime.now(UTC), since=moment
    )
    if as_json:
        document = {
            **report.as_dict(),
            "refusals_by_scanner": [summary.as_dict() for summary in refused],
        }
        typer.echo(json.dumps(document, indent=2))
        return
    console.print(
        render_summaries("Time to notification by day", "day", [report.overall, *report.days])
    )
    console.print(render_summaries("Time to notification by scanner", "scanner", report.scanners))
    console.print(render_alarms(report.alarms, target))
    console.print(render_refusals(refused))


def web_command(
    host: Annotated[str | None, typer.Option(help="address to listen on [HRCT_WEB_HOST]")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="TCP port [HRCT_WEB_PORT]")
    ] = None,
    target_seconds: Annotated[
        float | None,
        typer.Option(
            min=1, help="flag studies slower than this [HRCT_NOTIFICATION_TARGET_SECONDS]"
        ),
    ] = None,
    log_level: str = "info",
) -> None:
    """Serve the read-only web worklist and JSON API (token in HRCT_WEB_TOKEN)."""
    from hrct_triage.web.app import WebConfigError, required_token, serve

    settings = get_settings()
    try:
        token = required_token(settings.web.web_token)
    except WebConfigError as error:
        console.print(str(error), style="red")
        raise typer.Exit(BAD_USAGE) from error
    serve(
        host=settings.web.web_host if host is None else host,
        port=settings.web.web_port if port is None else port,
        database_url=settings.resolved_database_url,
        token=token,
        target_seconds=_target_seconds(target_seconds, settings),
        log_level=log_level,
    )
