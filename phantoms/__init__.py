"""Synthetic chest CT studies written as DICOM, for demo, tests and training; imports ``common``.

A distribution of its own (``phantoms/pyproject.toml``): the GPU worker image does not install it.

No real patient data can be had for this project, yet the demo, the tests and the training of the
shipped demo weights need chest CT that behaves like the real thing; everything is deterministic
by seed (UIDs included, no clock anywhere), so tests compare bytes and a training set can be
rebuilt exactly.

The seam between the patient and the files: ``anatomy``, ``vessels``, ``lesions`` and ``patient``
draw one patient (an ``Anatomy``), and ``painting``, ``capsules`` and ``rendering`` turn it into
HU slices and COVID lesion masks at given table positions (``rendering.render_series``,
``rendering.projection``), knowing nothing of DICOM. The writers (``identity``, ``ct_image``,
``enhanced``, ``series``, ``encoders``, ``labels``, ``study``, ``non_ct``) read only those slices,
masks and the few scanner facts an ``Anatomy`` carries (``pixel_spacing``, ``z_top``,
``noise_sigma``, ``signed_pixels``, ``severity``), so another anatomy can replace the first group
without touching them.
"""

from hrct_triage.phantoms.encoders import TRANSFER_SYNTAXES
from hrct_triage.phantoms.labels import LABELS_NAME, LESION_MASKS_NAME, PhantomStudy
from hrct_triage.phantoms.lesions import SEVERITY_MIX, check_severity_mix, parse_severity_mix
from hrct_triage.phantoms.non_ct import write_non_ct_study
from hrct_triage.phantoms.options import THIN_THICKNESS_LIMIT
from hrct_triage.phantoms.rendering import KERNELS
from hrct_triage.phantoms.study import write_phantom_studies

__all__ = [
    "KERNELS",
    "LABELS_NAME",
    "LESION_MASKS_NAME",
    "SEVERITY_MIX",
    "THIN_THICKNESS_LIMIT",
    "TRANSFER_SYNTAXES",
    "PhantomStudy",
    "check_severity_mix",
    "parse_severity_mix",
    "write_non_ct_study",
    "write_phantom_studies",
]
