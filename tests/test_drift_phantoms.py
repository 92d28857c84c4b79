"""A drift alarm raised by real inputs: phantom studies made by the phantom tool, analysed by the
worker's own triage job with the shipped checkpoint, so their input statistics are the worker's.

The checkpoint reference is written from a first batch (1 mm LUNG, as the reference of a
checkpoint would be); then, on another worklist, a second LUNG batch (other patients) and a batch
sent as BONE with added noise arrive from one scanner. The BONE batch must alarm on its noise, in
the log and in ``stats --drift``; the unchanged LUNG batch must not. Batches are six studies at
128 x 128 (a few CPU-minutes in all), so the test lowers the minimum to six studies and the
p-value bar to 0.01 (six against six, fully separated, gives p = 0.002). At 128 x 128 the
worker's noise estimate of these phantoms reads 100-180 HU (lung texture counts as noise at that
resolution), and 60 HU of added noise moved it too little to separate six from six; the batch
gets 250 HU, a protocol gone badly wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import typer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from hrct_triage.cli import operations as ops_cli
from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.db import worklist
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.models import Study, StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.listener.drift_watch import DriftWatch
from hrct_triage.phantoms import write_phantom_studies
from hrct_triage.worker.jobs import WorkerContext, run_triage
from hrct_triage.worker.method.checkpoints import default_checkpoint
from hrct_triage.worker.method.model import load_model

SCANNER = "CT_ER1"
BATCH = 6
ADDED_NOISE_HU = 250.0
DRIFT_SETTINGS: dict[str, Any] = {"drift_min_studies": BATCH, "drift_alpha": 0.01}


def _phantoms(out: Path, *, seed: int, kernel: str) -> list[Path]:
    write_phantom_studies(
        out,
        covid=BATCH // 2,
        healthy=BATCH - BATCH // 2,
        slices=30,
        seed=seed,
        matrix=128,
        kernel=kernel,
    )
    return sorted(p for p in out.iterdir() if p.is_dir())


def _add_noise(study: Path, rng: np.random.Generator) -> None:
    """White noise of ``ADDED_NOISE_HU`` on every image of the thin series, in place."""
    for path in sorted(study.glob("CT_02_*.dcm")):
        ds = pydicom.dcmread(path)
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        stored = ds.pixel_array.astype(np.float64)
        stored += rng.normal(0.0, ADDED_NOISE_HU / slope, stored.shape)
        info = np.iinfo(ds.pixel_array.dtype)
        ds.PixelData = (
            np.clip(np.rint(stored), info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
        )
        ds.save_as(path)


def _receive(sessions: sessionmaker[Session], studies: list[Path], now: datetime) -> list[int]:
    """Every file recorded as the listener records it, from ``SCANNER``; the studies completed."""
    with transaction(sessions) as session:
        for study in studies:
            for path in sorted(study.glob("*.dcm")):
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                facts = worklist.InstanceFacts(
                    study_uid=ds.StudyInstanceUID,
                    series_uid=ds.SeriesInstanceUID,
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                    modality=ds.get("Modality"),
                    series_number=ds.get("SeriesNumber"),
                    accession_number=ds.get("AccessionNumber"),
                    calling_ae=SCANNER,
                )
                worklist.record_instance(session, facts, association_id=None, now=now)
    with transaction(sessions) as session:
        return worklist.complete_ready_studies(
            session, quiet_seconds=0, now=now + timedelta(seconds=1)
        )


def _worklist(folder: Path) -> tuple[str, sessionmaker[Session]]:
    url = f"sqlite:///{folder / 'worklist.sqlite'}"
    upgrade(url)
    return url, make_sessionmaker(make_engine(url))


def _triage(
    settings: Settings, sessions: sessionmaker[Session], model: Any, ids: list[int]
) -> None:
    context = WorkerContext(settings, sessions, lambda: model, "drift-test")
    for study_id in ids:
        assert run_triage(context, study_id) == StudyStatus.DONE


@pytest.mark.timeout(1800)  # 18 phantom studies made and analysed on the CPU: minutes
def test_a_bone_kernel_with_added_noise_raises_the_drift_alarm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = default_checkpoint()
    assert checkpoint is not None, "the shipped checkpoint is part of the checkout"
    model = load_model(checkpoint, allow_untrained=False, device="cpu")
    now = datetime.now(UTC)
    model_path = tmp_path / "model.safetensors"  # where the drift watch looks for the reference
    # given a reference written from a LUNG batch analysed by the worker
    _, reference_sessions = _worklist(tmp_path / "reference")
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "reference",
        min_slices=16,
        heatmaps=0,
        model_path=model_path,
        **DRIFT_SETTINGS,
    )
    ids = _receive(reference_sessions, _phantoms(tmp_path / "a", seed=101, kernel="LUNG"), now)
    _triage(settings, reference_sessions, model, ids)
    with transaction(reference_sessions) as session:
        rows = session.scalars(select(Study)).all()
        studies = [
            {"input_stats": s.input_stats, "probability": s.probability, "domain_score": None}
            for s in rows
        ]
    assert len(studies) == BATCH and all(s["input_stats"] for s in studies)
    (tmp_path / "model.domain.json").write_text(json.dumps({"studies": studies}))
    # and another LUNG batch and a BONE batch with added noise, analysed on the site's worklist
    url, sessions = _worklist(tmp_path / "site")
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "site",
        min_slices=16,
        heatmaps=0,
        model_path=model_path,
        **DRIFT_SETTINGS,
    )
    lung = _phantoms(tmp_path / "lung", seed=202, kernel="LUNG")
    bone = _phantoms(tmp_path / "bone", seed=303, kernel="BONE")
    rng = np.random.default_rng(0)
    for study in bone:
        _add_noise(study, rng)
    _triage(settings, sessions, model, _receive(sessions, [*lung, *bone], now))
    # when the listener's drift check runs
    with caplog.at_level(logging.WARNING, logger="hrct.drift"):
        report = DriftWatch(settings, sessions).run_once()
    # then the BONE group alarms on its noise, against the checkpoint reference; LUNG does not
    groups = {g.key.kernel: g for g in report.groups}
    assert set(groups) == {"LUNG", "BONE"}
    assert all(g.recent == BATCH for g in groups.values())
    assert groups["LUNG"].alarms == [], [q.quantity for q in groups["LUNG"].alarms]
    assert "noise_hu" in [q.quantity for q in groups["BONE"].alarms]
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("kernel BONE" in line for line in lines)
    noise = [line for line in lines if ": noise_hu KS D=" in line]
    assert len(noise) == 1
    assert noise[0].startswith(f"drift alarm: scanner {SCANNER}, station ")
    assert "checkpoint reference model.domain.json" in noise[0]
    # and stats --drift prints the same alarm
    for name, value in {
        "HRCT_DATABASE_URL": url,
        "HRCT_MODEL_PATH": str(model_path),
        "HRCT_DRIFT_MIN_STUDIES": str(BATCH),
        "HRCT_DRIFT_ALPHA": "0.01",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    cli = typer.Typer()
    cli.command("stats")(ops_cli.stats_command)
    cli.command("noop")(lambda: None)
    printed = CliRunner().invoke(cli, ["stats", "--drift", "--json"])
    assert printed.exit_code == 0, printed.output
    document = json.loads(printed.output)
    assert {(a["group"]["kernel"], a["quantity"]) for a in document["alarms"]} >= {
        ("BONE", "noise_hu")
    }
    assert {a["group"]["kernel"] for a in document["alarms"]} == {"BONE"}
    tables = CliRunner().invoke(cli, ["stats", "--drift"])
    assert tables.exit_code == 0, tables.output
    assert "drift alarm: scanner CT_ER1" in tables.output and "noise_hu KS D=" in tables.output
    get_settings.cache_clear()
