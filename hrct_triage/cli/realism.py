"""``realism``: how close chest CT series are to each other (phantoms against a real series).

A plain typer command function, registered in ``hrct_triage.cli.app`` with one line, so that
this module never imports the CLI (and the CLI stays the one composition root).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# Off a terminal (CI logs, pipes) rich would fold the column names at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 220)


def realism_command(
    folders: Annotated[
        list[Path], typer.Argument(help="study folders of DICOM files, one column each")
    ],
    reference: Annotated[
        Path | None,
        typer.Option(help="the folder the distances are measured to [the first one]"),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="the measurements as JSON instead of a table")
    ] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="the table as markdown, for documents")
    ] = False,
    min_slices: Annotated[int, typer.Option(help="as the worker's HRCT_MIN_SLICES")] = 20,
) -> None:
    """Measure each folder's analysed series as the worker loads it and print them side by side.

    Lung HU histogram, vessel volume fraction (overall and by distance from the pleura), vessels
    and airways per lung slice, and the noise power spectrum in air and soft tissue.
    """
    from hrct_triage.worker.method.results import NotApplicable
    from hrct_triage.worker.training.realism import (
        Realism,
        load_series,
        markdown_table,
        measure,
        summary,
        table_rows,
    )

    results: dict[str, Realism] = {}
    names: dict[Path, str] = {}
    failed = False
    for folder in folders:
        try:
            volume = load_series(folder, min_slices=min_slices)
            results[volume.name] = measure(volume)
            names[folder.resolve()] = volume.name
        except (NotApplicable, ValueError, FileNotFoundError) as exc:
            console.print(f"realism: {folder}: {exc}", style="red")
            failed = True
    if reference is not None and reference.resolve() not in names:
        console.print(f"realism: --reference {reference} is not one of the folders measured")
        raise typer.Exit(2)
    ref = names[reference.resolve()] if reference is not None else next(iter(results), None)
    if json_output:
        against = results[ref] if ref is not None else None
        series = [summary(r, reference=against) for r in results.values()]
        typer.echo(json.dumps({"reference": ref, "series": series}, indent=2))
    elif markdown and results:
        typer.echo(markdown_table(results, reference=ref))
    elif results:
        table = Table(title="Realism: lung, vessels, airways and noise of each series")
        table.add_column("measure")
        for name in results:
            table.add_column(name, justify="right", overflow="fold")
        for label, cells in table_rows(results, reference=ref):
            table.add_row(label, *cells)
        console.print(table)
    if failed:
        raise typer.Exit(1)
