"""From HU slices to what the DenseNet sees, as Yang et al. 2020 describe it.

Two steps of the paper live here. First, only slices that contain lung parenchyma enter the study
probability; the paper found them by lung segmentation, which we do with a threshold and
connected components: air inside the body, not connected to the air around the patient, minus
components too small to be lung (trachea, bronchi, gas pockets). The mask only selects slices;
the network sees the whole windowed slice, as in the paper's Figure 2. Second, the lung window
(width 1200 HU, level -600 HU) maps HU to [0, 1]; slices are resized to 224 and replicated to the
three input channels of an ImageNet-shaped DenseNet-121.

Everything is vectorised over the whole stack (one ``ndimage.label`` call with an in-plane
structuring element, torch for windowing and resizing) so a 300-slice 512 x 512 series takes a
small fraction of the model's time. Training must use :func:`model_input` too, so the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage

from hrct_triage.common import paper
from hrct_triage.worker.method.cpu_pool import cpu_map

__all__ = [
    "LungSettings",
    "lung_mask",
    "lung_slices",
    "lung_window",
    "model_input",
]

# In-plane 4-connectivity and no connection between slices: one label call segments every slice.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
# Segmentation only decides which slices hold lung, so it runs on at most ~256 x 256 pixels.
_SEGMENTATION_SIZE = 256
# Slices windowed and resized per torch call. Small enough that a chunk's float temporaries
# (8 MiB at 512 x 512) are reused by the allocator: at 32 slices each one was a fresh 32 MiB
# mapping (116k-163k page faults against 2k-12k for 249 slices) and model_input took twice
# as long for the same output.
_CHUNK = 8


@dataclass(frozen=True)
class LungSettings:
    """Thresholds of the lung segmentation; areas in mm^2 so they hold for any pixel spacing."""

    # Aerated lung, including ground-glass opacity (about -700 to -300 HU), lies below this.
    air_threshold_hu: float = -320.0
    # One connected air region smaller than this is trachea, a bronchus or a gas pocket (the adult
    # trachea is ~2-3 cm^2 in cross-section), not lung.
    min_component_mm2: float = 300.0
    # A slice counts as a lung slice with at least this much lung (10 cm^2): drops the apex tip and
    # the last costophrenic sliver, whose few pixels say little about the parenchyma.
    min_lung_area_mm2: float = 1000.0


def lung_mask(
    hu: npt.NDArray[np.floating],
    *,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    settings: LungSettings = LungSettings(),
) -> npt.NDArray[np.bool_]:
    """Lung voxels of a (slices, rows, columns) HU stack, segmented slice by slice."""
    if hu.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, columns), got shape {hu.shape}")
    air = hu < settings.air_threshold_hu
    labels, count = ndimage.label(air, structure=_IN_PLANE)
    outside = np.zeros(count + 1, dtype=bool)
    outside[0] = True  # label 0 is "not air"
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[np.unique(edge)] = True
    pixel_area = float(pixel_spacing[0]) * float(pixel_spacing[1])
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = ~outside & (sizes * pixel_area >= settings.min_component_mm2)
    return keep[labels]


def lung_field(
    hu: npt.NDArray[np.floating],
    *,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    settings: LungSettings = LungSettings(),
) -> npt.NDArray[np.bool_]:
    """The lungs of one (rows, columns) HU slice with the holes in them filled.

    ``lung_mask`` keeps air only, so vessels and dense opacities are holes in it; a heat map
    should be free to show evidence there. This is where heat maps are drawn and peaks sought.
    """
    if hu.ndim != 2:
        raise ValueError(f"hu must be one (rows, columns) slice, got shape {hu.shape}")
    lungs = lung_mask(hu[None], pixel_spacing=pixel_spacing, settings=settings)[0]
    return np.asarray(ndimage.binary_fill_holes(lungs), dtype=bool)


def lung_slices(
    hu: npt.NDArray[np.floating],
    *,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    settings: LungSettings = LungSettings(),
) -> npt.NDArray[np.bool_]:
    """Which slices hold at least ``settings.min_lung_area_mm2`` of lung parenchyma."""
    if hu.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, columns), got shape {hu.shape}")
    stride = max(1, min(hu.shape[1], hu.shape[2]) // _SEGMENTATION_SIZE)
    spacing = (float(pixel_spacing[0]) * stride, float(pixel_spacing[1]) * stride)

    def chunk_area(start: int) -> npt.NDArray[np.float64]:
        small = hu[start : start + _CHUNK, ::stride, ::stride]
        mask = lung_mask(small, pixel_spacing=spacing, settings=settings)
        return np.asarray(mask.sum(axis=(1, 2)) * (spacing[0] * spacing[1]), dtype=np.float64)

    # Components never span slices, so chunks segment exactly as the whole stack would, with
    # temporaries (labels are int32) small enough to be reused rather than mapped afresh, and
    # independently: on the worker's CPU threads (the labelling runs outside the GIL).
    areas = cpu_map(chunk_area, range(0, hu.shape[0], _CHUNK))
    area = np.concatenate(areas) if areas else np.empty(0, dtype=np.float64)
    return np.asarray(area >= settings.min_lung_area_mm2, dtype=bool)


def lung_window(
    hu: npt.NDArray[np.floating],
    *,
    width: float = paper.LUNG_WINDOW_WIDTH,
    level: float = paper.LUNG_WINDOW_LEVEL,
) -> npt.NDArray[np.float32]:
    """HU to [0, 1] through the lung window (level - width/2 maps to 0, level + width/2 to 1)."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def model_input(
    hu: npt.NDArray[np.floating],
    *,
    indices: Sequence[int] | npt.NDArray[np.integer] | None = None,
    size: int = paper.INPUT_SIZE,
    width: float = paper.LUNG_WINDOW_WIDTH,
    level: float = paper.LUNG_WINDOW_LEVEL,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(slices, rows, columns) HU -> (len(indices), 3, size, size) float32 network input.

    ``indices`` picks slices (all by default) without copying the whole stack. Lung window first,
    then a bilinear antialiased resize, then the one channel is repeated three times as a view
    (``expand``), so the result costs the memory of a single channel. With a CUDA ``device`` the
    raw HU chunks travel from pinned host memory and the window and resize run on the GPU, where
    they cost next to nothing; the result then lives on that device.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, columns), got shape {hu.shape}")
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    chosen = np.arange(hu.shape[0]) if indices is None else np.asarray(indices, dtype=np.intp)
    low = level - width / 2.0
    on_gpu = device is not None and device.type == "cuda"
    out = torch.empty((len(chosen), 1, size, size), dtype=torch.float32, device=device)
    for start in range(0, len(chosen), _CHUNK):
        picked = hu[chosen[start : start + _CHUNK]]
        chunk = torch.from_numpy(np.ascontiguousarray(picked, dtype=np.float32))
        if on_gpu:
            chunk = chunk.pin_memory().to(device, non_blocking=True)
        # in place: ``chunk`` is a fresh copy (fancy indexing), the same ops without temporaries
        windowed = chunk.sub_(low).div_(width).clamp_(0.0, 1.0).unsqueeze(1)
        resized = F.interpolate(
            windowed, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + _CHUNK] = resized.clamp_(0.0, 1.0)
    return out.expand(-1, 3, -1, -1)
