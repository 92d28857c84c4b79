"""Tests of ``hrct-triage hybrids``: synthetic COVID-19 lesions in one series, read as the worker
reads a study (``worker.training.hybrids``, ``worker.training.pointing``).

A small phantom (128 x 128, 20 slices of 5 mm, normal lungs) stands in for the real series: the
test needs no real data, and the command must not care where the background came from. The
shipped weights run for real; nothing is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from hrct_triage.cli.app import app
from hrct_triage.common.diagnostic_metrics import proportion_interval
from hrct_triage.phantoms import insert_covid, write_phantom_studies
from hrct_triage.worker.method.checkpoints import DEMO_CHECKPOINT
from hrct_triage.worker.method.inference import cam_image
from hrct_triage.worker.method.model import file_sha256, load_model
from hrct_triage.worker.method.pipeline import analyse_study
from hrct_triage.worker.training.dataset import study_paths
from hrct_triage.worker.training.hybrids import load_background
from hrct_triage.worker.training.pointing import pointing_game, pointing_hit
from tests.helpers.checkpoints import shipped_model_version


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One normal chest, its thin series 5 mm LUNG kernel as the real development series is."""
    out = tmp_path_factory.mktemp("hybrids")
    (study,) = write_phantom_studies(
        out, covid=0, healthy=1, slices=20, seed=3, thickness=5.0, kernel="LUNG", matrix=128,
        negative_mix={"normal": 1.0},
    )  # fmt: skip
    return study.folder


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


# --- the pointing game ---------------------------------------------------------------------


def test_a_peak_within_the_tolerance_of_the_lesion_is_a_hit() -> None:
    # given a lesion of 3 x 3 pixels at rows 20-22, columns 20-22
    lesion = np.zeros((64, 64), dtype=bool)
    lesion[20:23, 20:23] = True

    def heat_peaking_at(row: int, column: int) -> np.ndarray:
        heat = np.zeros((64, 64), dtype=np.float32)
        heat[row, column] = 1.0
        return heat

    def hit(heat: np.ndarray, spacing: float, tolerance: float = 10.0) -> bool:
        return pointing_hit(heat, lesion, pixel_spacing=(spacing, spacing), tolerance_mm=tolerance)

    # a peak inside the lesion is a hit, with any tolerance
    assert hit(heat_peaking_at(21, 21), 1.0, tolerance=0.0)
    # a peak 8 pixels from its edge is a hit at 1 mm pixels (8 mm) but not at 2 mm (16 mm)
    assert hit(heat_peaking_at(21, 30), 1.0)
    assert not hit(heat_peaking_at(21, 30), 2.0)
    # the distance is Euclidean in mm: 8 px down and 8 px right of the corner is 11.3 mm
    assert not hit(heat_peaking_at(30, 30), 1.0)
    assert hit(heat_peaking_at(30, 30), 1.0, tolerance=11.4)
    # a peak in the far corner is a miss; an empty mask is never hit
    assert not hit(heat_peaking_at(63, 63), 1.0)
    empty = np.zeros_like(lesion)
    assert not pointing_hit(
        heat_peaking_at(21, 21), empty, pixel_spacing=(1.0, 1.0), tolerance_mm=10.0
    )


def _chest_slice() -> np.ndarray:
    """64 x 64 pixels of 5 mm: air around a soft-tissue body holding two aerated lungs."""
    rows, columns = np.mgrid[0:64, 0:64].astype(np.float64)
    hu = np.full((64, 64), -1000.0, dtype=np.float32)
    hu[((rows - 32) / 26) ** 2 + ((columns - 32) / 30) ** 2 <= 1] = 40.0
    for centre in (20, 44):
        hu[((rows - 32) / 16) ** 2 + ((columns - centre) / 9) ** 2 <= 1] = -850.0
    return hu


def test_the_pointing_game_reads_the_cam_where_the_worker_draws_it() -> None:
    # given three slices of one chest, a lesion in the right lung (image left) of the first two
    hu = np.stack([_chest_slice()] * 3)
    lesion = np.zeros((64, 64), dtype=bool)
    lesion[30:35, 18:23] = True
    # and raw 7 x 7 CAMs as the network gives them (a cell is about 9 pixels):
    cams = np.zeros((3, 7, 7), dtype=np.float32)
    cams[0, 3, 2] = 5.0  # slice 0: strongest over the lesion,
    cams[0, 0, 0] = 10.0  # ...and stronger still in the air outside the body
    cams[1, 3, 4] = 5.0  # slice 1: over the other lung
    cams[2, 3, 2] = 5.0  # slice 2: over the lesion's place, but it has no lesion
    masks = {0: lesion, 1: lesion}
    # when the game is played on the three lung slices
    outcome = pointing_game(hu, [0, 1, 2], cams, masks, pixel_spacing=(5.0, 5.0))
    # then the heat map inside the lung field points at the lesion on slice 0 and away on 1,
    # and slice 2 does not play
    assert outcome == {0: True, 1: False}
    # (over the whole image, slice 0's peak would be in the air: the lung field decides)
    whole = cam_image(cams[0], rows=64, columns=64)
    peak = np.unravel_index(int(np.argmax(whole)), whole.shape)
    assert not pointing_hit(whole, lesion, pixel_spacing=(5.0, 5.0), tolerance_mm=10.0)
    assert hu[0][peak] == -1000.0


def test_the_sensitivity_interval_is_wilsons() -> None:
    # all of 20 found: Wilson's lower bound is 0.839 (the normal approximation would give 1-1)
    low, high = proportion_interval(20, 20) or (0.0, 0.0)
    assert (round(low, 3), high) == (0.839, 1.0)
    low, high = proportion_interval(3, 4) or (0.0, 0.0)
    assert (round(low, 3), round(high, 3)) == (0.301, 0.954)
    assert proportion_interval(0, 0) is None


