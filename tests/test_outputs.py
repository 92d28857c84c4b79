"""The DICOM outputs: TID 1500 SR and heat-map SCs (worker.outputs.objects, worker.outputs.sr,
worker.outputs.sc).

No torch, no model: a small fake CT series and a hand-made StudyAnalysis. The DICOM validators
(dciodvfy from dicom3tools, dsrdump from DCMTK) are run where installed; tests that need them
are marked ``dcmtk`` and skip, saying why, where they are missing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from hrct_triage.common.settings import Settings
from hrct_triage.common.uids import derive_uid
from hrct_triage.worker.outputs.files import write_output
from hrct_triage.worker.outputs.objects import SeriesLabels, build_outputs, encode
from hrct_triage.worker.outputs.sc import (
    _demo_note,
    _draw_legend,
    _fixed_legend,
    _legend_strip,
    build_heatmap_scs,
    decision_text,
    render_heatmap,
)
from hrct_triage.worker.outputs.sr import (
    ABSENT,
    COVID_19,
    LUNG,
    PRESENT,
    PROBABILITY,
    THRESHOLD_VALUE,
    build_not_analysed_sr,
    build_sr,
)
from hrct_triage.worker.outputs.uids import OutputKey
from tests.helpers.fake_study import (
    MATRIX,
    SLICES,
    WHEN,
    by_uid,
    ct_series,
    make_analysis,
    make_model,
)


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return ct_series()


@pytest.fixture(scope="module")
def positive(series: list[Dataset]) -> tuple[Dataset, list[Dataset]]:
    """The SR and SCs of a positive analysis."""
    outputs = build_outputs(make_analysis(series), series, content_datetime=WHEN)
    return outputs.sr, outputs.scs


# ---------------------------------------------------------------- validators


def _save(ds: Dataset, folder: Path, name: str) -> Path:
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that contain "Error" (warnings are allowed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """DCMTK's SR dump, with template identifiers."""
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    return subprocess.run(
        ["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------- dciodvfy / dsrdump


@pytest.mark.dcmtk
def test_positive_sr_passes_dciodvfy(
    positive: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    # given the SR of a positive analysis
    sr, _ = positive
    # when it is written and validated
    errors = dciodvfy_errors(_save(sr, tmp_path, "sr"))
    # then dciodvfy reports no error
    assert errors == []


@pytest.mark.dcmtk
def test_negative_sr_passes_dciodvfy(series: list[Dataset], tmp_path: Path) -> None:
    # given the SR of a negative analysis
    analysis = make_analysis(series, positive=False)
    scs = build_heatmap_scs(analysis, by_uid(series), content_datetime=WHEN)
    sr = build_sr(analysis, series, scs, content_datetime=WHEN)
    # when it is validated / then no error
    assert dciodvfy_errors(_save(sr, tmp_path, "sr")) == []


@pytest.mark.dcmtk
def test_superseding_sr_passes_dciodvfy_and_names_its_predecessor(
    series: list[Dataset], positive: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    # given an earlier SR and a new analysis with other weights
    old_sr, _ = positive
    analysis = make_analysis(series, model=make_model(version="0.2.0+phantom.untrained"))
    # when the new SR is built as its successor
    sr = build_sr(analysis, series, [], content_datetime=WHEN, predecessor=old_sr)
    # then it references the old SR and is valid
    item = sr.PredecessorDocumentsSequence[0]
    referenced = item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert item.StudyInstanceUID == old_sr.StudyInstanceUID
    assert referenced.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert sr.SOPInstanceUID != old_sr.SOPInstanceUID
    assert dciodvfy_errors(_save(sr, tmp_path, "sr")) == []


@pytest.mark.dcmtk
def test_heatmap_sc_passes_dciodvfy(
    positive: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    # given the heat-map SCs / when validated / then no error in any of them
    _, scs = positive
    assert scs
    for index, sc in enumerate(scs):
        assert dciodvfy_errors(_save(sc, tmp_path, f"sc{index}")) == []


@pytest.mark.dcmtk
def test_not_analysed_sr_passes_dciodvfy_and_gives_the_reason(
    series: list[Dataset], tmp_path: Path
) -> None:
    # given a study that could not be analysed
    reason = "no axial CT series with at least 20 slices"
    # when its SR is built
    sr = build_not_analysed_sr(series[:3], reason, make_model(), content_datetime=WHEN)
    path = _save(sr, tmp_path, "sr")
    # then it is valid, carries the reason and no finding
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    assert "Measurement Group" not in dump.stdout
    assert "840539006" not in dump.stdout
    evaluations = sr.ContentSequence[-1]
    assert evaluations.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    assert reason in evaluations.ContentSequence[0].TextValue


@pytest.mark.dcmtk
def test_dsrdump_reads_the_sr(positive: tuple[Dataset, list[Dataset]], tmp_path: Path) -> None:
    # given the positive SR on disk
    sr, _ = positive
    # when DCMTK dumps it
    dump = dsrdump(_save(sr, tmp_path, "sr"))
    # then it parses, and shows the report title and its templates
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    assert "TID 1500" in dump.stdout and "TID 1501" in dump.stdout


# ---------------------------------------------------------------- reading the SR back


def _read_group(path: Path) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    content = hd.sr.srread(path).content
    assert isinstance(content, hd.sr.MeasurementReport)
    groups = content.get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _library_uids(path: Path) -> list[str]:
    """SOP Instance UIDs in the SR's image library, in document order."""
    report = hd.sr.srread(path)
    library = find_content_items(report.content[0], name=codes.DCM.ImageLibrary)
    images = find_content_items(library[0], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    return [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in images]


@pytest.mark.parametrize("is_positive", [True, False])
def test_sr_reads_back_with_highdicom(
    series: list[Dataset], tmp_path: Path, is_positive: bool
) -> None:
    # given an analysis
    analysis = make_analysis(series, positive=is_positive)
    outputs = build_outputs(analysis, series, content_datetime=WHEN)
    # when its SR is written and read back with highdicom
    path = _save(outputs.sr, tmp_path, "sr")
    group = _read_group(path)
    # then finding, site, probability, threshold and decision come back
    assert group.finding_type == COVID_19
    assert [site.value for site in group.finding_sites] == [LUNG]
    (probability,) = group.get_measurements(name=PROBABILITY)
    (threshold,) = group.get_measurements(name=THRESHOLD_VALUE)
    assert probability.value == pytest.approx(analysis.probability)
    assert threshold.value == pytest.approx(0.8)
    assert probability.unit.value == "1" and probability.unit.scheme_designator == "UCUM"
    (evaluation,) = group.get_qualitative_evaluations(name=COVID_19)
    assert evaluation.value == (PRESENT if is_positive else ABSENT)


def test_sr_references_every_analysed_image_and_every_heat_map(
    series: list[Dataset], tmp_path: Path
) -> None:
    # given an analysis with heat maps
    analysis = make_analysis(series, heatmaps=3)
    outputs = build_outputs(analysis, series, content_datetime=WHEN)
    # when the SR is read back
    path = _save(outputs.sr, tmp_path, "sr")
    library = _library_uids(path)
    group = _read_group(path)
    evidence = {uid for _, _, uid, _ in hd.sr.srread(path).get_evidence()}
    # then the library lists the analysed slices in table order, then the SCs
    sc_uids = [sc.SOPInstanceUID for sc in outputs.scs]
    assert library == [s.sop_instance_uid for s in analysis.slices] + sc_uids
    # and the group's source images are the slices averaged into the probability
    assert [img.referenced_sop_instance_uid for img in group.source_images] == analysis.kept
    # and every referenced instance is listed as evidence
    assert set(library) <= evidence


def test_sr_has_the_contract_frame(
    positive: tuple[Dataset, list[Dataset]], series: list[Dataset]
) -> None:
    # given the positive SR / then its document-level attributes are the contract's
    sr, _ = positive
    source = series[0]
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert "not for diagnostic use" in sr.SeriesDescription
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    algorithm = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        and item.Manufacturer == "hrct-triage"
    ]
    assert algorithm[0].SoftwareVersions == "0.1.0+phantom.untrained"
    assert algorithm[0].ManufacturerModelName == "hrct-triage DenseNet-121"
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20240304", "111213.141516")


def test_sr_names_the_model_as_device_observer_and_algorithm(
    positive: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    # given the positive SR read back
    sr, _ = positive
    report = hd.sr.srread(_save(sr, tmp_path, "sr"))
    root = report.content[0]
    # then the observer is a device whose UID follows the weights
    (observer_type,) = find_content_items(root, name=codes.DCM.ObserverType)
    assert observer_type.value == codes.DCM.Device
    (device_uid,) = find_content_items(root, name=codes.DCM.DeviceObserverUID)
    other = make_model(sha256="cd" * 32)
    assert device_uid.value != derive_uid("device", other.name, other.version, other.sha256 or "")
    # and the algorithm version keeps the demo model's "untrained" note
    (version,) = find_content_items(root, name=codes.DCM.AlgorithmVersion, recursive=True)
    assert "untrained" in version.value
    parameters = {
        item.value
        for item in find_content_items(root, name=codes.DCM.AlgorithmParameters, recursive=True)
    }
    assert {"threshold=0.8", "trim_fraction=0.1", "window_width=1200"} <= parameters
    (procedure,) = find_content_items(root, name=codes.DCM.ProcedureReported)
    assert procedure.value.value == "29252-4"


def test_procedure_code_of_the_source_wins(series: list[Dataset]) -> None:
    # given a source whose Procedure Code Sequence names the procedure
    headers = [ds.copy() for ds in series]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "24627-2", "LN", "CT Chest"
    headers[0].ProcedureCodeSequence = [code]
    # when the SR is built
    sr = build_sr(make_analysis(headers), headers, [], content_datetime=WHEN)
    # then Procedure Reported is the source's code
    items = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert [i.ConceptCodeSequence[0].CodeValue for i in items] == ["24627-2"]


@pytest.mark.dcmtk
def test_anonymised_source_without_type2_attributes_still_gives_valid_outputs(
    tmp_path: Path,
) -> None:
    # given a source whose optional patient/study attributes were stripped
    headers = ct_series(SLICES, 32)
    for ds in headers:
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
            delattr(ds, keyword)
    # when the outputs are built
    outputs = build_outputs(make_analysis(headers), headers, content_datetime=WHEN)
    # then they are valid, with the attributes present and empty
    assert outputs.sr.PatientBirthDate in ("", None)
    for index, ds in enumerate(outputs.all):
        assert dciodvfy_errors(_save(ds, tmp_path, f"out{index}")) == []


# ---------------------------------------------------------------- identity


def test_same_inputs_give_identical_objects(series: list[Dataset]) -> None:
    # given the same analysis built twice, a moment apart
    first = build_outputs(make_analysis(series), series, content_datetime=WHEN)
    time.sleep(0.01)
    second = build_outputs(make_analysis(series), series, content_datetime=WHEN)
    # then the SOP Instance UIDs and the bytes are the same
    assert [ds.SOPInstanceUID for ds in first.all] == [ds.SOPInstanceUID for ds in second.all]
    assert [encode(ds) for ds in first.all] == [encode(ds) for ds in second.all]


def test_another_analysed_set_gives_new_uids(series: list[Dataset]) -> None:
    # given two analyses of the same study that saw different slices
    whole = make_analysis(series)
    part = make_analysis(series[:-1])
    # when their outputs are built
    a = build_outputs(whole, series, content_datetime=WHEN)
    b = build_outputs(part, series, content_datetime=WHEN)
    # then no UID is shared
    assert _uids(a.all).isdisjoint(_uids(b.all))


def test_another_model_version_gives_new_uids(series: list[Dataset]) -> None:
    # given the same slices analysed by two model versions
    a = build_outputs(make_analysis(series), series, content_datetime=WHEN)
    newer = make_analysis(series, model=make_model(version="0.1.1+phantom.untrained"))
    b = build_outputs(newer, series, content_datetime=WHEN)
    # then no UID is shared
    assert _uids(a.all).isdisjoint(_uids(b.all))


def test_another_trim_fraction_gives_new_uids(series: list[Dataset]) -> None:
    # given the same slices and model, averaged with two trim fractions
    a = build_outputs(make_analysis(series), series, content_datetime=WHEN)
    other = replace(make_analysis(series), trim_fraction=0.25)
    b = build_outputs(other, series, content_datetime=WHEN)
    # then no UID is shared: the SRs state different trim fractions (and may differ in result)
    assert _uids(a.all).isdisjoint(_uids(b.all))


def _uids(datasets: Sequence[Dataset]) -> set[str]:
    return {ds.SOPInstanceUID for ds in datasets} | {ds.SeriesInstanceUID for ds in datasets}


def test_order_of_the_analysed_set_does_not_matter(series: list[Dataset]) -> None:
    # given the same analysed slices listed in another order
    analysis = make_analysis(series)
    shuffled = replace(analysis, slices=list(reversed(analysis.slices)))
    # then the output key is the same
    assert OutputKey.for_analysis(analysis) == OutputKey.for_analysis(shuffled)


def test_derive_uid_is_a_short_valid_uid_that_depends_on_every_part() -> None:
    # given some parts / when UIDs are derived
    uid = derive_uid("1.2.3", "abc", "sr", "0")
    # then they are valid 2.25 UIDs, stable, and sensitive to part boundaries
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid
    assert uid == derive_uid("1.2.3", "abc", "sr", "0")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    with pytest.raises(ValueError, match="parts"):
        derive_uid()


def test_aware_content_datetime_is_accepted(series: list[Dataset]) -> None:
    # given the worklist's UTC analysis time
    when = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
    # when the SR is built / then dates are written as local wall-clock time
    sr = build_sr(make_analysis(series), series, [], content_datetime=when)
    local = when.astimezone().replace(tzinfo=None)
    assert str(sr.ContentDate) == local.strftime("%Y%m%d")


# ---------------------------------------------------------------- secondary captures


def test_sc_is_an_rgb_derived_image_of_the_source_study(
    positive: tuple[Dataset, list[Dataset]], series: list[Dataset]
) -> None:
    # given the SCs of the positive analysis
    _, scs = positive
    headers = by_uid(series)
    for sc in scs:
        reference = sc.SourceImageSequence[0]
        source = headers[reference.ReferencedSOPInstanceUID]
        # then each is RGB, in the source study, in its own series, and says what it is
        assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
        assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.PatientID == source.PatientID
        assert sc.SeriesInstanceUID != source.SeriesInstanceUID
        assert reference.ReferencedSOPClassUID == CTImageStorage
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert sc.BurnedInAnnotation == "YES"
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert sc.BodyPartExamined == "CHEST"
        assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert "not for diagnostic use" in sc.SeriesDescription
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert [sc.InstanceNumber for sc in scs] == list(range(1, len(scs) + 1))


def test_overlay_keeps_low_activation_grey_and_marks_high_activation_red(
    series: list[Dataset],
) -> None:
    # given a heat map with a single activation peak
    heatmap = make_analysis(series).heatmaps[0]
    # when it is rendered
    rgb = render_heatmap(heatmap, make_model())
    scale = rgb.shape[1] // MATRIX
    # then the image is enlarged, has a legend strip below, and is grey where the CAM is ~0
    assert rgb.dtype == np.uint8 and rgb.shape[1] == MATRIX * scale
    assert rgb.shape[0] > MATRIX * scale
    corner = rgb[2 * scale, 2 * scale].astype(int)
    assert corner[0] == corner[1] == corner[2]
    # and red dominates at the peak
    row, col = np.unravel_index(np.argmax(heatmap.cam), heatmap.cam.shape)
    peak = rgb[row * scale + scale // 2, col * scale + scale // 2].astype(int)
    assert peak[0] > peak[1] + 40 and peak[0] > peak[2] + 40


@pytest.mark.parametrize("width", [512, 640, 1024])
@pytest.mark.parametrize("probability", [0.0, 0.93, 1.0])
@pytest.mark.parametrize("untrained", [True, False])
def test_legend_of_fixed_parts_and_probability_line_is_the_legend_drawn_at_once(
    width: int, probability: float, untrained: bool
) -> None:
    # given a model, a strip width, a slice probability and the study's decision rule
    model = replace(make_model(), untrained=untrained)
    note = _demo_note(model)
    decision = decision_text(0.8, 0.1)
    # when the strip is composed of its cached fixed parts and the probability line
    composed = _legend_strip(width, probability, model, decision)
    # then it is the strip drawn in one figure, pixel for pixel
    drawn = _draw_legend(width, probability=probability, note=note, decision=decision, fixed=True)
    assert np.array_equal(composed, drawn)
    # and it was composed, not drawn at once: the line touches no drawn pixel of the fixed parts
    line = _draw_legend(width, probability=probability, note=None, decision=None, fixed=False)
    fixed = _fixed_legend(width, note, decision)
    assert np.any(line) and not np.any(fixed[np.any(line != 0, axis=2)])


def test_sc_pixel_spacing_follows_the_enlargement(positive: tuple[Dataset, list[Dataset]]) -> None:
    # given an SC of a 64-pixel, 5 mm/pixel slice enlarged to >= 512 pixels
    _, scs = positive
    scale = 512 // MATRIX
    # then its pixel spacing is the source spacing divided by the factor
    assert [float(v) for v in scs[0].PixelSpacing] == pytest.approx([5.0 / scale] * 2)


# ---------------------------------------------------------------- arguments


def test_missing_header_is_named(series: list[Dataset]) -> None:
    analysis = make_analysis(series)
    with pytest.raises(ValueError, match="headers"):
        build_sr(analysis, series[1:], [], content_datetime=WHEN)
    with pytest.raises(ValueError, match="headers_by_uid"):
        build_heatmap_scs(analysis, {}, content_datetime=WHEN)


def test_contradictory_decision_is_refused(series: list[Dataset]) -> None:
    analysis = replace(make_analysis(series), positive=False)
    with pytest.raises(ValueError, match=r"analysis\.positive"):
        build_sr(analysis, series, [], content_datetime=WHEN)


def test_heatmap_of_the_wrong_size_is_refused(series: list[Dataset]) -> None:
    analysis = make_analysis(series)
    small = replace(
        analysis.heatmaps[0],
        lung_window=analysis.heatmaps[0].lung_window[:32],
        cam=analysis.heatmaps[0].cam[:32],
    )
    with pytest.raises(ValueError, match=r"analysis\.heatmaps\[0\]"):
        build_heatmap_scs(
            replace(analysis, heatmaps=[small]), by_uid(series), content_datetime=WHEN
        )


def test_an_sr_cannot_supersede_itself(
    positive: tuple[Dataset, list[Dataset]], series: list[Dataset]
) -> None:
    sr, _ = positive
    with pytest.raises(ValueError, match="predecessor"):
        build_sr(make_analysis(series), series, [], content_datetime=WHEN, predecessor=sr)


def test_sr_of_another_study_is_refused_as_predecessor(series: list[Dataset]) -> None:
    other = ct_series(3)
    old = build_sr(make_analysis(other, heatmaps=0), other, [], content_datetime=WHEN)
    with pytest.raises(ValueError, match="predecessor"):
        build_sr(make_analysis(series), series, [], content_datetime=WHEN, predecessor=old)


# ---------------------------------------------------------------- writing and speed


def test_write_output_names_the_file_by_uid(
    positive: tuple[Dataset, list[Dataset]], tmp_path: Path
) -> None:
    # given the SR / when written twice
    sr, _ = positive
    first = write_output(sr, tmp_path)
    second = write_output(sr, tmp_path)
    # then one file named by its UID holds exactly the encoded bytes, and no temporary is left
    assert first == second == tmp_path / f"{sr.SOPInstanceUID}.dcm"
    assert first.read_bytes() == encode(sr)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_sr_with_300_slice_library_stays_small() -> None:
    # given 300 header-only slices of a 512 matrix
    headers = ct_series(300, 16, pixels=False)
    for ds in headers:
        ds.Rows = ds.Columns = 512
    analysis = make_analysis(headers, heatmaps=0)
    # when the SR is built and encoded
    sr = build_sr(analysis, headers, [], content_datetime=WHEN)
    data = encode(sr)
    # then the library lists every slice once, compactly (shared geometry stated per group)
    assert len(data) < 2_000_000


# ---------------------------------------------------------------- series labels


def test_configured_series_labels_reach_every_output(series: list[Dataset]) -> None:
    # given a site's own series numbers and descriptions
    labels = SeriesLabels(
        sr_number=77,
        sr_description="KI Triage Bericht - NOT FOR DIAGNOSTIC USE",
        sc_number=78,
        sc_description="KI Heatmap (not for diagnostic use)",
    )
    # when the outputs are built
    outputs = build_outputs(make_analysis(series), series, content_datetime=WHEN, labels=labels)
    # then the SR and every SC carry them
    assert (outputs.sr.SeriesNumber, outputs.sr.SeriesDescription) == (77, labels.sr_description)
    assert {(sc.SeriesNumber, sc.SeriesDescription) for sc in outputs.scs} == {
        (78, labels.sc_description)
    }


def test_a_series_description_must_say_not_for_diagnostic_use(series: list[Dataset]) -> None:
    # given descriptions that drop the warning / then every edge refuses them, naming them
    with pytest.raises(ValueError, match="sr_description"):
        SeriesLabels(sr_description="AI COVID-19 triage SR")
    with pytest.raises(ValueError, match="sc_series_description"):
        Settings(_env_file=None, sc_series_description="AI heat map")
    with pytest.raises(ValueError, match="series_description"):
        build_sr(
            make_analysis(series), series, [], content_datetime=WHEN, series_description="AI SR"
        )
    analysis = make_analysis(series)
    with pytest.raises(ValueError, match="series_description"):
        build_heatmap_scs(analysis, by_uid(series), content_datetime=WHEN, series_description="x")


@pytest.mark.dcmtk
def test_not_analysed_sr_of_a_new_analysis_supersedes_the_old_one(
    series: list[Dataset], tmp_path: Path
) -> None:
    # given the not-analysed SR of a study's first analysis
    reason = "no axial CT series with at least 20 slices"
    first = build_not_analysed_sr(
        series[:3], reason, make_model(), content_datetime=WHEN, analysis_id="1"
    )
    # when the study is analysed again (late instances) and still cannot be
    second = build_not_analysed_sr(
        series[:3],
        reason,
        make_model(),
        content_datetime=WHEN,
        analysis_id="2",
        predecessor=first,
        series_number=77,
        series_description="AI triage - not for diagnostic use",
    )
    again = build_not_analysed_sr(
        series[:3], reason, make_model(), content_datetime=WHEN, analysis_id="1"
    )
    # then the new SR is a new object naming the old one, valid; a rebuild is the same object
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert encode(again) == encode(first)
    referenced = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SeriesNumber == 77
    assert dciodvfy_errors(_save(second, tmp_path, "sr")) == []
