"""The per-study input statistics and acquisition the worker records for drift watch and the domain
guard: computed on a phantom's lung field, sensitive to noise, and stored on the worklist row by
the real triage task."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest

from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.db import worklist
from hrct_triage.db.models import Study, StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.listener import spool
from hrct_triage.listener.reconcile import reconcile
from hrct_triage.worker.jobs import WorkerContext, run_triage
from hrct_triage.worker.method.input_statistics import HISTOGRAM_EDGES, input_statistics
from hrct_triage.worker.method.model import (
    CheckpointMetadata,
    build_densenet121,
    load_model,
    save_checkpoint,
)
from hrct_triage.worker.method.preprocess import lung_slices
from hrct_triage.worker.method.series import select_series
from hrct_triage.worker.method.volume import CTVolume, load_volume

SCALARS = (
    "lung_hu_mean",
    "lung_hu_sd",
    "lung_hu_p10",
    "lung_hu_p50",
    "lung_hu_p90",
    "noise_hu",
    "lung_slices",
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One healthy phantom of 24 thin slices at matrix 256."""
    from hrct_triage.phantoms import write_phantom_studies

    out = tmp_path_factory.mktemp("stats-phantom")
    write_phantom_studies(out, covid=0, healthy=1, slices=24, seed=21, matrix=256)
    return out / "healthy_001"


def _volume(folder: Path) -> CTVolume:
    return load_volume(select_series(sorted(folder.rglob("*.dcm")), min_slices=16))


def _lung(volume: CTVolume) -> np.ndarray:
    return np.flatnonzero(lung_slices(volume.hu, pixel_spacing=volume.pixel_spacing))


def test_statistics_describe_the_lung_field_and_follow_the_noise(phantom: Path) -> None:
    # given a phantom chest volume and its lung slices
    volume = _volume(phantom)
    lung = _lung(volume)
    # when its statistics are computed
    stats = input_statistics(
        volume.hu, lung, pixel_spacing=volume.pixel_spacing, slice_spacing=volume.slice_spacing
    )
    # then every scalar of the contract is there, and the lung looks like aerated lung
    assert all(isinstance(stats[key], int | float) for key in SCALARS)
    assert stats["lung_slices"] == lung.size
    # the lung's head-to-foot extent counts from the first to the last lung slice, in mm
    extent = (lung.max() - lung.min() + 1) * volume.slice_spacing
    assert stats["lung_extent_mm"] == pytest.approx(extent, abs=0.05)
    assert input_statistics(volume.hu, lung[:5])["lung_extent_mm"] is None  # spacing unknown
    assert -1024 < stats["lung_hu_p10"] < stats["lung_hu_p50"] < stats["lung_hu_p90"]
    assert -950 < stats["lung_hu_p50"] < -600
    assert len(stats["lung_hu_histogram"]) == len(HISTOGRAM_EDGES) - 1
    assert sum(stats["lung_hu_histogram"]) == pytest.approx(1.0, abs=1e-3)
    # and when 80 HU of white noise is added, the noise estimate rises by about that much
    rng = np.random.default_rng(0)
    noisy = volume.hu + rng.normal(0.0, 80.0, volume.hu.shape).astype(np.float32)
    loud = input_statistics(noisy, lung, pixel_spacing=volume.pixel_spacing)
    added = float(np.sqrt(loud["noise_hu"] ** 2 - stats["noise_hu"] ** 2))
    assert 60.0 < added < 100.0


def test_statistics_refuse_an_input_without_lung_slices(phantom: Path) -> None:
    volume = _volume(phantom)
    with pytest.raises(ValueError, match="no lung slices"):
        input_statistics(volume.hu, [], pixel_spacing=volume.pixel_spacing)
    with pytest.raises(ValueError, match="rows, columns"):
        input_statistics(volume.hu[0], [0])


def test_the_worker_records_statistics_and_acquisition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phantom: Path, database_url: str
) -> None:
    # given a queued phantom study and seeded weights
    monkeypatch.chdir(tmp_path)
    for name in ("HRCT_DESTINATIONS", "HRCT_MODEL_PATH", "HRCT_MODE"):
        monkeypatch.delenv(name, raising=False)
    url = database_url  # migrated, SQLite or PostgreSQL
    monkeypatch.setenv("HRCT_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HRCT_DATABASE_URL", url)
    get_settings.cache_clear()
    checkpoint = tmp_path / "seeded.safetensors"
    metadata = CheckpointMetadata(name="n", version="9.9.9-stats", trained_on="-", created="")
    save_checkpoint(checkpoint, build_densenet121(seed=3), metadata=metadata)
    settings = Settings(model_path=checkpoint, heatmaps=1, min_slices=16)
    paths = sorted(phantom.rglob("*.dcm"))
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        folder = spool.instance_dir(settings.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        spool.write_instance(folder, ds.SOPInstanceUID, b"", path.read_bytes())
    sessions = make_sessionmaker(make_engine(url))
    assert reconcile(settings.spool_dir, sessions).adopted == len(paths)
    with transaction(sessions) as session:
        later = datetime.now(UTC) + timedelta(seconds=1)
        (study_id,) = worklist.complete_ready_studies(session, quiet_seconds=0, now=later)
    # when the worker runs the triage task
    model = load_model(checkpoint, allow_untrained=False, device="cpu")
    context = WorkerContext(settings, sessions, lambda: model, "w1")
    assert run_triage(context, study_id) == StudyStatus.DONE
    # then the row holds the statistics and the acquisition of the analysed thin series
    with transaction(sessions) as session:
        study = session.get(Study, study_id)
        assert study is not None
        stats, station = study.input_stats, study.station_name
        kernel, thickness = study.convolution_kernel, study.slice_thickness
    assert stats is not None and all(isinstance(stats[key], int | float) for key in SCALARS)
    assert (station, kernel, thickness) == ("PHANTOM01", "LUNG", 1.0)
