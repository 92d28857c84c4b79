"""How a study is sent (slice thickness, kernel, transfer syntax, Enhanced CT, cohort), checked.

Options vary how a study is sent, never who the patient is: the anatomy, lesions and noise draws
depend on the seed alone. A series whose content an option changes gets UIDs of its own (the
study UID stays), so two variants of one study can meet in one PACS without clashing.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

from hrct_triage.phantoms.encoders import SYNTAXES, TRANSFER_SYNTAXES, Syntax, decimal_string
from hrct_triage.phantoms.lesions import SEVERITY_MIX, check_severity_mix
from hrct_triage.phantoms.rendering import KERNEL_LOOK, KERNELS

THIN_THICKNESS_LIMIT = 5.0
"""The thin series must stay thinner than this (the thick soft-tissue series' slice thickness)."""


@dataclass(frozen=True)
class Options:
    """How a study is sent; the defaults are the files written before these options existed."""

    thickness: float = 1.0  # SliceThickness (mm) of the thin series
    kernel: str = "LUNG"  # ConvolutionKernel of the thin series
    transfer_syntax: str = "explicit"  # a TRANSFER_SYNTAXES name, for every CT image
    enhanced: bool = False  # the thin series as one multi-frame Enhanced CT Image instance
    # shares of the positive studies' severities; None is SEVERITY_MIX, the paper's cohort
    severity_mix: tuple[tuple[str, float], ...] | None = None

    def check(self) -> None:
        if not (math.isfinite(self.thickness) and 0.0 < self.thickness < THIN_THICKNESS_LIMIT):
            raise ValueError(
                f"thickness must be > 0 and < {THIN_THICKNESS_LIMIT:g} mm (the thin series stays "
                f"thinner than the soft-tissue series), got {self.thickness:g}"
            )
        if self.kernel not in KERNEL_LOOK:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
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

    @property
    def syntax(self) -> Syntax:
        return SYNTAXES[self.transfer_syntax]

    @property
    def mix(self) -> dict[str, float]:
        return dict(self.severity_mix) if self.severity_mix is not None else SEVERITY_MIX

    def cohort(self) -> tuple[str, ...]:
        """Extra UID parts for another severity mix: other patients, so other studies."""
        if self.severity_mix is None or dict(self.severity_mix) == SEVERITY_MIX:
            return ()
        return ("mix", *(f"{name}={share:g}" for name, share in self.severity_mix))

    def variant(self, *, thin: bool) -> tuple[str, ...]:
        """Extra UID parts of a series whose content an option changes; none for the defaults."""
        parts: list[str] = []
        if thin and (self.thickness != 1.0 or self.kernel != "LUNG" or self.enhanced):
            parts += ["recon", decimal_string(self.thickness), self.kernel]
            parts += ["enhanced"] if self.enhanced else []
        if self.syntax.lossy_method is not None:
            parts += ["lossy", self.syntax.name]
        return tuple(parts)
