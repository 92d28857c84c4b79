"""Heat-map Secondary Capture images: the lung-window slice with the CAM overlaid.

One RGB SC per ``StudyAnalysis.heatmaps`` entry, in the source study, in its own series, each
referencing the CT image it was computed from. Below the image a legend strip says what the
colours mean, the decision rule the study was judged by (threshold and trim fraction) and that
the picture is not for diagnostic use; because that text is burned in, Burned In Annotation is
YES.

Rendering is pure numpy plus a matplotlib Agg canvas for the legend (no pyplot, no display, no
system fonts beyond matplotlib's DejaVu Sans), so the same inputs give the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache

import highdicom as hd
import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DS

from hrct_triage.common.settings import check_series_description
from hrct_triage.worker.method.results import HeatMap, ModelInfo, StudyAnalysis
from hrct_triage.worker.outputs.source_text import (
    OUTPUT_CHARACTER_SET,
    carry_study_text,
    decoded_source,
)
from hrct_triage.worker.outputs.uids import (
    OutputKey,
    algorithm_equipment,
    check_model,
    stamp_datetimes,
)

RGBImage = npt.NDArray[np.uint8]

DEFAULT_SC_SERIES_DESCRIPTION = "AI COVID-19 heat map - not for diagnostic use"

#: Matplotlib colour map of the overlay; "turbo" reads blue (weak) .. red (strong).
COLOUR_MAP = "turbo"
#: Opacity of the overlay where the CAM is 1; it scales with the CAM, so weak areas stay grey.
MAX_ALPHA = 0.65
#: Small images are enlarged (nearest neighbour, whole factors) so the legend text stays legible.
MIN_RENDER_SIZE = 512
_DPI = 100  # legend canvas: pixels per inch; sizes below are in pixels, fonts in points
_FONT = "DejaVu Sans"  # shipped with matplotlib, so rendering needs no system fonts
_RANGE_TOLERANCE = 1e-3  # lung window and CAM should be in [0, 1]; allow float round-off


#: The legend's warning line on a study outside the model's validated domain.
OUT_OF_DOMAIN_NOTE = "outside the model's validated domain"


def build_heatmap_scs(
    analysis: StudyAnalysis,
    headers_by_uid: Mapping[str, Dataset],
    *,
    content_datetime: datetime,
    series_number: int = 9902,
    series_description: str = DEFAULT_SC_SERIES_DESCRIPTION,
) -> list[Dataset]:
    """One RGB Secondary Capture per heat map of ``analysis``, in the order of the heat maps.

    ``headers_by_uid`` maps SOP Instance UID to the source CT header (pixel data not needed);
    patient, study and the referenced image come from it. ``content_datetime`` (the recorded
    analysis time) dates the objects, so a rebuild is byte-identical.
    """
    _check_arguments(analysis, headers_by_uid, series_number, series_description)
    key = OutputKey.for_analysis(analysis)
    decision = decision_text(analysis.threshold, analysis.trim_fraction)
    return [
        _build_one(
            heatmap,
            headers_by_uid[heatmap.sop_instance_uid],
            model=analysis.model,
            decision=decision,
            out_of_domain=analysis.in_domain is False,
            sop_instance_uid=key.uid("sc", index),
            series_instance_uid=key.uid("sc-series"),
            instance_number=index + 1,
            series_number=series_number,
            series_description=series_description,
            when=content_datetime,
        )
        for index, heatmap in enumerate(analysis.heatmaps)
    ]


def render_heatmap(
    heatmap: HeatMap,
    model: ModelInfo | None = None,
    *,
    decision: str | None = None,
    out_of_domain: bool = False,
) -> RGBImage:
    """The SC picture of ``heatmap``: grey slice, CAM overlay, legend strip below it, with the
    line ``decision`` (:func:`decision_text`) when given, and ``OUT_OF_DOMAIN_NOTE`` as its
    warning line when ``out_of_domain``.

    Public so that the worker's preview, the docs and the tests can look at the same pixels
    that go into the DICOM object.
    """
    _check_heatmap(heatmap, "heatmap")
    scale = _scale_factor(heatmap.lung_window.shape)
    image = _overlay(_enlarge(heatmap.lung_window, scale), _enlarge(heatmap.cam, scale))
    legend = _legend_strip(
        image.shape[1], heatmap.probability, model, decision, out_of_domain=out_of_domain
    )
    return np.ascontiguousarray(np.concatenate([image, legend], axis=0))


def decision_text(threshold: float, trim_fraction: float) -> str:
    """The legend's line on how the study was judged, with the values the SR states."""
    return f"study decision: threshold {threshold:g}, trim fraction {trim_fraction:g}"


