"""Tests of the synthetic chest CT phantoms (the phantoms/ package): the DICOM studies.

The demo, the pipeline tests and the training of the demo weights all stand on these studies, so
they must be valid DICOM as a scanner sends it, realistic in Hounsfield units, honest in their
ground truth (labels, groups, findings, masks), and byte-for-byte reproducible from a seed. Most
studies here are 256 x 256 to keep the file quick; one default study checks 512 x 512.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from typer.testing import CliRunner

from hrct_triage.cli.app import app
from hrct_triage.phantoms import (
    CONFOUNDERS,
    COVID_KINDS,
    FINDING_NAMES,
    FINDINGS,
    GROUPS,
    KERNELS,
    LABELS_NAME,
    LESION_MASKS_NAME,
    SEVERITY_MIX,
    TRANSFER_SYNTAXES,
    PhantomStudy,
    parse_negative_mix,
    parse_severity_mix,
    write_non_ct_study,
    write_phantom_studies,
)
from hrct_triage.phantoms.options import RANDOM_FOV_MM, RANDOM_MATRICES, RANDOM_THICKNESSES
from hrct_triage.worker.method.preprocess import lung_mask
from hrct_triage.worker.method.series import select_series
from hrct_triage.worker.method.volume import CTVolume, load_volume
from tests.helpers.dicom_peers import dciodvfy_errors

SLICES = 24
SEED = 0
MATRIX = 256  # the studies of this file; the default (512) is checked once
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
COVID_IDS = {FINDINGS[kind] for kind in COVID_KINDS}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phantoms")


@pytest.fixture(scope="module")
def studies(out_dir: Path) -> list[PhantomStudy]:
    return write_phantom_studies(
        out_dir, covid=1, healthy=1, slices=SLICES, seed=SEED, matrix=MATRIX
    )


@pytest.fixture(scope="module")
def covid(studies: list[PhantomStudy]) -> PhantomStudy:
    return next(s for s in studies if s.label == "covid")


@pytest.fixture(scope="module")
def healthy(studies: list[PhantomStudy]) -> PhantomStudy:
    return next(s for s in studies if s.label == "healthy")


def _series(study: PhantomStudy) -> dict[str, list[pydicom.Dataset]]:
    """The study's images grouped by SeriesInstanceUID, each series in InstanceNumber order."""
    groups: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sorted(study.folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        groups[ds.SeriesInstanceUID].append(ds)
    return {uid: sorted(dss, key=lambda d: int(d.InstanceNumber)) for uid, dss in groups.items()}


def _hu(ds: pydicom.Dataset) -> NDArray[np.float64]:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _thin_slices(study: PhantomStudy) -> list[pydicom.Dataset]:
    return _series(study)[study.lung_series_uid]


def test_same_seed_gives_byte_identical_files(tmp_path: Path, studies: list[PhantomStudy]) -> None:
    # given the studies the fixture wrote with seed 0, one at a time
    # when the same studies are written again elsewhere, two at once in worker processes
    again = write_phantom_studies(
        tmp_path, covid=1, healthy=1, slices=SLICES, seed=SEED, matrix=MATRIX, workers=2
    )
    # then they come back in the same order and every file, UIDs and masks included, is the same
    assert [s.folder.name for s in again] == [s.folder.name for s in studies]
    for first, second in zip(studies, again, strict=True):
        names = sorted(p.name for p in first.folder.iterdir())
        assert names == sorted(p.name for p in second.folder.iterdir())
        for name in names:
            assert (first.folder / name).read_bytes() == (second.folder / name).read_bytes(), name
        assert second.study_uid == first.study_uid
        assert second.lesion_instances == first.lesion_instances


def test_another_seed_gives_another_patient(tmp_path: Path, covid: PhantomStudy) -> None:
    # given the positive study of seed 0
    # when the first positive study of another seed is written with the default options
    other = write_phantom_studies(tmp_path, covid=1, healthy=0, slices=8, seed=SEED + 1)[0]
    # then it is another study of another patient
    assert other.study_uid != covid.study_uid
    assert other.patient_id != covid.patient_id
    # and its CT images have the default 512 x 512 matrix, as a scanner sends them
    for path in other.folder.glob("CT_0[23]_*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (ds.Rows, ds.Columns) == (512, 512)


def test_every_file_is_ct_or_sc_dicom_that_pydicom_reads(studies: list[PhantomStudy]) -> None:
    # given the written studies
    for study in studies:
        for path in study.folder.glob("*.dcm"):
            # when each file is read
            ds = pydicom.dcmread(path)
            # then it is a Part 10 CT image in Explicit VR Little Endian with pixel data in HU
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            assert ds.SOPClassUID == CT_IMAGE_STORAGE
            assert ds.StudyInstanceUID == study.study_uid
            assert ds.PatientID == study.patient_id
            assert ds.Modality == "CT"
            assert ds.Manufacturer == "hrct-triage phantom"
            # the localizer keeps 512 x 512, the axial series have the study's matrix
            size = 512 if ds.ImageType[2] == "LOCALIZER" else MATRIX
            assert (ds.Rows, ds.Columns) == (size, size)
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.BitsAllocated == 16
            assert (ds.BitsStored, ds.PixelRepresentation) in {(12, 0), (16, 1)}
            assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
            assert ds.pixel_array.shape == (size, size)


@pytest.mark.dcmtk
def test_dcmdump_reads_one_file_of_each_series_without_error(covid: PhantomStudy) -> None:
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmdump (DCMTK) is not on PATH")
    # given one file of each series of the positive study
    for series in _series(covid).values():
        path = Path(series[0].filename)
        # when dcmdump reads it
        done = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, check=False)
        # then it exits 0 and reports no error
        assert done.returncode == 0, done.stderr
        assert "E:" not in done.stderr, done.stderr


@pytest.mark.dcmtk
def test_dciodvfy_finds_no_error_in_a_thin_slice(covid: PhantomStudy) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not on PATH")
    # given a thin lung-series slice
    path = Path(_thin_slices(covid)[SLICES // 2].filename)
    # when dciodvfy checks it against the CT Image IOD
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    # then no line reports an error (warnings are fine)
    report = done.stdout + done.stderr
    assert "CTImage" in report
    assert not [line for line in report.splitlines() if "Error" in line], report


def test_the_three_series_a_scanner_sends(covid: PhantomStudy) -> None:
    # given a study's images
    series = _series(covid)
    # when they are grouped by series
    kinds = {dss[0].ImageType[2]: dss for dss in series.values() if dss[0].ImageType[2] != "AXIAL"}
    axial = sorted(
        (dss for dss in series.values() if dss[0].ImageType[2] == "AXIAL"),
        key=lambda dss: float(dss[0].SliceThickness),
    )
    # then there are a localizer, a thin lung series and a thick soft-tissue series
    assert len(series) == 3
    assert len(kinds["LOCALIZER"]) == 1
    thin, thick = axial
    assert thin[0].SeriesInstanceUID == covid.lung_series_uid
    assert len(thin) == SLICES
    assert len(thick) == max(8, round(SLICES / 5))
    for dss, thickness, kernel in ((thin, 1.0, "LUNG"), (thick, 5.0, "STANDARD")):
        for ds in dss:
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
            assert float(ds.SliceThickness) == thickness
            assert ds.ConvolutionKernel == kernel
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            # a field of view of 307-461 mm, fitted to the patient
            assert 0.6 * 512 <= float(ds.PixelSpacing[0]) * MATRIX <= 0.9 * 512
    assert list(kinds["LOCALIZER"][0].ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    frames = {ds.FrameOfReferenceUID for dss in series.values() for ds in dss}
    assert len(frames) == 1


def test_thin_slices_spread_over_the_chest_in_table_order(covid: PhantomStudy) -> None:
    # given the thin lung series
    thin = _thin_slices(covid)
    # when their positions are read in InstanceNumber order
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in thin])
    # then they run from apex to bases, evenly, over the patient's chest (its lungs and a margin:
    # 24-36 cm), SliceLocation agreeing
    step = np.diff(z)
    assert np.allclose(step, step[0], atol=1e-3) and step[0] < 0
    assert 240.0 <= -step[0] * SLICES <= 360.0
    assert [float(ds.SliceLocation) for ds in thin] == pytest.approx(list(z))
    assert [int(ds.InstanceNumber) for ds in thin] == list(range(1, SLICES + 1))


def _thin_hu(study: PhantomStudy) -> NDArray[np.float64]:
    return np.stack([_hu(ds) for ds in _thin_slices(study)])


def test_lung_parenchyma_is_about_minus_850_hu(healthy: PhantomStudy) -> None:
    # given a healthy chest and its ground-truth lung
    hu = _thin_hu(healthy)
    lung = np.load(healthy.folder / LESION_MASKS_NAME)["lung"]
    # then the lungs fill a good part of the middle slices and their parenchyma is about -850 HU
    assert lung[SLICES // 2].mean() > 20_000 / 512**2  # as much of the slice as 20,000 of 512^2
    assert -900.0 < float(np.median(hu[lung])) < -800.0
    # and what the model reads as lung is the lung: the worker's segmentation agrees
    spacing = float(_thin_slices(healthy)[0].PixelSpacing[0])
    found = lung_mask(hu.astype(np.float32), pixel_spacing=(spacing, spacing))
    middle = slice(SLICES // 3, 2 * SLICES // 3)
    overlap = (found[middle] & lung[middle]).sum() / lung[middle].sum()
    assert overlap > 0.8
    # and air outside the patient (or the padding outside the reconstruction circle) is below
    # any tissue
    assert float(np.median(hu[:, :10, :10])) < -950.0


def test_ground_glass_lesions_are_between_minus_700_and_minus_300_hu(covid: PhantomStudy) -> None:
    # given the positive study and its ground-truth lesion masks
    masks = np.load(covid.folder / LESION_MASKS_NAME)["masks"]
    hu = _thin_hu(covid)
    lung = np.load(covid.folder / LESION_MASKS_NAME)["lung"]
    # when the HU under the masks is gathered
    values = hu[masks]
    # then the lesions are mostly ground glass, well above the aerated lung around them
    assert values.size > 200
    assert -700.0 <= float(np.median(values)) <= -300.0
    assert float(np.mean((values >= -700.0) & (values <= -300.0))) > 0.5
    assert float(np.median(values)) > float(np.median(hu[lung & ~masks])) + 150.0


def test_lesion_ground_truth_agrees_with_the_masks(
    covid: PhantomStudy, healthy: PhantomStudy
) -> None:
    # given both studies' lesion_masks.npz
    for study in (covid, healthy):
        saved = np.load(study.folder / LESION_MASKS_NAME)
        masks = saved["masks"]
        # then there is one boolean mask per thin slice, in InstanceNumber order
        assert masks.shape == (SLICES, MATRIX, MATRIX)
        assert masks.dtype == bool
        assert list(saved["instance_numbers"]) == list(range(1, SLICES + 1))
        uids = [ds.SOPInstanceUID for ds in _thin_slices(study)]
        assert list(saved["sop_instance_uids"]) == uids
        # and lesion_instances lists exactly the slices whose mask is not empty
        expected = [i + 1 for i in range(SLICES) if masks[i].any()]
        assert study.lesion_instances == expected
        # and beside them: every finding's id per voxel with its names, and the lung
        assert saved["findings"].shape == masks.shape and saved["findings"].dtype == np.uint8
        assert tuple(saved["finding_names"]) == FINDING_NAMES
        assert saved["lung"].shape == masks.shape and saved["lung"].dtype == bool
        # where the lesions lie inside the lung and are COVID-19 findings
        assert not (masks & ~saved["lung"]).any()
        if masks.any():
            ids = saved["findings"][masks]
            assert np.isin(ids, list(COVID_IDS)).mean() > 0.9
    assert covid.lesion_instances
    assert healthy.lesion_instances == []


def test_labels_csv_lists_every_study_folder(out_dir: Path, studies: list[PhantomStudy]) -> None:
    # given the run's labels.csv
    with (out_dir / LABELS_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # then it has one row per study, matching the folders on disk
    assert [r["study_uid"] for r in rows] == [s.study_uid for s in studies]
    for row, study in zip(rows, studies, strict=True):
        assert list(row) == [
            "study_uid",
            "folder",
            "label",
            "patient_id",
            "lesion_instances",
            "severity",
            "group",
            "findings",
        ]
        assert row["severity"] == study.severity
        assert row["group"] == study.group
        assert row["findings"] == ";".join(study.findings)
        assert (out_dir / row["folder"]) == study.folder
        assert study.folder.is_dir()
        assert row["label"] == study.label
        assert row["patient_id"] == study.patient_id
        listed = [int(n) for n in row["lesion_instances"].split(";") if n]
        assert listed == study.lesion_instances
        ds = pydicom.dcmread(next(study.folder.glob("*.dcm")), stop_before_pixels=True)
        assert ds.StudyInstanceUID == row["study_uid"]
    assert {r["label"] for r in rows} == {"covid", "healthy"}
    assert {r["label"]: r["severity"] for r in rows}["healthy"] == "none"
    assert {r["label"]: r["severity"] for r in rows}["covid"] in SEVERITY_MIX
    assert {r["label"]: r["group"] for r in rows}["covid"] == "covid"
    assert {r["label"]: r["group"] for r in rows}["healthy"] in GROUPS[1:]


def test_a_severity_mix_draws_other_patients_of_that_severity(
    tmp_path: Path, studies: list[PhantomStudy]
) -> None:
    # given the fixture's seed written again with every positive mild
    mild = write_phantom_studies(
        tmp_path, covid=3, healthy=1, slices=8, seed=SEED, matrix=MATRIX,
        severity_mix={"mild": 1.0},
    )  # fmt: skip
    # then every positive is mild and says so in labels.csv
    assert [s.severity for s in mild if s.label == "covid"] == ["mild"] * 3
    with (tmp_path / LABELS_NAME).open(newline="") as handle:
        assert [r["severity"] for r in csv.DictReader(handle)] == ["mild"] * 3 + ["none"]
    # and they are other studies than the default cohort's, under other UIDs and patient IDs
    default = {s.label: s for s in studies}
    drawn = {s.label: s for s in mild}
    for label in ("covid", "healthy"):
        assert drawn[label].study_uid != default[label].study_uid
        assert drawn[label].patient_id != default[label].patient_id
    # while the default shares, written out in full, change nothing
    again = write_phantom_studies(
        tmp_path / "default", covid=1, healthy=1, slices=8, seed=SEED, matrix=MATRIX,
        severity_mix=dict(SEVERITY_MIX),
    )  # fmt: skip
    assert [s.study_uid for s in again] == [s.study_uid for s in studies]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mild=0.5,severe=0.4", "sum to 1"),
        ("mild=1.2,severe=-0.2", ">= 0"),
        ("diffuse=1", "unknown severity diffuse"),
        ("mild", "not NAME=SHARE"),
        ("mild=half", "not a number"),
    ],
)
def test_a_bad_severity_mix_is_refused_before_any_file(
    tmp_path: Path, text: str, message: str
) -> None:
    # when the CLI is given shares that cannot be a cohort
    result = CliRunner().invoke(
        app, ["phantom", str(tmp_path / "out"), "--severity-mix", text], catch_exceptions=False
    )
    # then it says why and writes nothing
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_severity_mix_shares_are_read_in_a_fixed_order() -> None:
    assert parse_severity_mix("severe=0.5, mild=0.5") == {
        "focal": 0.0,
        "mild": 0.5,
        "moderate": 0.0,
        "severe": 0.5,
    }


def test_patient_identity_is_synthetic_and_labelled(covid: PhantomStudy) -> None:
    # given a thin slice of the positive study
    ds = _thin_slices(covid)[0]
    # then the patient is plainly a phantom and the study a chest CT without contrast
    assert str(ds.PatientName) == "PHANTOM^COVID^001"
    assert ds.StudyDescription == "CT CHEST WO CONTRAST"
    assert ds.BodyPartExamined == "CHEST"
    assert ds.StudyDate == "20260101"


def test_non_ct_study_has_secondary_captures_only(tmp_path: Path) -> None:
    # when a study without CT is written
    folder = write_non_ct_study(tmp_path, seed=SEED)
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    # then it holds three Secondary Capture images of one study and no CT at all
    assert len(datasets) == 3
    assert {ds.SOPClassUID for ds in datasets} == {"1.2.840.10008.5.1.4.1.1.7"}
    assert all(ds.Modality != "CT" for ds in datasets)
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert all(ds.pixel_array.shape == (512, 512) for ds in datasets)
    # and it is reproducible
    again = write_non_ct_study(tmp_path / "again", seed=SEED)
    for path in folder.glob("*.dcm"):
        assert path.read_bytes() == (again / path.name).read_bytes()


# --- options: transfer syntax, thickness, kernel, Enhanced CT --------------------------------

# Seed 5: covid_001 stores 12-bit unsigned values, healthy_001 16-bit signed ones with padding,
# so every encoder sees both kinds of pixel data.
OPTION_SEED = 5
OPTION_SLICES = 8
OPTION_MATRIX = 128  # the encoders and headers do not care, the clock does


def _syntaxes(names: list[str]) -> list[Any]:
    """Transfer syntax names as parameters: jpeg-lossless is encoded by DCMTK's dcmcjpeg."""
    return [pytest.param(n, marks=pytest.mark.dcmtk) if n == "jpeg-lossless" else n for n in names]


LOSSLESS = [name for name in TRANSFER_SYNTAXES if name not in ("explicit", "jpeg-ls-near")]


def _write(folder: Path, **options: Any) -> list[PhantomStudy]:
    return write_phantom_studies(
        folder, covid=1, healthy=1, slices=OPTION_SLICES, seed=OPTION_SEED, matrix=OPTION_MATRIX,
        **options,
    )  # fmt: skip


def _volume(study: PhantomStudy) -> CTVolume:
    """The thin series as the worker selects and loads it."""
    return load_volume(select_series(sorted(study.folder.glob("*.dcm")), min_slices=OPTION_SLICES))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomStudy]:
    """Default options: Explicit VR Little Endian, 1 mm LUNG, single-frame."""
    studies = _write(tmp_path_factory.mktemp("plain"))
    signed = [int(_thin_slices(s)[0].PixelRepresentation) for s in studies]
    assert signed == [0, 1]  # one study of each pixel representation
    return studies


@pytest.fixture(scope="module")
def soft(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomStudy]:
    return _write(tmp_path_factory.mktemp("soft"), kernel="SOFT")


@pytest.fixture(scope="module")
def bone_thin(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomStudy]:
    return _write(tmp_path_factory.mktemp("bone"), kernel="bone", thickness=0.625)


def _assert_same_hu(studies: list[PhantomStudy], reference: list[PhantomStudy]) -> None:
    for study, ref in zip(studies, reference, strict=True):
        # the worker's selection and volume give exactly the uncompressed Hounsfield units
        volume, expected = _volume(study), _volume(ref)
        assert np.array_equal(volume.hu, expected.hu), study.folder
        # and every other CT image (localizer, thick series) decodes to the same stored values
        for path in sorted(ref.folder.glob("CT_0[13]_*.dcm")):
            again = pydicom.dcmread(study.folder / path.name)
            assert np.array_equal(again.pixel_array, pydicom.dcmread(path).pixel_array), path.name


@pytest.mark.parametrize("name", _syntaxes(LOSSLESS))
def test_lossless_transfer_syntaxes_decode_to_the_same_hu(
    tmp_path: Path, plain: list[PhantomStudy], name: str
) -> None:
    # when the studies of the plain fixture are written again in a lossless transfer syntax
    studies = _write(tmp_path, transfer_syntax=name)
    # then every CT image says so, keeps its UIDs and its lossless flag
    for study, ref in zip(studies, plain, strict=True):
        assert study.lung_series_uid == ref.lung_series_uid
        assert study.lesion_instances == ref.lesion_instances
        for path in study.folder.glob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]
            assert ds.SOPInstanceUID == pydicom.dcmread(ref.folder / path.name).SOPInstanceUID
            assert ds.LossyImageCompression == "00"
    # and the pixel data decodes to exactly the same values
    _assert_same_hu(studies, plain)


@pytest.mark.parametrize("name", _syntaxes(["jpeg-ls", "jpeg-lossless", "deflated"]))
def test_compressed_enhanced_ct_decodes_to_the_same_hu(
    tmp_path: Path, plain: list[PhantomStudy], name: str
) -> None:
    # when the thin series is one compressed Enhanced CT instance (one fragment a frame)
    studies = _write(tmp_path, transfer_syntax=name, enhanced=True)
    # then the worker loads it as a multi-frame series with the same HU, frame k = slice k
    for study in studies:
        volume = _volume(study)
        assert volume.frame_numbers == tuple(range(1, OPTION_SLICES + 1))
    _assert_same_hu(studies, plain)


def test_near_lossless_stays_within_two_hu_and_says_it_is_lossy(
    tmp_path: Path, plain: list[PhantomStudy]
) -> None:
    # when the studies are written JPEG-LS near-lossless
    studies = _write(tmp_path, transfer_syntax="jpeg-ls-near")
    for study, ref in zip(studies, plain, strict=True):
        # then each HU is within NEAR = 2 of the lossless one
        difference = np.abs(_volume(study).hu - _volume(ref).hu)
        assert 0 < float(difference.max()) <= 2.0
        # and the images say they are lossy, under UIDs of their own
        ds = _thin_slices(study)[0]
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES["jpeg-ls-near"]
        assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_14495_1")
        assert float(ds.LossyImageCompressionRatio) > 1.0
        assert study.lung_series_uid != ref.lung_series_uid
        assert study.study_uid == ref.study_uid
    # and the padding of the signed study is declared as a range that covers the moved values
    signed = _thin_slices(studies[1])[OPTION_SLICES // 2]
    low, high = int(signed.PixelPaddingValue), int(signed.PixelPaddingRangeLimit)
    assert (low, high) == (-2002, -1998)
    plain_pixels = _thin_slices(plain[1])[OPTION_SLICES // 2].pixel_array
    padded = signed.pixel_array[plain_pixels == -2000]
    assert padded.size and ((padded >= low) & (padded <= high)).all()


def test_options_keep_the_files_byte_identical_by_seed(tmp_path: Path) -> None:
    # given a study written with every option changed
    options: dict[str, Any] = {
        "thickness": 2.0,
        "kernel": "BONE",
        "transfer_syntax": "rle",
        "enhanced": True,
        "matrix": OPTION_MATRIX,
    }
    first = write_phantom_studies(tmp_path / "a", covid=1, healthy=0, slices=8, seed=5, **options)
    # when it is written again with the same seed and options
    again = write_phantom_studies(tmp_path / "b", covid=1, healthy=0, slices=8, seed=5, **options)
    assert pydicom.dcmread(first[0].folder / "CT_02_enhanced.dcm").Rows == OPTION_MATRIX
    # then every file is byte-identical
    names = sorted(p.name for p in first[0].folder.iterdir())
    assert "CT_02_enhanced.dcm" in names
    for name in names:
        assert (first[0].folder / name).read_bytes() == (again[0].folder / name).read_bytes()


def test_thickness_and_kernel_are_in_the_thin_series_headers(
    plain: list[PhantomStudy], bone_thin: list[PhantomStudy]
) -> None:
    for study, ref in zip(bone_thin, plain, strict=True):
        # given the thin series written 0.625 mm with the BONE kernel
        thin = _thin_slices(study)
        # then its headers say so, under a series UID of its own in the same study
        for ds in thin:
            assert float(ds.SliceThickness) == 0.625
            assert ds.ConvolutionKernel == "BONE"
            assert ds.SeriesDescription == "CHEST 0.625 BONE"
        assert study.lung_series_uid != ref.lung_series_uid
        assert thin[0].StudyInstanceUID == ref.study_uid
        # and the same slices at the same places, with the same ground truth
        assert [ds.ImagePositionPatient for ds in thin] == [
            ds.ImagePositionPatient for ds in _thin_slices(ref)
        ]
        assert study.lesion_instances == ref.lesion_instances
        # while the localizer and the thick series are the plain study's, byte for byte
        for path in ref.folder.glob("CT_0[13]_*.dcm"):
            assert path.read_bytes() == (study.folder / path.name).read_bytes()


def _grain(ds: pydicom.Dataset) -> float:
    """Pixel-to-pixel variation inside the body: higher for sharper, noisier kernels."""
    middle = slice(OPTION_MATRIX * 5 // 16, OPTION_MATRIX * 11 // 16)
    hu = _hu(ds)[middle, middle]
    return float(np.median(np.abs(np.diff(hu, axis=1))))


def test_sharper_kernels_look_sharper_and_noisier(
    plain: list[PhantomStudy], soft: list[PhantomStudy], bone_thin: list[PhantomStudy]
) -> None:
    # given the same slice through BONE (0.625 mm), LUNG and SOFT (1 mm) reconstructions
    k = OPTION_SLICES // 2
    grain = {
        kernel: _grain(_thin_slices(studies[0])[k])
        for kernel, studies in (("BONE", bone_thin), ("LUNG", plain), ("SOFT", soft))
    }
    # then the grain follows the kernel
    assert grain["BONE"] > grain["LUNG"] > grain["SOFT"], grain


def test_series_selection_prefers_the_thinnest_then_the_lung_kernel(
    plain: list[PhantomStudy], soft: list[PhantomStudy], bone_thin: list[PhantomStudy]
) -> None:
    # given the plain study (1 mm LUNG, 5 mm STANDARD, localizer) and the same study's thin
    # series reconstructed 1 mm SOFT and 0.625 mm BONE
    study = sorted(plain[0].folder.glob("*.dcm"))
    soft_thin = sorted(soft[0].folder.glob("CT_02_*.dcm"))
    bone = sorted(bone_thin[0].folder.glob("CT_02_*.dcm"))
    # when selecting among 1 mm series, then the lung kernel wins over the soft one
    chosen = select_series([*soft_thin, *study], min_slices=OPTION_SLICES)
    assert chosen.series_uid == plain[0].lung_series_uid
    assert (chosen.slice_thickness, chosen.kernel) == (1.0, "LUNG")
    # and a thinner series wins before any kernel rule
    chosen = select_series([*soft_thin, *study, *bone], min_slices=OPTION_SLICES)
    assert chosen.series_uid == bone_thin[0].lung_series_uid
    assert (chosen.slice_thickness, chosen.kernel) == (0.625, "BONE")


def test_enhanced_ct_headers_carry_thickness_kernel_and_frame_mapping(
    tmp_path: Path, plain: list[PhantomStudy]
) -> None:
    # when a study is written with its thin series as one Enhanced CT instance, 2 mm SOFT
    study = write_phantom_studies(
        tmp_path,
        covid=1,
        healthy=0,
        slices=8,
        seed=OPTION_SEED,
        thickness=2,
        kernel="SOFT",
        enhanced=True,
        matrix=OPTION_MATRIX,
    )[0]
    paths = sorted(study.folder.glob("CT_02_*.dcm"))
    assert [p.name for p in paths] == ["CT_02_enhanced.dcm"]
    ds = pydicom.dcmread(paths[0])
    # then it is one Enhanced CT instance of 8 frames with the functional groups the worker reads
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"
    assert ds.SeriesInstanceUID == study.lung_series_uid and int(ds.NumberOfFrames) == 8
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == 2.0
    reconstruction = shared.CTReconstructionSequence[0]
    assert (reconstruction.ConvolutionKernel, reconstruction.ConvolutionKernelGroup) == (
        "SOFT",
        "SOFT_TISSUE",
    )
    assert shared.CTImageFrameTypeSequence[0].FrameType[0] == "ORIGINAL"
    transform = shared.PixelValueTransformationSequence[0]
    assert (float(transform.RescaleIntercept), transform.RescaleType) == (-1024.0, "HU")
    # and frame k sits where slice k of the single-frame series sits, numbered k in the masks
    z = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    single = [float(ds.ImagePositionPatient[2]) for ds in _thin_slices(plain[0])]
    assert z == pytest.approx(single)
    stacks = [f.FrameContentSequence[0] for f in ds.PerFrameFunctionalGroupsSequence]
    assert [int(c.InStackPositionNumber) for c in stacks] == list(range(1, 9))
    saved = np.load(study.folder / LESION_MASKS_NAME)
    assert list(saved["instance_numbers"]) == list(range(1, 9))
    assert set(saved["sop_instance_uids"]) == {ds.SOPInstanceUID}
    assert study.lesion_instances == [i + 1 for i in range(8) if saved["masks"][i].any()]


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    ("name", "enhanced"),
    [
        ("explicit", True),
        ("jpeg2000", True),
        ("rle", False),
        ("jpeg-lossless", False),
        ("jpeg-ls-near", False),
    ],
)
def test_dciodvfy_finds_no_error_in_option_outputs(
    tmp_path: Path, name: str, enhanced: bool
) -> None:
    # given a study written with a transfer syntax, its thin series single- or multi-frame
    study = write_phantom_studies(
        tmp_path,
        covid=0,
        healthy=1,
        slices=8,
        seed=OPTION_SEED,
        transfer_syntax=name,
        enhanced=enhanced,
        matrix=OPTION_MATRIX,
    )[0]
    # then dciodvfy finds no error in the thin series, the thick series or the localizer
    first_two = sorted(study.folder.glob("CT_0[12]_*.dcm"))[:2]
    for path in [*first_two, study.folder / "CT_03_0001.dcm"]:
        assert dciodvfy_errors(path) == [], path


def test_bad_options_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    for options, message in (
        ({"thickness": 5.5}, "thickness"),
        ({"thickness": 0.0}, "thickness"),
        ({"thickness": 5.0}, "needs more slices than it"),  # 8 thin slices, 8 thick ones
        ({"kernel": "B70f"}, "kernel must be one of LUNG, BONE, STANDARD, SOFT"),
        ({"transfer_syntax": "jpeg-baseline"}, "transfer syntax must be one of"),
        ({"matrix": 100}, "matrix must be even and 128-1024"),
        ({"randomise_acquisition": True, "thickness": 2.0}, "randomised acquisition"),
        ({"negative_mix": {"normal": 0.5}}, "sum to 1"),
    ):
        with pytest.raises(ValueError, match=message):
            write_phantom_studies(tmp_path / "out", covid=1, healthy=0, slices=8, **options)
    assert not (tmp_path / "out").exists()


def test_cli_passes_the_options_through(tmp_path: Path) -> None:
    # when the CLI writes one study of each label with every option (--negative is --healthy)
    args = ["phantom", str(tmp_path), "--covid", "1", "--negative", "1", "--slices", "8"]
    args += ["--seed", str(OPTION_SEED), "--thickness", "0.75", "--kernel", "bone"]
    args += ["--transfer-syntax", "jpeg-ls", "--enhanced", "--matrix", "128"]
    args += ["--negative-mix", "other_pneumonia=1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    # then it succeeds and the files say what was asked
    assert result.exit_code == 0, result.output
    ds = pydicom.dcmread(tmp_path / "covid_001" / "CT_02_enhanced.dcm", stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES["jpeg-ls"]
    assert (ds.Rows, ds.Columns) == (128, 128)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == 0.75
    assert shared.CTReconstructionSequence[0].ConvolutionKernel == "BONE"
    with (tmp_path / LABELS_NAME).open(newline="") as handle:
        groups = {r["folder"]: r["group"] for r in csv.DictReader(handle)}
    assert groups == {"covid_001": "covid", "healthy_001": "other_pneumonia"}
    # and a bad option is a usage error (exit 2) naming the choices
    bad = CliRunner().invoke(app, [*args[:2], "--kernel", "fuzzy"])
    assert bad.exit_code == 2 and "LUNG, BONE, STANDARD, SOFT" in bad.output
    bad = CliRunner().invoke(app, [*args[:2], "--negative-mix", "pneumothorax=1"])
    assert bad.exit_code == 2 and "unknown negative group pneumothorax" in bad.output


# --- negatives: groups and confounders ---------------------------------------------------------

SMALL = {"slices": 12, "matrix": 128}  # enough lung slices to cut every finding


def _labels(folder: Path) -> list[dict[str, str]]:
    with (folder / LABELS_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _finding_ids(study: PhantomStudy) -> set[int]:
    return {int(v) for v in np.unique(np.load(study.folder / LESION_MASKS_NAME)["findings"])}


def test_a_negative_mix_draws_its_groups_and_labels_them(tmp_path: Path) -> None:
    # when negatives are written with a mix of the three groups
    mix = {"normal": 0.4, "other_pneumonia": 0.2, "other_finding": 0.4}
    studies = write_phantom_studies(
        tmp_path, covid=0, healthy=8, seed=SEED, negative_mix=mix, **SMALL
    )
    # then every group of the mix is drawn, each study labelled healthy with its group
    assert {s.group for s in studies} == set(mix)
    for study, row in zip(studies, _labels(tmp_path), strict=True):
        assert (row["label"], row["group"], row["severity"]) == ("healthy", study.group, "none")
        assert row["lesion_instances"] == "" and study.lesion_instances == []
        # and its findings agree with its group, in labels.csv and in the masks' findings map
        assert row["findings"] == ";".join(study.findings)
        shown = {FINDING_NAMES[i] for i in _finding_ids(study)} - {""}
        assert not shown & set(COVID_KINDS)
        if study.group == "normal":
            assert study.findings == () and shown == set()
        elif study.group == "other_pneumonia":
            assert study.findings == ("other_pneumonia",) and shown == {"other_pneumonia"}
        else:
            assert study.findings and "other_pneumonia" not in study.findings
            assert shown <= set(study.findings)


def test_without_a_negative_mix_the_group_follows_the_drawn_findings(tmp_path: Path) -> None:
    # when negatives and positives are written with the generator's own draw of confounders
    # (about one negative in five is drawn normal: seed 3 draws both kinds among six, seed 0
    # draws no normal one)
    studies = write_phantom_studies(tmp_path, covid=2, healthy=6, seed=3, **SMALL)
    # then each study's group is what its findings make it
    for study in studies:
        if study.label == "covid":
            assert study.group == "covid"
        elif "other_pneumonia" in study.findings:
            assert study.group == "other_pneumonia"
        else:
            assert study.group == ("other_finding" if study.findings else "normal")
        assert set(study.findings) <= set(CONFOUNDERS)
    # and some negatives show findings while others are normal
    negatives = {s.group for s in studies if s.label == "healthy"}
    assert "normal" in negatives and negatives - {"normal"}


@pytest.mark.parametrize("name", CONFOUNDERS)
def test_each_confounder_is_drawn_and_labelled(tmp_path: Path, name: str) -> None:
    # when a negative is written with all its share on one confounder
    (study,) = write_phantom_studies(
        tmp_path, covid=0, healthy=1, seed=SEED, negative_mix={name: 1.0}, **SMALL
    )
    # then labels.csv names it, in the group it belongs to
    (row,) = _labels(tmp_path)
    group = "other_pneumonia" if name == "other_pneumonia" else "other_finding"
    assert (row["group"], row["findings"]) == (group, name)
    assert (study.group, study.findings) == (group, (name,))
    # and the findings map shows it in the lung (motion is in the image, not in the lung)
    ids = _finding_ids(study) - {0}
    assert ids == (set() if name == "motion" else {FINDINGS[name]})


def test_negative_mix_shares_are_read_in_a_fixed_order() -> None:
    assert list(parse_negative_mix("nodule=0.1, other_finding=0.2,normal=0.7")) == [
        "normal",
        "other_finding",
        "nodule",
    ]
    for text, message in (
        ("normal=0.5,other_pneumonia=0.4", "sum to 1"),
        ("normal=1,covid=0", "unknown negative group covid"),
        ("normal", "not NAME=SHARE"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_negative_mix(text)


# --- domain randomisation of the thin series ----------------------------------------------------


def test_randomised_acquisition_varies_the_thin_series_not_the_patient(
    tmp_path: Path, plain: list[PhantomStudy]
) -> None:
    # when the plain fixture's studies are written again with a randomised acquisition
    studies = write_phantom_studies(
        tmp_path, covid=1, healthy=1, slices=10, seed=OPTION_SEED, matrix=OPTION_MATRIX,
        randomise_acquisition=True,
    )  # fmt: skip
    seen = set()
    for study, ref in zip(studies, plain, strict=True):
        # then the thin series carries a drawn kernel, thickness, matrix and field of view
        thin = _thin_slices(study)
        ds = thin[0]
        assert ds.ConvolutionKernel in KERNELS
        assert float(ds.SliceThickness) in RANDOM_THICKNESSES
        assert ds.Rows in {round(OPTION_MATRIX * share) for share in RANDOM_MATRICES}
        fov = float(ds.PixelSpacing[0]) * ds.Rows
        assert RANDOM_FOV_MM[0] - 2.0 <= fov <= RANDOM_FOV_MM[1] + 2.0
        seen.add((ds.ConvolutionKernel, float(ds.SliceThickness), ds.Rows, round(fov)))
        # under UIDs of its own, in the same study of the same patient
        assert study.lung_series_uid != ref.lung_series_uid
        assert (study.study_uid, study.patient_id) == (ref.study_uid, ref.patient_id)
        assert (study.group, study.findings) == (ref.group, ref.findings)
        # and it is still the series the worker picks
        assert _volume(study).series_uid == study.lung_series_uid
    assert len(seen) == 2  # each study drew its own acquisition
