"""``hrct-triage echo --capabilities``: what each destination accepts of the SOP classes and
transfer syntaxes our outputs may be sent in, shown as a table (or JSON) and kept in the
worklist, so a PACS that takes no SR class is known before the first study, not after it.

A plain function called by ``hrct_triage.cli.app``'s ``echo``; it never imports the CLI.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from hrct_triage.common.settings import Destination, Settings
from hrct_triage.common.sop_classes import SECONDARY_CAPTURE, SR_CLASSES, sop_class_name
from hrct_triage.db import worklist
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.worker.delivery.outcomes import Capabilities

FAILED = 1


def capabilities_command(
    settings: Settings, timeout: float | None, *, as_json: bool, console: Console
) -> int:
    """Check every destination, print what each accepts, keep it; the exit code is 1 when a
    destination could not be checked or would refuse one of our outputs."""
    from hrct_triage.worker.delivery.capabilities import check_capabilities

    reports = [
        check_capabilities(
            destination,
            calling_ae=settings.listener.ae_title,
            timeout=timeout or settings.delivery.delivery_timeout_seconds,
        )
        for destination in settings.delivery.every_destination_list
    ]
    kept = _keep(settings, reports)
    if as_json:
        sys.stdout.write(json.dumps([_document(report) for report in reports], indent=2) + "\n")
    else:
        _print_table(console, reports)
    if kept is not None:
        sys.stderr.write(f"capabilities not kept in the worklist: {kept}\n")
    return 0 if all(_plan(report)["ok"] for report in reports) else FAILED


def _plan(report: Capabilities) -> dict[str, Any]:
    """How a delivery would go: the SR's class (the pinned one only, if pinned), whether the
    heat maps go, and whether all of it would."""
    destination = report.destination
    if destination.is_dicomweb:
        pinned = destination.sr_class or SR_CLASSES[0]
        return {"sr_class": pinned, "sc": True, "ok": True}
    candidates = (destination.sr_class,) if destination.sr_class else SR_CLASSES
    sr_class = next((c for c in candidates if report.accepts(c)), None)
    sc = report.accepts(SECONDARY_CAPTURE)
    return {"sr_class": sr_class, "sc": sc, "ok": report.problem is None and bool(sr_class) and sc}


def _document(report: Capabilities) -> dict[str, Any]:
    plan = _plan(report)
    return {
        "destination": str(report.destination),
        "pinned_sr_class": report.destination.sr_class,
        "problem": report.problem,
        "seconds": round(report.seconds, 3),
        "sr_sent_as": plan["sr_class"],
        "heat_maps_sent": plan["sc"],
        "ok": plan["ok"],
        "answers": [asdict(answer) for answer in report.answers],
    }


def _print_table(console: Console, reports: list[Capabilities]) -> None:
    table = Table(title="What each destination accepts (proposed by this gateway)")
    for column in ("destination", "SOP class", "transfer syntax", "answer"):
        table.add_column(column, overflow="fold")
    for report in reports:
        name = str(report.destination)
        if report.destination.is_dicomweb:
            table.add_row(name, "-", "-", "not negotiated (DICOMweb, STOW-RS)")
            continue
        if report.problem is not None:
            table.add_row(name, "-", "-", f"[red]{report.problem}[/]")
            continue
        for answer in report.answers:
            words = "[green]accepted[/]" if answer.accepted else f"[red]{answer.detail}[/]"
            table.add_row(
                name,
                sop_class_name(answer.sop_class_uid),
                sop_class_name(answer.transfer_syntax_uid),
                words,
            )
            name = ""
    console.print(table)
    for report in reports:
        console.print(_summary(report.destination, _plan(report), report.problem))


def _summary(destination: Destination, plan: dict[str, Any], problem: str | None) -> str:
    if problem is not None and not destination.is_dicomweb:
        return f"{destination}: [red]could not be asked[/]"
    pin = " (pinned by sr=)" if destination.sr_class else ""
    sr = (
        f"SR as {sop_class_name(plan['sr_class'])}{pin}"
        if plan["sr_class"]
        else f"[red]no SR class accepted{pin}: the SR would fail[/]"
    )
    sc = "heat maps as Secondary Capture" if plan["sc"] else "[red]heat maps refused[/]"
    return f"{destination}: {sr}; {sc}"


def _keep(settings: Settings, reports: list[Capabilities]) -> str | None:
    """Store the reports in the worklist for the worker; why not, when the worklist cannot
    take them (not migrated, not reachable)."""
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            for report in reports:
                if report.destination.is_dicomweb:
                    continue
                worklist.save_capabilities(
                    session,
                    str(report.destination),
                    answers=[asdict(answer) for answer in report.answers],
                    problem=report.problem,
                    now=datetime.now(UTC),
                )
    except SQLAlchemyError as error:
        return f"{type(error).__name__} (run `hrct-triage db upgrade`?)"
    finally:
        engine.dispose()
    return None