def _check_arguments(
    analysis: StudyAnalysis,
    headers_by_uid: Mapping[str, Dataset],
    series_number: int,
    series_description: str,
) -> None:
    """Refuse, naming the argument, whatever would give a wrong or invalid object."""
    check_model(analysis.model)
    if not 1 <= series_number <= 2**31 - 1:
        raise ValueError(f"series_number: must be a positive IS, got {series_number}")
    try:
        check_series_description(series_description)
    except ValueError as error:
        raise ValueError(f"series_description: {error}") from None
    for index, heatmap in enumerate(analysis.heatmaps):
        name = f"analysis.heatmaps[{index}]"
        _check_heatmap(heatmap, name)
        header = headers_by_uid.get(heatmap.sop_instance_uid)
        if header is None:
            raise ValueError(f"headers_by_uid: no header for {name} ({heatmap.sop_instance_uid})")
        if header.get("StudyInstanceUID") != analysis.study_uid:
            raise ValueError(
                f"headers_by_uid[{heatmap.sop_instance_uid!r}]: not in study {analysis.study_uid}"
            )
        shape = (int(header.Rows), int(header.Columns))
        if heatmap.lung_window.shape != shape:
            raise ValueError(
                f"{name}: arrays are {heatmap.lung_window.shape}, source image is {shape}"
            )


def _check_heatmap(heatmap: HeatMap, name: str) -> None:
    """Both arrays 2-D, the same shape, finite and in [0, 1]; the probability in [0, 1]."""
    for field_name in ("lung_window", "cam"):
        array = getattr(heatmap, field_name)
        if array.ndim != 2 or min(array.shape) < 1:
            raise ValueError(f"{name}.{field_name}: expected a 2-D array, got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name}.{field_name}: contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"{name}.{field_name}: values {low}..{high} outside [0, 1]")
    if heatmap.cam.shape != heatmap.lung_window.shape:
        raise ValueError(f"{name}.cam: shape {heatmap.cam.shape} != lung_window shape")
    if not 0.0 <= heatmap.probability <= 1.0:
        raise ValueError(f"{name}.probability: {heatmap.probability} outside [0, 1]")


def _scale_factor(shape: tuple[int, ...]) -> int:
    """Whole enlargement factor that brings the longer side to at least MIN_RENDER_SIZE."""
    return max(1, math.ceil(MIN_RENDER_SIZE / max(shape)))


def _enlarge(array: npt.NDArray[np.float32], scale: int) -> npt.NDArray[np.float32]:
    """Nearest-neighbour enlargement: keeps the pixels honest and the geometry a whole factor."""
    if scale == 1:
        return array
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def _blend(grey: npt.NDArray[np.floating], cam: npt.NDArray[np.floating]) -> RGBImage:
    """Grey background with the CAM colour laid over it, opacity proportional to the CAM.

    Used for the image and for the legend bar, so the bar shows exactly the colours seen.
    """
    grey = np.clip(grey, 0.0, 1.0)
    cam = np.clip(cam, 0.0, 1.0)
    colour = colormaps[COLOUR_MAP](cam)[..., :3]
    alpha = (MAX_ALPHA * cam)[..., np.newaxis]
    rgb = grey[..., np.newaxis] * (1.0 - alpha) + colour * alpha
    return np.round(rgb * 255.0).astype(np.uint8)


def _overlay(lung_window: npt.NDArray[np.float32], cam: npt.NDArray[np.float32]) -> RGBImage:
    """The slice in the lung window, grey, with the CAM overlay."""
    return _blend(lung_window.astype(np.float64), cam.astype(np.float64))


def _legend_strip(
    width: int,
    probability: float,
    model: ModelInfo | None,
    decision: str | None,
    *,
    out_of_domain: bool = False,
) -> RGBImage:
    """A black strip under the image: what the colours mean, "low .. high", the slice's
    probability, the study's decision rule and warnings.

    Sizes follow the image width so the strip reads the same on a 512 or a 1024 matrix.
    Drawing it took ~20 ms a heat map, mostly for the parts that never change with the slice;
    those are drawn once per width, model and decision rule (``_fixed_legend``) and only the
    probability line is drawn per heat map. Where no pixel of one lies on a drawn pixel of the
    other, the union is exactly the strip drawn at once (tests/test_outputs.py compares them);
    otherwise the strip is drawn at once.
    """
    note = OUT_OF_DOMAIN_NOTE if out_of_domain else _demo_note(model)
    fixed = _fixed_legend(width, note, decision)
    line = _draw_legend(width, probability=probability, note=None, decision=None, fixed=False)
    if np.any(fixed[np.any(line != 0, axis=2)]):
        return _draw_legend(
            width, probability=probability, note=note, decision=decision, fixed=True
        )
    return np.maximum(fixed, line)


def _demo_note(model: ModelInfo | None) -> str | None:
    if model is not None and model.untrained:
        return f"demo model, trained on {model.trained_on}"[:60]
    return None


@lru_cache(maxsize=8)
def _fixed_legend(width: int, note: str | None, decision: str | None) -> RGBImage:
    """The parts of the strip that do not depend on the slice (read-only, shared)."""
    pixels = _draw_legend(width, probability=None, note=note, decision=decision, fixed=True)
    pixels.flags.writeable = False
    return pixels


def _draw_legend(
    width: int,
    *,
    probability: float | None,
    note: str | None,
    decision: str | None,
    fixed: bool,
) -> RGBImage:
    """The strip with the fixed parts (if ``fixed``), the probability line, the decision rule
    and the note; five rows of text, each a fifth of the strip."""
    row = max(80, round(width * 0.2)) / 4
    height = round(row * 5)
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    font_pt = max(6.0, row * 0.48 * 72 / _DPI)

    def label(x: float, y: float, words: str, align: str, colour: str = "white") -> None:
        figure.text(
            x, y, words, ha=align, va="center", color=colour, fontsize=font_pt, family=_FONT
        )

    warning = "#ffcc00"
    if fixed:
        label(0.5, 0.9, "AI heat map: COVID-19 evidence (class activation map)", "center")
        bar_axes = figure.add_axes((0.14, 0.65, 0.72, 0.13))
        ramp = np.linspace(0.0, 1.0, 256)[np.newaxis, :]
        bar_axes.imshow(
            _blend(np.full_like(ramp, 0.5), ramp), aspect="auto", interpolation="nearest"
        )
        bar_axes.set_axis_off()
        label(0.13, 0.71, "low", "right")
        label(0.87, 0.71, "high", "left")
    if probability is not None:
        label(
            0.5,
            0.5,
            f"slice probability {probability:.2f} - NOT FOR DIAGNOSTIC USE",
            "center",
            warning,
        )
    if decision is not None:
        label(0.5, 0.31, decision, "center")
    if note is not None:
        label(0.5, 0.11, note, "center", warning)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    return _fit(pixels, height, width)


def _fit(pixels: npt.NDArray[np.uint8], height: int, width: int) -> RGBImage:
    """Crop or pad with black to exactly height x width (figure sizes round to whole pixels)."""
    out = np.zeros((height, width, 3), dtype=np.uint8)
    rows, cols = min(height, pixels.shape[0]), min(width, pixels.shape[1])
    out[:rows, :cols] = pixels[:rows, :cols]
    return out


def _patient_orientation(header: Dataset) -> tuple[str, str]:
    """Row and column directions (one letter each) from Image Orientation (Patient).

    The SC Image has no geometry module, so Patient Orientation is how a viewer knows which
    way is left; the dominant axis of each direction cosine names it. Axial default: L, P.
    """
    cosines = [float(v) for v in header.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive along x, y, z (LPS)

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][1 if vector[axis] > 0 else 0]

    return letter(cosines[:3]), letter(cosines[3:6])


def _pixel_spacing(header: Dataset, scale: int) -> list[str] | None:
    """Source pixel spacing divided by the enlargement, so distances in the image stay true."""
    spacing = header.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        return None
    return [str(DS(float(value) / scale, auto_format=True)) for value in spacing]


def _source_image_item(header: Dataset) -> Dataset:
    """Source Image Sequence item: the CT image the overlay was computed from, and why."""
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def _build_one(
    heatmap: HeatMap,
    header: Dataset,
    *,
    model: ModelInfo,
    decision: str,
    out_of_domain: bool,
    sop_instance_uid: str,
    series_instance_uid: str,
    instance_number: int,
    series_number: int,
    series_description: str,
    when: datetime,
) -> Dataset:
    """One SC from ``header`` (patient, study, equipment) and the rendered heat map."""
    pixels = render_heatmap(heatmap, model, decision=decision, out_of_domain=out_of_domain)
    source = decoded_source(header)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        patient_orientation=_patient_orientation(header),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(model, when)],
        series_description=series_description,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        specific_character_set=OUTPUT_CHARACTER_SET,
    )
    carry_study_text(sc, source)
    _describe_derivation(sc, header, heatmap, model, _scale_factor(heatmap.cam.shape), decision)
    stamp_datetimes(sc, when)
    return sc


