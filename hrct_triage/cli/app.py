"""``hrct-triage``: the admin CLI and the entry points of every process.

Exit codes: 0 success; 1 a study or operation failed; 2 bad usage (typer); 3 nothing matched.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hrct_triage.cli import admin as ops_admin
from hrct_triage.cli import domain_reference as domain_cli
from hrct_triage.cli import hybrids as hybrids_cli
from hrct_triage.cli import labels as labels_cli
from hrct_triage.cli import operations as ops_cli
from hrct_triage.cli import realism as realism_cli
from hrct_triage.cli import validate as validate_cli
from hrct_triage.common import paper
from hrct_triage.common.errors import HrctTriageError
from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.common.task_queue import CONSUME_ORDER
from hrct_triage.db import queries, worklist
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.models import Study, StudyStatus
from hrct_triage.db.priority import URGENT_MARK
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.worklist_table import render_worklist

app = typer.Typer(
    help="PACS-integrated triage of chest HRCT for COVID-19 pneumonia.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Worklist database administration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
# Off a terminal (CI logs, pipes) rich would fold 64-character UIDs at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)
NOTHING_MATCHED = 3


def _logging(level: str = "INFO", settings: Settings | None = None) -> None:
    """Text or JSON lines (HRCT_LOG_FORMAT); never patient identifiers either way."""
    from hrct_triage.common.logs import configure_logging

    configure_logging(settings or get_settings(), level)


def _sessions(settings: Settings) -> Any:
    return make_sessionmaker(make_engine(settings.resolved_database_url))


def _print_json(document: object) -> None:
    typer.echo(json.dumps(document, indent=2, sort_keys=False))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the worklist database to the newest schema."""
    settings = get_settings()
    upgrade(settings.resolved_database_url)
    console.print("worklist schema is current")


@app.command()
def listen(log_level: str = "INFO") -> None:
    """Run the DICOM listener and the outbox dispatcher."""
    from hrct_triage.listener.scp import Listener

    settings = get_settings()
    _logging(log_level, settings)
    upgrade(settings.resolved_database_url)
    listener = Listener(settings)
    listener.start()
    signalled = _wait_for_signal(listener.failed)
    listener.stop()
    if not signalled:  # a listener process died; the supervisor's restart reconciles
        raise typer.Exit(1)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="analyses at once (one per GPU)")] = 1,
    queue: Annotated[
        str, typer.Option(help="broker queues to consume, comma list, most urgent first")
    ] = ",".join(CONSUME_ORDER),
    pool: Annotated[str, typer.Option(help="Celery pool: prefork or solo")] = "prefork",
    log_level: str = "INFO",
    parent_pid: Annotated[
        int | None,
        typer.Option(hidden=True, help="end when this process ends (set by `up` and `demo`)"),
    ] = None,
) -> None:
    """Run a Celery worker that analyses and delivers studies.

    By default it consumes ``hrct.urgent`` before ``hrct``: on Redis strictly (the urgent queue
    is emptied first), on the embedded broker round robin between the two.
    """
    if parent_pid is not None:  # started by `up` or `demo`: a warm shutdown when they end
        from hrct_triage.common.parent_death import die_with_parent

        die_with_parent(parent_pid)
    from hrct_triage.worker.celery_app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--loglevel",
            log_level,
            "--hostname",
            f"hrct-{os.getpid()}@%h",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ]
    )


@app.command()
def up(
    workers: Annotated[int, typer.Option(help="worker processes to start")] = 1,
    log_level: str = "INFO",
) -> None:
    """Run listener, dispatcher and worker(s) on this machine with the configured services."""
    from hrct_triage.processes import running_gateway

    settings = get_settings()
    _logging(log_level, settings)
    upgrade(settings.resolved_database_url)
    with running_gateway(settings, workers=workers) as listener:
        signalled = _wait_for_signal(listener.failed)
    if not signalled:  # a listener process died; see `listen`
        raise typer.Exit(1)


