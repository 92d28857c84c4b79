"""The AI result as a Comprehensive 3D SR: TID 1500 "Imaging Measurement Report".

Content tree (codes as the product contract fixes them):

    Imaging Measurement Report (126000, DCM)                       TID 1500
      language, observer context of kind DEVICE (the model)        TID 1204, 1001/1002/1004
      Procedure Reported (29252-4, LN, "CT Chest WO contrast") unless the source says better
      Image Library: the analysed CT images, then the heat-map SCs TID 1600
      Imaging Measurements
        Measurement Group                                          TID 1501
          tracking identifier + UID, Finding (840539006, SCT, "COVID-19"),
          Finding Site (39607008, SCT, "Lung"), Algorithm Identification (TID 4019),
          source images = the slices averaged into the study probability,
          Probability (122157, DCM) and Threshold Value (122411, DCM), both in UCUM "1",
          COVID-19 = Present (52101004, SCT) / Absent (272519000, SCT)

A study that could not be analysed gets the same frame without a measurement group: a
"Qualitative Evaluations" container with a TEXT item giving the reason (``build_not_analysed_sr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sequence import Sequence as DataElementSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from hrct_triage.common.settings import check_series_description
from hrct_triage.worker.method.results import ModelInfo, StudyAnalysis
from hrct_triage.worker.outputs.source_text import (
    OUTPUT_CHARACTER_SET,
    carry_study_text,
    decoded_source,
)
from hrct_triage.worker.outputs.sr_library import SOURCE_OF_MEASUREMENT, add_images, image_library
from hrct_triage.worker.outputs.uids import (
    OutputKey,
    algorithm_equipment,
    check_model,
    derive_uid,
    device_observer_uid,
    local_datetime,
    stamp_datetimes,
)

COVID_19 = Code("840539006", "SCT", "COVID-19")
LUNG = Code("39607008", "SCT", "Lung")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD_VALUE = Code("122411", "DCM", "Threshold Value")
NO_UNITS = Code("1", "UCUM", "no units")
CT_CHEST_WO_CONTRAST = Code("29252-4", "LN", "CT Chest WO contrast")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
NOT_ANALYSED_REASON = Code("121106", "DCM", "Comment")
# The domain guard's verdict (``worker.method.domain``), in the project's private scheme: no
# standard code says "the input lies inside the model's validated domain". Yes/No from SNOMED CT.
WITHIN_VALIDATED_DOMAIN = Code("DOMAIN-001", "99HRCT", "Input within the model's validated domain")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")


DEFAULT_SR_SERIES_DESCRIPTION = "AI COVID-19 triage SR - not for diagnostic use"
_TRACKING_IDENTIFIER = "AI COVID-19 triage"
_VALUE_DECIMALS = 6  # probabilities to 1e-6; DS holds 16 characters
_SERIES_NUMBER_MAX = 2**31 - 1  # IS
_CROSS_SECTIONAL = (
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
)  # what highdicom's CT image-library entry reads


def build_sr(
    analysis: StudyAnalysis,
    headers: Sequence[Dataset],
    heatmap_scs: Sequence[Dataset],
    *,
    content_datetime: datetime,
    series_number: int = 9901,
    series_description: str = DEFAULT_SR_SERIES_DESCRIPTION,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
    pre_encoded: bool = True,
) -> Dataset:
    """The TID 1500 SR of ``analysis``, in the source study, with deterministic UIDs and dates.

    ``headers`` are the source CT headers (pixel data not needed, it is never read); every
    analysed slice needs one, others are ignored. ``heatmap_scs`` are the SCs of
    ``build_heatmap_scs`` for the same analysis; they join the image library and the evidence.
    ``predecessor`` is the SR this one supersedes (a new analysis of the same study).
    ``pre_encoded=False`` keeps the per-image items as datasets instead of pre-encoded bytes
    (``hrct_triage.worker.outputs.sr_encoded``); the file written is the same, only slower to write.
    """
    check_model(analysis.model)
    _check_frame(series_number, series_description, institution_name)
    _check_analysis(analysis)
    images = _analysed_headers(analysis, headers)
    scs = _checked_scs(heatmap_scs, analysis.study_uid)
    key = OutputKey.for_analysis(analysis)
    _check_predecessor(predecessor, analysis.study_uid, key.uid("sr"))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(analysis.model),
        procedure_reported=_procedure_reported(images[0]),
        imaging_measurements=[_measurement_group(analysis, key)],
    )
    sr = _document(
        report,
        evidence=[*images, *scs],
        model=analysis.model,
        series_instance_uid=key.uid("sr-series"),
        sop_instance_uid=key.uid("sr"),
        when=content_datetime,
        series_number=series_number,
        series_description=series_description,
        predecessor=predecessor,
        institution_name=institution_name,
    )
    _add_image_references(sr, analysis, images, scs, pre_encoded=pre_encoded)
    return _plain(sr)


def build_not_analysed_sr(
    headers: Sequence[Dataset],
    reason: str,
    model: ModelInfo,
    *,
    content_datetime: datetime,
    series_number: int = 9901,
    series_description: str = DEFAULT_SR_SERIES_DESCRIPTION,
    institution_name: str | None = None,
    analysis_id: str = "",
    predecessor: Dataset | None = None,
) -> Dataset:
    """A TID 1500 SR saying that the study was not analysed, and why; it holds no finding.

    ``headers`` are headers of the study's received instances (at least one); they are the
    evidence and give patient and study. The UIDs derive from the study, the instances, the
    model, the reason and ``analysis_id`` (the worklist generation), so a redelivered task
    rebuilds the same object and a new analysis of the study makes a new one, which names the
    SR it supersedes as ``predecessor``.
    """
    check_model(model, name="model")
    _check_frame(series_number, series_description, institution_name)
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("reason: must be a non-empty text")
    evidence = _checked_study_headers(headers)
    parts = (
        str(evidence[0].StudyInstanceUID),
        *sorted({str(ds.SOPInstanceUID) for ds in evidence}),
        model.version,
        model.sha256 or "",
        reason,
        analysis_id,
    )
    sop_instance_uid = derive_uid("not-analysed", *parts, "sr")
    _check_predecessor(predecessor, str(evidence[0].StudyInstanceUID), sop_instance_uid)
    root = _not_analysed_content(model, _procedure_reported(evidence[0]), reason)
    return _document(
        root,
        evidence=evidence,
        model=model,
        series_instance_uid=derive_uid("not-analysed", *parts, "sr-series"),
        sop_instance_uid=sop_instance_uid,
        when=content_datetime,
        series_number=series_number,
        series_description=series_description,
        predecessor=predecessor,
        institution_name=institution_name,
    )


def _document(
    content: Dataset | DataElementSequence,
    *,
    evidence: Sequence[Dataset],
    model: ModelInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    when: datetime,
    series_number: int,
    series_description: str,
    predecessor: Dataset | None,
    institution_name: str | None,
) -> Dataset:
    """Wrap a content tree into the SR document; patient and study come from ``evidence[0]``.

    COMPLETE (nothing more will be added), UNVERIFIED (no person signed it) and PRELIMINARY
    (an AI triage result is never the definitive report).
    """
    local = local_datetime(when)
    source = _with_empty_type2(decoded_source(evidence[0]))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, *evidence[1:]],
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=model.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=None if predecessor is None else [predecessor],
        contributing_equipment=[algorithm_equipment(model, local)],
        series_description=series_description,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        content_date=local.date(),
        content_time=local.time(),
        specific_character_set=OUTPUT_CHARACTER_SET,
    )
    carry_study_text(sr, source)
    stamp_datetimes(sr, local)
    return sr


_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _with_empty_type2(header: Dataset) -> Dataset:
    """A shallow copy of ``header`` with the Type 2 patient/study attributes present.

    highdicom reads them as attributes and fails on a header that omits them (anonymised
    studies often do); Type 2 means "present, may be empty", so empty is the truthful value.
    """
    missing = [name for name in _PATIENT_STUDY_TYPE2 if name not in header]
    if not missing:
        return header
    patched = header.copy()
    for name in missing:
        setattr(patched, name, None)
    return patched


def _check_frame(series_number: int, series_description: str, institution: str | None) -> None:
    """The plain arguments every SR builder takes."""
    if not 1 <= series_number <= _SERIES_NUMBER_MAX:
        raise ValueError(f"series_number: must be a positive IS, got {series_number}")
    try:
        check_series_description(series_description)
    except ValueError as error:
        raise ValueError(f"series_description: {error}") from None
    if institution is not None and (not institution or len(institution) > 64):
        raise ValueError("institution_name: needs 1..64 characters (LO) or None")


def _check_analysis(analysis: StudyAnalysis) -> None:
    """Numbers in range and a decision that agrees with them, so the SR cannot contradict itself."""
    for name in ("probability", "threshold"):
        value = getattr(analysis, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"analysis.{name}: {value} outside [0, 1]")
    if not 0.0 <= analysis.trim_fraction < 0.5:
        raise ValueError(f"analysis.trim_fraction: {analysis.trim_fraction} outside [0, 0.5)")
    if analysis.positive != (analysis.probability >= analysis.threshold):
        raise ValueError(
            f"analysis.positive: {analysis.positive} disagrees with probability "
            f"{analysis.probability} and threshold {analysis.threshold}"
        )
    analysed = {s.sop_instance_uid for s in analysis.slices}
    if not set(analysis.kept) <= analysed:
        raise ValueError("analysis.kept: names instances that are not in analysis.slices")


def _analysed_headers(analysis: StudyAnalysis, headers: Sequence[Dataset]) -> list[Dataset]:
    """The headers of the analysed slices, in table order (the order of ``analysis.slices``)."""
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in headers}
    images = []
    for index, result in enumerate(analysis.slices):
        header = by_uid.get(result.sop_instance_uid)
        if header is None:
            raise ValueError(
                f"headers: no header for analysis.slices[{index}] ({result.sop_instance_uid})"
            )
        images.append(header)
    for header in images:
        _check_image_header(header, analysis.study_uid)
    return images


def _check_image_header(header: Dataset, study_uid: str) -> None:
    """A header must be of the study and carry what the image library entry reads."""
    uid = header.get("SOPInstanceUID")
    if header.get("StudyInstanceUID") != study_uid:
        raise ValueError(f"headers: {uid} is not in study {study_uid}")
    needed = ["SOPClassUID", "SeriesInstanceUID", "Rows", "Columns", "Modality"]
    if header.get("Modality") in ("CT", "MR", "PT"):
        needed += _CROSS_SECTIONAL
    missing = [name for name in needed if name not in header]
    if missing:
        raise ValueError(f"headers: {uid} lacks {', '.join(missing)}")


def _checked_scs(heatmap_scs: Sequence[Dataset], study_uid: str) -> list[Dataset]:
    """Heat-map SCs must be images of the same study (they go into the image library)."""
    for index, sc in enumerate(heatmap_scs):
        if sc.get("StudyInstanceUID") != study_uid:
            raise ValueError(f"heatmap_scs[{index}]: not in study {study_uid}")
        if "Rows" not in sc or "SOPClassUID" not in sc:
            raise ValueError(f"heatmap_scs[{index}]: not an image")
    return list(heatmap_scs)


def _checked_study_headers(headers: Sequence[Dataset]) -> list[Dataset]:
    """At least one header, all of one study, each with the UIDs evidence lists need."""
    if not headers:
        raise ValueError("headers: at least one header of the study is needed")
    study_uid = headers[0].get("StudyInstanceUID")
    for index, ds in enumerate(headers):
        if ds.get("StudyInstanceUID") != study_uid or not study_uid:
            raise ValueError(f"headers[{index}]: not in study {study_uid}")
        for name in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "PatientID"):
            if name not in ds:
                raise ValueError(f"headers[{index}]: lacks {name}")
    return list(headers)


def _check_predecessor(predecessor: Dataset | None, study_uid: str, sr_uid: str) -> None:
    """A superseded SR must be another SR document of the same study."""
    if predecessor is None:
        return
    if predecessor.get("StudyInstanceUID") != study_uid:
        raise ValueError(f"predecessor: not in study {study_uid}")
    if predecessor.get("Modality") != "SR" or "SeriesInstanceUID" not in predecessor:
        raise ValueError("predecessor: not an SR document")
    if predecessor.get("SOPInstanceUID") == sr_uid:
        raise ValueError(
            "predecessor: is this very SR (same analysis key); a document cannot supersede itself"
        )


def _procedure_reported(header: Dataset) -> list[CodedConcept | Code]:
    """The source's Procedure Code Sequence if it has well-formed codes, else CT chest w/o."""
    codes_found: list[CodedConcept | Code] = []
    for item in decoded_source(header).get("ProcedureCodeSequence", []):
        value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
        scheme = item.get("CodingSchemeDesignator")
        meaning = item.get("CodeMeaning")
        if value and scheme and meaning:
            codes_found.append(CodedConcept(str(value), str(scheme), str(meaning)))
    return codes_found or [CT_CHEST_WO_CONTRAST]


