"""A synthetic chest CT volume in HU with its ground truth: the phantom generator's entry point.

Why this exists: the project cannot use patient data to train, and a model trained on cartoon
chests learns the cartoon. ``generate`` draws a patient (``patient``, ``structures``), the
lungs' trees (``airways_vessels``) and findings (``findings``), then renders, per thin
sub-slice, what a chest CT shows (``anatomy``, ``painting``, ``lesion_painting``), averages the
sub-slices to the slice thickness, and hands the volume to the scanner (``scanner_physics``).

Everything depends on the seed alone (numpy Generators seeded from it; no clock), in three
streams, so that how a study is acquired never changes who the patient is: the body and its
disease (``draw_body``), the grid-sized textures, and the scanner's draws. One ``Body`` can
thus be rendered as several series (thin lung kernel, thick soft tissue) of one study.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from hrct_triage.phantoms.airways_vessels import Trees, lung_trees
from hrct_triage.phantoms.anatomy import lung_atlas, lung_fields
from hrct_triage.phantoms.findings import Atlas, Plan, draw_findings
from hrct_triage.phantoms.geometry import Grid, Tubes, tube_cover
from hrct_triage.phantoms.lesion_painting import LesionContext, SliceContext, paint
from hrct_triage.phantoms.painting import (
    AIR,
    BLOOD,
    Extras,
    Textures,
    blend,
    draw_textures,
    fissure_cover,
    paint_lung,
    paint_static,
)
from hrct_triage.phantoms.patient import Patient, cavity_axes, draw_patient, outline_xy
from hrct_triage.phantoms.scanner_physics import draw_scanner, scan
from hrct_triage.phantoms.structures import Structures, draw_structures

__all__ = ["Body", "Phantom", "StudySpec", "draw_body", "frontal_projection", "generate", "render"]

F32 = NDArray[np.floating[Any]]
F64 = NDArray[np.floating[Any]]
Mask = NDArray[np.bool_]


@dataclass(frozen=True)
class StudySpec:
    """How the study is acquired and reconstructed."""

    slices: int = 64
    thickness: float = 1.0  # mm
    spacing: float | None = None  # mm between slice centres; None spreads them over the chest
    matrix: int = 512
    pixel_spacing: float | None = None  # mm; None draws one to fit the body (0.62-0.86)
    kernel: str = "LUNG"  # a scanner_physics.KERNELS name, or "RANDOM"
    noise_sd: float | None = None  # soft-tissue noise SD (HU) at the body centre; None draws
    start: float | None = None  # depth (mm below the apex) of the first slice centre
    sub_mm: float = 1.25  # thin sub-slice spacing for partial volume


@dataclass(frozen=True)
class Phantom:
    """A generated study: HU volume and ground truth, apex first."""

    hu: F32  # (slices, rows, columns), rounded and clipped like stored CT values
    lung: Mask  # anatomical lung (vessels inside it included)
    lobes: NDArray[np.uint8]  # LOBES ids
    lesion: Mask  # COVID-19 lesion voxels
    findings: NDArray[np.uint8]  # per voxel: findings.FINDINGS id (0 none)
    labels: dict[str, object]  # study label, findings present, severity, acquisition
    z: F64  # slice centre positions (DICOM z, mm)
    pixel_spacing: float
    thickness: float
    kernel: str
    patient: Patient
    seconds: float


def _depth_range(p: Patient, spec: StudySpec) -> F64:
    h = p.lung_height
    cover = h * 1.12 + 20.0
    spacing = spec.spacing if spec.spacing is not None else max(spec.thickness, cover / spec.slices)
    start = spec.start if spec.start is not None else -0.06 * h + spacing / 2.0
    return np.asarray(start + spacing * np.arange(spec.slices), dtype=np.float64)


@dataclass(frozen=True)
class Body:
    """One patient with their disease, drawn once: what every series of a study shares."""

    seed: int
    label: str
    key: tuple[int, int, int]  # the study's random streams: (seed, 23, 0 covid / 1 other)
    patient: Patient
    structures: Structures
    atlas: Atlas
    trees: Trees
    pixel_spacing: float  # a field of view that fits the body, as mm per pixel at 512 x 512
    extras: Extras
    plan: Plan
    metal_kind: str  # "none", "sternal_wires" or "ecg_leads"
    metal: F64  # (n, 4): x, y, depth, radius in mm
    lesions: LesionContext

    @property
    def findings(self) -> tuple[str, ...]:
        """The confounders this patient shows (``findings.CONFOUNDERS`` names), sorted."""
        return tuple(sorted({f.kind for f in self.plan.items if not f.covid}))


def draw_body(
    seed: int,
    *,
    label: str = "healthy",
    findings: tuple[str, ...] | None = None,
    severity: str | None = None,
) -> Body:
    """The patient of (seed, label): body, trees and findings. ``label`` is "covid" or
    "healthy"; ``findings`` forces confounders (``findings.FINDINGS`` names) instead of drawing
    them; ``severity`` forces the COVID-19 extent."""
    key = (seed, 23, 0 if label == "covid" else 1)
    rng = np.random.default_rng([*key, 0])
    p = draw_patient(rng)
    st = draw_structures(p, rng)
    at = lung_atlas(p, st)
    trees = _trees(p, st, at, rng)
    body_half = p.cav_a + 40.0 * p.scale + 1.6 * p.fat + (0 if p.arms_up else 60.0)
    drawn_sp = float(np.clip(2.0 * body_half * rng.uniform(1.02, 1.25) / 512.0, 0.6, 0.9))
    extras = Extras(rng.uniform([2.0, 0.5, 0.0, 0.0], [9.0, 2.5, 6.3, 0.05], (4, 4)))
    plan = draw_findings(rng, at, label=label, findings=findings, severity=severity, age=p.age)
    metal_kind, metal = _metal(p, rng)
    lesions = LesionContext.make(plan, anatomy_seed=seed)
    lesions.airways = trees.airway_lumen
    lesions.airway_walls = trees.airway_wall
    lesions.airway_lobe = trees.airway_lobe
    return Body(
        seed, label, key, p, st, at, trees, drawn_sp, extras, plan, metal_kind, metal, lesions
    )


def generate(
    seed: int,
    spec: StudySpec = StudySpec(),
    *,
    label: str = "healthy",
    findings: tuple[str, ...] | None = None,
    severity: str | None = None,
) -> Phantom:
    """Generate one series of the patient of (seed, label) as ``spec`` acquires it.

    The same (seed, spec, label, findings, severity) always gives the same volume.
    """
    return render(draw_body(seed, label=label, findings=findings, severity=severity), spec)


def render(body: Body, spec: StudySpec) -> Phantom:
    """``body`` scanned as ``spec`` says: thin sub-slices averaged to the slice thickness, then
    the scanner. Other specs of one body give other series of the same patient and lesions."""
    t0 = time.process_time()
    p, trees, plan = body.patient, body.trees, body.plan
    scan_rng = np.random.default_rng([*body.key, 2])
    scanner = draw_scanner(scan_rng, spec.kernel, spec.noise_sd)
    sp = spec.pixel_spacing if spec.pixel_spacing is not None else body.pixel_spacing
    sp = sp * 512.0 / spec.matrix
    grid = Grid(spec.matrix, sp)
    tex = draw_textures(np.random.default_rng([*body.key, 1, spec.matrix]), grid)
    depths = _depth_range(p, spec)
    n_sub = max(1, math.ceil(spec.thickness / spec.sub_mm))
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    weights = 1.0 - 0.35 * np.abs(offsets) * 2.0  # a slightly peaked slice sensitivity profile
    weights = weights / weights.sum()
    sub_slab = spec.thickness / n_sub
    vessels = Tubes.concat([trees.arteries, trees.veins])
    out = np.empty((len(depths), *grid.shape), dtype=np.float32)
    lung_out = np.zeros((len(depths), *grid.shape), dtype=bool)
    lobe_out = np.zeros((len(depths), *grid.shape), dtype=np.uint8)
    lesion_out = np.zeros((len(depths), *grid.shape), dtype=bool)
    find_out = np.zeros((len(depths), *grid.shape), dtype=np.uint8)
    for k, dc in enumerate(depths):
        acc = np.zeros(grid.shape, dtype=np.float32)
        lung_acc = np.zeros(grid.shape, dtype=np.float32)
        les_acc = np.zeros(grid.shape, dtype=np.float32)
        find_max = np.zeros(grid.shape, dtype=np.uint8)
        for off, w in zip(offsets, weights, strict=True):
            d = float(dc + off * spec.thickness)
            hu, lung, lobes, les, fnd = _render_thin(body, vessels, grid, d, tex, sub_slab)
            _paint_metal(hu, grid, body.metal, d)
            acc += np.float32(w) * hu
            lung_acc += np.float32(w) * lung
            les_acc += np.float32(w) * les
            np.maximum(find_max, fnd, out=find_max)
            if off == offsets[len(offsets) // 2]:
                lobe_out[k] = lobes
        out[k] = acc
        lung_out[k] = lung_acc > 0.5
        lesion_out[k] = les_acc > 0.5
        find_out[k] = find_max
    hu_final = scan(
        out, grid, scanner, spec.thickness, scan_rng, plan.motion, metal=body.metal, depths=depths
    )
    labels: dict[str, object] = {
        "label": body.label,
        "severity": plan.severity,
        "findings": sorted({f.kind for f in plan.items if not f.covid}),
        "covid_lesions": sum(1 for f in plan.items if f.covid),
        "kernel": scanner.kernel.name,
        "noise_sd": round(scanner.noise_sd, 1),
        "thickness": spec.thickness,
        "pixel_spacing": round(sp, 4),
        "motion": plan.motion,
        "metal": body.metal_kind,
        "arms_up": p.arms_up,
        "female": p.female,
        "age": round(p.age),
    }
    return Phantom(
        hu=hu_final,
        lung=lung_out,
        lobes=lobe_out,
        lesion=lesion_out,
        findings=find_out,
        labels=labels,
        z=-depths + 0.0,
        pixel_spacing=sp,
        thickness=spec.thickness,
        kernel=scanner.kernel.name,
        patient=p,
        seconds=time.process_time() - t0,
    )


def _sample(rng: np.random.Generator, at: Atlas, count: int) -> tuple[F64, NDArray[np.int64]]:
    """``count`` points of the atlas, jittered within their voxel, as (x, y, z) and lobe."""
    pick = rng.choice(len(at.lobe), size=min(count, len(at.lobe)), replace=False)
    pts = at.points[pick] + rng.uniform(-2.0, 2.0, (pick.size, 3))
    pts[:, 2] = -pts[:, 2]
    return pts, at.lobe[pick]


def _trees(p: Patient, st: Structures, at: Atlas, rng: np.random.Generator) -> Trees:
    a_pts, a_lobe = _sample(rng, at, p.vessel_points)
    v_pts, v_lobe = _sample(rng, at, int(p.vessel_points * 0.8))
    s = p.scale
    hil_r, hil_l = st.hila
    roots_a = np.stack(
        [
            hil_r + np.array([4.0 * s, 2.0, 12.0 * s]),
            hil_r + np.array([2.0 * s, -10.0 * s, -12.0 * s]),
            hil_r + np.array([2.0 * s, 6.0 * s, -14.0 * s]),
            hil_l + np.array([-2.0 * s, -2.0, 10.0 * s]),
            hil_l + np.array([-2.0 * s, 8.0 * s, -12.0 * s]),
        ]
    )
    share = np.bincount(a_lobe, minlength=6)[1:].astype(np.float64)
    # hilar vessels scale with the lungs they feed (4 mm atlas voxels; 4.5 l is typical)
    size = float(np.clip((len(at.lobe) * 64.0 / 4.5e6) ** (1.0 / 3.0), 0.8, 1.12))
    r_lung = np.array([6.2, 6.2, 6.2, 6.0, 6.0]) * size
    side_total = np.array([share[:3].sum()] * 3 + [share[3:].sum()] * 2)
    r_root = r_lung * (share / np.maximum(side_total, 1.0)) ** (1.0 / 2.7)
    la = st.heart_centre + np.array([-8.0 * s, 40.0 * s, 20.0 * s])
    roots_v = np.stack(
        [
            la + np.array([-40.0 * s, -6.0 * s, 16.0 * s]),
            la + np.array([-42.0 * s, -10.0 * s, 8.0 * s]),
            la + np.array([-38.0 * s, 4.0 * s, -4.0 * s]),
            la + np.array([40.0 * s, -4.0 * s, 18.0 * s]),
            la + np.array([40.0 * s, 4.0 * s, -2.0 * s]),
        ]
    )
    v_share = np.bincount(v_lobe, minlength=6)[1:].astype(np.float64)
    v_total = np.array([v_share[:3].sum()] * 3 + [v_share[3:].sum()] * 2)
    r_vroot = np.array([6.2] * 5) * size * (v_share / np.maximum(v_total, 1.0)) ** (1.0 / 2.7)
    return lung_trees(rng, a_pts, a_lobe - 1, roots_a, r_root, v_pts, v_lobe - 1, roots_v, r_vroot)


def _metal(p: Patient, rng: np.random.Generator) -> tuple[str, F64]:
    """Metal some patients carry: sternotomy wires, or ECG electrode clips on the skin.

    Returns the kind ("none", "sternal_wires", "ecg_leads") and objects as (x, y, depth, r).
    """
    s = p.scale
    u = rng.random()
    if u < 0.12:
        h = p.lung_height
        rows = []
        for t in np.linspace(0.3, 0.68, int(rng.integers(4, 7))):
            d = float(t * h)
            _, b, cy = cavity_axes(p, d)
            for side in (-1.0, 1.0):
                rows.append((side * 9.0 * s, cy - b - 7.0 * s, d, float(rng.uniform(0.7, 1.1))))
        return "sternal_wires", np.array(rows)
    if u < 0.4:
        rows = []
        for _ in range(int(rng.integers(3, 6))):
            theta = float(-np.pi / 2 + rng.uniform(-1.1, 1.1))
            d = float(rng.uniform(0.15, 0.95) * p.lung_height)
            cy = cavity_axes(p, d)[2]
            x = np.array([[math.cos(theta)]], dtype=np.float32)
            y = np.array([[cy + math.sin(theta)]], dtype=np.float32)
            r_skin = float(outline_xy(p, x, y, d).r_body[0, 0]) + 2.0  # clip on the skin
            rows.append((r_skin * math.cos(theta), cy + r_skin * math.sin(theta), d, 1.6))
        return "ecg_leads", np.array(rows)
    return "none", np.zeros((0, 4))


def _paint_metal(hu: F32, grid: Grid, metal: F64, d: float) -> None:
    if not len(metal):
        return
    near = np.abs(metal[:, 2] - d) < metal[:, 3]
    if not near.any():
        return
    m = metal[near]
    centres = np.stack([m[:, 0], m[:, 1], -m[:, 2]], axis=1)
    cover = tube_cover(grid, Tubes(centres, centres.copy(), m[:, 3], m[:, 3].copy()), -d)
    blend(hu, np.float32(3000.0), cover)


def _render_thin(
    body: Body, vessels: Tubes, grid: Grid, d: float, tex: Textures, slab: float
) -> tuple[F32, F32, NDArray[np.uint8], F32, NDArray[np.uint8]]:
    """One thin slice: HU, lung coverage, lobes, COVID lesion coverage, finding ids."""
    p, st, trees, plan = body.patient, body.structures, body.trees, body.plan
    sl, lung, lobes = lung_fields(p, st, grid, d)
    hu = paint_static(p, st, grid, sl, tex, body.extras)
    z = -d
    les = np.zeros(grid.shape, dtype=np.float32)
    fnd = np.zeros(grid.shape, dtype=np.uint8)
    if float(lung.max()) > 0.0:
        fis = fissure_cover(p, sl, grid, slab, tex)
        base = paint_lung(p, grid, sl, hu, tex, fis)
        ctx = SliceContext(
            grid, d, hu, lung, lobes, sl.y, sl.x, base, body.lesions, p.lung_height, sl.cav_y,
            p.cav_b,
        )  # fmt: skip
        paint(plan, ctx, les, fnd, phase="before_vessels")
        blood = tube_cover(grid, vessels, z, blur=0.25 * slab)
        blend(hu, np.float32(BLOOD), blood * np.maximum(lung, sl.mediastinum * 1.0))
        paint(plan, ctx, les, fnd, phase="after_vessels")
        wall = tube_cover(grid, trees.airway_wall, z, blur=0.25 * slab)
        lumen = tube_cover(grid, trees.airway_lumen, z, blur=0.25 * slab)
        blend(hu, np.float32(20.0), wall * np.clip(1.0 - lumen, 0.0, 1.0) * 0.9)
        blend(hu, np.float32(AIR), lumen)
        paint(plan, ctx, les, fnd, phase="after_airways")
    blend(hu, np.float32(AIR), tube_cover(grid, st.trachea_lumen, z))
    return hu, lung, lobes, les, fnd


def frontal_projection(
    body: Body,
    *,
    width_mm: float = 420.0,
    height_mm: float = 420.0,
    top_depth: float = -80.0,
    size: int = 512,
) -> F32:
    """A frontal projection (water-equivalent cm) of ``body``, ``top_depth`` mm below the apex
    at the top: what a localizer shows, on a coarse grid without lung detail or lesions."""
    p, st = body.patient, body.structures
    n = 128
    grid = Grid(n, width_mm / n)
    tex = draw_textures(np.random.default_rng([*body.key, 1, n]), grid)
    extras = Extras(np.zeros((4, 4)))
    rows = []
    for k in range(100):
        d = top_depth + (k + 0.5) * height_mm / 100
        sl, lung, _ = lung_fields(p, st, grid, d)
        hu = paint_static(p, st, grid, sl, tex, extras)
        blend(hu, np.float32(p.lung_hu), lung)
        rows.append(np.clip(hu + 1000.0, 0.0, None).sum(axis=0) * grid.spacing / 10000.0)
    proj = np.stack(rows).astype(np.float32)
    return np.asarray(ndimage.zoom(proj, (size / proj.shape[0], size / n), order=1), np.float32)