def _wait_for_signal(failed: threading.Event | None = None) -> bool:
    """Until SIGINT or SIGTERM (True), or until ``failed`` is set (False). A signal wins: the
    listener's other processes get it too and stop on their own."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        if failed is not None and failed.is_set() and not stop.wait(0.5):
            return False
    return True


@app.command("worklist")
def worklist_command(
    status: Annotated[str | None, typer.Option(help="only studies in this state")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many rows")] = None,
    positive: Annotated[
        bool | None,
        typer.Option("--positive/--negative", help="only analysed studies with this result"),
    ] = None,
    since: Annotated[
        datetime | None, typer.Option(help="first instance at or after this (UTC if no zone)")
    ] = None,
    scanner: Annotated[str | None, typer.Option(help="calling AE title of the scanner")] = None,
    accession: Annotated[str | None, typer.Option(help="text in the accession number")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """Studies, urgent first. With a filter, exit 3 when nothing matched."""
    if status is not None and status not in StudyStatus.ALL:
        raise typer.BadParameter(f"unknown status {status!r}; one of {', '.join(StudyStatus.ALL)}")
    filtered = any(v is not None for v in (status, positive, since, scanner, accession))
    with transaction(_sessions(get_settings())) as session:
        rows = queries.worklist_rows(
            session,
            status=status,
            limit=limit,
            positive=positive,
            since=_aware(since),
            scanner=scanner,
            accession=accession,
        )
    if as_json:
        _print_json(rows)
    else:
        console.print(render_worklist(rows))
    if filtered and not rows:
        raise typer.Exit(NOTHING_MATCHED)


def _aware(moment: datetime | None) -> datetime | None:
    """typer parses dates without a zone; the worklist's clock is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@app.command()
def show(
    study_uid: str,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """One study: series, result, outputs and their delivery, timings, events."""
    from hrct_triage.db import stats

    with transaction(_sessions(get_settings())) as session:
        detail = queries.study_detail(session, study_uid)
        timeline = stats.load_timeline(session, study_uid)
    if detail is not None and timeline is not None:
        detail.update(timeline.as_dict())
    if detail is None:
        console.print(f"no study {study_uid}", style="red")
        raise typer.Exit(NOTHING_MATCHED)
    if as_json:
        _print_json(detail)
        return
    console.print_json(
        data={k: v for k, v in detail.items() if k not in ("slice_probabilities", "all_outputs")}
    )


@app.command()
def requeue(
    study_uids: Annotated[list[str] | None, typer.Argument(help="studies to analyse again")] = None,
    status: Annotated[str | None, typer.Option(help="every study in this state")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="only studies first seen after this")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list, change nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="no confirmation for many")] = False,
    urgent: Annotated[
        bool, typer.Option("--urgent", help="publish to the urgent queue (jumps the queue)")
    ] = False,
) -> None:
    """Analyse again and deliver again (new outputs that supersede the old)."""
    if not study_uids and not status:
        raise typer.BadParameter("give study UIDs or --status")
    with transaction(_sessions(get_settings())) as session:
        studies = _select_studies(session, study_uids, status, since)
        if not studies:
            console.print("no study matched")
            raise typer.Exit(NOTHING_MATCHED)
        if dry_run:
            for study in studies:
                console.print(f"would requeue {study.study_uid} ({study.status})")
            return
        if len(studies) > 10 and not yes:
            typer.confirm(f"requeue {len(studies)} studies?", abort=True)
        now = datetime.now(UTC)
        for study in studies:
            detail = f"requeued by operator {URGENT_MARK}" if urgent else "requeued by operator"
            changed = worklist.requeue(session, study, now=now, detail=detail)
            console.print(f"{'requeued' if changed else 'still receiving, left'} {study.study_uid}")


def _select_studies(
    session: Any, uids: list[str] | None, status: str | None, since: datetime | None
) -> list[Study]:
    from sqlalchemy import select

    query = select(Study)
    if uids:
        query = query.where(Study.study_uid.in_(uids))
    if status:
        query = query.where(Study.status == status)
    if since:
        moment = since if since.tzinfo else since.replace(tzinfo=UTC)
        query = query.where(Study.first_instance_at >= moment)
    return list(session.scalars(query.order_by(Study.id)).all())


