"""``labels import FILE``: the hospital's reference labels into the worklist, for local validation.

A typer sub-app, registered in ``hrct_triage.cli.app`` with one line; a file with a bad row
imports nothing and exits 1 with every bad row and its line number.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hrct_triage.common.settings import get_settings
from hrct_triage.db.reference_labels import LabelImportError, import_labels, read_label_file
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction

app = typer.Typer(help="Reference labels from the hospital (for `validate`).", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 180)


@app.command("import")
def import_command(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with study_uid and/or accession_number, label (covid, other, normal, "
            "unknown), optional reader and reported_at"
        ),
    ],
) -> None:
    """Import or correct reference labels; a bad row anywhere imports nothing (exit 1)."""
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        rows = read_label_file(file)
        with transaction(make_sessionmaker(engine)) as session:
            counts = import_labels(session, rows, source=file.name, now=datetime.now(UTC))
    except LabelImportError as error:
        table = Table(title=f"{error.source}: bad rows, nothing imported")
        table.add_column("line", justify="right")
        table.add_column("problem", overflow="fold")
        for problem in error.problems:
            table.add_row(str(problem.line), problem.message)
        console.print(table)
        raise typer.Exit(1) from error
    finally:
        engine.dispose()
    console.print(
        f"{len(rows)} labels from {file.name}: [green]{counts.new} new[/], "
        f"[yellow]{counts.corrected} corrected[/], {counts.unchanged} unchanged"
    )
    for line in counts.corrections:
        console.print(f"  corrected {line}")
