"""The thin series as one multi-frame Enhanced CT Image instance.

The values are those of the single-frame images, moved where the Enhanced CT IOD keeps them
(shared and per-frame functional groups), so both forms of one study describe the same slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage

from hrct_triage.phantoms.ct_image import (
    Series,
    axial_plane,
    ct_series_dataset,
    declare_padding,
    stored_pixels,
)
from hrct_triage.phantoms.encoders import SeriesWriter, Syntax, decimal_string
from hrct_triage.phantoms.generator import Phantom
from hrct_triage.phantoms.geometry import Grid
from hrct_triage.phantoms.identity import STUDY_DATE, Identity, patient_study
from hrct_triage.phantoms.kernels import KERNEL_TABLE

# Value 3 (image flavor) VOLUME: Enhanced CT has no AXIAL term; the orientation says axial.
_ENHANCED_IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]


# Top-level attributes an Enhanced CT instance shares with the single-frame images; the
# acquisition and reconstruction ones move into functional groups.
_ENHANCED_COPIED = (
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "PatientPosition",
    "ProtocolName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "AcquisitionNumber",
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "LossyImageCompression",
    "BurnedInAnnotation",
)


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _enhanced_ct_dataset(
    ids: Identity, series: Series, uid: str, *, signed: bool, length_mm: float
) -> Dataset:
    """The Enhanced CT Image modules of a series, with the functional groups all frames share.

    Values are those of the single-frame images (``ct_series_dataset``), moved where the
    Enhanced CT IOD keeps them: Pixel Measures, Plane Orientation, Pixel Value Transformation,
    Frame VOI LUT, CT Image Frame Type and the CT acquisition, reconstruction and exposure macros.
    ``length_mm`` is the table travel the series covers.
    """
    single = ct_series_dataset(ids, series, uid, signed=signed)
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    patient_study(ds, ids)
    for keyword in _ENHANCED_COPIED:
        ds.add(single[keyword])
    ds.ImageType = _ENHANCED_IMAGE_TYPE
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = STUDY_DATE + ids.time(series.offset_s)
    ds.AcquisitionDuration = length_mm / float(single.TableSpeed)
    ds.ContentQualification = "PRODUCT"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionContextSequence = []
    group = KERNEL_TABLE[series.kernel].group if series.kernel in KERNEL_TABLE else "SOFT_TISSUE"
    shared = _item(
        PlaneOrientationSequence=[_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])],
        PixelValueTransformationSequence=[
            _item(
                RescaleIntercept=single.RescaleIntercept,
                RescaleSlope=single.RescaleSlope,
                RescaleType="HU",
            )
        ],
        FrameVOILUTSequence=[
            _item(WindowCenter=single.WindowCenter, WindowWidth=single.WindowWidth)
        ],
        CTImageFrameTypeSequence=[
            _item(
                FrameType=_ENHANCED_IMAGE_TYPE,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
        CTAcquisitionTypeSequence=[
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        ],
        CTAcquisitionDetailsSequence=[
            _item(
                DataCollectionDiameter=single.DataCollectionDiameter,
                GantryDetectorTilt=single.GantryDetectorTilt,
                TableHeight=single.TableHeight,
                RotationDirection=single.RotationDirection,
                RevolutionTime=single.RevolutionTime,
                SingleCollimationWidth=single.SingleCollimationWidth,
                TotalCollimationWidth=single.TotalCollimationWidth,
            )
        ],
        CTTableDynamicsSequence=[
            _item(
                TableSpeed=single.TableSpeed,
                TableFeedPerRotation=single.TableFeedPerRotation,
                SpiralPitchFactor=single.SpiralPitchFactor,
            )
        ],
        CTGeometrySequence=[
            _item(
                DistanceSourceToDetector=single.DistanceSourceToDetector,
                DistanceSourceToDataCollectionCenter=float(single.DistanceSourceToPatient),
            )
        ],
        CTExposureSequence=[
            _item(
                ExposureTimeInms=float(single.ExposureTime),
                XRayTubeCurrentInmA=float(single.XRayTubeCurrent),
                ExposureInmAs=float(single.Exposure),
                ExposureModulationType="NONE",
                CTDIvol=single.CTDIvol,
                CTDIPhantomTypeCodeSequence=single.CTDIPhantomTypeCodeSequence,
            )
        ],
        CTXRayDetailsSequence=[
            _item(
                KVP=single.KVP,
                FocalSpots=single.FocalSpots,
                FilterType="BUTTERFLY",
                FilterMaterial="ALUMINUM",
            )
        ],
        FrameAnatomySequence=[
            _item(AnatomicRegionSequence=[_code("43799004", "SCT", "Chest")], FrameLaterality="U")
        ],
        IrradiationEventIdentificationSequence=[
            _item(IrradiationEventUID=ids.uid("irradiation", series.number))
        ],
    )
    shared.CTReconstructionSequence = [
        _item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ",
            ConvolutionKernel=series.kernel,
            ConvolutionKernelGroup=group,
            ReconstructionAngle=360.0,
            ImageFilter="NONE",
        )
    ]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _enhanced_frames(
    ds: Dataset,
    ids: Identity,
    series: Series,
    grid: Grid,
    positions: Sequence[float],
    length_mm: float,
) -> None:
    """Image size, dimensions and the per-frame groups: frame k is at ``positions[k - 1]``.

    One stack (StackID 1) whose in-stack position numbers run in table order, apex first, as the
    frames do; those two are the dimensions. Each frame's acquisition time follows the table.
    """
    axial_plane(ds, grid)  # at the top level for now: moved into functional groups below
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PixelMeasuresSequence = [
        _item(
            PixelSpacing=ds.PixelSpacing,
            SliceThickness=decimal_string(float(series.thickness or 0.0)),
        )
    ]
    reconstruction = shared.CTReconstructionSequence[0]
    reconstruction.ReconstructionDiameter = ds.ReconstructionDiameter
    reconstruction.ReconstructionPixelSpacing = [float(v) for v in ds.PixelSpacing]
    del ds.ImageOrientationPatient, ds.PixelSpacing, ds.ReconstructionDiameter
    ds.NumberOfFrames = len(positions)
    organization = ids.uid("dimensions", series.number)
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organization)]
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=organization,
            DimensionIndexPointer=pointer,
            FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
            DimensionDescriptionLabel=label,
        )
        for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position"))
    ]
    table_speed = float(ds.SharedFunctionalGroupsSequence[0].CTTableDynamicsSequence[0].TableSpeed)
    step_s = length_mm / len(positions) / table_speed
    x0 = y0 = decimal_string(float(grid.coords[0]))
    frames = []
    for k, z in enumerate(positions, start=1):
        when = STUDY_DATE + ids.time(series.offset_s + (k - 1) * step_s)
        frames.append(
            _item(
                FrameContentSequence=[
                    _item(
                        FrameAcquisitionNumber=1,
                        FrameReferenceDateTime=when,
                        FrameAcquisitionDateTime=when,
                        FrameAcquisitionDuration=round(step_s * 1000.0, 3),
                        StackID="1",
                        InStackPositionNumber=k,
                        DimensionIndexValues=[1, k],
                    )
                ],
                PlanePositionSequence=[_item(ImagePositionPatient=[x0, y0, decimal_string(z)])],
                CTPositionSequence=[
                    _item(
                        TablePosition=z,
                        ReconstructionTargetCenterPatient=[0.0, 0.0, z],
                        DataCollectionCenterPatient=[0.0, 0.0, z],
                    )
                ],
            )
        )
    ds.PerFrameFunctionalGroupsSequence = frames


def write_enhanced_series(
    folder: Path,
    phantom: Phantom,
    ids: Identity,
    series: Series,
    *,
    signed: bool,
    syntax: Syntax,
    variant: tuple[str, ...],
) -> str:
    """Write a generated series as one Enhanced CT Image instance; returns its UID.

    Frame k (1-based) is slice k of the single-frame series: same table position, same pixels.
    """
    grid = Grid(phantom.hu.shape[-1], phantom.pixel_spacing)
    positions = [float(z) for z in phantom.z]
    length = _covered_mm(positions)
    uid = ids.uid("series", series.number, *variant)
    ds = _enhanced_ct_dataset(ids, series, uid, signed=signed, length_mm=length)
    _enhanced_frames(ds, ids, series, grid, positions, length)
    outside = declare_padding(ds, grid, syntax, signed=signed)
    frames = [stored_pixels(hu, signed=signed, outside=outside) for hu in phantom.hu]
    own = Dataset()
    own.SOPInstanceUID = ids.uid("image", series.number, 1, *variant)
    SeriesWriter(ds, syntax).write(folder / f"CT_{series.number:02d}_enhanced.dcm", own, frames)
    return str(own.SOPInstanceUID)


def _covered_mm(positions: Sequence[float]) -> float:
    """Table travel of a series: from the first slice centre to the last, plus one step."""
    if len(positions) < 2:
        return 0.0
    return abs(positions[-1] - positions[0]) * len(positions) / (len(positions) - 1)