@app.command()
def resend(study_uids: list[str]) -> None:
    """Deliver the stored outputs of the latest analysis again, where they were owed.

    A shadow result goes to the shadow destinations it was owed to, never to HRCT_DESTINATIONS,
    even after HRCT_MODE became live.
    """
    with transaction(_sessions(get_settings())) as session:
        studies = _select_studies(session, study_uids, None, None)
        if not studies:
            raise typer.Exit(NOTHING_MATCHED)
        for study in studies:
            count = worklist.resend(session, study, now=datetime.now(UTC))
            console.print(f"{study.study_uid}: {_resend_words(study, count)}")


def _resend_words(study: Study, count: int) -> str:
    if study.mode != "shadow":
        return f"{count} deliveries to send again"
    if count:
        return f"shadow result: {count} deliveries to the shadow destinations to send again"
    return (
        "shadow result with no shadow destination (HRCT_SHADOW_DESTINATIONS was empty when it "
        "was analysed): nothing to send; shadow results never go to HRCT_DESTINATIONS"
    )


@app.command()
def echo(
    timeout: Annotated[
        float | None, typer.Option(help="seconds per peer (default HRCT_DELIVERY_TIMEOUT_SECONDS)")
    ] = None,
    capabilities: Annotated[
        bool,
        typer.Option(
            "--capabilities",
            help="propose every SOP class and transfer syntax we send, show what each accepts",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --capabilities: JSON")] = False,
) -> None:
    """C-ECHO every destination in HRCT_DESTINATIONS and HRCT_SHADOW_DESTINATIONS; exit 1 if
    any does not answer.

    With --capabilities: what each accepts of our SR classes and Secondary Capture, and so
    which class the SR would go as; exit 1 if a destination would refuse an output.
    """
    settings = get_settings()
    if not settings.delivery.every_destination_list:
        console.print("no destinations configured (HRCT_DESTINATIONS, HRCT_SHADOW_DESTINATIONS)")
        raise typer.Exit(NOTHING_MATCHED)
    if capabilities:
        from hrct_triage.cli.capabilities import capabilities_command

        code = capabilities_command(settings, timeout, as_json=as_json, console=console)
        raise typer.Exit(code)
    results = ops_admin.echo_all(settings, timeout)
    table = Table(title=f"C-ECHO from {settings.listener.ae_title}")
    for column in ("destination", "result", "status", "seconds"):
        table.add_column(column, overflow="fold")
    for result in results:
        shadow = settings.delivery.is_shadow_only(result.destination)
        table.add_row(
            f"{result.destination}{' (shadow)' if shadow else ''}",
            "[green]ok[/]" if result.ok else "[red]FAILED[/]",
            result.detail,
            f"{result.seconds:.2f}",
        )
    console.print(table)
    if not all(result.ok for result in results):
        raise typer.Exit(1)


@app.command()
def phantom(
    out_dir: Path,
    covid: Annotated[int, typer.Option(help="COVID-19-like studies")] = 2,
    healthy: Annotated[
        int,
        typer.Option(
            "--healthy",
            "--negative",
            help="non-COVID studies: normal lungs, other pneumonia, other findings",
        ),
    ] = 2,
    slices: Annotated[int, typer.Option(help="slices of the thin lung series")] = 64,
    seed: Annotated[int, typer.Option(help="same seed, same files")] = 0,
    thickness: Annotated[
        float, typer.Option(help="SliceThickness (mm) of the thin series, at most 5")
    ] = 1.0,
    kernel: Annotated[
        str,
        typer.Option(
            help="ConvolutionKernel of the thin series: LUNG, BONE, STANDARD, SOFT, DETAIL, "
            "or RANDOM (one drawn per study)"
        ),
    ] = "LUNG",
    matrix: Annotated[int, typer.Option(help="rows and columns of the CT images")] = 512,
    transfer_syntax: Annotated[
        str,
        typer.Option(
            help="of every CT image: explicit, deflated, rle, jpeg-ls, jpeg2000, jpeg-lossless "
            "(process 14 SV1, needs DCMTK dcmcjpeg), jpeg-ls-near (lossy, NEAR 2)"
        ),
    ] = "explicit",
    enhanced: Annotated[
        bool,
        typer.Option("--enhanced", help="thin series as one multi-frame Enhanced CT instance"),
    ] = False,
    randomise_acquisition: Annotated[
        bool,
        typer.Option(
            "--randomise-acquisition",
            help="draw the thin series' kernel, noise, field of view, thickness and matrix per "
            "study (domain randomisation for training sets)",
        ),
    ] = False,
    workers: Annotated[int, typer.Option(help="studies written at once (processes)")] = 1,
    severity_mix: Annotated[
        str | None,
        typer.Option(
            help="shares of the positives' severities, e.g. "
            "focal=0.05,mild=0.5,moderate=0.25,severe=0.2 [default: "
            "focal=0.05,mild=0.3,moderate=0.4,severe=0.25]"
        ),
    ] = None,
    negative_mix: Annotated[
        str | None,
        typer.Option(
            help="shares of the negatives' groups, e.g. "
            "normal=0.4,other_pneumonia=0.2,other_finding=0.4; a confounder's name (nodule, "
            "mass, atelectasis, plate_atelectasis, effusion, fibrosis, bronchiectasis, "
            "emphysema, mosaic, motion) forces that one [default: the generator's own draw]"
        ),
    ] = None,
) -> None:
    """Write synthetic chest CT studies, one folder each, and labels.csv."""
    from rich.progress import Progress

    from hrct_triage.phantoms import (
        parse_negative_mix,
        parse_severity_mix,
        write_phantom_studies,
    )

    try:
        mix = None if severity_mix is None else parse_severity_mix(severity_mix)
        negatives = None if negative_mix is None else parse_negative_mix(negative_mix)
        with Progress(console=console) as progress:
            task = progress.add_task("phantoms", total=covid + healthy)
            studies = write_phantom_studies(
                out_dir,
                covid=covid,
                healthy=healthy,
                slices=slices,
                seed=seed,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
                thickness=thickness,
                kernel=kernel,
                transfer_syntax=transfer_syntax,
                enhanced=enhanced,
                workers=workers,
                severity_mix=mix,
                negative_mix=negatives,
                matrix=matrix,
                randomise_acquisition=randomise_acquisition,
            )
    except ValueError as exc:  # checked before any file is written
        raise typer.BadParameter(str(exc)) from exc
    console.print(f"{len(studies)} studies in {out_dir} (labels in {out_dir / 'labels.csv'})")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="where phantoms, spool and PACS files go")] = Path(
        "demo-out"
    ),
    covid: int = 2,
    healthy: int = 2,
    slices: int = 64,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the results")] = 600,
) -> None:
    """Phantoms -> listener -> worker -> SR and heat maps at a PACS stand-in (embedded)."""
    from hrct_triage.demo.run import run_demo

    raise typer.Exit(
        run_demo(
            console, out_dir=out_dir, covid=covid, healthy=healthy, slices=slices, timeout=timeout
        )
    )


