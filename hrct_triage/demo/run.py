"""``hrct-triage demo``: the whole path on one machine, with nothing but this package installed.

Phantom studies are sent over DICOM to the listener as a scanner would; a Celery worker on the
embedded broker analyses them; the SR and heat maps land at a PACS stand-in; the worklist prints.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from hrct_triage.common.settings import (
    AnalysisSettings,
    DeliverySettings,
    ListenerSettings,
    Settings,
)
from hrct_triage.db import queries
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.models import StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.demo.pacs import PacsStandIn
from hrct_triage.demo.scanner import send_folder
from hrct_triage.processes import running_gateway
from hrct_triage.worklist_table import render_worklist

TERMINAL = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_APPLICABLE)
# Short quiet period: the demo's "scanner" sends each study in one association.
DEMO_QUIET_SECONDS = 2.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_demo(
    console: Console, *, out_dir: Path, covid: int, healthy: int, slices: int, timeout: float
) -> int:
    from hrct_triage.phantoms import write_phantom_studies
    from hrct_triage.worker.method.checkpoints import default_checkpoint

    started = time.monotonic()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pacs = PacsStandIn(out_dir / "pacs")
    pacs_port = pacs.start()
    checkpoint = default_checkpoint()
    settings = Settings(
        data_dir=out_dir / "var",
        database_url=None,
        broker_url=None,
        listener=ListenerSettings(
            port=free_port(),
            quiet_seconds=DEMO_QUIET_SECONDS,
            metrics_port=0,  # the demo must not need (or take) the production metrics port
            poll_seconds=0.5,
        ),
        delivery=DeliverySettings(destinations=[f"{pacs.ae_title}@127.0.0.1:{pacs_port}"]),
        analysis=AnalysisSettings(model_path=checkpoint, allow_untrained=checkpoint is None),
    )
    if checkpoint is None:
        console.print(
            "[bold yellow]No trained checkpoint is installed: the demo runs an "
            "UNTRAINED DenseNet-121; its probabilities mean nothing.[/]"
        )
    upgrade(settings.resolved_database_url)
    console.print(f"making {covid + healthy} phantom studies ({slices} thin slices each)")
    # a study takes seconds of one core: one process per core
    workers = max(1, min(covid + healthy, os.cpu_count() or 1))
    studies = write_phantom_studies(
        out_dir / "phantoms", covid=covid, healthy=healthy, slices=slices, seed=2026,
        workers=workers,
    )  # fmt: skip
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    try:
        with running_gateway(settings, quiet_workers=True):
            total = sum(len(list(s.folder.rglob("*.dcm"))) for s in studies)
            with Progress(console=console) as progress:
                sending = progress.add_task("scanner -> listener (C-STORE)", total=total)
                for study in studies:
                    send_folder(
                        study.folder,
                        host="127.0.0.1",
                        port=settings.listener.port,
                        called_ae=settings.listener.ae_title,
                        progress=lambda n: progress.advance(sending, n),
                    )
                waiting = progress.add_task("triage", total=len(studies))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    with transaction(sessions) as session:
                        rows = queries.worklist_rows(session)
                    finished = sum(row["status"] in TERMINAL for row in rows)
                    progress.update(waiting, completed=finished)
                    if finished == len(studies):
                        break
                    time.sleep(0.5)
    finally:
        pacs.stop()
    with transaction(sessions) as session:
        rows = queries.worklist_rows(session)
    console.print(render_worklist(rows))
    labels = {s.study_uid: s.label for s in studies}
    for row in rows:
        console.print(
            f"{row['study_uid']} (phantom truth: {labels.get(row['study_uid'], '?')}) "
            f"-> {row['status']}"
        )
    for study_uid, files in pacs.received().items():
        console.print(
            f"PACS stand-in holds {len(files)} objects for {study_uid} in "
            f"{files[0].parent if files else ''}"
        )
    elapsed = time.monotonic() - started
    ok = len(rows) == len(studies) and all(row["status"] == StudyStatus.DONE for row in rows)
    console.print(f"demo {'finished' if ok else 'FAILED'} in {elapsed:.0f} s")
    return 0 if ok else 1
