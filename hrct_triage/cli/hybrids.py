"""``hybrids``: sensitivity and pointing game of a checkpoint on one real series with synthetic
COVID-19 lesions painted into it (``hrct_triage.phantoms.hybrid``).

A plain typer command function, registered in ``hrct_triage.cli.app`` with one line. The CLI is
the composition root: it joins the phantoms' lesion painter to the worker's reading of a series
(``hrct_triage.worker.training.hybrids``), which do not import each other.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hrct_triage.common.settings import get_settings

# Off a terminal (CI logs, pipes) rich would fold 64-character UIDs at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)

DEFAULT_SEVERITIES = "moderate,severe"


def hybrids_command(
    folder: Annotated[
        Path, typer.Argument(help="a folder of one real CT series, or of a study (rglob)")
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="safetensors with its .sha256 [HRCT_MODEL_PATH, else shipped weights]"),
    ] = None,
    series: Annotated[
        str | None,
        typer.Option("--series", help="SeriesInstanceUID to use [the series the worker picks]"),
    ] = None,
    count: Annotated[int, typer.Option(help="hybrids to build")] = 20,
    severity: Annotated[
        str,
        typer.Option(help="severities taken in turn, comma list of focal, mild, moderate, severe"),
    ] = DEFAULT_SEVERITIES,
    seed: Annotated[int, typer.Option(help="hybrid i uses seed SEED + i")] = 0,
    threshold: Annotated[
        float | None, typer.Option(help="[HRCT_THRESHOLD if set, else the checkpoint's]")
    ] = None,
    trim_fraction: Annotated[
        float | None, typer.Option(help="[HRCT_TRIM_FRACTION if set, else the checkpoint's]")
    ] = None,
    pointing_tolerance_mm: Annotated[
        float, typer.Option(help="lesion mask dilation for the pointing game")
    ] = 10.0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="write every figure to this JSON file")
    ] = None,
    batch_size: int = 32,
    min_slices: Annotated[int, typer.Option(help="as the worker's HRCT_MIN_SLICES")] = 20,
    device: Annotated[
        str | None, typer.Option(help="where the model runs (default: cuda if any, else cpu)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="rich progress bar")] = True,
) -> None:
    """Insert synthetic COVID-19 into a real series and measure what the worker makes of it.

    The series the worker would analyse (or --series) is read as the worker reads it and scored
    plain; then COUNT hybrids (the generator's lesions painted into the worker's filled lung
    mask, in memory only) are scored by the worker's inference path. Reported: each study
    probability and result at the threshold, the fraction of lung slices at or above it,
    sensitivity with its 95% Wilson interval, and the pointing game (on each lesion slice, a hit
    when the heat map's peak lies within --pointing-tolerance-mm of the lesion). Nothing is
    written but the --json file.
    """
    from hrct_triage.phantoms import SEVERITY_MIX, insert_covid
    from hrct_triage.worker.method.checkpoints import default_checkpoint
    from hrct_triage.worker.method.decision import decision_rule
    from hrct_triage.worker.method.model import ModelError, load_model
    from hrct_triage.worker.method.results import NotApplicable
    from hrct_triage.worker.training.hybrids import (
        HybridResult,
        hybrid_plan,
        load_background,
        read_volume,
        report,
        score_hybrid,
        slice_readings,
    )

    severities = [s.strip() for s in severity.split(",") if s.strip()]
    unknown = [s for s in severities if s not in SEVERITY_MIX]
    if unknown or not severities:
        raise typer.BadParameter(
            f"unknown severity {', '.join(unknown) or '(none)'}; use {', '.join(SEVERITY_MIX)}"
        )
    if count < 1:
        raise typer.BadParameter("--count must be at least 1")
    started = time.perf_counter()
    settings = get_settings().analysis
    weights = checkpoint or settings.model_path or default_checkpoint()
    try:
        background = load_background(folder, series_uid=series, min_slices=min_slices)
        model = load_model(weights, allow_untrained=False, device=device)
        rule = decision_rule(
            model.metadata,
            threshold=settings.threshold_override if threshold is None else threshold,
            trim_fraction=settings.trim_fraction_override
            if trim_fraction is None
            else trim_fraction,
        )
        plain, plain_scores = read_volume(background.volume, model, rule, batch_size=batch_size)
    except (NotApplicable, ModelError, ValueError, FileNotFoundError) as exc:
        console.print(f"hybrids: {exc}", style="red")
        raise typer.Exit(1) from exc
    results: list[HybridResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(
        *columns, TimeElapsedColumn(), console=Console(stderr=True), disable=not progress
    ) as bars:
        task = bars.add_task("hybrids", total=count)
        for index, hybrid_seed, name in hybrid_plan(count, severities, seed):
            hybrid = insert_covid(
                background.volume.hu,
                background.lung,
                pixel_spacing=background.pixel_spacing,
                slice_thickness=background.slice_thickness,
                z=background.z,
                seed=hybrid_seed,
                severity=name,
            )
            try:
                results.append(
                    score_hybrid(
                        background,
                        hybrid.hu,
                        hybrid.lesion,
                        index=index,
                        seed=hybrid_seed,
                        severity=hybrid.severity,
                        model=model,
                        rule=rule,
                        tolerance_mm=pointing_tolerance_mm,
                        batch_size=batch_size,
                    )
                )
            except NotApplicable as exc:  # lesions filled every lung slice: say so, go on
                console.print(f"hybrids: hybrid {index} (seed {hybrid_seed}): {exc}", style="red")
            del hybrid
            bars.advance(task)
    document = report(
        background=background,
        model=model,
        checkpoint=weights,
        rule=rule,
        plain=plain,
        hybrids=results,
        seed=seed,
        severities=severities,
        tolerance_mm=pointing_tolerance_mm,
        seconds=time.perf_counter() - started,
    )
    document["plain"]["slices"] = slice_readings(background.volume, plain_scores)
    _print(document)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        console.print(f"figures: {json_path}")


def _numbers(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _print(document: dict[str, Any]) -> None:
    model, series, plain = document["model"], document["series"], document["plain"]
    threshold = document["threshold"]
    console.print(
        f"weights {model['version']} (sha256 {model['sha256'] or 'none'}), "
        f"threshold {threshold:g}, trim {document['trim_fraction']:g}"
    )
    console.print(
        f"series {series['series_uid']} (kernel {series['kernel'] or '-'}, "
        f"{series['slice_thickness_mm']:g} mm, {series['slices']} slices)"
    )
    console.print(
        f"plain series: probability {plain['probability']:.3f} {plain['result']}, "
        f"{plain['slices_above_threshold']} of {plain['lung_slices']} lung slices "
        f"({_percent(plain['fraction_above_threshold'])}) at or above {threshold:g}"
    )
    flagged = [s["instance_number"] for s in plain["slices"] if s["probability"] >= threshold]
    if flagged:
        console.print(f"plain series: InstanceNumber of those slices: {_numbers(flagged)}")
    table = Table(title="Hybrids: the real series with synthetic COVID-19 lesions")
    for name in ("#", "seed", "severity", "lesion slices", "probability", "result"):
        table.add_column(name, justify="left" if name in ("severity", "result") else "right")
    table.add_column("slices >= threshold", justify="right")
    table.add_column("pointing game", justify="right")
    for hybrid in document["hybrids"]:
        game = hybrid["pointing_game"]
        colour = "red" if hybrid["result"] == "POSITIVE" else "green"
        table.add_row(
            str(hybrid["index"]),
            str(hybrid["seed"]),
            hybrid["severity"],
            str(hybrid["lesion_slices"]),
            f"{hybrid['probability']:.3f}",
            f"[{colour}]{hybrid['result']}[/]",
            f"{hybrid['slices_above_threshold']}/{hybrid['lung_slices']}",
            f"{game['hits']}/{game['slices']} ({_percent(game['rate'])})",
        )
    console.print(table)
    summary = document["summary"]
    interval = summary["sensitivity_ci"]
    ci = "" if interval is None else f" (95% CI {interval[0]:.2f}-{interval[1]:.2f}, Wilson)"
    game = summary["pointing_game"]
    console.print(
        f"sensitivity at {threshold:g}: {summary['detected']}/{summary['hybrids']} "
        f"= {_percent(summary['sensitivity'])}{ci}"
    )
    console.print(
        f"pointing game ({document['pointing_tolerance_mm']:g} mm): {game['hits']}/"
        f"{game['slices']} lesion slices = {_percent(game['rate'])}, mean of hybrids "
        f"{_percent(game['mean_of_hybrids'])}"
    )
    console.print(document["note"], style="dim")
    if document["weights_note"]:
        console.print(document["weights_note"], style="dim")
