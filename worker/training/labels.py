"""The labels CSV and the patient-level train/validation/test split.

The CSV is what a hospital can produce from its own records, and what ``hrct-triage phantom``
writes: one row per study, with

* ``folder`` (required): the study's DICOM folder, relative to the data folder (or absolute);
* ``label`` (required): ``covid`` / ``healthy`` (also ``positive`` / ``negative``, ``1`` / ``0``);
* ``study_uid``: the key that reader CSVs and reports use (the folder name when absent);
* ``patient_id``: studies of one patient always land in the same split (each study is its own
  patient when absent);
* ``lesion_instances``: ``;``-separated InstanceNumbers (frame numbers for Enhanced CT) of the
  slices that show a lesion; the paper trained positives on exactly those slices;
* ``split``: ``train`` / ``validation`` / ``test``, to fix the split by hand.

The paper's three cohorts did not overlap in patients; a slice-level or study-level split would
let one patient's near-identical slices sit on both sides and inflate every metric. So the split
is made over patients, stratified by label (a patient is positive when any of their studies is),
and depends only on the seed and the set of patients, never on the row order.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = [
    "PAPER_TEST_FRACTION",
    "PAPER_VALIDATION_FRACTION",
    "SPLITS",
    "LabelledStudy",
    "assign_splits",
    "parse_label",
    "read_labels",
    "split_patients",
    "write_labels",
]

SPLITS = ("train", "validation", "test")
# The paper's cohorts: 135 training, 20 validation, 140 test patients out of 295.
PAPER_VALIDATION_FRACTION = 20 / 295
PAPER_TEST_FRACTION = 140 / 295

_POSITIVE = {"covid", "covid-19", "covid19", "positive", "pos", "1", "true", "yes"}
_NEGATIVE = {"healthy", "negative", "neg", "normal", "0", "false", "no"}
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class LabelledStudy:
    """One row of the labels CSV, resolved: where the study is and what is known about it.

    ``lesion_instances`` is None when the CSV has no per-slice labels for the study, and an empty
    set when it says the study has no lesion slice; the two are treated differently in training.
    """

    key: str
    folder: Path
    positive: bool
    patient_id: str
    lesion_instances: frozenset[int] | None = None
    split: str | None = None


def parse_label(value: str, *, where: str) -> bool:
    """True for a COVID-19 label, False for healthy; ``where`` names the row in the error."""
    text = value.strip().lower()
    if text in _POSITIVE:
        return True
    if text in _NEGATIVE:
        return False
    raise ValueError(
        f"{where}: label {value!r} is neither COVID-19 ({'/'.join(sorted(_POSITIVE))})"
        f" nor healthy ({'/'.join(sorted(_NEGATIVE))})"
    )


def read_labels(path: Path, *, data_dir: Path) -> list[LabelledStudy]:
    """Read and check the labels CSV; folders are resolved against ``data_dir``."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        missing = {"folder", "label"} - columns
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        studies = [_row(row, columns, path, line, data_dir) for line, row in enumerate(reader, 2)]
    if not studies:
        raise ValueError(f"{path}: no studies")
    duplicates = _duplicates(s.key for s in studies)
    if duplicates:
        raise ValueError(f"{path}: study listed twice: {', '.join(sorted(duplicates)[:5])}")
    return studies


def _row(
    row: Mapping[str, str | None], columns: set[str], path: Path, line: int, data_dir: Path
) -> LabelledStudy:
    where = f"{path}:{line}"
    folder_text = (row.get("folder") or "").strip()
    if not folder_text:
        raise ValueError(f"{where}: empty folder")
    key = (row.get("study_uid") or "").strip() or Path(folder_text).name
    lesions: frozenset[int] | None = None
    if "lesion_instances" in columns:
        lesions = _instances(row.get("lesion_instances") or "", where=where)
    split_text = (row.get("split") or "").strip().lower()
    if split_text and split_text not in _SPLIT_ALIASES:
        raise ValueError(f"{where}: split {split_text!r} is not one of {', '.join(SPLITS)}")
    return LabelledStudy(
        key=key,
        folder=data_dir / folder_text,
        positive=parse_label(row.get("label") or "", where=where),
        patient_id=(row.get("patient_id") or "").strip() or key,
        lesion_instances=lesions,
        split=_SPLIT_ALIASES[split_text] if split_text else None,
    )


