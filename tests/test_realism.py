"""Tests of the realism measurements (``hrct-triage realism``, ``worker.training.realism``).

The measurements decide whether the phantoms look like real chest CT, so they are checked on
phantoms whose make-up is known (the same patient with a sharp and a smooth kernel) and, where
the machine has it, on the real development series kept outside the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hrct_triage.cli.app import app
from hrct_triage.phantoms import write_phantom_studies


def _real_ct() -> Path | None:
    """The shared real chest CT folder (HRCT_REAL_CT, else a ``shared/real-ct`` above us)."""
    given = os.environ.get("HRCT_REAL_CT")
    if given:
        return Path(given) if Path(given).is_dir() else None
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "real-ct").is_dir():
            return parent / "shared" / "real-ct"
    return None


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One normal patient, its thin series reconstructed 5 mm LUNG and 5 mm STANDARD."""
    out = tmp_path_factory.mktemp("realism")
    found = {}
    for kernel in ("LUNG", "STANDARD"):
        (study,) = write_phantom_studies(
            out / kernel, covid=0, healthy=1, slices=20, seed=3, thickness=5.0,
            kernel=kernel, matrix=256, negative_mix={"normal": 1.0},
        )  # fmt: skip
        found[kernel] = study.folder
    return found


def _measure(*folders: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    args = ["realism", *map(str, folders), "--json", *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.output)
    return document


def test_realism_measures_each_kernel_of_one_patient(kernels: dict[str, Path]) -> None:
    # when the same patient's LUNG and STANDARD reconstructions are measured
    document = _measure(kernels["LUNG"], kernels["STANDARD"])
    lung, standard = document["series"]
    # then each column is the series the worker analyses, named by its folder
    assert document["reference"] == "LUNG/healthy_001"
    assert (lung["kernel"], lung["slice_thickness_mm"]) == ("LUNG", 5.0)
    assert (standard["kernel"], standard["slice_thickness_mm"]) == ("STANDARD", 5.0)
    for series in (lung, standard):
        # with aerated lung about -850 HU and vessels in it
        assert series["lung_slices"] >= 8
        assert -900.0 < series["lung_hu_percentiles"]["50"] < -800.0
        assert 0.005 < series["vessel_fraction"] < 0.15
        assert series["vessels_per_slice"] > 5
        assert series["nps_air_cycles_per_mm"]["rois"] > 0
        assert series["nps_soft_tissue_cycles_per_mm"]["rois"] > 0
    # and the kernel's fingerprint: the lung kernel's noise is higher and peaks at higher
    # frequencies; the sharp kernel shows more small vessels
    for nps in ("nps_air_cycles_per_mm", "nps_soft_tissue_cycles_per_mm"):
        assert lung[nps]["sd_hu"] > standard[nps]["sd_hu"]
        assert lung[nps]["mean"] > standard[nps]["mean"]
    assert lung["vessels_per_slice"] > standard["vessels_per_slice"]
    # and distances are to the first folder: none to itself, some to the other kernel
    assert lung["distance_to_reference"]["lung_histogram_emd_hu"] == 0.0
    assert standard["distance_to_reference"]["nps_soft_shape_l1"] > 0.2


def test_realism_prints_a_table_and_measures_against_the_reference(
    kernels: dict[str, Path],
) -> None:
    # when a table is asked for, with the STANDARD series as the reference
    args = ["realism", str(kernels["LUNG"]), str(kernels["STANDARD"])]
    result = CliRunner().invoke(app, [*args, "--reference", args[2]], catch_exceptions=False)
    # then it names both series and the distances to the reference
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "LUNG/healthy_001" in text and "STANDARD/healthy_001" in text
    assert "lung histogram EMD to STANDARD/healthy_001" in text
    assert "vessel fraction 0-10 mm from pleura" in text
    # and as markdown, one row per measure with a cell per series
    result = CliRunner().invoke(app, [*args, "--markdown"], catch_exceptions=False)
    lines = result.output.splitlines()
    assert lines[0] == "| measure | LUNG/healthy_001 | STANDARD/healthy_001 |"
    assert lines[1] == "| --- | --- | --- |"
    assert all(line.count("|") == 4 for line in lines[2:])
    assert any(line.startswith("| lung HU p50 | -") for line in lines)


def test_a_folder_without_a_ct_series_is_reported_not_measured(
    tmp_path: Path, kernels: dict[str, Path]
) -> None:
    # given an empty folder beside a phantom
    empty = tmp_path / "empty"
    empty.mkdir()
    # when both are measured
    result = CliRunner().invoke(app, ["realism", str(kernels["LUNG"]), str(empty)])
    # then the phantom is measured, the empty folder named with the reason, and the exit is 1
    assert result.exit_code == 1
    assert "LUNG/healthy_001" in result.output
    assert f"{empty}:" in " ".join(result.output.split())


@pytest.mark.realct
def test_the_real_development_series_is_measured_as_recorded() -> None:
    real = _real_ct()
    series = None if real is None else real / "lung-pet-ct-dx-A0001" / "series-5mm-kernel-L"
    if series is None or not series.is_dir():
        pytest.skip("the real development series (shared/real-ct) is not on this machine")
    # when the real lung-kernel series is measured, read where it lies
    (measured,) = _measure(series)["series"]
    # then the numbers are those of the model card's realism table
    assert (measured["kernel"], measured["slice_thickness_mm"]) == ("L", 5.0)
    assert measured["lung_slices"] == 48
    assert round(measured["lung_hu_percentiles"]["50"]) == -868
    assert round(100 * measured["vessel_fraction"], 2) == 4.14
    assert round(measured["nps_air_cycles_per_mm"]["peak"], 2) == 0.43
