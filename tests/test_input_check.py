"""The worker's input check on real phantom files: which late objects change what would be
analysed (the series selection chooses and its exact instances), and what the events say."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pydicom
import pytest

from hrct_triage.db import worklist
from hrct_triage.phantoms import write_phantom_studies
from hrct_triage.worker import input_check
from tests.helpers_waves import (
    changed_version,
    coronal_reformat,
    dose_sr,
    extra_slice,
    series_files,
)

MIN_SLICES = 4  # the thick series of a 24-slice phantom has 4 or 5 slices: analysable


def _row(path: Path) -> worklist.InputRow:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return worklist.InputRow(str(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID), sha)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A phantom study's series, and what a scanner sends later, by name."""
    out = tmp_path_factory.mktemp("input-check")
    (study,) = write_phantom_studies(out / "study", covid=1, healthy=0, slices=24, seed=26)
    thin, thick = series_files(study.folder, "CT_02"), series_files(study.folder, "CT_03")
    late = out / "late"
    return {
        "thin": thin,
        "thick": thick,
        "localizer": series_files(study.folder, "CT_01"),
        "dose": [dose_sr(thick[0], late)],
        "reformat": coronal_reformat(thin, late / "mpr", images=8),
        "extra": [extra_slice(thick, late)],
        "changed": [changed_version(thick[1], late)],
    }


def _look(files: dict[str, list[Path]], *names: str) -> input_check.InputView:
    paths = [path for name in names for path in files[name]]
    return input_check.look([_row(path) for path in paths], min_slices=MIN_SLICES)


def test_late_objects_selection_would_not_choose_leave_the_input_as_it_was(
    files: dict[str, list[Path]],
) -> None:
    first = _look(files, "thick")
    assert first.selected is not None and first.selected.paths == tuple(files["thick"])
    for late in ("dose", "reformat", "localizer"):
        after = _look(files, "thick", late)
        assert after.digest == first.digest, late
        assert after.fingerprint != first.fingerprint, late
    # the order the instances arrived in does not matter
    assert _look(files, "localizer", "dose", "thick").digest == first.digest


def test_a_better_series_or_other_instances_of_the_analysed_one_change_the_input(
    files: dict[str, list[Path]],
) -> None:
    first = _look(files, "thick")
    thin = _look(files, "thick", "thin")
    assert thin.selected is not None and thin.selected.paths == tuple(files["thin"])
    assert thin.digest != first.digest
    assert _look(files, "thick", "extra").digest != first.digest
    # the same SOP Instance UID with other bytes is another input too
    changed = [path for path in files["thick"] if path.name != files["thick"][1].name]
    replaced = input_check.look(
        [_row(path) for path in (*changed, *files["changed"])], min_slices=MIN_SLICES
    )
    assert replaced.selected is not None and replaced.digest != first.digest
    described = input_check.describe_change(
        thin, before_series_uid=first.selected.series_uid if first.selected else None
    )
    assert described.startswith("series selection now chooses series 2 'CHEST 1.0 LUNG' (24")
    assert described.endswith("instead of series 3 'CHEST 5.0 STANDARD'")


def test_a_study_without_a_series_to_analyse_has_an_input_too(
    files: dict[str, list[Path]],
) -> None:
    view = _look(files, "dose", "localizer", "reformat")
    assert (view.selected, view.digest) == (None, input_check.NO_SERIES)
    assert view.reason is not None and "LOCALIZER" in view.reason
    assert input_check.describe_same(view) == "still no series fits for analysis"
    assert _look(files, "dose", "localizer").digest == view.digest


def test_a_better_series_still_arriving_is_seen_before_it_is_complete(
    files: dict[str, list[Path]],
) -> None:
    # given the thick series analysed and the first two thin slices in (too few to choose)
    rows = [_row(path) for path in (*files["thick"], *files["thin"][:2], *files["dose"])]
    view = input_check.look(rows, min_slices=MIN_SLICES)
    assert view.selected is not None and view.selected.paths == tuple(files["thick"])
    # then the thin series is what selection would choose once complete
    preferred = input_check.arriving_preferred(view, analysed_series_uid=view.selected.series_uid)
    assert preferred is not None and preferred.paths == tuple(files["thin"][:2])
    # and nothing else that arrives would be
    quiet = _look(files, "thick", "dose", "reformat", "localizer")
    assert quiet.selected is not None
    assert (
        input_check.arriving_preferred(quiet, analysed_series_uid=quiet.selected.series_uid) is None
    )


def test_a_second_look_reads_only_the_new_headers(
    files: dict[str, list[Path]], tmp_path: Path
) -> None:
    copies = []
    for path in files["thick"]:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    first = input_check.look([_row(path) for path in copies], min_slices=MIN_SLICES)
    copies[0].unlink()  # gone from the disk, still known from the first look
    again = input_check.look(
        [*first.rows, _row(files["dose"][0])], min_slices=MIN_SLICES, known=first.known
    )
    assert again.digest == first.digest and len(again.known) == len(copies) + 1


def test_what_the_event_says_arrived() -> None:
    late = [
        worklist.LateSeries(
            "1.2.9", 997, "Dose Report", "SR", ("1.2.840.10008.5.1.4.1.1.88.67",), 1, 0
        ),
        worklist.LateSeries(
            "1.2.2", 2, "CHEST 1.0 LUNG", "CT", ("1.2.840.10008.5.1.4.1.1.2",), 3, 1
        ),
    ]
    assert input_check.describe_arrivals(late) == (
        "1 new instance in series 997 'Dose Report' (SR; X-Ray Radiation Dose SR Storage); "
        "3 new and 1 changed instances in series 2 'CHEST 1.0 LUNG' (CT; CT Image Storage)"
    )
