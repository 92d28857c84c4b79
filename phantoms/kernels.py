"""The reconstruction kernels a thin series can carry, as a scanner names them and as they look.

The header names the kernel as GE does (LUNG, BONE, DETAIL, STANDARD, SOFT), so the worker's
series picker sees familiar values; the generator renders each with one of its own kernels
(``scanner_physics.KERNELS``: modulation transfer, edge enhancement and noise power spectrum).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KERNELS", "RANDOM", "Kernel", "random_kernel"]


@dataclass(frozen=True)
class Kernel:
    """A ConvolutionKernel of the thin series: its Enhanced CT group and the generator's look."""

    group: str  # ConvolutionKernelGroup (Enhanced CT defined terms)
    physics: str  # the scanner_physics.KERNELS entry that renders it


KERNEL_TABLE = {
    "LUNG": Kernel("LUNG", "LUNG"),
    "BONE": Kernel("BONE", "SHARP"),
    "STANDARD": Kernel("SOFT_TISSUE", "STANDARD"),
    "SOFT": Kernel("SOFT_TISSUE", "STANDARD"),
    "DETAIL": Kernel("SOFT_TISSUE", "MEDIUM"),
}
KERNELS: tuple[str, ...] = tuple(KERNEL_TABLE)
"""Reconstruction kernels the thin series can have (its ConvolutionKernel); LUNG is the default.
BONE is sharper and noisier, DETAIL between the two, STANDARD and SOFT smoother and quieter, as
on a scanner."""

RANDOM = "RANDOM"
"""The kernel option that draws one of ``KERNELS`` per study (domain randomisation)."""

# Lung-like kernels are what a chest HRCT series is reconstructed with most often.
_RANDOM_SHARES = {"LUNG": 0.35, "BONE": 0.15, "DETAIL": 0.15, "STANDARD": 0.2, "SOFT": 0.15}


def random_kernel(u: float) -> str:
    """The kernel a uniform draw ``u`` in [0, 1) picks for a randomised study."""
    total = 0.0
    for name, share in _RANDOM_SHARES.items():
        total += share
        if u < total:
            return name
    return KERNELS[0]
