"""The analysis pipeline on small synthetic CT series written with pydicom in the test itself.

Each series is a stack of axial slices: an elliptic soft-tissue body in air, and (on the slices
given) two air-filled lungs with a ground-glass patch whose size changes along z, so that the
untrained network gives different probabilities per slice. Sizes stay small (128 x 128, 24-30
slices) so the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from hrct_triage.phantoms import LESION_MASKS_NAME, PhantomStudy, write_phantom_studies
from hrct_triage.worker.method.inference import (
    cam_image,
    forward,
    study_probability,
    top_slices,
    trim_count,
)
from hrct_triage.worker.method.model import (
    CheckpointError,
    CheckpointMetadata,
    LoadedModel,
    ModelError,
    WeightsMissing,
    build_densenet121,
    cpu_supports_bf16,
    file_sha256,
    load_model,
    save_checkpoint,
)
from hrct_triage.worker.method.pipeline import analyse_study
from hrct_triage.worker.method.preprocess import lung_field, lung_slices, lung_window, model_input
from hrct_triage.worker.method.results import NotApplicable, StudyAnalysis
from hrct_triage.worker.method.series import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    select_series,
)
from hrct_triage.worker.method.volume import load_volume
from tests.helpers.dicom_peers import dciodvfy_errors

torch.set_num_threads(2)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SIZE = 128
PIXEL_MM = 2.5  # 320 mm field of view, like an adult chest
STUDY = "1.2.826.0.1.3680043.10.1.1"


# --- synthetic series --------------------------------------------------------------------------


@dataclass
class SeriesSpec:
    """How one synthetic series looks; the defaults make a thin lung-kernel chest series."""

    slices: int = 30
    lung_range: tuple[int, int] = (4, 26)  # slice indices (superior first) that show lung
    thickness: float = 1.0
    spacing: float = 1.0
    kernel: str = "LUNG"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    modality: str = "CT"
    sop_class: str = CT_IMAGE_STORAGE
    orientation: tuple[float, ...] = AXIAL
    size: int = SIZE
    slope: float = 1.0
    intercept: float = -1024.0
    skip: tuple[int, ...] = ()  # slice indices left out (missing slices)


def phantom_hu(spec: SeriesSpec, index: int) -> npt.NDArray[np.float32]:
    """One slice in HU: body, two lungs with a ground-glass patch, a little seeded noise."""
    n = spec.size
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[(x / 0.42) ** 2 + (y / 0.32) ** 2 <= 1.0] = 40.0
    if spec.lung_range[0] <= index < spec.lung_range[1]:
        for side in (-1.0, 1.0):
            hu[((x - side * 0.18) / 0.12) ** 2 + (y / 0.22) ** 2 <= 1.0] = -850.0
        radius = 0.02 + 0.05 * abs(math.sin(index / 3.0))
        hu[(x - 0.2) ** 2 + (y + 0.05) ** 2 <= radius**2] = -550.0
    noise = np.random.default_rng(index).normal(0.0, 15.0, size=(n, n)).astype(np.float32)
    return np.clip(hu + noise, -1024.0, 3000.0)


def _stored(hu: npt.NDArray[np.float32], spec: SeriesSpec) -> npt.NDArray[np.uint16]:
    return np.round((hu - spec.intercept) / spec.slope).astype(np.uint16)


def _base_dataset(spec: SeriesSpec, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(spec.sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "PHANTOM"
    ds.Modality = spec.modality
    ds.ImageType = list(spec.image_type)
    ds.Rows = ds.Columns = spec.size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _z(spec: SeriesSpec, index: int) -> float:
    return 100.0 - index * spec.spacing  # index 0 is the most superior slice


def write_series(
    folder: Path,
    spec: SeriesSpec,
    *,
    study_uid: str = STUDY,
    series_uid: str | None = None,
    frame_of_reference: str | None = None,
) -> tuple[str, list[Path]]:
    """Write one single-frame file per slice, in shuffled order; return the series UID, paths."""
    series_uid = series_uid or _uid()
    frame_of_reference = frame_of_reference or _uid()
    folder.mkdir(parents=True, exist_ok=True)
    indices = [i for i in range(spec.slices) if i not in spec.skip]
    random.Random(series_uid).shuffle(indices)
    paths = []
    for index in indices:
        ds = _base_dataset(spec, study_uid, series_uid, f"{series_uid}.{index + 1}")
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [-160.0, -160.0, _z(spec, index)]
        ds.ImageOrientationPatient = list(spec.orientation)
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.SliceThickness = spec.thickness
        ds.ConvolutionKernel = spec.kernel
        ds.RescaleSlope = spec.slope
        ds.RescaleIntercept = spec.intercept
        ds.PixelData = _stored(phantom_hu(spec, index), spec).tobytes()
        path = folder / f"{series_uid}-{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return series_uid, paths


def write_enhanced(folder: Path, spec: SeriesSpec, *, study_uid: str) -> tuple[str, Path]:
    """The same slices as one Enhanced CT instance, frames in shuffled order."""
    series_uid = _uid()
    order = list(range(spec.slices))
    random.Random(1).shuffle(order)
    ds = _base_dataset(
        SeriesSpec(**{**spec.__dict__, "sop_class": ENHANCED_CT_IMAGE_STORAGE}),
        study_uid,
        series_uid,
        _uid(),
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.FrameOfReferenceUID = _uid()
    ds.NumberOfFrames = spec.slices
    shared = Dataset()
    shared.PixelMeasuresSequence = [
        _item(PixelSpacing=[PIXEL_MM, PIXEL_MM], SliceThickness=spec.thickness)
    ]
    shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=list(spec.orientation))]
    shared.PixelValueTransformationSequence = [
        _item(RescaleSlope=spec.slope, RescaleIntercept=spec.intercept, RescaleType="HU")
    ]
    shared.CTReconstructionSequence = [_item(ConvolutionKernel=spec.kernel)]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(PlanePositionSequence=[_item(ImagePositionPatient=[-160.0, -160.0, _z(spec, i)])])
        for i in order
    ]
    ds.PixelData = np.stack([_stored(phantom_hu(spec, i), spec) for i in order]).tobytes()
    path = folder / "enhanced.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return series_uid, path


def _uid() -> str:
    """A short random UID (2.25 + UUID), leaving room for a per-slice suffix within 64 chars."""
    return f"2.25.{uuid.uuid4().int}"


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def write_secondary_capture(folder: Path, *, study_uid: str) -> tuple[str, Path]:
    series_uid = _uid()
    spec = SeriesSpec(modality="OT", sop_class=SecondaryCaptureImageStorage, size=16)
    ds = _base_dataset(spec, study_uid, series_uid, _uid())
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    return series_uid, path


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained() -> LoadedModel:
    return load_model(None, allow_untrained=True, device="cpu")


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Path]]:
    return write_series(tmp_path_factory.mktemp("chest"), SeriesSpec())


@pytest.fixture(scope="module")
def chest_analysis(
    chest: tuple[str, list[Path]], untrained: LoadedModel
) -> Iterator[tuple[StudyAnalysis, list[Dataset]]]:
    yield analyse_study(STUDY, chest[1], untrained, batch_size=8)


# --- series selection --------------------------------------------------------------------------


def test_selection_prefers_thin_lung_series_over_thick_localizer_and_sc(tmp_path: Path) -> None:
    # Given a study with a thin lung series, a thick one, a localizer and a secondary capture
    study = "1.2.826.0.1.3680043.10.1.2"
    thin, thin_paths = write_series(tmp_path, SeriesSpec(size=16), study_uid=study)
    _, thick = write_series(
        tmp_path,
        SeriesSpec(size=16, thickness=5.0, spacing=5.0, kernel="STANDARD", slices=40),
        study_uid=study,
    )
    _, scout = write_series(
        tmp_path,
        SeriesSpec(size=16, slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        study_uid=study,
    )
    _, sc = write_secondary_capture(tmp_path, study_uid=study)
    junk = tmp_path / "not-dicom.dcm"
    junk.write_bytes(b"this is not DICOM")
    # When the series is selected (an unreadable file among them is skipped)
    chosen = select_series([*thick, *scout, sc, junk, *thin_paths])
    # Then the thin series wins, with all its files
    assert chosen.series_uid == thin
    assert sorted(chosen.paths) == sorted(thin_paths)
    assert chosen.slice_count == 30 and not chosen.multiframe


def test_selection_prefers_lung_kernel_at_equal_thickness(tmp_path: Path) -> None:
    # Given two 1 mm series, a soft-tissue kernel with more slices and a lung kernel
    _, soft = write_series(tmp_path, SeriesSpec(size=16, slices=35, kernel="STANDARD"))
    lung_uid, lung = write_series(tmp_path, SeriesSpec(size=16, slices=30, kernel="B70f"))
    # When selecting, then the sharp kernel wins over the slice count
    assert select_series([*soft, *lung]).series_uid == lung_uid


def test_no_fit_series_names_each_series_and_its_rule(tmp_path: Path) -> None:
    # Given a localizer, a secondary capture, a short series and a sagittal reformat
    _, scout = write_series(
        tmp_path, SeriesSpec(size=16, slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    )
    sc_uid, sc = write_secondary_capture(tmp_path, study_uid="1.2.3")
    short_uid, short = write_series(tmp_path, SeriesSpec(size=16, slices=12))
    sag_uid, sagittal = write_series(tmp_path, SeriesSpec(size=16, orientation=SAGITTAL))
    # When selecting
    with pytest.raises(NotApplicable) as caught:
        select_series([*scout, sc, *short, *sagittal])
    # Then the reason lists every series with the rule it failed
    reason = caught.value.reason
    assert reason.startswith("no axial CT series fit for analysis: ")
    assert "LOCALIZER" in reason
    assert f"{sc_uid} (OT) not CT" in reason
    assert f"{short_uid} only 12 slices < 20" in reason
    assert f"{sag_uid} not axial" in reason
    assert "PHANTOM" not in reason


# --- volume ------------------------------------------------------------------------------------


def test_volume_is_in_table_order_with_rescaled_hu(tmp_path: Path) -> None:
    # Given a series stored with slope 2 and intercept -2048, written in shuffled order
    spec = SeriesSpec(slices=24, slope=2.0, intercept=-2048.0, size=64)
    _, paths = write_series(tmp_path, spec)
    # When the volume is built
    volume = load_volume(select_series(paths))
    # Then slices run superior to inferior, headers and UIDs follow, and HU are restored
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.headers]
    assert z == sorted(z, reverse=True)
    assert [str(ds.SOPInstanceUID) for ds in volume.headers] == list(volume.sop_instance_uids)
    assert all("PixelData" not in ds for ds in volume.headers)
    stored = np.stack([_stored(phantom_hu(spec, i), spec) for i in range(spec.slices)])
    assert np.array_equal(volume.hu, stored.astype(np.float32) * 2.0 - 2048.0)
    assert volume.hu.dtype == np.float32 and volume.hu.min() < -900 and volume.hu.max() > 0
    assert volume.pixel_spacing == (PIXEL_MM, PIXEL_MM)
    assert volume.slice_spacing == pytest.approx(1.0)


def test_missing_slice_is_not_applicable(tmp_path: Path) -> None:
    # Given a series whose 11th slice never arrived
    _, paths = write_series(tmp_path, SeriesSpec(size=16, skip=(10,)))
    # When the volume is built, then the spacing rule names the gap
    with pytest.raises(NotApplicable, match="slice spacing not uniform"):
        load_volume(select_series(paths))


def test_series_without_lung_is_not_applicable(tmp_path: Path, untrained: LoadedModel) -> None:
    # Given an axial CT series that never shows lung (say, an abdomen)
    uid, paths = write_series(tmp_path, SeriesSpec(lung_range=(0, 0), size=64))
    # When analysed, then it is not applicable, and the reason names the series
    with pytest.raises(NotApplicable, match=f"series {uid}: no slice shows lung"):
        analyse_study(STUDY, paths, untrained)


def test_two_frames_of_reference_are_not_applicable(tmp_path: Path) -> None:
    # Given one series whose slices claim two frames of reference
    spec = SeriesSpec(size=16, slices=20)
    uid, first = write_series(tmp_path / "a", spec, series_uid="1.2.826.0.1.3680043.10.9")
    later = SeriesSpec(size=16, slices=20)
    _, second = write_series(tmp_path / "b", later, series_uid=uid)
    for index, path in enumerate(second):  # move the second half 20 mm down
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = f"{uid}.9{index}"
        ds.ImagePositionPatient = [-160.0, -160.0, float(ds.ImagePositionPatient[2]) - 20.0]
        ds.save_as(path)
    # When the volume is built, then the frame of reference rule fails
    with pytest.raises(NotApplicable, match="more than one frame of reference"):
        load_volume(select_series([*first, *second]))


def test_enhanced_ct_gives_the_same_probabilities_as_single_frames(
    tmp_path: Path,
    chest_analysis: tuple[StudyAnalysis, list[Dataset]],
    untrained: LoadedModel,
) -> None:
    # Given the chest series stored as one Enhanced CT instance with shuffled frames
    series_uid, path = write_enhanced(tmp_path, SeriesSpec(), study_uid=STUDY)
    # When it is analysed
    analysis, headers = analyse_study(STUDY, [path], untrained, batch_size=8)
    # Then the slices, their order and probabilities match the single-frame series
    reference = chest_analysis[0]
    assert analysis.series_uid == series_uid
    assert [s.probability for s in analysis.slices] == pytest.approx(
        [s.probability for s in reference.slices], abs=1e-5
    )
    frames = [s.frame_number for s in analysis.slices]
    assert all(f is not None for f in frames) and len(set(frames)) == len(frames)
    assert all(h.frame_number is not None for h in analysis.heatmaps)
    assert len(headers) == len(analysis.slices)


# --- preprocessing -----------------------------------------------------------------------------


def test_lung_slices_are_those_with_air_inside_the_body() -> None:
    # Given slices with lungs only on 4..25, and one slice holding just a trachea-sized hole
    spec = SeriesSpec()
    hu = np.stack([phantom_hu(spec, i) for i in range(spec.slices)])
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
    hu[0][x**2 + y**2 <= 0.03**2] = -1000.0  # ~10 mm across: trachea, not lung
    # When lung slices are detected
    found = lung_slices(hu, pixel_spacing=(PIXEL_MM, PIXEL_MM))
    # Then exactly the slices with lungs are found
    expected = np.zeros(spec.slices, dtype=bool)
    expected[4:26] = True
    assert found.tolist() == expected.tolist()


def test_lung_window_and_model_input() -> None:
    # Given HU values at and beyond the lung window edges
    hu = np.array([[[-1200.0, -1200.0], [-600.0, 0.0]]], dtype=np.float32)
    # When windowed, then -1200 -> 0, -600 -> 0.5, 0 -> 1
    assert lung_window(hu)[0].tolist() == [[0.0, 0.0], [0.5, 1.0]]
    # And the model input is 3 identical channels of 224 x 224 in [0, 1]
    inputs = model_input(np.full((2, 64, 64), -600.0, dtype=np.float32))
    assert tuple(inputs.shape) == (2, 3, 224, 224)
    assert torch.allclose(inputs, torch.full_like(inputs, 0.5))


# --- inference ---------------------------------------------------------------------------------


def test_trimmed_mean_matches_a_hand_computation() -> None:
    # Given 25 slice probabilities 0.00, 0.04, ..., 0.96 in table order
    probabilities = [i * 0.04 for i in range(25)]
    # When the study probability is taken with 10% trimming
    score = study_probability(probabilities, trim_fraction=0.1)
    # Then round(2.5) = 3 slices go at each end and the rest are averaged
    assert trim_count(25, 0.1) == 3 and trim_count(20, 0.1) == 2 and trim_count(1, 0.1) == 0
    assert score.kept == range(3, 22)
    assert score.probability == pytest.approx(sum(probabilities[3:22]) / 19)
    # And the heat-map slices are the top kept ones, weighted by their share of the mean
    top = top_slices(probabilities, score.kept, count=3)
    assert [i for i, _ in top] == [21, 20, 19]
    assert top[0][1] == pytest.approx(probabilities[21] / sum(probabilities[3:22]))


def test_forward_matches_the_torchvision_forward(untrained: LoadedModel) -> None:
    # Given a few windowed slices
    spec = SeriesSpec()
    inputs = model_input(np.stack([phantom_hu(spec, i) for i in (5, 10, 15)]))
    # When scored in batches of 2
    scores = forward(untrained, inputs, batch_size=2)
    # Then the probabilities equal softmax(DenseNet(x))[:, 1] under the same precision (bf16
    # autocast where the CPU has bf16 in hardware) and the raw CAMs are 7 x 7 float32
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=untrained.bf16),
    ):
        logits = untrained.module(inputs.contiguous(memory_format=torch.channels_last))
    expected = torch.softmax(logits.float(), dim=1)[:, 1]
    assert scores.probabilities == pytest.approx(expected.double().numpy(), abs=1e-5)
    assert scores.cams.shape == (3, 7, 7) and scores.cams.dtype == np.float32


def test_bf16_forward_stays_close_to_fp32() -> None:
    # Given the same weights run in fp32 and under bf16 autocast (emulated where the CPU lacks it)
    spec = SeriesSpec()
    inputs = model_input(np.stack([phantom_hu(spec, i) for i in (5, 10, 15)]))
    fp32 = forward(load_model(None, allow_untrained=True, device="cpu", bf16=False), inputs)
    bf16 = forward(load_model(None, allow_untrained=True, device="cpu", bf16=True), inputs)
    # Then the probabilities agree to well within what moves a decision at 0.8
    assert np.abs(fp32.probabilities - bf16.probabilities).max() < 0.006
    assert bf16.cams.dtype == np.float32


def test_cam_is_source_sized_and_in_unit_range(
    chest_analysis: tuple[StudyAnalysis, list[Dataset]],
) -> None:
    # Given the analysis of the chest series, then each heat map is 128 x 128 in [0, 1]
    analysis, _ = chest_analysis
    assert len(analysis.heatmaps) == 3
    for heat in analysis.heatmaps:
        assert heat.cam.shape == (SIZE, SIZE) and heat.lung_window.shape == (SIZE, SIZE)
        assert heat.cam.min() >= 0.0 and heat.cam.max() <= 1.0
        assert heat.lung_window.min() >= 0.0 and heat.lung_window.max() <= 1.0
        assert heat.cam[0, 0] == 0.0 and heat.cam[-1, -1] == 0.0  # drawn in the lungs only
    # And a CAM of all negative evidence is all zero, not NaN
    assert cam_image(-np.ones((7, 7), dtype=np.float32), rows=9, columns=9).max() == 0.0


def test_heat_map_is_drawn_inside_the_lung_field_only() -> None:
    # Given a slice of soft tissue with one air-filled lung, a vessel (a hole) inside it
    rows, columns = np.mgrid[0:64, 0:64]
    hu = np.full((64, 64), 40.0)
    hu[(rows - 32) ** 2 + (columns - 40) ** 2 < 15**2] = -850.0
    hu[38:42, 38:42] = 40.0
    field = lung_field(hu, pixel_spacing=(1.0, 1.0))
    assert field[40, 40] and field[32, 40] and not field[32, 5]  # the hole is filled
    # and a CAM whose strongest cell lies in the chest wall beside the lung
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[3, 0], cam[3, 4] = 5.0, 1.0
    # When it is drawn for the lung field
    heat = cam_image(cam, rows=64, columns=64, region=field)
    # Then nothing shows outside the lungs and the peak, scaled to 1, lies inside them
    assert heat[~field].max() == 0.0 and heat.max() == pytest.approx(1.0)
    assert field[np.unravel_index(int(np.argmax(heat)), heat.shape)]
    # whereas the whole-slice map peaks in the chest wall
    whole = cam_image(cam, rows=64, columns=64)
    assert not field[np.unravel_index(int(np.argmax(whole)), whole.shape)]
    # And a region that is not the slice's shape is refused
    with pytest.raises(ValueError, match="region"):
        cam_image(cam, rows=64, columns=64, region=field[:10])


def test_analysis_is_the_paper_recipe_over_lung_slices(
    chest_analysis: tuple[StudyAnalysis, list[Dataset]],
) -> None:
    # Given the analysis of a 30-slice series with lung on 22 slices
    analysis, headers = chest_analysis
    probabilities = [s.probability for s in analysis.slices]
    # Then 22 slices were scored, 2 trimmed at each end, and the mean is of the middle 18
    assert len(analysis.slices) == 22 and len(headers) == 22
    assert analysis.kept == [s.sop_instance_uid for s in analysis.slices[2:20]]
    assert analysis.probability == pytest.approx(float(np.mean(probabilities[2:20])))
    assert analysis.positive is (analysis.probability >= 0.8)
    assert [str(h.SOPInstanceUID) for h in headers] == [s.sop_instance_uid for s in analysis.slices]
    # And heat maps go to the most probable kept slices, most probable first
    kept_probs = sorted(probabilities[2:20], reverse=True)[:3]
    assert [h.probability for h in analysis.heatmaps] == pytest.approx(kept_probs)
    assert set(analysis.timings) >= {"select", "load", "preprocess", "forward", "cam", "total"}
    assert analysis.model.untrained and "untrained" in analysis.model.version


# --- model and checkpoints ---------------------------------------------------------------------


def test_untrained_model_is_refused_unless_allowed(tmp_path: Path) -> None:
    # Given no checkpoint, when untrained weights are not allowed, then loading says what to do
    with pytest.raises(WeightsMissing) as caught:
        load_model(None, allow_untrained=False, device="cpu")
    assert "HRCT_MODEL_PATH" in str(caught.value) and "HRCT_ALLOW_UNTRAINED=1" in str(caught.value)
    with pytest.raises(ModelError):
        load_model(tmp_path / "absent.safetensors", allow_untrained=False, device="cpu")


def test_untrained_weights_are_deterministic() -> None:
    # Given two untrained builds with the same seed, then their weights are identical
    first, second = build_densenet121(seed=7), build_densenet121(seed=7)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


def _metadata() -> CheckpointMetadata:
    return CheckpointMetadata(
        name="densenet121-covid19-hrct",
        version="0.1.0-phantom",
        trained_on="synthetic phantoms only",
        created="2025-01-01",
        threshold=0.8,
    )


def test_checkpoint_round_trip_checks_sha256(tmp_path: Path) -> None:
    # Given a checkpoint written with its metadata and sidecar
    module = build_densenet121(seed=3)
    path = tmp_path / "weights.safetensors"
    digest = save_checkpoint(path, module, metadata=_metadata())
    # When it is loaded
    loaded = load_model(path, allow_untrained=False, device="cpu")
    # Then the weights, the metadata and the hash come back
    assert digest == file_sha256(path) == loaded.info.sha256
    assert loaded.metadata == _metadata()
    assert loaded.info.version == "0.1.0-phantom" and not loaded.info.untrained
    assert loaded.info.trained_on == "synthetic phantoms only"
    assert loaded.bf16 == cpu_supports_bf16() and not loaded.module.training
    original = module.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.module.state_dict().items())


def test_tampered_or_unverifiable_checkpoint_is_refused(tmp_path: Path) -> None:
    # Given a checkpoint with one byte changed after its hash was written
    path = tmp_path / "weights.safetensors"
    save_checkpoint(path, build_densenet121(seed=3), metadata=_metadata())
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    # When it is loaded, then the SHA-256 check refuses it
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(path, allow_untrained=True, device="cpu")
    # And without a sidecar, or with a matching hash of a non-safetensors file, it is refused too
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(CheckpointError, match=r"no weights\.safetensors\.sha256"):
        load_model(path, allow_untrained=True, device="cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    junk.with_name(junk.name + ".sha256").write_text(f"{file_sha256(junk)}  {junk.name}\n")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(junk, allow_untrained=True, device="cpu")


# --- compressed transfer syntaxes --------------------------------------------------------------


def _probabilities(analysis: StudyAnalysis) -> list[float]:
    return [s.probability for s in analysis.slices]


def test_rle_compressed_copy_gives_the_same_probabilities(
    tmp_path: Path,
    chest: tuple[str, list[Path]],
    untrained: LoadedModel,
    chest_analysis: tuple[StudyAnalysis, list[Dataset]],
) -> None:
    # Given an RLE Lossless copy of the chest series (pydicom's own encoder)
    copies = []
    for path in chest[1]:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        copies.append(tmp_path / path.name)
        ds.save_as(copies[-1])
    # When analysed, then the probabilities are those of the uncompressed series
    analysis, _ = analyse_study(STUDY, copies, untrained, batch_size=8)
    assert _probabilities(analysis) == pytest.approx(_probabilities(chest_analysis[0]), abs=1e-4)


@pytest.mark.dcmtk
@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="needs DCMTK dcmcjpeg")
def test_jpeg_lossless_copy_gives_the_same_probabilities(
    tmp_path: Path,
    chest: tuple[str, list[Path]],
    untrained: LoadedModel,
    chest_analysis: tuple[StudyAnalysis, list[Dataset]],
) -> None:
    # Given a JPEG Lossless (process 14, SV1) copy of the chest series made by DCMTK
    copies = _dcmcjpeg(chest[1], tmp_path)
    assert str(pydicom.dcmread(copies[0]).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    # When analysed, then the probabilities are those of the uncompressed series
    analysis, _ = analyse_study(STUDY, copies, untrained, batch_size=8)
    assert _probabilities(analysis) == pytest.approx(_probabilities(chest_analysis[0]), abs=1e-4)


def _dcmcjpeg(paths: Sequence[Path], folder: Path) -> list[Path]:
    copies = []
    for path in paths:
        copy = folder / path.name
        subprocess.run(["dcmcjpeg", "+e1", str(path), str(copy)], check=True, capture_output=True)
        copies.append(copy)
    return copies


# --- phantom studies from hrct_triage.phantoms
# -------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomStudy, PhantomStudy]:
    """One positive phantom study (24 thin slices), single-frame and as Enhanced CT."""
    folder = tmp_path_factory.mktemp("phantom-twins")
    single = write_phantom_studies(folder / "single", covid=1, healthy=0, slices=24, seed=11)
    enhanced = write_phantom_studies(
        folder / "enhanced", covid=1, healthy=0, slices=24, seed=11, enhanced=True
    )
    return single[0], enhanced[0]


@pytest.mark.dcmtk
def test_enhanced_phantom_is_chosen_and_scored_like_its_single_frame_twin(
    phantom_twins: tuple[PhantomStudy, PhantomStudy], untrained: LoadedModel
) -> None:
    # Given the same phantom study sent single-frame and with its thin series as Enhanced CT
    single, enhanced = phantom_twins
    enhanced_file = enhanced.folder / "CT_02_enhanced.dcm"
    assert enhanced.study_uid == single.study_uid
    # When each study is analysed as the worker receives it (localizer, thin, thick series)
    results = [
        analyse_study(s.study_uid, sorted(s.folder.glob("*.dcm")), untrained, batch_size=8)[0]
        for s in (single, enhanced)
    ]
    reference, analysis = results
    # Then the Enhanced CT instance is the series chosen, frame k standing for slice k
    assert analysis.series_uid == enhanced.lung_series_uid
    assert reference.series_uid == single.lung_series_uid
    assert {s.sop_instance_uid for s in analysis.slices} == {
        str(pydicom.dcmread(enhanced_file, stop_before_pixels=True).SOPInstanceUID)
    }
    with np.load(single.folder / LESION_MASKS_NAME) as saved:
        uids, instances = saved["sop_instance_uids"].tolist(), saved["instance_numbers"].tolist()
    numbers = dict(zip(uids, instances, strict=True))
    assert [s.frame_number for s in analysis.slices] == [
        numbers[s.sop_instance_uid] for s in reference.slices
    ]
    # And the study probability and every slice's are those of the single-frame twin
    assert analysis.probability == pytest.approx(reference.probability, abs=1e-3)
    assert _probabilities(analysis) == pytest.approx(_probabilities(reference), abs=1e-3)
    assert enhanced.lesion_instances == single.lesion_instances
    # And dciodvfy finds no error in the Enhanced CT instance
    assert dciodvfy_errors(enhanced_file) == []
