"""The ground truth of phantom studies: ``PhantomStudy``, ``labels.csv`` and the lesion masks."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

LABELS_NAME = "labels.csv"
"""Name of the per-run label file written directly under ``out_dir``."""
LESION_MASKS_NAME = "lesion_masks.npz"
"""Name of the ground-truth lesion masks file inside each study folder (not a DICOM file)."""


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


def write_lesion_masks(folder: Path, masks: NDArray[np.bool_], uids: Sequence[str]) -> list[int]:
    """Write the thin series' lesion masks (one per slice) beside its files; return the
    InstanceNumbers of the slices with a lesion.

    With ``enhanced`` the numbers are frame numbers of the one Enhanced CT instance, which are the
    same numbers (frame k is slice k), and ``uids`` repeat that instance's UID.
    """
    # InstanceNumbers of the thin slices, or frame numbers of the Enhanced CT instance: the same
    instances = np.arange(1, len(masks) + 1, dtype=np.int32)
    np.savez_compressed(
        folder / LESION_MASKS_NAME,
        masks=masks,
        instance_numbers=instances,
        sop_instance_uids=np.array(uids),
    )
    return [int(n) for n, m in zip(instances, masks, strict=True) if m.any()]


def write_labels(path: Path, studies: Iterable[PhantomStudy]) -> None:
    """Write ``labels.csv``: one row per study, lesion InstanceNumbers joined by ``;``."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            ["study_uid", "folder", "label", "patient_id", "lesion_instances", "severity"]
        )
        for st in studies:
            lesions = ";".join(str(n) for n in st.lesion_instances)
            writer.writerow(
                [st.study_uid, st.folder.name, st.label, st.patient_id, lesions, st.severity]
            )
