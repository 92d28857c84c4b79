"""The pointing game: does the heat map the worker draws point at the lesion?

On each lung slice whose lesion mask is non-empty, the slice's class activation map is mapped
to the image as the secondary capture shows it (``worker.method.pipeline.slice_heat_map``: ReLU,
bilinear upsampling to the slice's rows and columns, zero outside the slice's lung field, scaled
to [0, 1]). Its peak (the first maximum in raster order) is a hit when it lies within
``tolerance_mm`` of a lesion pixel, that is, inside the lesion mask dilated by a disc of that
radius in millimetres. A study scores its hits over its lesion slices; a set pools the slices of
its studies. ``hrct-triage evaluate`` (phantom lesion masks) and ``hrct-triage hybrids`` (lesions
inserted into a real series) both play it this way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from hrct_triage.worker.method.pipeline import slice_heat_map
from hrct_triage.worker.method.preprocess import LungSettings

__all__ = ["DEFAULT_POINTING_TOLERANCE_MM", "pointing_game", "pointing_hit"]

# The CAM is 7 x 7 for a 224 input: one cell spans ~45 mm of a 320 mm field of view, so its
# upsampled peak cannot be placed closer than a few millimetres; 10 mm (about a pulmonary
# segment's small lesion radius) separates "points at the lesion" from "points elsewhere".
DEFAULT_POINTING_TOLERANCE_MM = 10.0


def pointing_hit(
    heat: npt.NDArray[np.floating],
    lesion: npt.NDArray[np.bool_],
    *,
    pixel_spacing: Sequence[float],
    tolerance_mm: float,
) -> bool:
    """True when the peak of ``heat`` lies within ``tolerance_mm`` of a pixel of ``lesion``.

    ``heat`` and ``lesion`` are one slice at image resolution; ``pixel_spacing`` is (between
    rows, between columns) in mm. An empty lesion mask is never hit.
    """
    if heat.shape != lesion.shape:
        raise ValueError(f"heat map is {heat.shape}, lesion mask {lesion.shape}")
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if not lesion.any():
        return False
    spacing = np.asarray(pixel_spacing, dtype=np.float64)
    peak = np.asarray(np.unravel_index(int(np.argmax(heat)), heat.shape), dtype=np.float64)
    pixels = np.argwhere(lesion).astype(np.float64)
    distance = float(np.min(np.linalg.norm((pixels - peak) * spacing, axis=1)))
    return distance <= tolerance_mm


def pointing_game(
    hu: npt.NDArray[np.floating],
    lung: Sequence[int] | npt.NDArray[np.integer],
    cams: npt.NDArray[np.float32],
    masks: Mapping[int, npt.NDArray[np.bool_]],
    *,
    pixel_spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_POINTING_TOLERANCE_MM,
    settings: LungSettings = LungSettings(),
) -> dict[int, bool]:
    """Hit or miss on each lesion slice: lung-slice position -> hit.

    ``hu`` is the volume the network read (slices, rows, columns), ``lung`` the volume indices
    of its lung slices, ``cams[i]`` the raw CAM of lung slice ``i`` and ``masks`` the lesion mask
    of a volume index. A lung slice without a mask, or with an empty one, does not play.
    """
    outcome: dict[int, bool] = {}
    for position, index in enumerate(int(i) for i in lung):
        mask = masks.get(index)
        if mask is None or not mask.any():
            continue
        heat = slice_heat_map(
            hu[index], cams[position], pixel_spacing=pixel_spacing, settings=settings
        )
        outcome[position] = pointing_hit(
            heat, mask, pixel_spacing=pixel_spacing, tolerance_mm=tolerance_mm
        )
    return outcome
