"""How close a chest CT series is to a real one, in numbers a radiologist would recognise.

Why this exists: a classifier trained on phantoms learns whatever separates phantom lungs from
phantom lesions; if the phantoms' normal lung differs from real normal lung (its density, its
vessels, its bronchi, its noise), real normal lung looks abnormal to the model. These measurements
can be computed on any HU volume (real or synthetic) with its pixel spacing and slice thickness,
so phantoms can be tuned against real series until the numbers agree:

* lung HU histogram: percentiles and a binned density inside the lung (vessels included);
* vessel volume fraction: voxels above -500 HU inside the lung, and how it falls off toward the
  pleura (real vessels taper and stop 1-2 cm short of it);
* noise power spectrum (1-D radial NPS, its peak and mean frequency, the noise SD) in air outside
  the body and in uniform soft tissue: the reconstruction kernel's fingerprint;
* airways and vessels per lung slice: connected components of walled air and of vessel density.

A folder is read as the worker reads it (series selection, then the volume loader), and the lung
is the worker's own segmentation with its holes (vessels, nodules, lesions) filled slice by
slice, so that what sits inside the lung is measured too. ``hrct-triage realism`` prints the
measurements of several folders side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from hrct_triage.worker.method.preprocess import lung_mask
from hrct_triage.worker.method.series import select_series
from hrct_triage.worker.method.volume import load_volume
from hrct_triage.worker.training.dataset import study_paths

F32 = NDArray[np.floating[Any]]
Mask = NDArray[np.bool_]


__all__ = [
    "HIST_EDGES",
    "NPS",
    "Realism",
    "Volume",
    "filled_lung",
    "load_series",
    "markdown_table",
    "measure",
    "summary",
    "table_rows",
]

HIST_EDGES = np.arange(-1050.0, 226.0, 25.0)  # HU bins of the lung histogram
PERCENTILES = (5, 25, 50, 75, 95)
VESSEL_HU = -500.0  # denser than any aerated lung, lighter than blood partial-volumed into 1 mm
AIRWAY_DARKER = 80.0  # HU below the local lung that a bronchial lumen must reach
AIRWAY_WALL = 60.0  # HU above the local lung that most of its wall must reach
PLEURA_BANDS_MM = ((0.0, 10.0), (10.0, 20.0), (20.0, 40.0), (40.0, 1e9))
_NPS_AIR_ROI = 48
_NPS_SOFT_ROI = 32
_MAX_ROIS = 160


@dataclass(frozen=True)
class Volume:
    """An axial HU stack (slices, rows, columns), apex first, with its geometry in mm."""

    hu: F32
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    slice_spacing: float
    name: str = ""
    kernel: str = ""


@dataclass(frozen=True)
class NPS:
    """A 1-D radial noise power spectrum: frequencies (cycles/mm) and power (HU^2 mm^2)."""

    freq: NDArray[np.float64]
    power: NDArray[np.float64]
    sd: float  # noise standard deviation in the ROIs (HU)
    rois: int

    @property
    def peak(self) -> float:
        if self.rois == 0:
            return math.nan
        smooth = np.convolve(self.power, np.ones(3) / 3.0, mode="same")
        return float(self.freq[int(np.argmax(smooth))])

    @property
    def mean_freq(self) -> float:
        total = float(self.power.sum())
        return float((self.freq * self.power).sum() / total) if total > 0 else math.nan

    def normalised(self, freq: NDArray[np.float64]) -> NDArray[np.float64]:
        """Power resampled at ``freq`` and scaled to unit area (shape only)."""
        p = np.interp(freq, self.freq, self.power, right=0.0)
        area = float(np.trapezoid(p, freq))
        return p / area if area > 0 else p


@dataclass(frozen=True)
class Realism:
    """Everything :func:`measure` finds in one volume."""

    name: str
    kernel: str  # the series' ConvolutionKernel
    thickness: float  # its slice thickness (mm)
    lung_slices: int
    lung_volume_ml: float
    percentiles: dict[int, float]
    mean_hu: float
    hist: NDArray[np.float64]  # density per HU bin of HIST_EDGES (sums to 1)
    below_950: float  # share of lung voxels < -950 HU
    ggo_range: float  # share of lung voxels in [-700, -300) HU
    vessel_fraction: float
    vessel_by_pleura: dict[str, float]  # vessel fraction by distance from the pleura
    vessels_per_slice: float
    small_vessels_per_slice: float  # components under 10 mm^2: the periphery's dots
    airways_per_slice: float
    nps_air: NPS
    nps_soft: NPS
    lung_noise_sd: float  # SD of (lung - its 5 x 5 median) in vessel-free lung
    extra: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def load_series(folder: Path, *, min_slices: int = 20) -> Volume:
    """The series of a study folder the worker would analyse, as HU, apex first.

    The same steps as the worker's (``select_series``, then ``load_volume``), so a folder with a
    lung and a soft-tissue series is measured on the one the model would read.
    """
    series = select_series(study_paths(folder), min_slices=min_slices)
    volume = load_volume(series)
    thickness = series.slice_thickness
    return Volume(
        hu=volume.hu,
        pixel_spacing=volume.pixel_spacing,
        slice_thickness=thickness if thickness is not None else volume.slice_spacing,
        slice_spacing=volume.slice_spacing,
        name=f"{folder.parent.name}/{folder.name}",
        kernel=series.kernel,
    )


# ------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------


def filled_lung(hu: F32, pixel_spacing: Sequence[float]) -> Mask:
    """The worker's lung segmentation with its holes filled slice by slice.

    ``lung_mask`` keeps aerated voxels only (below -320 HU), so vessels, bronchial walls,
    nodules and lesions are holes in it; filled, they are part of the lung, which is what a
    vessel fraction or a lesion histogram needs.
    """
    air = lung_mask(hu, pixel_spacing=pixel_spacing)
    out = np.empty_like(air)
    for k in range(air.shape[0]):
        out[k] = ndimage.binary_fill_holes(air[k])
    return out


def _body(hu2: F32) -> Mask:
    """The patient (and anything touching it) on one slice: dense, filled, largest part."""
    dense = hu2 > -500.0
    dense = ndimage.binary_opening(dense, iterations=2)
    labels, n = ndimage.label(dense)
    if n == 0:
        return dense
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return np.asarray(ndimage.binary_fill_holes(body), dtype=bool)


def _fov(shape: tuple[int, int], margin: int = 6) -> Mask:
    """The inscribed reconstruction circle, ``margin`` pixels inside its edge."""
    rows, cols = shape
    yy, xx = np.ogrid[:rows, :cols]
    r = min(rows, cols) / 2.0 - margin
    return np.asarray(((yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2) <= r * r)


# ------------------------------------------------------------------------------------------
# Noise power spectrum
# ------------------------------------------------------------------------------------------


def _radial_nps(rois: list[F32], spacing: float) -> NPS:
    n = _NPS_AIR_ROI if not rois else rois[0].shape[0]
    nyquist = 0.5 / spacing
    edges = np.linspace(0.0, nyquist, 25)
    freq = (edges[:-1] + edges[1:]) / 2.0
    if not rois:
        return NPS(freq, np.zeros_like(freq), math.nan, 0)
    f = np.fft.fftfreq(n, d=spacing)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2).ravel()
    which = np.digitize(radius, edges) - 1
    ok = (which >= 0) & (which < freq.size)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    design = np.stack([np.ones(n * n), yy.ravel(), xx.ravel()], axis=1)
    total = np.zeros(n * n)
    variances = []
    for roi in rois:
        if roi.shape[0] != n:
            continue
        values = roi.astype(np.float64).ravel()
        coef, *_ = np.linalg.lstsq(design, values, rcond=None)
        resid = (values - design @ coef).reshape(n, n)
        variances.append(float(resid.var()))
        total += (np.abs(np.fft.fft2(resid)) ** 2).ravel() * spacing * spacing / (n * n)
    total /= len(rois)
    summed = np.bincount(which[ok], weights=total[ok], minlength=freq.size)[: freq.size]
    counts = np.bincount(which[ok], minlength=freq.size)[: freq.size]
    power = np.asarray(summed / np.maximum(counts, 1), dtype=np.float64)
    return NPS(freq, power, math.sqrt(float(np.mean(variances))), len(rois))


def _pick_rois(
    hu: F32, ok: Mask, size: int, rng: np.random.Generator, limit: int = _MAX_ROIS
) -> list[F32]:
    """Non-overlapping size x size windows whose every pixel is ``ok`` (grid-aligned per slice)."""
    found: list[F32] = []
    rows, cols = hu.shape[1:]
    for k in range(hu.shape[0]):
        good = ok[k]
        # a window is usable when the ok-count over it is size^2 (integral image)
        integral = np.pad(good.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        for r in range(0, rows - size + 1, size // 2):
            for c in range(0, cols - size + 1, size // 2):
                s = (
                    integral[r + size, c + size]
                    - integral[r, c + size]
                    - integral[r + size, c]
                    + integral[r, c]
                )
                if s == size * size:
                    found.append(hu[k, r : r + size, c : c + size])
    if len(found) > limit:
        pick = rng.choice(len(found), size=limit, replace=False)
        found = [found[i] for i in sorted(pick)]
    return found


def noise_power(vol: Volume, *, lung: Mask | None = None) -> tuple[NPS, NPS]:
    """NPS in air outside the body (inside the reconstruction circle) and in soft tissue.

    Air ROIs: 48 x 48 pixels (32 x 32 where fewer than 10 fit), every pixel outside the
    (dilated) body, inside the circle, and within 100 HU of -1000 after a light smoothing (no
    table, blanket or clothing). Soft-tissue ROIs: 32 x 32 pixels whose smoothed HU stays
    within 0-100 (liver, spleen, heart, muscle; no fat, bone or vessel wall), away from the lung.
    Both remove a fitted plane before the FFT.
    """
    hu = vol.hu
    spacing = float(vol.pixel_spacing[0])
    rng = np.random.default_rng(0)
    smooth = np.empty_like(hu)
    for k in range(hu.shape[0]):
        smooth[k] = ndimage.gaussian_filter(hu[k], 2.0)
    fov = _fov(hu.shape[1:])
    air_ok = np.zeros(hu.shape, dtype=bool)
    soft_ok = np.zeros(hu.shape, dtype=bool)
    grow = max(1, round(15.0 / spacing))
    for k in range(hu.shape[0]):
        body = ndimage.binary_dilation(_body(hu[k]), iterations=grow)
        air_ok[k] = fov & ~body & (np.abs(smooth[k] + 1000.0) < 100.0)
        soft = (smooth[k] > 0.0) & (smooth[k] < 100.0)
        soft_ok[k] = ndimage.binary_erosion(soft, iterations=2)
        if lung is not None:
            soft_ok[k] &= ~ndimage.binary_dilation(lung[k], iterations=grow)
    air_rois = _pick_rois(hu, air_ok, _NPS_AIR_ROI, rng)
    if len(air_rois) < 10:  # a tight field of view leaves only narrow gaps of air
        air_rois = _pick_rois(hu, air_ok, _NPS_SOFT_ROI, rng)
    air = _radial_nps(air_rois, spacing)
    soft = _radial_nps(_pick_rois(hu, soft_ok, _NPS_SOFT_ROI, rng), spacing)
    return air, soft


# ------------------------------------------------------------------------------------------
# Structures in the lung
# ------------------------------------------------------------------------------------------


def _components_per_slice(
    binary: Mask, px_area: float, lo_mm2: float, hi_mm2: float
) -> tuple[list[int], list[NDArray[np.float64]]]:
    counts: list[int] = []
    areas: list[NDArray[np.float64]] = []
    for k in range(binary.shape[0]):
        labels, n = ndimage.label(binary[k])
        if n == 0:
            counts.append(0)
            areas.append(np.zeros(0))
            continue
        a = np.bincount(labels.ravel())[1:] * px_area
        keep = (a >= lo_mm2) & (a <= hi_mm2)
        counts.append(int(keep.sum()))
        areas.append(np.asarray(a[keep], dtype=np.float64))
    return counts, areas


def _airways(hu: F32, lung: Mask, spacing: float) -> list[int]:
    """Walled, roundish pockets of air inside the lung, per slice.

    A bronchus in cross-section is a small pocket darker than the lung around it, ringed by a
    wall denser than that lung. At 5 mm the lumen of a subsegmental bronchus is partial-volumed
    with the lung above and below it and rarely reaches -950 HU, so the test is relative: after
    a 1 mm smoothing (which keeps noise from making pockets), at least ``AIRWAY_DARKER`` HU
    below the local lung median (15 mm window), 2-400 mm^2, not a streak, and 60% of a
    1-2.5 mm ring around it ``AIRWAY_WALL`` HU above that median (a wall most of the way
    round: a vessel beside a sharp kernel's dark undershoot is not a bronchus). Emphysema and
    noise make pockets too, but without the ring.
    """
    px_area = spacing * spacing
    counts: list[int] = []
    inner = max(1, round(1.0 / spacing))
    outer = max(2, round(2.5 / spacing))
    window = max(3, round(15.0 / spacing) | 1)
    for k in range(hu.shape[0]):
        if not lung[k].any():
            counts.append(0)
            continue
        s = ndimage.gaussian_filter(hu[k], 1.0 / spacing)
        clipped = np.where(lung[k], np.minimum(s, -600.0), -850.0).astype(np.float32)
        local = ndimage.median_filter(clipped[::2, ::2], size=window // 2 | 1)
        local = np.repeat(np.repeat(local, 2, axis=0), 2, axis=1)[: s.shape[0], : s.shape[1]]
        pocket = (s < local - AIRWAY_DARKER) & lung[k]
        labels, n = ndimage.label(pocket)
        if n == 0:
            counts.append(0)
            continue
        area = np.bincount(labels.ravel(), minlength=n + 1)[1:] * px_area
        count = 0
        for i, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None or not (2.0 <= area[i - 1] <= 400.0):
                continue
            h = box[0].stop - box[0].start
            w = box[1].stop - box[1].start
            if min(h, w) / max(h, w) < 0.35:  # long streaks are not a cross-section
                continue
            r0 = max(box[0].start - outer, 0)
            c0 = max(box[1].start - outer, 0)
            win = (slice(r0, box[0].stop + outer), slice(c0, box[1].stop + outer))
            sub = labels[win] == i
            ring = ndimage.binary_dilation(sub, iterations=outer) & ~ndimage.binary_dilation(
                sub, iterations=inner
            )
            wall = s[win][ring]
            ref = float(np.median(local[win][sub]))
            if wall.size and float(np.percentile(wall, 40)) > ref + AIRWAY_WALL:
                count += 1
        counts.append(count)
    return counts


def _pockets_950(hu: F32, lung: Mask, spacing: float) -> list[int]:
    """The literal definition: round, small components below -950 HU inside the lung (after a
    0.7 mm smoothing), with no wall test. Counts noise pockets in sharp, noisy kernels too, which
    is why ``_airways`` is the one compared; kept to show how kernel-dependent it is."""
    px_area = spacing * spacing
    counts: list[int] = []
    for k in range(hu.shape[0]):
        if not lung[k].any():
            counts.append(0)
            continue
        s = ndimage.gaussian_filter(hu[k], 0.7 / spacing)
        labels, n = ndimage.label((s < -950.0) & lung[k])
        if n == 0:
            counts.append(0)
            continue
        area = np.bincount(labels.ravel(), minlength=n + 1)[1:] * px_area
        count = 0
        for i, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None or not (1.5 <= area[i - 1] <= 400.0):
                continue
            h = box[0].stop - box[0].start
            w = box[1].stop - box[1].start
            if min(h, w) / max(h, w) >= 0.35:
                count += 1
        counts.append(count)
    return counts


def _lung_noise(hu: F32, lung: Mask) -> float:
    """Fine-grain variation of aerated lung: SD of lung minus its 5 x 5 median, vessels aside."""
    values: list[NDArray[np.float32]] = []
    for k in range(0, hu.shape[0], max(1, hu.shape[0] // 12)):
        if lung[k].sum() < 500:
            continue
        med = ndimage.median_filter(hu[k], size=5)
        core = ndimage.binary_erosion(lung[k], iterations=4) & (med < -700.0)
        values.append((hu[k] - med)[core])
    if not values:
        return math.nan
    allv = np.concatenate(values)
    return float(1.4826 * np.median(np.abs(allv - np.median(allv))))


# ------------------------------------------------------------------------------------------
# Everything
# ------------------------------------------------------------------------------------------


def measure(
    vol: Volume,
    *,
    lung: Mask | None = None,
    min_lung_mm2: float = 2000.0,
    erode_mm: float = 2.0,
) -> Realism:
    """Measure one volume. ``lung`` (filled) is segmented with the worker's code when None.

    Only slices with at least ``min_lung_mm2`` of lung count (apex tip and last costophrenic
    sliver excluded). The lung is eroded by ``erode_mm`` in plane before the histogram and the
    vessel measures, so the chest wall's partial volume at the pleura is not counted as lung.
    A volume without such a slice is refused with a ``ValueError``.
    """
    hu = vol.hu
    sp = float(vol.pixel_spacing[0])
    px_area = float(vol.pixel_spacing[0]) * float(vol.pixel_spacing[1])
    if lung is None:
        lung = filled_lung(hu, vol.pixel_spacing)
    area = lung.sum(axis=(1, 2)) * px_area
    use = area >= min_lung_mm2
    if not use.any():
        raise ValueError(f"{vol.name}: no slice holds {min_lung_mm2:g} mm^2 of lung")
    lung = lung & use[:, None, None]
    iters = max(1, round(erode_mm / sp))
    core = np.zeros_like(lung)
    dist = np.zeros(lung.shape, dtype=np.float32)
    for k in np.flatnonzero(use):
        core[k] = ndimage.binary_erosion(lung[k], iterations=iters)
        dist[k] = ndimage.distance_transform_edt(lung[k]) * sp
    values = hu[core]
    hist, _ = np.histogram(np.clip(values, HIST_EDGES[0], HIST_EDGES[-1] - 1), bins=HIST_EDGES)
    hist = hist / max(1, hist.sum())
    levels = np.percentile(values, PERCENTILES)
    pct = {p: float(v) for p, v in zip(PERCENTILES, levels, strict=True)}
    vessel = (hu > VESSEL_HU) & core
    by_band: dict[str, float] = {}
    for lo, hi in PLEURA_BANDS_MM:
        band = core & (dist >= lo) & (dist < hi)
        by_band[_band_name(lo, hi)] = float(vessel[band].mean()) if band.any() else math.nan
    counts, areas = _components_per_slice(vessel, px_area, 0.5, 2000.0)
    n_use = max(1, int(use.sum()))
    picked = [counts[k] for k in np.flatnonzero(use)]
    small = [int((areas[k] < 10.0).sum()) for k in np.flatnonzero(use)]
    airway_counts = _airways(hu, core, sp)
    pockets = _pockets_950(hu, core, sp)
    air, soft = noise_power(vol, lung=lung)
    return Realism(
        name=vol.name,
        kernel=vol.kernel,
        thickness=vol.slice_thickness,
        lung_slices=int(use.sum()),
        lung_volume_ml=float(lung.sum() * px_area * vol.slice_spacing / 1000.0),
        percentiles=pct,
        mean_hu=float(values.mean()),
        hist=hist,
        below_950=float((values < -950.0).mean()),
        ggo_range=float(((values >= -700.0) & (values < -300.0)).mean()),
        vessel_fraction=float(vessel.sum() / max(1, core.sum())),
        vessel_by_pleura=by_band,
        vessels_per_slice=float(sum(picked) / n_use),
        small_vessels_per_slice=float(sum(small) / n_use),
        airways_per_slice=float(sum(airway_counts[k] for k in np.flatnonzero(use)) / n_use),
        nps_air=air,
        nps_soft=soft,
        lung_noise_sd=_lung_noise(hu, core),
        extra={"pockets_950": float(sum(pockets[k] for k in np.flatnonzero(use)) / n_use)},
    )


def hist_distance(a: Realism, b: Realism) -> float:
    """Earth mover's distance (HU) between two lung histograms."""
    width = float(HIST_EDGES[1] - HIST_EDGES[0])
    return float(np.abs(np.cumsum(a.hist) - np.cumsum(b.hist)).sum() * width)


def nps_shape_distance(a: NPS, b: NPS) -> float:
    """L1 distance between two unit-area NPS shapes (0 same shape, 2 disjoint)."""
    if a.rois == 0 or b.rois == 0:
        return math.nan
    hi = min(float(a.freq[-1]), float(b.freq[-1]))
    f = np.linspace(0.0, hi, 64)
    return float(np.trapezoid(np.abs(a.normalised(f) - b.normalised(f)), f))


Row = tuple[str, list[str]]


def table_rows(results: Mapping[str, Realism], *, reference: str | None = None) -> list[Row]:
    """The side-by-side table as (measure, one cell per result) rows; the distances at the end
    are to ``reference`` when it names a result."""
    names = list(results)
    rows: list[Row] = []

    def add(label: str, cell: Callable[[Realism], str]) -> None:
        cells = []
        for n in names:
            try:
                cells.append(cell(results[n]))
            except (ValueError, ZeroDivisionError, KeyError):
                cells.append("-")
        rows.append((label, cells))

    add("series kernel / slice thickness (mm)", lambda r: f"{r.kernel} / {r.thickness:g}")
    add("lung slices measured", lambda r: f"{r.lung_slices}")
    add("lung volume (ml, filled mask)", lambda r: f"{r.lung_volume_ml:.0f}")
    for p in PERCENTILES:
        add(f"lung HU p{p}", partial(_percentile_cell, p))
    add("lung HU mean", lambda r: f"{r.mean_hu:.0f}")
    add("lung share < -950 HU", lambda r: f"{100 * r.below_950:.1f}%")
    add("lung share -700..-300 HU", lambda r: f"{100 * r.ggo_range:.1f}%")
    add("vessel fraction (> -500 HU)", lambda r: f"{100 * r.vessel_fraction:.2f}%")
    for band in (_band_name(lo, hi) for lo, hi in PLEURA_BANDS_MM):
        add(f"  vessel fraction {band} mm from pleura", partial(_band_cell, band))
    add("vessels per lung slice", lambda r: f"{r.vessels_per_slice:.1f}")
    add("  of them < 10 mm^2", lambda r: f"{r.small_vessels_per_slice:.1f}")
    add("airways per lung slice", lambda r: f"{r.airways_per_slice:.2f}")
    add("  (round pockets < -950 HU, no wall test)", lambda r: f"{r.extra['pockets_950']:.1f}")
    add("lung fine noise SD (HU)", lambda r: f"{r.lung_noise_sd:.0f}")
    for label, which in (("air", "nps_air"), ("soft tissue", "nps_soft")):
        for measure_name, fmt in (
            ("ROIs", "{0.rois}"),
            ("noise SD (HU)", "{0.sd:.1f}"),
            ("peak (cycles/mm)", "{0.peak:.2f}"),
            ("mean freq (cycles/mm)", "{0.mean_freq:.2f}"),
        ):
            add(f"NPS {label}: {measure_name}", partial(_nps_cell, which, fmt))
    if reference is not None and reference in results:
        ref = results[reference]
        add(f"lung histogram EMD to {reference} (HU)", lambda r: f"{hist_distance(r, ref):.0f}")
        add(
            f"NPS air shape L1 to {reference}",
            lambda r: f"{nps_shape_distance(r.nps_air, ref.nps_air):.2f}",
        )
        add(
            f"NPS soft shape L1 to {reference}",
            lambda r: f"{nps_shape_distance(r.nps_soft, ref.nps_soft):.2f}",
        )
    return rows


def markdown_table(results: Mapping[str, Realism], *, reference: str | None = None) -> str:
    """``table_rows`` as a markdown table, one column per result."""
    names = list(results)
    head = "| measure | " + " | ".join(names) + " |"
    sep = "| --- |" + " --- |" * len(names)
    rows = table_rows(results, reference=reference)
    body = ["| " + label + " | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join([head, sep, *body])


def summary(result: Realism, *, reference: Realism | None = None) -> dict[str, Any]:
    """One result's numbers for JSON (NaN as None), with its distances to ``reference``."""

    def num(v: float) -> float | None:
        return None if math.isnan(v) else round(float(v), 6)

    def nps(n: NPS) -> dict[str, Any]:
        return {"rois": n.rois, "sd_hu": num(n.sd), "peak": num(n.peak), "mean": num(n.mean_freq)}

    out: dict[str, Any] = {
        "name": result.name,
        "kernel": result.kernel,
        "slice_thickness_mm": result.thickness,
        "lung_slices": result.lung_slices,
        "lung_volume_ml": num(result.lung_volume_ml),
        "lung_hu_percentiles": {str(p): num(v) for p, v in result.percentiles.items()},
        "lung_hu_mean": num(result.mean_hu),
        "lung_share_below_950": num(result.below_950),
        "lung_share_700_300": num(result.ggo_range),
        "vessel_fraction": num(result.vessel_fraction),
        "vessel_fraction_by_pleura_mm": {k: num(v) for k, v in result.vessel_by_pleura.items()},
        "vessels_per_slice": num(result.vessels_per_slice),
        "small_vessels_per_slice": num(result.small_vessels_per_slice),
        "airways_per_slice": num(result.airways_per_slice),
        "pockets_950_per_slice": num(result.extra.get("pockets_950", math.nan)),
        "lung_fine_noise_sd_hu": num(result.lung_noise_sd),
        "nps_air_cycles_per_mm": nps(result.nps_air),
        "nps_soft_tissue_cycles_per_mm": nps(result.nps_soft),
    }
    if reference is not None:
        out["distance_to_reference"] = {
            "reference": reference.name,
            "lung_histogram_emd_hu": num(hist_distance(result, reference)),
            "nps_air_shape_l1": num(nps_shape_distance(result.nps_air, reference.nps_air)),
            "nps_soft_shape_l1": num(nps_shape_distance(result.nps_soft, reference.nps_soft)),
        }
    return out


def _band_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}" if hi < 1e8 else f">{lo:g}"


def _percentile_cell(p: int, r: Realism) -> str:
    return f"{r.percentiles[p]:.0f}"


def _band_cell(band: str, r: Realism) -> str:
    v = r.vessel_by_pleura.get(band, math.nan)
    return "-" if math.isnan(v) else f"{100 * v:.2f}%"


def _nps_cell(which: str, fmt: str, r: Realism) -> str:
    n: NPS = getattr(r, which)
    return "-" if n.rois == 0 and "rois" not in fmt else fmt.format(n)
