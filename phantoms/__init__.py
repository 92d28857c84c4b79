"""Synthetic chest CT studies written as DICOM, for demo, tests and training; imports ``common``.

A distribution of its own (``phantoms/pyproject.toml``): the GPU worker image does not install it.

No real patient data can be had for this project, yet the demo, the tests and the training of the
shipped demo weights need chest CT that behaves like the real thing; everything is deterministic
by seed (UIDs included, no clock anywhere), so tests compare bytes and a training set can be
rebuilt exactly.

The seam between the patient and the files is ``generator``: ``draw_body`` draws one patient
(``patient``, ``structures``, the lungs' trees in ``airways_vessels``, the findings in
``findings``) and ``render`` turns it into one series' HU volume with its ground truth (COVID-19
lesion mask, findings, lung) as a ``Phantom``, painting thin sub-slices (``anatomy``,
``painting``, ``lesion_painting``, ``geometry``) and scanning them (``scanner_physics``), knowing
nothing of DICOM. The writers (``identity``, ``ct_image``, ``enhanced``, ``series``,
``encoders``, ``labels``, ``study``, ``non_ct``) read only a ``Phantom``'s HU, slice positions
and pixel spacing and the ``Body`` (for the localizer). ``cohort``, ``kernels`` and ``options``
say what a run holds and how it is sent. ``hybrid`` paints the same COVID-19 lesions into a real
HU volume, for evaluation on real backgrounds.
"""

from hrct_triage.phantoms.cohort import (
    GROUPS,
    NEGATIVE_CHOICES,
    SEVERITY_MIX,
    check_negative_mix,
    check_severity_mix,
    parse_negative_mix,
    parse_severity_mix,
)
from hrct_triage.phantoms.encoders import TRANSFER_SYNTAXES
from hrct_triage.phantoms.findings import CONFOUNDERS, COVID_KINDS, FINDINGS
from hrct_triage.phantoms.generator import Phantom, StudySpec, generate
from hrct_triage.phantoms.hybrid import Hybrid, insert_covid
from hrct_triage.phantoms.kernels import KERNELS, RANDOM
from hrct_triage.phantoms.labels import (
    FINDING_NAMES,
    LABELS_NAME,
    LESION_MASKS_NAME,
    PhantomStudy,
)
from hrct_triage.phantoms.non_ct import write_non_ct_study
from hrct_triage.phantoms.options import THIN_THICKNESS_LIMIT
from hrct_triage.phantoms.study import write_phantom_studies

__all__ = [
    "CONFOUNDERS",
    "COVID_KINDS",
    "FINDINGS",
    "FINDING_NAMES",
    "GROUPS",
    "KERNELS",
    "LABELS_NAME",
    "LESION_MASKS_NAME",
    "NEGATIVE_CHOICES",
    "RANDOM",
    "SEVERITY_MIX",
    "THIN_THICKNESS_LIMIT",
    "TRANSFER_SYNTAXES",
    "Hybrid",
    "Phantom",
    "PhantomStudy",
    "StudySpec",
    "check_negative_mix",
    "check_severity_mix",
    "generate",
    "insert_covid",
    "parse_negative_mix",
    "parse_severity_mix",
    "write_non_ct_study",
    "write_phantom_studies",
]
