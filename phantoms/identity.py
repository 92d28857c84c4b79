"""Who the phantom patient is and when the study was made, and every UID, derived from the seed.

No clock and no random UID generator: the same seed gives the same patient, dates and UIDs, so
tests can compare bytes and a training set can be rebuilt exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from hrct_triage.common.uids import derive_uid

STUDY_DATE = "20260101"
MANUFACTURER = "hrct-triage phantom"
_UID_NAMESPACE = "hrct-triage-phantom-v1"


@dataclass(frozen=True)
class Identity:
    """Who and when: patient and study attributes plus the UID derivation key."""

    key: tuple[str, ...]
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    accession: str
    study_id: str
    study_seconds: int

    @staticmethod
    def make(
        *,
        seed: int,
        label: str,
        index: int,
        rng: np.random.Generator,
        cohort: tuple[str, ...] = (),
        age: int | None = None,
        sex: str | None = None,
    ) -> Identity:
        """The patient and study of (seed, label, index); ``age`` and ``sex`` (F or M), when
        given, are the generated body's, so the header agrees with the images."""
        drawn_age = int(rng.integers(24, 82))
        age = drawn_age if age is None else age
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        drawn_sex = str(rng.choice(["F", "M"]))
        tag = label[0].upper()
        # another cohort is other patients: they must not share an ID with the default one's
        suffix = f"-{zlib.crc32('|'.join(cohort).encode()):08x}" if cohort else ""
        return Identity(
            key=(str(seed), label, str(index), *cohort),
            patient_name=f"PHANTOM^{label.upper()}^{index:03d}",
            patient_id=f"PHANTOM-S{seed}-{tag}{index:03d}{suffix}",
            birth_date=f"{2025 - age:04d}{month:02d}{day:02d}",
            sex=drawn_sex if sex is None else sex,
            age=f"{age:03d}Y",
            accession=f"PH{seed % 10000:04d}{tag}{index:05d}",
            study_id=f"{index % 100000}",
            study_seconds=int(rng.integers(7 * 3600, 19 * 3600)),
        )

    def uid(self, *parts: object) -> str:
        return derive_uid(_UID_NAMESPACE, *map(str, self.key), *map(str, parts))

    @property
    def study_uid(self) -> str:
        return self.uid("study")

    def time(self, offset_s: float = 0.0) -> str:
        total = self.study_seconds + offset_s
        h, rest = divmod(total, 3600)
        m, sec = divmod(rest, 60)
        return f"{int(h):02d}{int(m):02d}{sec:09.6f}"


def patient_study(ds: Dataset, ids: Identity) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = ids.birth_date
    ds.PatientSex = ids.sex
    ds.PatientAge = ids.age
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = ids.study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = ids.time()
    ds.ReferringPhysicianName = ""
    ds.StudyID = ids.study_id
    ds.AccessionNumber = ids.accession
    ds.StudyDescription = "CT CHEST WO CONTRAST"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "Synthetic chest imaging"
    ds.InstitutionName = "hrct-triage synthetic data (not a patient)"
    ds.StationName = "PHANTOM01"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "hrct-triage phantom 1"
