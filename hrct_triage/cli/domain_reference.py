"""``domain-reference``: build the domain guard's reference of a checkpoint from studies like its
training inputs, and ``domain-score``: where other studies fall against it.

Plain typer command functions, registered in ``hrct_triage.cli.app`` with one line each, so that
this module never imports the CLI (the CLI stays the one composition root).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 180)


def _study_folders(root: Path) -> list[Path]:
    """``root`` itself when it holds DICOM files directly, else its sub-folders that hold some."""
    if any(root.glob("*.dcm")):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and any(p.rglob("*.dcm")))


def domain_reference_command(
    phantom_dir: Annotated[
        Path, typer.Argument(help="folder of studies like the training inputs (one per folder)")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="reference file [<checkpoint without suffix>.domain.json]"),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="[HRCT_MODEL_PATH, else the shipped checkpoint]")
    ] = None,
    components: Annotated[int, typer.Option(help="principal axes of the features")] = 8,
    min_slices: Annotated[int, typer.Option(help="as the worker's HRCT_MIN_SLICES")] = 20,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [cuda when available]")] = None,
) -> None:
    """Run the checkpoint over every study in PHANTOM_DIR and write its domain reference."""
    from hrct_triage.common.settings import get_settings
    from hrct_triage.worker.method.checkpoints import default_checkpoint
    from hrct_triage.worker.method.domain import build_reference, reference_path
    from hrct_triage.worker.method.domain_inputs import read_study_inputs
    from hrct_triage.worker.method.model import ModelError, load_model
    from hrct_triage.worker.method.results import NotApplicable

    weights = checkpoint or get_settings().analysis.model_path or default_checkpoint()
    if weights is None or not weights.exists():
        console.print("domain-reference: no checkpoint to describe", style="red")
        raise typer.Exit(1)
    if not phantom_dir.is_dir():
        console.print(f"domain-reference: {phantom_dir} is not a folder", style="red")
        raise typer.Exit(2)
    try:
        model = load_model(weights, allow_untrained=False, device=device)
    except ModelError as exc:
        console.print(f"domain-reference: {exc}", style="red")
        raise typer.Exit(1) from exc
    folders = _study_folders(phantom_dir)
    studies = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as bars:
        task = bars.add_task("studies", total=len(folders))
        for folder in folders:
            try:
                studies.append(read_study_inputs(folder, model, min_slices=min_slices))
            except NotApplicable as exc:
                console.print(f"{folder.name}: left out, {exc.reason}", style="yellow")
            bars.advance(task)
    assert model.info.sha256 is not None  # loaded from a checked file
    try:
        reference = build_reference(
            model.info.sha256,
            [s.feature for s in studies],
            [s.input_stats for s in studies],
            probabilities=[s.probability for s in studies],
            names=[s.name for s in studies],
            components=components,
            description=f"{model.info.name} {model.info.version}: {len(studies)} studies "
            f"of {phantom_dir.name}",
        )
    except ValueError as exc:
        console.print(f"domain-reference: {exc}", style="red")
        raise typer.Exit(1) from exc
    target = out or reference_path(weights)
    target.write_text(json.dumps(reference.to_json(), separators=(",", ":")) + "\n")
    scores = sorted(s["domain_score"] for s in reference.studies)
    console.print(
        f"{target}: {len(studies)} studies, leave-one-out scores {scores[0]:.2f} to "
        f"{scores[-1]:.2f} (cut-off 1.0), {target.stat().st_size // 1024} KiB"
    )


def domain_score_command(
    folders: Annotated[list[Path], typer.Argument(help="study folders (or folders of them)")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="[HRCT_MODEL_PATH, else the shipped checkpoint]")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
    min_slices: Annotated[int, typer.Option(help="as the worker's HRCT_MIN_SLICES")] = 20,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [cuda when available]")] = None,
) -> None:
    """Score studies against the checkpoint's domain reference, as the worker would."""
    from hrct_triage.common.settings import get_settings
    from hrct_triage.worker.method.checkpoints import default_checkpoint
    from hrct_triage.worker.method.domain_inputs import read_study_inputs
    from hrct_triage.worker.method.model import ModelError, load_model
    from hrct_triage.worker.method.results import NotApplicable

    weights = checkpoint or get_settings().analysis.model_path or default_checkpoint()
    try:
        model = load_model(weights, allow_untrained=False, device=device)
    except ModelError as exc:
        console.print(f"domain-score: {exc}", style="red")
        raise typer.Exit(1) from exc
    if model.domain is None:
        console.print("domain-score: the checkpoint has no domain reference", style="red")
        raise typer.Exit(1)
    rows: list[dict[str, object]] = []
    for folder in [f for root in folders for f in _study_folders(root)]:
        try:
            study = read_study_inputs(folder, model, min_slices=min_slices)
        except NotApplicable as exc:
            rows.append({"study": str(folder), "not_applicable": exc.reason})
            continue
        stats = study.input_stats
        rows.append(
            {
                "study": str(folder),
                "domain_score": study.domain_score,
                "in_domain": None if study.domain_score is None else study.domain_score <= 1.0,
                "probability": round(study.probability, 4),
                **{k: v for k, v in stats.items() if isinstance(v, int | float)},
            }
        )
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("study", "domain score", "in domain", "probability", "lung p50", "noise")
    for row in rows:
        if "not_applicable" in row:
            table.add_row(str(row["study"]), "-", "not applicable", str(row["not_applicable"]))
            continue
        table.add_row(
            str(row["study"]),
            f"{row['domain_score']}",
            "yes" if row["in_domain"] else "NO",
            f"{row['probability']}",
            f"{row['lung_hu_p50']}",
            f"{row['noise_hu']}",
        )
    console.print(table)
