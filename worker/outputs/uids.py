"""Deterministic identity of the outputs: their UIDs, their dates and the equipment named in them.

A redelivered task must rebuild byte-identical objects, so nothing in an output may come from a
random UID generator or the wall clock. Every UID is a hash of what decides the content (study,
analysed instances, model, threshold, output kind, index) and every date or time comes from one
``content_datetime`` the caller takes from the worklist (the recorded analysis time).

Contract: the same ``OutputKey`` must always be built with the same ``content_datetime``; a new
key (another analysed set, model or threshold) gives new UIDs, so a new analysis is a new object.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Literal

from highdicom import ContributingEquipment
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM

from hrct_triage.common.uids import derive_uid
from hrct_triage.worker.method.results import ModelInfo, StudyAnalysis

#: The kinds of object a UID may name; part of the hash so two kinds never collide.
OutputKind = Literal["sr", "sc", "sc-series", "sr-series", "tracking"]

_MAX_LO_LENGTH = 64  # Long String, the VR of Manufacturer, Model Name and Software Versions


@dataclass(frozen=True)
class OutputKey:
    """Everything that decides an analysis' output content, hence its output UIDs.

    ``analysed_uids`` is sorted and free of duplicates so that the order the instances arrived
    in does not matter. The weights' SHA-256, the threshold and the trim fraction are part of the
    key although the product contract names only the model version: the same version with other
    weights, threshold or trim fraction can change the probability or flip Present/Absent, and
    one UID must never name two contents.
    ``analysis_id`` (the worklist's analysis generation) makes a requeued analysis a new object
    that supersedes the old one, while a redelivered task of the same analysis rebuilds it.
    """

    study_uid: str
    analysed_uids: tuple[str, ...]
    model_version: str
    model_sha256: str
    threshold: str
    trim_fraction: str
    analysis_id: str = ""

    @classmethod
    def for_analysis(cls, analysis: StudyAnalysis) -> OutputKey:
        """Key of the outputs of ``analysis`` (analysed set = every slice the model saw)."""
        if not analysis.study_uid:
            raise ValueError("analysis: study_uid is empty")
        if not analysis.slices:
            raise ValueError("analysis: no analysed slices")
        return cls(
            study_uid=analysis.study_uid,
            analysed_uids=tuple(sorted({s.sop_instance_uid for s in analysis.slices})),
            model_version=analysis.model.version,
            model_sha256=analysis.model.sha256 or "",
            threshold=repr(float(analysis.threshold)),
            trim_fraction=repr(float(analysis.trim_fraction)),
            analysis_id=analysis.analysis_id,
        )

    @property
    def analysed_digest(self) -> str:
        """SHA-256 of the analysed set, so that a 300-slice set hashes as one short part."""
        joined = "\\".join(self.analysed_uids).encode("ascii")
        return hashlib.sha256(joined).hexdigest()

    def uid(self, kind: OutputKind, index: int = 0) -> str:
        """UID of the ``index``-th object of ``kind`` for this key."""
        if index < 0:
            raise ValueError(f"index: must be >= 0, got {index}")
        return derive_uid(
            self.study_uid,
            self.analysed_digest,
            self.model_version,
            self.model_sha256,
            self.threshold,
            self.trim_fraction,
            self.analysis_id,
            kind,
            str(index),
        )


def sr_uid_for_class(sr_uid: str, sop_class: str) -> str:
    """UID of the SR ``sr_uid`` written as another SR class (``worker.outputs.sr_classes``).

    Derived from the stored SR's own UID, itself derived from the analysis key, so the
    rewritten document is as deterministic as the stored one, and one UID never names two
    classes.
    """
    if not sr_uid or not sop_class:
        raise ValueError("sr_uid and sop_class: both are needed")
    return derive_uid("sr-as-class", sr_uid, sop_class)


def device_observer_uid(model: ModelInfo) -> str:
    """UID of the algorithm as an SR device observer; it changes whenever the weights change."""
    return derive_uid("device", model.name, model.version, model.sha256 or "")


def check_model(model: ModelInfo, *, name: str = "analysis.model") -> None:
    """Refuse model metadata that would not fit the DICOM attributes it is written to (LO)."""
    for field_name in ("name", "version", "manufacturer"):
        value = getattr(model, field_name)
        if not value or len(value) > _MAX_LO_LENGTH or "\\" in value:
            raise ValueError(
                f"{name}.{field_name}: needs 1..{_MAX_LO_LENGTH} characters and no backslash, "
                f"got {value!r}"
            )


def algorithm_equipment(model: ModelInfo, when: datetime) -> ContributingEquipment:
    """The model as Contributing Equipment: it processed the CT images into this object.

    Processing Equipment (109102) rather than Modifying Equipment (109103): the outputs are new
    instances made from the source images, not edited copies of them.
    """
    check_model(model)
    return ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_datetime=DT(local_datetime(when).strftime("%Y%m%d%H%M%S.%f")),
        contribution_description="AI COVID-19 triage of the source CT images",
    )


def local_datetime(value: datetime, *, name: str = "content_datetime") -> datetime:
    """``value`` as naive local wall-clock time, the way DICOM DA/TM/DT without offset read.

    An aware value (e.g. the UTC ``analysed_at`` of the worklist) is converted to this host's
    zone: source studies carry local dates, and an output dated hours apart would confuse.
    """
    if not isinstance(value, datetime):
        raise ValueError(f"{name}: expected datetime, got {type(value).__name__}")
    if value.tzinfo is not None:
        value = value.astimezone().replace(tzinfo=None)
    return value


def _da(value: date) -> DA:
    return DA(value.strftime("%Y%m%d"))


def _tm(value: time) -> TM:
    return TM(value.strftime("%H%M%S.%f"))


def stamp_datetimes(ds: Dataset, when: datetime) -> None:
    """Overwrite every date/time highdicom took from the wall clock with ``when``.

    highdicom fills Instance Creation, Content, Secondary Capture dates and its own Contributing
    Equipment time from ``datetime.now()``; left alone they would make each rebuild differ.
    Series date/time are set too, since the output series is created at analysis time.
    """
    when = local_datetime(when)
    ds.InstanceCreationDate = _da(when)
    ds.InstanceCreationTime = _tm(when.time())
    ds.SeriesDate = _da(when)
    ds.SeriesTime = _tm(when.time())
    if "ContentDate" in ds:
        ds.ContentDate = _da(when)
        ds.ContentTime = _tm(when.time())
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture = _da(when)
        ds.TimeOfSecondaryCapture = _tm(when.time())
    for item in ds.get("ContributingEquipmentSequence", []):
        code = item.PurposeOfReferenceCodeSequence[0].CodeValue
        if code != "109101":  # acquisition equipment keeps the source's own time
            item.ContributionDateTime = DT(when.strftime("%Y%m%d%H%M%S.%f"))