def _observation_context(model: ModelInfo) -> hd.sr.ObservationContext:
    """The observer is the algorithm (a device); its UID changes when the weights change."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(model),
        name=model.name,
        manufacturer_name=model.manufacturer,
        model_name=model.name,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )


def _algorithm_identification(analysis: StudyAnalysis) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the knobs that decide the result, so a reader can tell runs apart."""
    model = analysis.model
    parameters = [
        f"threshold={analysis.threshold:g}",
        f"trim_fraction={analysis.trim_fraction:g}",
        f"window_width={model.window_width:g}",
        f"window_level={model.window_level:g}",
        f"input_size={model.input_size}",
        f"untrained={str(model.untrained).lower()}",
        f"trained_on={model.trained_on}",
    ]
    if model.sha256:
        parameters.append(f"weights_sha256={model.sha256}")
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,  # says "untrained"/"phantom" for the demo weights: keep it
        parameters=parameters,
        family=ARTIFICIAL_INTELLIGENCE,
        manufacturer=model.manufacturer,
    )


def _measurement_group(
    analysis: StudyAnalysis, key: OutputKey
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one TID 1501 group: finding, site, algorithm, probability, threshold, decision.

    Its source images (the slices averaged) are added by ``_add_image_references``.
    """
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=key.uid("tracking"), identifier=_TRACKING_IDENTIFIER
        ),
        finding_type=COVID_19,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        algorithm_id=_algorithm_identification(analysis),
        measurements=[
            _unitless(PROBABILITY, analysis.probability),
            _unitless(THRESHOLD_VALUE, analysis.threshold),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(COVID_19, PRESENT if analysis.positive else ABSENT),
            *_domain_evaluation(analysis),
        ],
    )


def _domain_evaluation(analysis: StudyAnalysis) -> list[hd.sr.QualitativeEvaluation]:
    """Whether the input lies inside the model's validated domain; nothing when not judged
    (the checkpoint has no domain reference)."""
    if analysis.in_domain is None:
        return []
    return [hd.sr.QualitativeEvaluation(WITHIN_VALIDATED_DOMAIN, YES if analysis.in_domain else NO)]


def _add_image_references(
    sr: Dataset,
    analysis: StudyAnalysis,
    images: Sequence[Dataset],
    scs: Sequence[Dataset],
    *,
    pre_encoded: bool,
) -> None:
    """Put the image library and the group's source images into the finished document.

    Why after construction: highdicom deep-copies and re-parses the whole content tree and
    checks each library image against the IOD tables, which took ~17 s for a 300-slice
    library. Built here (``worker.outputs.sr_library``, with the elements highdicom's content items
    have) and spliced in, it takes well under a second. Every image referenced here is already
    in the evidence passed to highdicom. Pre-encoded only in the encoding they are written in.
    """
    pre_encoded = pre_encoded and sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    content = sr.ContentSequence
    measurements_at = _index_of(content, codes.DCM.ImagingMeasurements)
    content.insert(measurements_at, image_library([*images, *scs], pre_encoded=pre_encoded))
    group = _find(content[measurements_at + 1].ContentSequence, codes.DCM.MeasurementGroup)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    add_images(
        group,
        SOURCE_OF_MEASUREMENT,
        [(str(by_uid[uid].SOPClassUID), uid) for uid in analysis.kept],
        pre_encoded=pre_encoded,
    )


def _index_of(content: Sequence[Dataset], name: Code) -> int:
    """Position of the first content item called ``name`` (a bug here is ours: assert)."""
    for index, item in enumerate(content):
        concept = item.ConceptNameCodeSequence[0]
        if (concept.CodeValue, concept.CodingSchemeDesignator) == (
            name.value,
            name.scheme_designator,
        ):
            return index
    raise AssertionError(f"no {name.meaning} item in the SR content")


def _find(content: Sequence[Dataset], name: Code) -> Dataset:
    """The first content item called ``name``."""
    return content[_index_of(content, name)]


def _plain(sr: Dataset) -> Dataset:
    """The document as a plain pydicom Dataset.

    highdicom's object keeps a parsed copy of the content taken before the image library was
    added; handing it out would let ``.content`` disagree with the dataset. Re-read the saved
    object with ``highdicom.sr.srread`` to get highdicom's view.
    """
    plain = Dataset(sr)
    plain.file_meta = sr.file_meta
    plain.preamble = sr.preamble
    return plain


def _unitless(name: Code, value: float) -> hd.sr.Measurement:
    """A NUM in UCUM "1" (a ratio), rounded so the DS stays short and stable."""
    return hd.sr.Measurement(name=name, value=round(float(value), _VALUE_DECIMALS), unit=NO_UNITS)


def _not_analysed_content(
    model: ModelInfo, procedure: Sequence[CodedConcept | Code], reason: str
) -> Dataset:
    """TID 1500 root without measurements: a Qualitative Evaluations container with the reason.

    highdicom's MeasurementReport insists on a measurement group, which would claim an
    analysis that did not happen, so the frame is assembled from its parts here.
    """
    root = hd.sr.ContainerContentItem(
        name=codes.cid7021.ImagingMeasurementReport, template_id="1500"
    )
    content = hd.sr.ContentSequence()
    content.extend(
        hd.sr.LanguageOfContentItemAndDescendants(
            hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
        )
    )
    content.extend(_observation_context(model))
    for code in procedure:
        content.append(
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=code,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=NOT_ANALYSED_REASON,
                value=f"Not analysed for COVID-19: {reason}"[:10240],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    content.append(evaluations)
    root.ContentSequence = content
    return root
