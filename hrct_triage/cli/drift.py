"""``hrct-triage stats --drift``: the drift watch as tables, so an operator sees at the terminal
what the log, the gauges and the web panel say."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hrct_triage.common.settings import Settings
from hrct_triage.db import drift
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def render_groups(report: drift.DriftReport) -> Table:
    """One row per group: recent studies, baseline, positive rate and alarms."""
    config = report.config
    table = Table(
        title=f"Drift by scanner and protocol (last {config.window_days} days)",
        title_justify="left",
    )
    for column in ("calling AE", "station", "kernel", "thickness"):
        table.add_column(column, overflow="fold")
    table.add_column("recent", justify="right")
    table.add_column("baseline", overflow="fold")
    table.add_column("positive rate (recent)", justify="right")
    table.add_column("alarm")
    for group in report.groups:
        first = (report.now - timedelta(days=config.window_days)).date()
        decided = [
            (d.positive_rate, d.studies)
            for d in group.days
            if d.positive_rate is not None and d.day >= first
        ]
        rate = sum(r * n for r, n in decided) / sum(n for _, n in decided) if decided else None
        alarms = ", ".join(q.quantity for q in group.alarms)
        table.add_row(
            Text(group.key.calling_ae),
            Text(group.key.station),
            Text(group.key.kernel),
            group.key.thickness,
            str(group.recent),
            Text(f"{group.baseline.description} ({group.baseline.studies})"),
            _number(rate, 2),
            Text(f"ALARM: {alarms}", style="bold red") if alarms else Text("no", style="green"),
        )
    return table


def render_statistics(group: drift.GroupDrift, config: drift.DriftConfig) -> Table:
    """One group's watched quantities: recent and baseline means, KS D and p."""
    table = Table(title=f"{group.key.label}: recent vs baseline", title_justify="left")
    table.add_column("quantity")
    for column in ("recent", "baseline", "recent mean", "baseline mean", "KS D", "p"):
        table.add_column(column, justify="right")
    table.add_column("alarm")
    for q in group.quantities:
        few = q.recent < config.min_studies or q.baseline < config.min_studies
        table.add_row(
            q.quantity,
            str(q.recent),
            str(q.baseline),
            _number(q.recent_mean, 4),
            _number(q.baseline_mean, 4),
            _number(q.statistic, 2),
            "—" if q.p_value is None else f"{q.p_value:.1e}",
            Text("ALARM", style="bold red")
            if q.alarm
            else Text("too few studies" if few else "no", style="dim" if few else "green"),
        )
    return table


def print_drift(settings: Settings, *, as_json: bool, console: Console) -> None:
    """Build the report from the worklist and print it (or one JSON document)."""
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            report = drift.drift_report(session, settings, now=datetime.now(UTC))
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    config = report.config
    console.print(render_groups(report))
    for group in report.groups:
        if group.recent:
            console.print(render_statistics(group, config))
    found = report.alarms
    console.print(
        Text(
            f"{len(found)} drift alarms (KS D>{config.threshold:g} with p<{config.alpha:g}, "
            f"at least {config.min_studies} recent and baseline studies)",
            style="bold red" if found else "green",
        )
    )
    for group, quantity in found:
        console.print(Text(group.alarm_message(quantity, config), style="red"))
