"""The ground truth of phantom studies: ``PhantomStudy``, ``labels.csv`` and the lesion masks."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hrct_triage.phantoms.findings import FINDINGS

LABELS_NAME = "labels.csv"
"""Name of the per-run label file written directly under ``out_dir``."""
LESION_MASKS_NAME = "lesion_masks.npz"
"""Name of the ground-truth lesion masks file inside each study folder (not a DICOM file)."""
FINDING_NAMES: tuple[str, ...] = ("", *FINDINGS)
"""``finding_names`` in the masks file: the name of each id of its ``findings`` array."""


@dataclass(frozen=True)
class PhantomStudy:
    """One synthetic study on disk, with the ground truth a test or a trainer needs."""

    study_uid: str
    folder: Path  # the study's folder; DICOM files are ``*.dcm``, masks in LESION_MASKS_NAME
    label: str  # "covid" or "healthy"
    patient_id: str
    lung_series_uid: str
    # InstanceNumbers of thin lung-series slices with a lesion; with ``enhanced``, the frame
    # numbers of the one Enhanced CT instance, which are the same numbers (frame k is slice k)
    lesion_instances: list[int]
    severity: str = "none"  # a SEVERITY_MIX key for positive studies
    group: str = "normal"  # a cohort.GROUPS name: covid, normal, other_pneumonia, other_finding
    findings: tuple[str, ...] = ()  # confounders shown (findings.CONFOUNDERS names), sorted


def write_lesion_masks(
    folder: Path,
    masks: NDArray[np.bool_],
    uids: Sequence[str],
    *,
    findings: NDArray[np.uint8] | None = None,
    lung: NDArray[np.bool_] | None = None,
) -> list[int]:
    """Write the thin series' ground truth (one mask per slice) beside its files; return the
    InstanceNumbers of the slices with a COVID-19 lesion.

    ``masks`` are the COVID-19 lesions (what heat maps are checked against), ``findings`` every
    finding's id per voxel (``finding_names[id]``, 0 none) and ``lung`` the anatomical lung.
    With ``enhanced`` the numbers are frame numbers of the one Enhanced CT instance, which are the
    same numbers (frame k is slice k), and ``uids`` repeat that instance's UID.
    """
    # InstanceNumbers of the thin slices, or frame numbers of the Enhanced CT instance: the same
    instances = np.arange(1, len(masks) + 1, dtype=np.int32)
    extra: dict[str, Any] = {}
    if findings is not None:
        extra["findings"] = findings
        extra["finding_names"] = np.array(FINDING_NAMES)
    if lung is not None:
        extra["lung"] = lung
    np.savez_compressed(
        folder / LESION_MASKS_NAME,
        masks=masks,
        instance_numbers=instances,
        sop_instance_uids=np.array(uids),
        **extra,
    )
    return [int(n) for n, m in zip(instances, masks, strict=True) if m.any()]


def write_labels(path: Path, studies: Iterable[PhantomStudy]) -> None:
    """Write ``labels.csv``: one row per study, lesion InstanceNumbers and findings joined by
    ``;``."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            [
                "study_uid",
                "folder",
                "label",
                "patient_id",
                "lesion_instances",
                "severity",
                "group",
                "findings",
            ]
        )
        for st in studies:
            lesions = ";".join(str(n) for n in st.lesion_instances)
            row = [st.study_uid, st.folder.name, st.label, st.patient_id, lesions, st.severity]
            writer.writerow([*row, st.group, ";".join(st.findings)])
