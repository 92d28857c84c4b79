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


def result_text(row: dict[str, Any]) -> str:
    """POSITIVE / negative, with "(shadow)" after a result reached in shadow mode (it went to no
    clinical destination and does not order the worklist) and "(outside validated domain)" where
    the domain guard said the input lies outside the model's training inputs."""
    if row["positive"] is None:
        return ""
    shadow = row.get("mode") == "shadow"
    text = (
        "[bold red]POSITIVE[/]"
        if row["positive"] and not shadow
        else ("POSITIVE" if row["positive"] else "negative")
    )
    if shadow:
        text += " [magenta](shadow)[/]"
    if row.get("in_domain") is False:
        text += " [yellow](outside validated domain)[/]"
    return text


def render_worklist(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Worklist (urgent first)")
    for column in (
        "priority",
        "study_uid",
        "status",
        "probability",
        "result",
        "mode",
        "instances",
        "model",
        "reason",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        probability = row["probability"]
        table.add_row(
            str(row["priority"]),
            row["study_uid"],
            f"[{_status_style(row['status'])}]{row['status']}[/]",
            "" if probability is None else f"{probability:.3f}",
            result_text(row),
            row.get("mode") or "",
            str(row["instances"]),
            row["model_version"] or "",
            row["reason"] or "",
        )
    return table
