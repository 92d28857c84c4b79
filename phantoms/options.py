"""How a study is sent (slice thickness, kernel, matrix, transfer syntax, Enhanced CT, cohort).

Options vary how a study is sent, never who the patient is: the body, its findings and the
scanner's draws depend on the seed alone, except for the cohort options (severity and negative
mixes), which draw other patients. A series whose content an option changes gets UIDs of its own
(the study UID stays), so two variants of one study can meet in one PACS without clashing.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

import numpy as np

from hrct_triage.phantoms.cohort import SEVERITY_MIX, check_negative_mix, check_severity_mix
from hrct_triage.phantoms.encoders import SYNTAXES, TRANSFER_SYNTAXES, Syntax, decimal_string
from hrct_triage.phantoms.kernels import KERNEL_TABLE, KERNELS, RANDOM, random_kernel
from hrct_triage.phantoms.scanner_physics import KERNELS as LOOKS

THIN_THICKNESS_LIMIT = 5.0
"""The thin series is at most this thick (the thick soft-tissue series' slice thickness)."""
MATRIX = 512  # rows and columns of the CT images by default, and of the localizer always
MATRIX_RANGE = (128, 1024)
"""Rows and columns a study's CT images may have; below 512 for quick tests only."""

# Domain randomisation of the thin series: slice thicknesses (mm), reconstruction matrices (as
# shares of the study's matrix: 384, 512 or 768 for the default) and fields of view (mm) a chest
# CT is commonly sent with, and how far the noise may stray from the kernel's usual range.
RANDOM_THICKNESSES = (0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
RANDOM_MATRICES = {0.75: 0.1, 1.0: 0.8, 1.5: 0.1}
RANDOM_FOV_MM = (330.0, 460.0)
RANDOM_NOISE_SPREAD = (0.75, 1.25)


@dataclass(frozen=True)
class Acquisition:
    """How one study's thin series is reconstructed: the options' values, or a random draw."""

    kernel: str  # ConvolutionKernel (a KERNELS name)
    thickness: float  # mm
    matrix: int
    pixel_spacing: float | None  # mm at 512 x 512 (a field of view); None fits the patient
    noise_sd: float | None  # soft-tissue noise SD (HU) at 5 mm; None: the kernel's own draw

    @property
    def physics(self) -> str:
        """The generator's kernel that renders this ConvolutionKernel."""
        return KERNEL_TABLE[self.kernel].physics


@dataclass(frozen=True)
class Options:
    """How a study is sent; the defaults are a 1 mm LUNG series of 512 x 512 images."""

    thickness: float = 1.0  # SliceThickness (mm) of the thin series
    kernel: str = "LUNG"  # ConvolutionKernel of the thin series, or RANDOM
    transfer_syntax: str = "explicit"  # a TRANSFER_SYNTAXES name, for every CT image
    enhanced: bool = False  # the thin series as one multi-frame Enhanced CT Image instance
    # shares of the positive studies' severities; None is SEVERITY_MIX
    severity_mix: tuple[tuple[str, float], ...] | None = None
    # shares of the negative studies' groups (cohort.NEGATIVE_CHOICES); None: the generator's
    negative_mix: tuple[tuple[str, float], ...] | None = None
    matrix: int = MATRIX  # rows and columns of the CT images
    randomise: bool = False  # draw the thin series' kernel, noise, FOV, thickness and matrix

    def check(self) -> None:
        if not (math.isfinite(self.thickness) and 0.0 < self.thickness <= THIN_THICKNESS_LIMIT):
            raise ValueError(
                f"thickness must be > 0 and <= {THIN_THICKNESS_LIMIT:g} mm (the thin series is "
                f"no thicker than the soft-tissue series), got {self.thickness:g}"
            )
        if self.kernel not in KERNELS and self.kernel != RANDOM:
            raise ValueError(
                f"kernel must be one of {', '.join(KERNELS)} or {RANDOM}, got {self.kernel!r}"
            )
        if self.randomise and (self.thickness != 1.0 or self.kernel not in ("LUNG", RANDOM)):
            raise ValueError(
                "randomised acquisition draws the thickness and the kernel: "
                "leave thickness and kernel at their defaults"
            )
        if not MATRIX_RANGE[0] <= self.matrix <= MATRIX_RANGE[1] or self.matrix % 2:
            low, high = MATRIX_RANGE
            raise ValueError(f"matrix must be even and {low}-{high}, got {self.matrix}")
        syntax = SYNTAXES.get(self.transfer_syntax)
        if syntax is None:
            names = ", ".join(TRANSFER_SYNTAXES)
            raise ValueError(
                f"transfer syntax must be one of {names}, got {self.transfer_syntax!r}"
            )
        if syntax.encoder == "dcmtk" and shutil.which("dcmcjpeg") is None:
            raise ValueError(f"transfer syntax {syntax.name} needs DCMTK's dcmcjpeg on PATH")
        if self.severity_mix is not None:
            check_severity_mix(dict(self.severity_mix))
        if self.negative_mix is not None:
            check_negative_mix(dict(self.negative_mix))

    @property
    def syntax(self) -> Syntax:
        return SYNTAXES[self.transfer_syntax]

    @property
    def mix(self) -> dict[str, float]:
        return dict(self.severity_mix) if self.severity_mix is not None else SEVERITY_MIX

    @property
    def negatives(self) -> dict[str, float] | None:
        return dict(self.negative_mix) if self.negative_mix is not None else None

    def cohort(self) -> tuple[str, ...]:
        """Extra UID parts for other severity or negative mixes: other patients, other studies."""
        parts: list[str] = []
        if self.severity_mix is not None and dict(self.severity_mix) != SEVERITY_MIX:
            parts += ["mix", *(f"{name}={share:g}" for name, share in self.severity_mix)]
        if self.negative_mix is not None:
            parts += ["negatives", *(f"{name}={share:g}" for name, share in self.negative_mix)]
        return tuple(parts)

    def acquisition(self, rng: np.random.Generator) -> Acquisition:
        """The thin series' reconstruction; ``rng`` draws whatever the options randomise."""
        kernel = self.kernel if self.kernel != RANDOM else random_kernel(float(rng.random()))
        if not self.randomise:
            return Acquisition(kernel, self.thickness, self.matrix, None, None)
        kernel = random_kernel(float(rng.random()))
        thickness = float(RANDOM_THICKNESSES[int(rng.integers(len(RANDOM_THICKNESSES)))])
        scales = list(RANDOM_MATRICES)
        scale = scales[int(rng.choice(len(scales), p=list(RANDOM_MATRICES.values())))]
        matrix = min(max(2 * round(self.matrix * scale / 2), MATRIX_RANGE[0]), MATRIX_RANGE[1])
        fov = float(rng.uniform(*RANDOM_FOV_MM))
        low, high = LOOKS[KERNEL_TABLE[kernel].physics].noise_5mm
        noise = float(rng.uniform(low * RANDOM_NOISE_SPREAD[0], high * RANDOM_NOISE_SPREAD[1]))
        return Acquisition(kernel, thickness, matrix, round(fov / MATRIX, 4), round(noise, 1))

    def variant(self, *, thin: bool) -> tuple[str, ...]:
        """Extra UID parts of a series whose content an option changes; none for the defaults."""
        parts: list[str] = []
        if thin and (self.thickness != 1.0 or self.kernel != "LUNG" or self.enhanced):
            parts += ["recon", decimal_string(self.thickness), self.kernel]
            parts += ["enhanced"] if self.enhanced else []
        if thin and self.randomise:
            parts += ["randomised"]
        if self.matrix != MATRIX:
            parts += ["matrix", str(self.matrix)]
        if self.syntax.lossy_method is not None:
            parts += ["lossy", self.syntax.name]
        return tuple(parts)