# --- training and evaluation ----------------------------------------------------------------
# torch is imported inside the commands so that the rest of the CLI stays quick to start.
# Multi-GPU: `torchrun --nproc-per-node N -m hrct_triage train ...` (one process per GPU).


def _training_logging(level: str) -> None:
    """Log through rich so that log lines appear above the progress bars, not through them.

    Like ``_logging``, a no-op when logging is already set up (by a test runner, say).
    """
    from rich.logging import RichHandler

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="folder of DICOM studies, one folder each")],
    labels: Annotated[Path | None, typer.Option(help="labels CSV [DATA_DIR/labels.csv]")] = None,
    output_dir: Annotated[Path, typer.Option(help="split, state, history, cache")] = Path(
        "runs/train"
    ),
    checkpoint: Annotated[
        Path | None, typer.Option(help="best weights [OUTPUT_DIR/densenet121.safetensors]")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="[OUTPUT_DIR/cache]")] = None,
    epochs: Annotated[int, typer.Option(help="paper: 20")] = 20,
    batch_size: Annotated[int, typer.Option(help="global batch, paper: 32")] = 32,
    learning_rate: Annotated[
        float, typer.Option("--learning-rate", "--lr", help="initial; paper silent")
    ] = 0.01,
    momentum: Annotated[float, typer.Option(help="SGD momentum, paper: 0.9")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="paper: none")] = 0.0,
    step_size: Annotated[int, typer.Option(help="StepLR epochs, paper: 5")] = 5,
    gamma: Annotated[float, typer.Option(help="StepLR factor; paper silent")] = 0.1,
    flip_probability: Annotated[float, typer.Option(help="per axis, random flips")] = 0.5,
    negative_stride: Annotated[int, typer.Option(help="every n-th lung slice of healthy")] = 3,
    validation_fraction: Annotated[
        float, typer.Option(help="patients per class; paper 20/295")
    ] = 20 / 295,
    test_fraction: Annotated[float, typer.Option(help="patients per class; paper 140/295")] = (
        140 / 295
    ),
    seed: Annotated[int, typer.Option(help="split, initial weights, shuffling, flips")] = 0,
    input_size: Annotated[int, typer.Option(help="pixels; the paper's")] = paper.INPUT_SIZE,
    window_width: Annotated[float, typer.Option(help="HU; the paper's")] = paper.LUNG_WINDOW_WIDTH,
    window_level: Annotated[float, typer.Option(help="HU; the paper's")] = paper.LUNG_WINDOW_LEVEL,
    threshold: Annotated[
        float, typer.Option(help="stored in the checkpoint; the paper's")
    ] = paper.THRESHOLD,
    trim_fraction: Annotated[
        float, typer.Option(help="dropped at each end, stored in the checkpoint; the paper's")
    ] = paper.TRIM_FRACTION,
    min_slices: Annotated[int, typer.Option(help="smallest series analysed")] = 20,
    pretrained: Annotated[
        Path | None, typer.Option(help="local ImageNet DenseNet-121 weights (no download)")
    ] = None,
    freeze_through: Annotated[
        str,
        typer.Option(
            help="none, denseblock1 or denseblock2: keep those first stages of the --pretrained "
            "weights (CPU fine-tuning, 2-3x faster steps)"
        ),
    ] = "none",
    resume: Annotated[Path | None, typer.Option(help="a state.pt to continue from")] = None,
    model_version: Annotated[str | None, typer.Option(help="[DATE][-phantom]")] = None,
    trained_on: Annotated[str | None, typer.Option(help="data description for the card")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes")] = 0,
    preprocess_workers: Annotated[
        int, typer.Option(help="processes decoding studies into the cache (per rank)")
    ] = 1,
    device: Annotated[str | None, typer.Option(help="[cuda:LOCAL_RANK if any, else cpu]")] = None,
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            "--cuda-graphs", help="replay each step as a CUDA graph (one GPU, no torchrun)"
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="rich progress bars")] = True,
    log_level: str = "INFO",
) -> None:
    """Train DenseNet-121 with the paper's recipe; runs under torchrun for several GPUs."""
    from hrct_triage.worker.training.train import TrainConfig
    from hrct_triage.worker.training.train import train as run_training

    _training_logging(log_level)
    try:
        config = TrainConfig(
            data_dir=data_dir,
            labels=labels,
            output_dir=output_dir,
            checkpoint=checkpoint,
            cache_dir=cache_dir,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            step_size=step_size,
            gamma=gamma,
            flip_probability=flip_probability,
            negative_stride=negative_stride,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            seed=seed,
            input_size=input_size,
            window_width=window_width,
            window_level=window_level,
            threshold=threshold,
            trim_fraction=trim_fraction,
            min_slices=min_slices,
            pretrained=pretrained,
            freeze_through=freeze_through,
            resume=resume,
            model_version=model_version,
            trained_on=trained_on,
            workers=workers,
            preprocess_workers=preprocess_workers,
            device=device,
            cuda_graphs=cuda_graphs,
            progress=progress,
        )
        result = run_training(config, console=Console(stderr=True))
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"train: {exc}", style="red")
        raise typer.Exit(1) from exc
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(
            f"best epoch {result.best_epoch}: {result.checkpoint} (sha256 {result.sha256})"
        )


