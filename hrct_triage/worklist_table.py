"""The worklist as a terminal table, urgent first: printed by ``hrct-triage worklist`` and at
the end of the demo."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _status_style(status: str) -> str:
    return {
        "done": "green",
        "failed": "red",
        "not_applicable": "yellow",
        "processing": "cyan",
        "delivering": "cyan",
    }.get(status, "white")


def render_worklist(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Worklist (urgent first)")
    for column in (
        "priority",
        "study_uid",
        "status",
        "probability",
        "result",
        "instances",
        "model",
        "reason",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        probability = row["probability"]
        result = (
            ""
            if row["positive"] is None
            else "[bold red]POSITIVE[/]"
            if row["positive"]
            else "negative"
        )
        if row.get("in_domain") is False and row["positive"] is not None:
            result += " [yellow](outside validated domain)[/]"
        table.add_row(
            str(row["priority"]),
            row["study_uid"],
            f"[{_status_style(row['status'])}]{row['status']}[/]",
            "" if probability is None else f"{probability:.3f}",
            result,
            str(row["instances"]),
            row["model_version"] or "",
            row["reason"] or "",
        )
    return table