def _describe_derivation(
    sc: Dataset, header: Dataset, heatmap: HeatMap, model: ModelInfo, scale: int, decision: str
) -> None:
    """Say truthfully what the picture is, where it came from and that text is burned in."""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # the legend strip carries text
    sc.BodyPartExamined = header.get("BodyPartExamined") or "CHEST"
    sc.ConversionType = "WSD"  # made by software on a workstation, not captured from video
    sc.SecondaryCaptureDeviceManufacturer = model.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name
    sc.SecondaryCaptureDeviceSoftwareVersions = model.version
    sc.LossyImageCompression = "01" if header.get("LossyImageCompression") == "01" else "00"
    sc.SourceImageSequence = [_source_image_item(header)]
    sc.DerivationDescription = (
        f"Lung window W{model.window_width:g} L{model.window_level:g} of the source slice, "
        f"class activation map of {model.name} {model.version} overlaid ({COLOUR_MAP}, "
        f"opacity up to {MAX_ALPHA:g} with activation), enlarged x{scale}, legend added"
    )[:1024]
    sc.ImageComments = (
        f"AI COVID-19 heat map, slice probability {heatmap.probability:.3f}, share of the "
        f"study decision {heatmap.weight:.3f} ({decision}). Not for diagnostic use."
    )
    spacing = _pixel_spacing(header, scale)
    if spacing is not None:
        sc.PixelSpacing = spacing
