"""Per-study statistics of the analysed input, recorded so that drift and the domain guard can see
what the scanners send (a new kernel, a noisier protocol, a calibration shift) without the images.

Computed on the lung field (``preprocess.lung_field``: the lungs with vessels and opacities filled
in) of at most ``MAX_SLICES`` lung slices spread evenly over the lung. The result is a flat dict:

* ``lung_hu_mean``, ``lung_hu_sd``, ``lung_hu_p10``, ``lung_hu_p50``, ``lung_hu_p90``: HU of
  the lung-field voxels;
* ``noise_hu``: the image noise in HU, as the robust standard deviation (1.4826 x median absolute
  deviation) of the residual after a 3 x 3 mean, over aerated lung (below -700 HU after a 5 x 5
  mean, so that the noise itself does not choose the pixels; eroded by two pixels so edges stay
  out), divided by sqrt(8/9) so that white noise of SD s gives s.
  Aerated lung is the one homogeneous region every lung slice has (air outside the body may be
  cut off by the field of view or padded); texture left in it counts as noise, and noise that a
  smooth kernel correlates between pixels reads lower: it is an estimate to compare studies by,
  not a physical measurement (None when no sampled slice has aerated lung);
* ``lung_slices``: how many slices held lung (all of them, not only those sampled);
* ``lung_slice_share``: ``lung_slices`` over the slices of the series (a chest CT covers the
  lungs and a little more; a scan of the lung bases or the abdomen much less);
* ``lung_extent_mm``: head-to-foot extent of the lung slices in mm, first to last lung slice
  (a chest CT covers 200 to 300 mm of lung whatever its slice thickness; a scan of the lung
  bases or the upper abdomen much less; None without the slice spacing);
* ``lung_fraction``: lung-field area over body area on the sampled slices (a chest gives 0.3 to
  0.6; a series that only grazes the lung bases much less);
* ``lung_hu_histogram``: fractions of the lung-field voxels in the ``HISTOGRAM_EDGES`` bins (HU
  below the first edge or above the last land in the end bins), a list, not a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from hrct_triage.worker.method.preprocess import LungSettings, lung_field

__all__ = ["HISTOGRAM_EDGES", "MAX_SLICES", "input_statistics"]

# Sampled slices: enough for stable percentiles, few enough to cost milliseconds per study.
MAX_SLICES = 24
# 100 HU bins from emphysema to soft tissue; what lies outside goes to the end bins.
HISTOGRAM_EDGES: tuple[float, ...] = tuple(float(v) for v in range(-1100, 201, 100))
_AERATED_HU = -700.0
_WHITE_NOISE_RESIDUAL = float(np.sqrt(8.0 / 9.0))
_BODY_HU = -500.0


def input_statistics(
    hu: npt.NDArray[np.floating],
    lung_indices: Sequence[int] | npt.NDArray[np.integer],
    *,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    slice_spacing: float | None = None,
    settings: LungSettings = LungSettings(),
) -> dict[str, Any]:
    """The statistics above for a (slices, rows, columns) HU stack and its lung slices."""
    if hu.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, columns), got shape {hu.shape}")
    lung = np.asarray(lung_indices, dtype=np.intp)
    if lung.size == 0:
        raise ValueError("no lung slices to describe")
    picks = np.linspace(0, lung.size - 1, min(MAX_SLICES, lung.size)).round().astype(np.intp)
    sampled = lung[np.unique(picks)]
    values: list[npt.NDArray[np.float32]] = []
    residuals: list[npt.NDArray[np.float32]] = []
    lung_area = body_area = 0
    for index in sampled.tolist():
        image = np.asarray(hu[index], dtype=np.float32)
        field = lung_field(image, pixel_spacing=pixel_spacing, settings=settings)
        values.append(image[field])
        lung_area += int(field.sum())
        body = np.asarray(ndimage.binary_fill_holes(image > _BODY_HU), dtype=bool) | field
        body_area += int(body.sum())
        smooth = ndimage.uniform_filter(image, size=5, mode="nearest")
        aerated = ndimage.binary_erosion(field & (smooth < _AERATED_HU), iterations=2)
        if aerated.any():
            residual = image - ndimage.uniform_filter(image, size=3, mode="nearest")
            residuals.append(residual[aerated])
    voxels = np.concatenate(values)
    if voxels.size == 0:
        raise ValueError("the lung slices hold no lung-field voxel")
    noise = _robust_noise(residuals)
    p10, p50, p90 = (float(v) for v in np.percentile(voxels, [10, 50, 90]))
    edges = np.asarray(HISTOGRAM_EDGES)
    counts = np.bincount(
        np.clip(np.searchsorted(edges, voxels, side="right") - 1, 0, edges.size - 2),
        minlength=edges.size - 1,
    )
    return {
        "lung_hu_mean": round(float(voxels.mean()), 3),
        "lung_hu_sd": round(float(voxels.std()), 3),
        "lung_hu_p10": round(p10, 3),
        "lung_hu_p50": round(p50, 3),
        "lung_hu_p90": round(p90, 3),
        "noise_hu": None if noise is None else round(noise, 3),
        "lung_slices": int(lung.size),
        "lung_slice_share": round(lung.size / hu.shape[0], 4),
        "lung_extent_mm": (
            None
            if slice_spacing is None
            else round(float(lung.max() - lung.min() + 1) * slice_spacing, 1)
        ),
        "lung_fraction": round(lung_area / body_area, 4) if body_area else 0.0,
        "lung_hu_histogram": [round(float(c) / voxels.size, 5) for c in counts],
    }


def _robust_noise(residuals: list[npt.NDArray[np.float32]]) -> float | None:
    if not residuals:
        return None
    pooled = np.concatenate(residuals)
    mad = float(np.median(np.abs(pooled - np.median(pooled))))
    return 1.4826 * mad / _WHITE_NOISE_RESIDUAL