# --- hybrids of one series -----------------------------------------------------------------


def test_a_hybrid_changes_the_series_only_inside_its_lungs(background: Path) -> None:
    # given the series the worker picks from the phantom study (the thin LUNG series)
    series = load_background(background)
    assert (series.kernel, series.slice_thickness, series.volume.shape) == (
        "LUNG",
        5.0,
        (20, 128, 128),
    )
    # when COVID-19 is inserted into the worker's filled lung mask
    hybrid = insert_covid(
        series.volume.hu,
        series.lung,
        pixel_spacing=series.pixel_spacing,
        slice_thickness=series.slice_thickness,
        z=series.z,
        seed=1,
        severity="severe",
    )
    # then there are lesions, inside the lungs, and the series is untouched outside them
    assert hybrid.lesion.any()
    assert not (hybrid.lesion & ~series.lung).any()
    outside = ~series.lung
    assert np.array_equal(hybrid.hu[outside], series.volume.hu[outside])
    assert float(np.mean(hybrid.hu[hybrid.lesion] - series.volume.hu[hybrid.lesion])) > 150.0


def test_hybrids_command_scores_the_series_and_its_hybrids(
    background: Path, tmp_path: Path
) -> None:
    # given the phantom's folder, and where the figures go
    before = _files(background.parent)
    report = tmp_path / "figures" / "hybrids.json"
    # when two hybrids are made and scored with the shipped weights
    args = ["hybrids", str(background), "--count", "2", "--seed", "5", "--json", str(report)]
    result = CliRunner().invoke(app, [*args, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    # then the figures name the weights, the series and the rule applied
    assert document["model"]["version"] == shipped_model_version()
    assert document["model"]["sha256"] == file_sha256(DEMO_CHECKPOINT)
    assert document["threshold"] == 0.8 and document["trim_fraction"] == 0.1
    assert document["pointing_tolerance_mm"] == 10.0
    assert "never used for training" in document["note"]
    assert document["phantom_trained_weights"] is True and document["weights_note"]
    model = load_model(DEMO_CHECKPOINT, allow_untrained=False)
    analysis, _ = analyse_study("study", study_paths(background), model)
    assert document["series"]["series_uid"] == analysis.series_uid
    # and the plain series is scored exactly as the worker scores the study
    plain = document["plain"]
    assert plain["probability"] == pytest.approx(analysis.probability, abs=1e-9)
    assert plain["lung_slices"] == len(analysis.slices)
    above = sum(s.probability >= 0.8 for s in analysis.slices)
    assert plain["slices_above_threshold"] == above
    assert plain["fraction_above_threshold"] == pytest.approx(above / len(analysis.slices))
    # and each lung slice is listed with the worker's own probability for it, so a reader can
    # open the flagged ones
    listed = [(s["sop_instance_uid"], s["probability"]) for s in plain["slices"]]
    worker = [(s.sop_instance_uid, s.probability) for s in analysis.slices]
    assert [uid for uid, _ in listed] == [uid for uid, _ in worker]
    assert [p for _, p in listed] == pytest.approx([p for _, p in worker], abs=1e-9)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in study_paths(background)]
    numbers = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in headers}
    assert all(numbers[s["sop_instance_uid"]] == s["instance_number"] for s in plain["slices"])
    assert ("InstanceNumber of those slices" in result.output) == (above > 0)
    # and each hybrid has lesions, its seed, its severity in turn, and figures in range
    hybrids = document["hybrids"]
    assert [(h["seed"], h["severity"]) for h in hybrids] == [(5, "moderate"), (6, "severe")]
    for hybrid in hybrids:
        assert hybrid["lesion_slices"] > 0 and hybrid["lesion_voxels"] > 0
        assert 0.0 <= hybrid["probability"] <= 1.0
        assert hybrid["result"] == ("POSITIVE" if hybrid["probability"] >= 0.8 else "NEGATIVE")
        game = hybrid["pointing_game"]
        assert 0 < game["slices"] <= hybrid["lesion_slices"]
        assert 0 <= game["hits"] <= game["slices"]
        flagged = hybrid["pointing_game_slices_above_threshold"]
        assert flagged["slices"] <= game["slices"] and flagged["hits"] <= game["hits"]
    # and the summary is made of them
    summary = document["summary"]
    detected = sum(h["result"] == "POSITIVE" for h in hybrids)
    assert (summary["hybrids"], summary["detected"]) == (2, detected)
    assert summary["sensitivity"] == detected / 2
    low, high = summary["sensitivity_ci"]
    assert 0.0 <= low <= summary["sensitivity"] <= high <= 1.0
    game = summary["pointing_game"]
    assert game["slices"] == sum(h["pointing_game"]["slices"] for h in hybrids)
    assert game["hits"] == sum(h["pointing_game"]["hits"] for h in hybrids)
    # and the table says it too
    text = " ".join(result.output.split())
    assert "sensitivity at 0.8:" in text and "pointing game (10 mm):" in text
    # and nothing was written but the JSON: not beside the series, not beside the figures
    assert _files(background.parent) == before
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["hybrids.json"]


def test_a_series_not_in_the_folder_or_an_unknown_severity_is_refused(background: Path) -> None:
    # when a series UID that is not there is asked for
    result = CliRunner().invoke(app, ["hybrids", str(background), "--series", "1.2.3"])
    # then the command fails and names the series the folder holds
    assert result.exit_code == 1
    assert "no series 1.2.3" in " ".join(result.output.split())
    # and an unknown severity is a usage error
    result = CliRunner().invoke(app, ["hybrids", str(background), "--severity", "worst"])
    assert result.exit_code == 2
