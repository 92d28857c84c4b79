"""Tests of the synthetic chest CT phantoms (worker/phantom.py).

The demo, the pipeline tests and the training of the demo weights all stand on these studies, so
they must be valid DICOM as a scanner sends it, realistic in Hounsfield units, honest in their
ground truth, and byte-for-byte reproducible from a seed.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from worker.phantom import (
    LABELS_NAME,
    LESION_MASKS_NAME,
    PhantomStudy,
    write_non_ct_study,
    write_phantom_studies,
)

SLICES = 24
SEED = 0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phantoms")


@pytest.fixture(scope="module")
def studies(out_dir: Path) -> list[PhantomStudy]:
    return write_phantom_studies(out_dir, covid=1, healthy=1, slices=SLICES, seed=SEED)


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


def _lungs(hu: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Crude lung segmentation: the two largest air-like regions that do not touch the edge."""
    labels, count = ndimage.label(hu < -400)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    sizes = [(int((labels == i).sum()), i) for i in range(1, count + 1) if i not in border]
    keep = [i for _, i in sorted(sizes, reverse=True)[:2]]
    return np.isin(labels, keep)


def test_same_seed_gives_byte_identical_files(tmp_path: Path, covid: PhantomStudy) -> None:
    # given the positive study written by the fixture with seed 0
    # when the same study is written again elsewhere with the same seed
    again = write_phantom_studies(tmp_path, covid=1, healthy=0, slices=SLICES, seed=SEED)[0]
    # then every file, UIDs and masks included, is byte-identical
    names = sorted(p.name for p in covid.folder.iterdir())
    assert names == sorted(p.name for p in again.folder.iterdir())
    for name in names:
        assert (covid.folder / name).read_bytes() == (again.folder / name).read_bytes(), name
    assert again.study_uid == covid.study_uid
    assert again.lesion_instances == covid.lesion_instances


def test_another_seed_gives_another_patient(tmp_path: Path, covid: PhantomStudy) -> None:
    # given the positive study of seed 0
    # when the first positive study of another seed is written
    other = write_phantom_studies(tmp_path, covid=1, healthy=0, slices=8, seed=SEED + 1)[0]
    # then it is another study of another patient
    assert other.study_uid != covid.study_uid
    assert other.patient_id != covid.patient_id


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
            assert (ds.Rows, ds.Columns) == (512, 512)
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.BitsAllocated == 16
            assert (ds.BitsStored, ds.PixelRepresentation) in {(12, 0), (16, 1)}
            assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
            assert ds.pixel_array.shape == (512, 512)


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
            assert 0.6 < float(ds.PixelSpacing[0]) < 0.8
    assert list(kinds["LOCALIZER"][0].ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    frames = {ds.FrameOfReferenceUID for dss in series.values() for ds in dss}
    assert len(frames) == 1


def test_thin_slices_spread_over_the_chest_in_table_order(covid: PhantomStudy) -> None:
    # given the thin lung series
    thin = _thin_slices(covid)
    # when their positions are read in InstanceNumber order
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in thin])
    # then they run from apex to bases, evenly, over about 260 mm, SliceLocation agreeing
    assert np.allclose(np.diff(z), -260.0 / SLICES, atol=1e-3)
    assert [float(ds.SliceLocation) for ds in thin] == pytest.approx(list(z))
    assert [int(ds.InstanceNumber) for ds in thin] == list(range(1, SLICES + 1))


def test_lung_parenchyma_is_about_minus_850_hu(healthy: PhantomStudy) -> None:
    # given a slice through the middle of a healthy chest
    hu = _hu(_thin_slices(healthy)[SLICES // 2])
    # when the lungs are segmented from it
    lungs = _lungs(hu)
    # then both lungs are there and their parenchyma is about -850 HU
    assert lungs.sum() > 20_000
    assert -900.0 < float(np.median(hu[lungs])) < -790.0
    # and soft tissue and air outside the patient are where they belong
    assert float(np.median(hu[:20, :20])) < -950.0


def test_ground_glass_lesions_are_between_minus_700_and_minus_300_hu(covid: PhantomStudy) -> None:
    # given the positive study and its ground-truth lesion masks
    masks = np.load(covid.folder / LESION_MASKS_NAME)["masks"]
    thin = _thin_slices(covid)
    # when the HU under the masks is gathered
    values = np.concatenate([_hu(thin[n - 1])[masks[n - 1]] for n in covid.lesion_instances])
    # then the lesions are mostly ground glass
    assert values.size > 50
    assert -700.0 <= float(np.median(values)) <= -300.0
    assert float(np.mean((values >= -700.0) & (values <= -300.0))) > 0.5


def test_lesion_ground_truth_agrees_with_the_masks(
    covid: PhantomStudy, healthy: PhantomStudy
) -> None:
    # given both studies' lesion_masks.npz
    for study in (covid, healthy):
        saved = np.load(study.folder / LESION_MASKS_NAME)
        masks = saved["masks"]
        # then there is one boolean mask per thin slice, in InstanceNumber order
        assert masks.shape == (SLICES, 512, 512)
        assert masks.dtype == bool
        assert list(saved["instance_numbers"]) == list(range(1, SLICES + 1))
        uids = [ds.SOPInstanceUID for ds in _thin_slices(study)]
        assert list(saved["sop_instance_uids"]) == uids
        # and lesion_instances lists exactly the slices whose mask is not empty
        expected = [i + 1 for i in range(SLICES) if masks[i].any()]
        assert study.lesion_instances == expected
    assert covid.lesion_instances
    assert healthy.lesion_instances == []


def test_labels_csv_lists_every_study_folder(out_dir: Path, studies: list[PhantomStudy]) -> None:
    # given the run's labels.csv
    with (out_dir / LABELS_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # then it has one row per study, matching the folders on disk
    assert [r["study_uid"] for r in rows] == [s.study_uid for s in studies]
    for row, study in zip(rows, studies, strict=True):
        assert list(row) == ["study_uid", "folder", "label", "patient_id", "lesion_instances"]
        assert (out_dir / row["folder"]) == study.folder
        assert study.folder.is_dir()
        assert row["label"] == study.label
        assert row["patient_id"] == study.patient_id
        listed = [int(n) for n in row["lesion_instances"].split(";") if n]
        assert listed == study.lesion_instances
        ds = pydicom.dcmread(next(study.folder.glob("*.dcm")), stop_before_pixels=True)
        assert ds.StudyInstanceUID == row["study_uid"]
    assert {r["label"] for r in rows} == {"covid", "healthy"}


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