def _instances(text: str, *, where: str) -> frozenset[int]:
    try:
        return frozenset(int(part) for part in text.replace(",", ";").split(";") if part.strip())
    except ValueError as exc:
        raise ValueError(f"{where}: lesion_instances must be ;-separated integers") from exc


def _duplicates(values: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    repeated: set[str] = set()
    for value in values:
        (repeated if value in seen else seen).add(value)
    return repeated


def split_patients(
    studies: Sequence[LabelledStudy],
    *,
    validation_fraction: float = PAPER_VALIDATION_FRACTION,
    test_fraction: float = PAPER_TEST_FRACTION,
    seed: int = 0,
) -> dict[str, str]:
    """Study key -> split, made over patients and stratified by label, reproducible by seed.

    Each class gets ``round(n * fraction)`` patients in validation and in test, but at least one
    whenever the fraction is above zero, because an AUC needs both classes; training keeps the
    rest and must keep at least one patient of each class.
    """
    for name, value in (
        ("validation_fraction", validation_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    patients: dict[str, bool] = {}
    for study in studies:
        patients[study.patient_id] = patients.get(study.patient_id, False) or study.positive
    rng = np.random.default_rng(seed)
    by_patient: dict[str, str] = {}
    for positive in (False, True):
        members = sorted(p for p, label in patients.items() if label is positive)
        n_val = _share(len(members), validation_fraction)
        n_test = _share(len(members), test_fraction)
        if members and n_val + n_test >= len(members):
            kind = "COVID-19" if positive else "healthy"
            raise ValueError(
                f"only {len(members)} {kind} patient(s): too few for a training, "
                f"validation ({n_val}) and test ({n_test}) split"
            )
        order = [members[i] for i in rng.permutation(len(members))]
        for rank, patient in enumerate(order):
            by_patient[patient] = (
                "validation" if rank < n_val else "test" if rank < n_val + n_test else "train"
            )
    return {study.key: by_patient[study.patient_id] for study in studies}


def _share(n: int, fraction: float) -> int:
    if fraction <= 0.0 or n == 0:
        return 0
    return max(1, math.floor(n * fraction + 0.5))


def assign_splits(
    studies: Sequence[LabelledStudy],
    *,
    validation_fraction: float = PAPER_VALIDATION_FRACTION,
    test_fraction: float = PAPER_TEST_FRACTION,
    seed: int = 0,
) -> list[LabelledStudy]:
    """The studies with their split: the CSV's ``split`` column when given, else a seeded split.

    A hand-made split is checked for the property the paper relies on: no patient in two splits.
    """
    given = [s.split for s in studies]
    if all(split is not None for split in given):
        _check_patients_disjoint(studies)
        return list(studies)
    if any(split is not None for split in given):
        raise ValueError(
            "the split column is filled for some studies only; fill it for all "
            "or leave it empty for a seeded split"
        )
    splits = split_patients(
        studies, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed
    )
    return [replace(s, split=splits[s.key]) for s in studies]


def _check_patients_disjoint(studies: Sequence[LabelledStudy]) -> None:
    seen: dict[str, str | None] = {}
    for study in studies:
        other = seen.setdefault(study.patient_id, study.split)
        if other != study.split:
            raise ValueError(
                f"patient {study.patient_id} is in both {other} and {study.split}: "
                "the cohorts must not share patients"
            )


def write_labels(path: Path, studies: Sequence[LabelledStudy]) -> None:
    """Write studies (with absolute folders and their split) as a labels CSV.

    Training writes its split this way, so ``hrct-triage evaluate --labels <run>/split.csv
    --split test`` scores exactly the held-out patients.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["study_uid", "folder", "label", "patient_id", "lesion_instances", "split"])
        for s in studies:
            lesions = (
                ""
                if s.lesion_instances is None
                else ";".join(str(n) for n in sorted(s.lesion_instances))
            )
            writer.writerow(
                [
                    s.key,
                    str(s.folder.resolve()),
                    "covid" if s.positive else "healthy",
                    s.patient_id,
                    lesions,
                    s.split or "",
                ]
            )
