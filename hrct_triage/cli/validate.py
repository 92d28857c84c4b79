"""``validate``: the recorded results against the imported reference labels, as Markdown, JSON and
PNGs (Table 1, the threshold curve, ROC, a site threshold for a target sensitivity).

A plain typer command function, registered in ``hrct_triage.cli.app`` with one line.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markdown import Markdown

from hrct_triage.cli.validation_report import validation_markdown
from hrct_triage.common.settings import get_settings
from hrct_triage.common.storage import write_durably
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.db.validation import (
    DEFAULT_MIN_PER_CLASS,
    DEFAULT_TARGET_SENSITIVITY,
    ValidationOptions,
    validation_figures,
)
from hrct_triage.db.validation_cases import CaseFilter, Cases, labelled_cases
from hrct_triage.db.validation_plots import validation_pngs

console = Console(width=None if sys.stdout.isatty() else 180)
NOTHING_MATCHED = 3


def validate_command(
    since: Annotated[
        datetime | None, typer.Option(help="results analysed at or after this (UTC if no zone)")
    ] = None,
    scanner: Annotated[str | None, typer.Option(help="calling AE title of the scanner")] = None,
    model: Annotated[str | None, typer.Option(help="model version of the results")] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="decision threshold [the studies' recorded one if they agree, else "
            "HRCT_THRESHOLD or the paper's]",
        ),
    ] = None,
    target_sensitivity: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="for the recommended site threshold")
    ] = DEFAULT_TARGET_SENSITIVITY,
    min_positives: Annotated[
        int, typer.Option(min=1, help="labelled COVID-19 studies needed to recommend")
    ] = DEFAULT_MIN_PER_CLASS,
    min_negatives: Annotated[
        int, typer.Option(min=1, help="labelled non-COVID studies needed to recommend")
    ] = DEFAULT_MIN_PER_CLASS,
    out: Annotated[
        Path | None, typer.Option(help="report folder [HRCT_DATA_DIR/validation]")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the JSON, not the Markdown")
    ] = False,
) -> None:
    """Compare the recorded results with the imported labels; exit 3 when none is labelled."""
    settings = get_settings()
    selection = CaseFilter(
        since=since if since is None or since.tzinfo else since.replace(tzinfo=UTC),
        scanner=scanner,
        model_version=model,
    )
    options = ValidationOptions(
        configured_threshold=settings.analysis.threshold,
        threshold=threshold,
        target_sensitivity=target_sensitivity,
        min_positives=min_positives,
        min_negatives=min_negatives,
    )
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            found = labelled_cases(session, selection)
    finally:
        engine.dispose()
    if not found.cases:
        console.print(
            f"no analysed study with a covid/other/normal label "
            f"({found.analysed} analysed, {found.labels} labels held, "
            f"{found.unknown} labelled unknown)"
        )
        raise typer.Exit(NOTHING_MATCHED)
    folder = out or settings.data_dir / "validation"
    document = write_report(folder, found, options, selection)
    if as_json:
        typer.echo(json.dumps(document, indent=2))
    else:
        console.print(Markdown((folder / "validation.md").read_text(encoding="utf-8")))
    console.print(f"report: {folder / 'validation.md'}, {folder / 'validation.json'}", style="dim")


def write_report(
    folder: Path, found: Cases, options: ValidationOptions, selection: CaseFilter
) -> dict[str, Any]:
    """validation.json, validation.md and the PNGs into ``folder``; the JSON document."""
    document = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "filters": selection.as_dict(),
        **validation_figures(found, options),
    }
    models = ", ".join(found.model_versions) or "all models"
    pngs = validation_pngs(found, document, title=f"{models}, n={len(found.cases)}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        write_durably(folder / name, data)
    document["figures"] = sorted(pngs)
    write_durably(folder / "validation.json", json.dumps(document, indent=2).encode("utf-8"))
    markdown = validation_markdown(document, sorted(pngs))
    write_durably(folder / "validation.md", markdown.encode("utf-8"))
    return document