@app.command()
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="folder of DICOM studies, one folder each")],
    checkpoint: Annotated[Path, typer.Option(help="safetensors with its .sha256")],
    labels: Annotated[Path | None, typer.Option(help="labels CSV [DATA_DIR/labels.csv]")] = None,
    output_dir: Annotated[Path, typer.Option(help="report.md, report.json, PNGs")] = Path(
        "runs/evaluate"
    ),
    split: Annotated[
        list[str] | None, typer.Option(help="set(s) to report, e.g. validation, test [all]")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="[HRCT_THRESHOLD if set, else the checkpoint's]")
    ] = None,
    trim_fraction: Annotated[
        float | None, typer.Option(help="[HRCT_TRIM_FRACTION if set, else the checkpoint's]")
    ] = None,
    reader: Annotated[Path | None, typer.Option(help="CSV: study_uid,reader")] = None,
    ci_method: Annotated[str, typer.Option(help="delong or bootstrap")] = "delong",
    confidence: float = 0.95,
    bootstrap: Annotated[int, typer.Option(help="bootstrap replicates")] = 2000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    pointing_tolerance_mm: Annotated[float, typer.Option(help="lesion mask dilation")] = 10.0,
    batch_size: int = 32,
    min_slices: int = 20,
    device: Annotated[str | None, typer.Option(help="[cuda if any, else cpu]")] = None,
    progress: Annotated[bool, typer.Option(help="rich progress bar")] = True,
    log_level: str = "INFO",
) -> None:
    """Subject-level evaluation: Table 1 and 2 of the paper, ROC and threshold plots, JSON.

    The decision rule is the worker's: an option, else the setting if set, else the checkpoint's.
    """
    from rich.markdown import Markdown

    from hrct_triage.worker.method.model import ModelError
    from hrct_triage.worker.training.evaluate import EvaluateConfig
    from hrct_triage.worker.training.evaluate import evaluate as run_evaluation

    if ci_method not in ("delong", "bootstrap"):
        raise typer.BadParameter("--ci-method must be delong or bootstrap")
    _training_logging(log_level)
    settings = get_settings()
    try:
        config = EvaluateConfig(
            data_dir=data_dir,
            checkpoint=checkpoint,
            labels=labels,
            output_dir=output_dir,
            splits=tuple(split or ()),
            threshold=settings.analysis.threshold_override if threshold is None else threshold,
            trim_fraction=settings.analysis.trim_fraction_override
            if trim_fraction is None
            else trim_fraction,
            reader=reader,
            ci_method="bootstrap" if ci_method == "bootstrap" else "delong",
            confidence=confidence,
            n_bootstrap=bootstrap,
            seed=seed,
            pointing_tolerance_mm=pointing_tolerance_mm,
            batch_size=batch_size,
            min_slices=min_slices,
            device=device,
            progress=progress,
        )
        run_evaluation(config, console=Console(stderr=True))
    except (ValueError, FileNotFoundError, ModelError) as exc:
        console.print(f"evaluate: {exc}", style="red")
        raise typer.Exit(1) from exc
    console.print(Markdown((output_dir / "report.md").read_text(encoding="utf-8")))
    console.print(f"report: {output_dir / 'report.md'} and {output_dir / 'report.json'}")


app.command("cancel")(ops_admin.cancel_command)
app.command("purge")(ops_admin.purge_command)
app.command("doctor")(ops_admin.doctor_command)
# Operations commands live in their own module; registered here so `hrct-triage --help` lists them.
app.command("stats")(ops_cli.stats_command)
app.command("web")(ops_cli.web_command)
app.command("realism")(realism_cli.realism_command)
app.command("hybrids")(hybrids_cli.hybrids_command)
app.add_typer(labels_cli.app, name="labels")
app.command("validate")(validate_cli.validate_command)
app.command("domain-reference")(domain_cli.domain_reference_command)
app.command("domain-score")(domain_cli.domain_score_command)


def main() -> None:
    """The ``hrct-triage`` console entry point: an error of ours ends the command with its
    message and exit status 1 instead of a traceback; anything else is a bug and keeps one."""
    try:
        app()
    except HrctTriageError as error:
        console.print(f"hrct-triage: {error}", style="red")
        sys.exit(1)
