"""Synthetic chest CT studies ("phantoms"), written as DICOM files the way a CT scanner sends them.

Why this exists: no real patient data can be had for this project, yet the demo, the tests and the
training of the shipped demo weights all need chest CT that behaves like the real thing. So this
module draws chest CT from analytic 3-D anatomy (body, chest wall, ribs, spine, lungs that change
shape from apex to bases, airways, mediastinum, heart, branching vessels) in realistic Hounsfield
units, adds the COVID-19 pattern Yang et al. 2020 trained on (peripheral, posterior, bilateral,
multifocal ground-glass opacities, consolidation, crazy paving) to positive studies, and adds the
confounders the paper names (dependent atelectasis, partial-volume vessel blobs, motion) to healthy
ones. Each study is sent as a scanner would: a localizer, the thin axial lung-kernel series that the
model reads, and a thick soft-tissue series that the series picker must pass over.

Everything is deterministic by seed, UIDs included (no clock anywhere), so tests can compare bytes
and a training set can be rebuilt exactly. Per slice, 2-D fields are computed from the 3-D shapes
with numpy inside bounding boxes; there are no per-voxel Python loops.

Options vary how the study is sent, never who the patient is (the anatomy, lesions and noise draws
depend on the seed alone): the thin series' slice thickness and reconstruction kernel (header, and
the noise and sharpness of its pixels), the transfer syntax of every CT image
(``TRANSFER_SYNTAXES``) and, with ``enhanced``, the thin series as one multi-frame Enhanced CT
Image instance. The defaults write exactly the files written before these options existed. A
series whose content an option changes gets UIDs of its own (the study UID stays), so two
variants of one study can meet in one PACS or one series selection without clashing; a lossless
transfer syntax keeps every UID, as a lossless transcoding would.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from scipy import ndimage

from hrct_triage.common.uids import derive_uid

__all__ = [
    "KERNELS",
    "LABELS_NAME",
    "LESION_MASKS_NAME",
    "TRANSFER_SYNTAXES",
    "PhantomStudy",
    "write_non_ct_study",
    "write_phantom_studies",
]

LABELS_NAME = "labels.csv"
"""Name of the per-run label file written directly under ``out_dir``."""
LESION_MASKS_NAME = "lesion_masks.npz"
"""Name of the ground-truth lesion masks file inside each study folder (not a DICOM file)."""


@dataclass(frozen=True)
class _Kernel:
    """How a reconstruction kernel looks: its Enhanced CT group, sharpness and noise."""

    group: str  # ConvolutionKernelGroup (Enhanced CT defined terms)
    blur_passes: int  # 3-tap smoothing passes (the point-spread): fewer is sharper
    noise: float  # noise standard deviation relative to the lung kernel's


_KERNEL_LOOK = {
    "LUNG": _Kernel("LUNG", 1, 1.0),
    "BONE": _Kernel("BONE", 0, 1.3),
    "STANDARD": _Kernel("SOFT_TISSUE", 3, 0.55),
    "SOFT": _Kernel("SOFT_TISSUE", 4, 0.45),
}
KERNELS: tuple[str, ...] = tuple(_KERNEL_LOOK)
"""Reconstruction kernels the thin series can have (its ConvolutionKernel); LUNG is the default.
BONE is sharper and noisier, STANDARD and SOFT smoother and quieter, as on a scanner."""


@dataclass(frozen=True)
class _Syntax:
    """How the CT images are written in one transfer syntax."""

    name: str  # the option's name
    uid: UID
    encoder: Literal["native", "deflate", "pydicom", "dcmtk"]
    lossy_method: str | None = None  # LossyImageCompressionMethod; None: lossless
    jls_error: int = 0  # NEAR of JPEG-LS near-lossless: largest error of a stored value

    @property
    def encapsulated(self) -> bool:
        return self.encoder in ("pydicom", "dcmtk")


_SYNTAXES = {
    syntax.name: syntax
    for syntax in (
        _Syntax("explicit", ExplicitVRLittleEndian, "native"),
        _Syntax("deflated", DeflatedExplicitVRLittleEndian, "deflate"),
        _Syntax("rle", RLELossless, "pydicom"),
        _Syntax("jpeg-ls", JPEGLSLossless, "pydicom"),
        _Syntax("jpeg2000", JPEG2000Lossless, "pydicom"),
        _Syntax("jpeg-lossless", JPEGLosslessSV1, "dcmtk"),
        _Syntax("jpeg-ls-near", JPEGLSNearLossless, "pydicom", "ISO_14495_1", jls_error=2),
    )
}
TRANSFER_SYNTAXES: dict[str, str] = {name: str(s.uid) for name, s in _SYNTAXES.items()}
"""Transfer syntaxes the CT images can be written in, by option name, and their UIDs.

``explicit`` (Explicit VR Little Endian) is the default. All are lossless but ``jpeg-ls-near``
(JPEG-LS near-lossless, NEAR = 2: each stored value, i.e. each HU, within 2 of the original; marked
LossyImageCompression 01). ``deflated`` is written here with zlib; ``rle``, ``jpeg-ls``,
``jpeg2000`` and ``jpeg-ls-near`` are encoded by pydicom with its plugins (pylibjpeg-rle or
pydicom's own RLE, pyjpegls, pylibjpeg-openjpeg); ``jpeg-lossless`` (process 14, selection value 1)
has no pydicom encoder and is encoded by DCMTK's ``dcmcjpeg``, which must be on PATH. JPEG baseline
is not offered: it holds 8 bits a sample, and the CT Image IOD needs 16 bits allocated."""

THIN_THICKNESS_LIMIT = 5.0
"""The thin series must stay thinner than this (the thick soft-tissue series' slice thickness)."""


@dataclass(frozen=True)
class _Options:
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
        if self.kernel not in _KERNEL_LOOK:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        syntax = _SYNTAXES.get(self.transfer_syntax)
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
    def syntax(self) -> _Syntax:
        return _SYNTAXES[self.transfer_syntax]

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
            parts += ["recon", _ds(self.thickness), self.kernel]
            parts += ["enhanced"] if self.enhanced else []
        if self.syntax.lossy_method is not None:
            parts += ["lossy", self.syntax.name]
        return tuple(parts)


Label = Literal["covid", "healthy"]
F32 = NDArray[np.float32]
Mask = NDArray[np.bool_]
Box = tuple[slice, slice]

MATRIX = 512
CHEST_LENGTH_MM = 260.0
STUDY_DATE = "20260101"
MANUFACTURER = "hrct-triage phantom"
_UID_NAMESPACE = "hrct-triage-phantom-v1"

# Hounsfield units of the tissues drawn.
AIR = -1000.0
LUNG = -850.0
FAT = -100.0
MEDIASTINAL_FAT = -85.0
SKIN = 30.0
MUSCLE = 40.0
BLOOD = 40.0
LIVER = 55.0
CARTILAGE = 140.0
MARROW = 230.0
CORTEX = 700.0
DISC = 85.0
CSF = 15.0
TABLE_SHELL = 250.0
TABLE_FOAM = -900.0

BODY_CY = -8.0  # y (mm) of the body's centre; the table is under its posterior edge
_CARINA_T = 0.31  # fraction of the scan length, from the apex end, where the trachea divides


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomStudy:
    """One synthetic study on disk, with the ground truth a test or a trainer needs."""

    study_uid: str
    folder: Path  # the study's folder; DICOM files are ``*.dcm``, masks in LESION_MASKS_NAME
    label: str  # "covid" or "healthy"
    patient_id: str
    lung_series_uid: str
    # InstanceNumbers of thin lung-series slices with a lesion; with ``enhanced``, the frame
    # numbers of the one Enhanced CT instance, which are the same numbers (frame k is slice k)
    lesion_instances: list[int]
    severity: str = "none"  # a SEVERITY_MIX key for positive studies


def write_phantom_studies(
    out_dir: Path,
    *,
    covid: int,
    healthy: int,
    slices: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    thickness: float = 1.0,
    kernel: str = "LUNG",
    transfer_syntax: str = "explicit",
    enhanced: bool = False,
    workers: int = 1,
    severity_mix: Mapping[str, float] | None = None,
) -> list[PhantomStudy]:
    """Write ``covid`` positive and ``healthy`` negative studies under ``out_dir``.

    Each study gets its own folder (``covid_001``, ``healthy_001``, ...) holding a localizer, the
    thin lung series of ``slices`` images and a thick soft-tissue series, plus
    ``lesion_masks.npz`` (a boolean mask per thin slice, for checking heat maps later).
    ``out_dir/labels.csv`` lists every study. A study depends only on (seed, label, index,
    slices), so asking for more studies never changes the ones already asked for;
    ``progress(done, total)`` is called after each study so a CLI can show a bar.

    ``thickness`` (mm, below 5) and ``kernel`` (one of ``KERNELS``) are the thin series'
    SliceThickness and ConvolutionKernel; its noise follows them (less for thicker slices and
    smoother kernels), its slice positions do not. ``transfer_syntax`` (a ``TRANSFER_SYNTAXES``
    name) applies to every CT image. With ``enhanced`` the thin series is one Enhanced CT Image
    instance (``CT_02_enhanced.dcm``) whose frame k is the single-frame series' slice k (table
    order, apex first): ``lesion_instances`` and the masks' ``instance_numbers`` are then frame
    numbers, and its ``sop_instance_uids`` repeat the one instance's UID. The patient (anatomy,
    lesions, noise draws) depends on the seed alone, never on these options.

    ``workers`` > 1 writes that many studies at once in child processes (a study takes seconds
    of one core); the files are the same as with one.

    ``severity_mix`` (shares of ``SEVERITY_MIX``'s keys, summing to 1) replaces the paper-like
    cohort of positive studies, e.g. to train on more mild disease. Other shares give a seed's
    bodies other disease, so their studies get other UIDs and patient IDs; labels.csv names
    each study's severity.
    """
    if covid < 0 or healthy < 0:
        raise ValueError("covid and healthy must be >= 0")
    if slices < 8:
        raise ValueError("slices must be >= 8 to cover the chest")
    options = _Options(
        thickness=float(thickness),
        kernel=kernel.upper(),
        transfer_syntax=transfer_syntax.lower(),
        enhanced=enhanced,
        severity_mix=None if severity_mix is None else tuple(severity_mix.items()),
    )
    options.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[Label, int]] = [("covid", i + 1) for i in range(covid)]
    plan += [("healthy", i + 1) for i in range(healthy)]
    if workers < 1:
        raise ValueError("workers must be >= 1")
    studies: list[PhantomStudy] = []
    write = partial(_write_planned, out_dir, slices, seed, options)
    with ExitStack() as stack:
        mapper = map if workers == 1 else stack.enter_context(ProcessPoolExecutor(workers)).map
        for done, study in enumerate(mapper(write, plan), start=1):
            studies.append(study)
            if progress is not None:
                progress(done, len(plan))
    _write_labels(out_dir / LABELS_NAME, studies)
    return studies


def _write_planned(
    out_dir: Path, slices: int, seed: int, options: _Options, planned: tuple[Label, int]
) -> PhantomStudy:
    """``_write_ct_study`` for one (label, index) of the plan; a module-level target for pools."""
    label, index = planned
    return _write_ct_study(
        out_dir, label=label, index=index, slices=slices, seed=seed, options=options
    )


def write_non_ct_study(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a study with no CT at all and return its folder.

    Three Secondary Capture images of a chest X-ray-like projection: the gateway must keep such a
    study but mark it ``not_applicable`` because it has no axial CT series to analyse.
    """
    rng = np.random.default_rng([seed, 7, 0])
    anat = _draw_anatomy(rng, label="healthy", slices=64)
    ids = _Identity.make(seed=seed, label="nonct", index=1, rng=rng)
    folder = out_dir / f"non_ct_{seed:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    projection = _projection(anat, width_mm=400.0, height_mm=400.0, z_top=anat.z_top + 80.0)
    series_uid = ids.uid("series", 1)
    for number in (1, 2, 3):
        gamma = (1.0, 0.8, 1.25)[number - 1]
        pixels = _to_uint8(projection, gamma=gamma)
        ds = _sc_dataset(ids, series_uid=series_uid, instance=number, pixels=pixels)
        _save(ds, folder / f"SC_01_{number:04d}.dcm")
    return folder


# --------------------------------------------------------------------------------------------
# Geometry: ellipses and the per-slice cross-sections of the anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipse:
    """An (optionally rotated) ellipse in patient x/y millimetres."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float = 0.0

    def grow(self, d: float) -> _Ellipse:
        return _Ellipse(self.cx, self.cy, max(self.ax + d, 0.1), max(self.ay + d, 0.1), self.angle)

    def contains(self, x: float, y: float, grow: float = 0.0) -> bool:
        """Whether (x, y) lies inside the ellipse grown (or, negative, shrunk) by ``grow`` mm."""
        dx, dy = x - self.cx, y - self.cy
        if self.angle:
            c, s = math.cos(self.angle), math.sin(self.angle)
            dx, dy = dx * c + dy * s, -dx * s + dy * c
        ax, ay = max(self.ax + grow, 0.1), max(self.ay + grow, 0.1)
        return (dx / ax) ** 2 + (dy / ay) ** 2 <= 1.0

    def half_extent(self) -> tuple[float, float]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return math.hypot(self.ax * c, self.ay * s), math.hypot(self.ax * s, self.ay * c)


@dataclass(frozen=True)
class _Sections:
    """Cross-sections of every analytic organ at one table position ``z``."""

    body: _Ellipse
    muscle: _Ellipse
    cavity: _Ellipse
    lungs: tuple[_Ellipse | None, _Ellipse | None]  # right (x < 0), left (x > 0)
    lung_exclusions: tuple[_Ellipse, ...]  # mediastinum, heart, domes, spine, aorta
    domes: tuple[_Ellipse | None, _Ellipse | None]
    heart: _Ellipse | None
    soft_vessels: tuple[_Ellipse, ...]  # aorta, SVC, great vessels: blood in the mediastinum
    trachea: _Ellipse | None
    esophagus: _Ellipse | None
    vertebra: _Ellipse
    canal: _Ellipse
    posterior_arch: _Ellipse
    processes: tuple[_Ellipse, ...]
    bones: tuple[tuple[_Ellipse, float], ...]  # ribs, sternum, scapulae, clavicles (shape, core)
    is_disc: bool


@dataclass(frozen=True)
class _Lesion:
    """An irregular ellipsoidal opacity; ``kind`` decides how it is blended into lung."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    kind: str  # "ggo", "consolidation", "crazy", "atelectasis", "blob"
    level: float  # HU of the ground-glass (or only) component
    core_level: float  # HU of the consolidated core (consolidation kind)
    in_mask: bool  # counts as a COVID-19 lesion in the ground truth
    phase: float  # offsets the texture so lesions differ
    angle: float = 0.0  # in-plane rotation: long axis along the pleura


@dataclass(frozen=True)
class _Vessels:
    """Vessel tree as capsules: endpoints (n, 3) in mm and radii (n,)."""

    p0: NDArray[np.float64]
    p1: NDArray[np.float64]
    radius: NDArray[np.float64]


@dataclass(frozen=True)
class _Anatomy:
    """Everything random about one patient, drawn once from the study's seed."""

    label: Label
    size: float  # overall patient scale
    aspect: float  # AP / lateral
    fat_mm: float
    z_top: float  # table position of the first thin slice edge (apex end)
    pixel_spacing: float
    lung_level: float
    noise_sigma: float
    dome_right: float  # t of the right hemidiaphragm top
    dome_left: float
    heart_shift: float
    lesions: tuple[_Lesion, ...] = ()
    vessels: _Vessels | None = None
    motion_px: int = 0  # ghost shift of a breathing artefact at the bases (0: none)
    signed_pixels: bool = False  # PixelRepresentation 1 with padding (GE-like) vs 0 (12 bit)
    severity: str = "none"


def _t_of(anat: _Anatomy, z: float) -> float:
    """Fraction of the chest from the apex end (0) to the bases (1) at table position z."""
    return (anat.z_top - z) / CHEST_LENGTH_MM


def _smooth01(v: float) -> float:
    v = min(max(v, 0.0), 1.0)
    return v * v * (3.0 - 2.0 * v)


def _body_axes(anat: _Anatomy, t: float) -> tuple[float, float]:
    grow = _smooth01(t / 0.5)
    a = 165.0 * anat.size * (0.86 + 0.14 * grow)
    b = 112.0 * anat.size * anat.aspect * (0.9 + 0.1 * grow)
    return a, b


def _sections(anat: _Anatomy, z: float) -> _Sections:
    """The cross-sections at z; shared by the painter and the point-in-lung test."""
    t = _t_of(anat, z)
    s = anat.size
    a_b, b_b = _body_axes(anat, t)
    body = _Ellipse(0.0, BODY_CY, a_b, b_b)
    muscle = _Ellipse(0.0, BODY_CY, a_b - anat.fat_mm, b_b - anat.fat_mm)
    cavity = _Ellipse(0.0, BODY_CY - 6.0, muscle.ax - 16.0 * s, muscle.ay - 22.0 * s)
    cav_post = cavity.cy + cavity.ay
    vertebra = _Ellipse(0.0, cav_post - 22.0 * s, 17.0 * s, 15.0 * s)
    canal_y = vertebra.cy + vertebra.ay + 8.0 * s
    canal = _Ellipse(0.0, canal_y, 8.0 * s, 7.0 * s)
    posterior_arch = _Ellipse(0.0, canal_y + 2.0 * s, 14.0 * s, 12.0 * s)
    processes = (
        _Ellipse(0.0, canal_y + 20.0 * s, 4.0 * s, 12.0 * s),
        _Ellipse(-22.0 * s, canal_y - 2.0 * s, 11.0 * s, 4.5 * s, 0.25),
        _Ellipse(22.0 * s, canal_y - 2.0 * s, 11.0 * s, 4.5 * s, -0.25),
    )
    is_disc = (z - anat.z_top) % (26.0 * s) < 5.0 * s
    domes = (_dome(anat, z, -1), _dome(anat, z, 1))
    heart = _heart(anat, t)
    mediastinum = _mediastinum(anat, t, cavity)
    aorta_desc = (
        _Ellipse(20.0 * s, vertebra.cy - 14.0 * s, 12.0 * s, 12.0 * s) if t > 0.26 else None
    )
    soft = _great_vessels(anat, t, aorta_desc)
    trachea = _trachea(anat, t, vertebra) if t < _CARINA_T else None
    esophagus = _Ellipse(6.0 * s, vertebra.cy - vertebra.ay - 8.0 * s, 7.0 * s, 6.0 * s)
    exclusions: list[_Ellipse] = [mediastinum, vertebra.grow(10.0 * s)]
    exclusions += [e for e in domes if e is not None]
    if heart is not None:
        exclusions.append(heart.grow(4.0 * s))
    if aorta_desc is not None:
        exclusions.append(aorta_desc.grow(3.0 * s))
    return _Sections(
        body=body,
        muscle=muscle,
        cavity=cavity,
        lungs=(_lung(anat, t, cavity, -1), _lung(anat, t, cavity, 1)),
        lung_exclusions=tuple(exclusions),
        domes=domes,
        heart=heart,
        soft_vessels=soft,
        trachea=trachea,
        esophagus=esophagus,
        vertebra=vertebra,
        canal=canal,
        posterior_arch=posterior_arch,
        processes=processes,
        bones=_bones(anat, z, cavity),
        is_disc=is_disc,
    )


def _lung(anat: _Anatomy, t: float, cavity: _Ellipse, side: int) -> _Ellipse | None:
    """Lung outline before cuts: grows from a small apex, tapers into the posterior recess."""
    grow = min(max((t - 0.02) / 0.33, 0.0), 1.0) ** 0.55
    taper = min(max((0.985 - t) / 0.07, 0.0), 1.0) ** 0.5
    g = grow * taper
    if g <= 0.02:
        return None
    cx = side * cavity.ax * (0.5 + 0.12 * (1.0 - g))
    cy = cavity.cy + 5.0 + 22.0 * anat.size * (1.0 - g) + 10.0 * (1.0 - taper)
    return _Ellipse(cx, cy, cavity.ax * 0.56 * g, cavity.ay * 1.02 * g)


def _dome(anat: _Anatomy, z: float, side: int) -> _Ellipse | None:
    """Cross-section of a hemidiaphragm dome (liver on the right, spleen/stomach on the left)."""
    s = anat.size
    top_t = anat.dome_right if side < 0 else anat.dome_left
    rz = 80.0 * s
    zc = anat.z_top - top_t * CHEST_LENGTH_MM - rz
    dz = max((z - zc) / rz, 0.0)  # below the dome's equator the abdomen stays full width
    if dz >= 1.0:
        return None
    f = math.sqrt(1.0 - dz * dz)
    return _Ellipse(side * 55.0 * s, BODY_CY - 18.0 * s, 98.0 * s * f, 95.0 * s * f)


def _heart(anat: _Anatomy, t: float) -> _Ellipse | None:
    """The heart: lower-middle chest, left of midline, long axis to the left and anterior."""
    h2 = 1.0 - ((t - 0.68) / 0.23) ** 2
    if h2 <= 0.01:
        return None
    h = math.sqrt(h2)
    s = anat.size
    return _Ellipse(
        (14.0 + anat.heart_shift) * s, BODY_CY - 34.0 * s, 64.0 * s * h, 48.0 * s * h, -0.55
    )


def _mediastinum(anat: _Anatomy, t: float, cavity: _Ellipse) -> _Ellipse:
    s = anat.size
    width = 19.0 if t < 0.22 else (30.0 if t < 0.47 else 22.0)
    return _Ellipse(4.0 * s, cavity.cy - 8.0, width * s, cavity.ay * 0.97)


def _trachea(anat: _Anatomy, t: float, vertebra: _Ellipse) -> _Ellipse:
    y_low = vertebra.cy - vertebra.ay - 24.0 * anat.size
    y = y_low - 26.0 * anat.size * (1.0 - t / _CARINA_T)
    return _Ellipse(0.0, y, 9.0 * anat.size, 8.0 * anat.size)


def _great_vessels(anat: _Anatomy, t: float, aorta_desc: _Ellipse | None) -> tuple[_Ellipse, ...]:
    s = anat.size
    out: list[_Ellipse] = [] if aorta_desc is None else [aorta_desc]
    if 0.27 < t < 0.5:
        out.append(_Ellipse(-8.0 * s, BODY_CY - 40.0 * s, 15.0 * s, 15.0 * s))  # ascending aorta
    if 0.36 < t < 0.47:
        out.append(_Ellipse(22.0 * s, BODY_CY - 42.0 * s, 14.0 * s, 13.0 * s))  # pulmonary trunk
    if 0.14 < t < 0.46:
        out.append(_Ellipse(-26.0 * s, BODY_CY - 30.0 * s, 10.0 * s, 9.0 * s))  # SVC
    if 0.23 <= t <= 0.28:  # aortic arch, running from front right to back left
        out.append(_Ellipse(6.0 * s, BODY_CY - 8.0 * s, 36.0 * s, 12.0 * s, 1.0))
    if 0.05 < t < 0.23:  # arch branches
        out.append(_Ellipse(-14.0 * s, BODY_CY - 34.0 * s, 7.0 * s, 7.0 * s))
        out.append(_Ellipse(6.0 * s, BODY_CY - 30.0 * s, 5.5 * s, 5.5 * s))
        out.append(_Ellipse(17.0 * s, BODY_CY - 20.0 * s, 5.5 * s, 5.5 * s))
    return tuple(out)


def _bones(anat: _Anatomy, z: float, cavity: _Ellipse) -> tuple[tuple[_Ellipse, float], ...]:
    """Ribs (oblique, so each cut is an elongated ring), sternum, scapulae and clavicles."""
    s = anat.size
    t = _t_of(anat, z)
    out: list[tuple[_Ellipse, float]] = []
    a_r, b_r = cavity.ax + 6.0 * s, cavity.ay + 6.0 * s
    drop = 78.0 * s
    for k in range(12):
        z_k = anat.z_top + 14.0 - k * 24.0 * s
        u = (z_k - z) / drop
        reach = 0.55 if k >= 10 else 1.0  # floating ribs stop early
        if not 0.0 <= u <= reach:
            continue
        phi = math.pi * (0.1 + 0.85 * u**0.8)
        core = CARTILAGE if phi > 0.84 * math.pi else MARROW
        for side in (-1, 1):
            x = side * a_r * math.sin(phi)
            y = cavity.cy + b_r * math.cos(phi)
            angle = math.atan2(-b_r * math.sin(phi), side * a_r * math.cos(phi))
            out.append((_Ellipse(x, y, 8.0 * s, 3.6 * s, angle), core))
    if 0.12 < t < 0.66:
        out.append((_Ellipse(0.0, cavity.cy - cavity.ay - 5.0 * s, 14.0 * s, 5.5 * s), MARROW))
    if 0.02 < t < 0.42:
        phi = 0.27 * math.pi
        for side in (-1, 1):
            x = side * (a_r + 15.0 * s) * math.sin(phi)
            y = cavity.cy + (b_r + 13.0 * s) * math.cos(phi)
            angle = math.atan2(-math.sin(phi), side * math.cos(phi))
            out.append((_Ellipse(x, y, 28.0 * s, 3.0 * s, angle), MARROW))
    if t < 0.09:
        for side in (-1, 1):
            y = cavity.cy - cavity.ay - 10.0 * s
            out.append((_Ellipse(side * 60.0 * s, y, 32.0 * s, 6.0 * s, side * 0.25), MARROW))
    return tuple(out)


def _point_in_lung(sec: _Sections, x: float, y: float, margin: float = 0.0) -> bool:
    """Scalar twin of the painted lung mask, used to grow vessels and place lesions."""
    if not sec.cavity.contains(x, y, -margin):
        return False
    if not any(e is not None and e.contains(x, y, -margin) for e in sec.lungs):
        return False
    return not any(e.contains(x, y, margin) for e in sec.lung_exclusions)


# --------------------------------------------------------------------------------------------
# Drawing one patient at random
# --------------------------------------------------------------------------------------------


def _draw_anatomy(
    rng: np.random.Generator,
    *,
    label: Label,
    slices: int,
    mix: Mapping[str, float] | None = None,
) -> _Anatomy:
    base = _Anatomy(
        label=label,
        size=float(rng.uniform(0.9, 1.08)),
        aspect=float(rng.uniform(0.94, 1.06)),
        fat_mm=float(rng.uniform(7.0, 22.0)),
        z_top=round(float(rng.uniform(-40.0, 60.0)), 1),
        pixel_spacing=round(float(rng.uniform(0.66, 0.76)), 4),
        lung_level=LUNG + float(rng.uniform(-20.0, 15.0)),
        noise_sigma=float(rng.uniform(15.0, 25.0)),
        dome_right=float(rng.uniform(0.66, 0.74)),
        dome_left=float(rng.uniform(0.72, 0.79)),
        heart_shift=float(rng.uniform(-6.0, 8.0)),
        signed_pixels=bool(rng.random() < 0.5),
    )
    vessels = _grow_vessels(base, rng)
    lesions: list[_Lesion] = []
    severity = "none"
    motion = 0
    # Confounders go mostly to healthy studies (where they cause the paper's false positives)
    # but sometimes to positive ones too, so that they never give the label away by themselves.
    confound = 0.5 if label == "healthy" else 0.2
    if label == "covid":
        shares = SEVERITY_MIX if mix is None else mix
        severity = str(rng.choice(list(shares), p=list(shares.values())))
        lesions += _covid_lesions(base, rng, severity, slices)
    if rng.random() < confound:
        lesions += _atelectasis(base, rng)
    if rng.random() < confound:
        lesions += _vessel_blobs(base, rng, vessels)
    if rng.random() < confound * 0.8:
        motion = int(rng.integers(2, 6))
    return replace(
        base, lesions=tuple(lesions), vessels=vessels, motion_px=motion, severity=severity
    )


_NEIGHBOURS_5MM = np.array(
    [[5.0, 0, 0], [-5.0, 0, 0], [0, 5.0, 0], [0, -5.0, 0], [0, 0, 5.0], [0, 0, -5.0]]
)


class _LungProbe:
    """Point-in-lung tests against a 2 mm occupancy volume of the painted lung mask.

    Growing vessel trees asks tens of thousands of such questions; a lookup table answers them
    in bulk and agrees with what is painted, since it is built by the same painter.
    """

    STEP = 2.0

    def __init__(self, anat: _Anatomy) -> None:
        s = anat.size
        xs = np.arange(-170.0 * s, 170.0 * s, self.STEP, dtype=np.float32)
        ys = np.arange(-150.0 * s, 120.0 * s, self.STEP, dtype=np.float32)
        zs = anat.z_top - np.arange(0.0, CHEST_LENGTH_MM, self.STEP)
        grid = _Grid(xs, ys)
        lung = np.stack([_lung_mask(grid, _sections(anat, float(z))) for z in zs])
        self._lung = lung
        self._origin = np.array([xs[0], ys[0], zs[0]])
        self._scale = np.array([1.0, 1.0, -1.0]) / self.STEP
        self._limit = np.array(lung.shape[::-1])

    def inside(self, points: NDArray[np.float64], *, deep: bool = False) -> NDArray[np.bool_]:
        """For (n, 3) points: inside the lung (``deep``: at least ~5 mm from its edge)."""
        if deep:
            ok = self.inside(points)
            for offset in _NEIGHBOURS_5MM:
                ok &= self.inside(points + offset)
            return ok
        idx = np.rint((points - self._origin) * self._scale).astype(np.intp)
        ok = np.all((idx >= 0) & (idx < self._limit), axis=1)
        out = np.zeros(points.shape[0], dtype=bool)
        if ok.all():
            return self._lung[idx[:, 2], idx[:, 1], idx[:, 0]]
        good = idx[ok]
        out[ok] = self._lung[good[:, 2], good[:, 1], good[:, 0]]
        return out


def _grow_vessels(anat: _Anatomy, rng: np.random.Generator) -> _Vessels:
    """Space-filling pulmonary vessel trees, one per lung, rooted at the hilum.

    Random targets fill the lung; taken from the hilum outward, each joins the nearest vessel
    already grown by a gently jittered path. Radii then follow Murray's law from how many
    targets a segment feeds, so vessels branch and thin toward the pleura.
    """
    probe = _LungProbe(anat)
    targets = _lung_targets(anat, probe, rng, count=int(rng.integers(1800, 2400)))
    s = anat.size
    p0: list[NDArray[np.float64]] = []
    p1: list[NDArray[np.float64]] = []
    radii: list[float] = []
    roots = []  # pulmonary arteries enter higher, veins drain lower and more anterior
    for side in (-1, 1):
        roots.append((side, 0, np.array([side * 46.0 * s, BODY_CY - 8.0 * s, _hilum_z(anat)])))
        z_vein = _hilum_z(anat) - 32.0 * s
        roots.append((side, 1, np.array([side * 42.0 * s, BODY_CY - 22.0 * s, z_vein])))
    for side, tree, hilum in roots:
        mine = targets[(np.sign(targets[:, 0]) == side) & (np.arange(len(targets)) % 2 == tree)]
        order = np.argsort(((mine - hilum) ** 2).sum(axis=1))
        nodes, parents = _vessel_tree(probe, rng, hilum, mine[order])
        feeds = _leaf_counts(parents)
        for j in range(1, len(parents)):
            p0.append(nodes[parents[j]])
            p1.append(nodes[j])
            radii.append(min(0.45 * float(feeds[j]) ** 0.45, 6.5))
    if not radii:
        empty = np.zeros((0, 3))
        return _Vessels(empty, empty, np.zeros(0))
    return _Vessels(np.array(p0), np.array(p1), np.array(radii))


def _hilum_z(anat: _Anatomy) -> float:
    return anat.z_top - 0.42 * CHEST_LENGTH_MM


def _lung_targets(
    anat: _Anatomy, probe: _LungProbe, rng: np.random.Generator, count: int
) -> NDArray[np.float64]:
    """Points spread uniformly through both lungs, a few millimetres off the pleura."""
    s = anat.size
    low = [-150.0 * s, -110.0 * s, anat.z_top - 255.0]
    high = [150.0 * s, 90.0 * s, anat.z_top]
    found: list[NDArray[np.float64]] = []
    total = 0
    while total < count:
        cand = rng.uniform(low, high, (4096, 3))
        cand = cand[probe.inside(cand, deep=True)]
        found.append(cand)
        total += len(cand)
    return np.concatenate(found)[:count]


def _vessel_tree(
    probe: _LungProbe,
    rng: np.random.Generator,
    hilum: NDArray[np.float64],
    targets: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Nodes (n, 3) and parent indices (root -1) of one lung's tree.

    Targets join in small batches (growing with the tree) so that each batch is one set of
    numpy calls; within a batch they attach only to what was grown before.
    """
    nodes = np.empty((len(targets) * 40 + 1, 3))
    parents = np.empty(nodes.shape[0], dtype=np.intp)
    nodes[0], parents[0], count = hilum, -1, 1
    done = 0
    while done < len(targets):
        batch = targets[done : done + min(max(count // 6, 4), 64)]
        done += len(batch)
        near = ((batch[:, None, :] - nodes[None, :count, :]) ** 2).sum(axis=2).argmin(axis=1)
        points, steps = _vessel_paths(probe, rng, nodes[near], batch, hilum)
        for i in np.flatnonzero(steps):
            k = int(steps[i])
            nodes[count : count + k] = points[i, :k]
            parents[count] = near[i]
            parents[count + 1 : count + k] = np.arange(count, count + k - 1)
            count += k
    return nodes[:count], parents[:count]


def _vessel_paths(
    probe: _LungProbe,
    rng: np.random.Generator,
    start: NDArray[np.float64],
    target: NDArray[np.float64],
    hilum: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Jittered paths with a point every ~8 mm from each start to its target.

    Returns points (k, S, 3) and the number of points of each path, 0 where the path would
    leave the lung (the few centimetres around the hilum excepted).
    """
    gap = target - start
    steps = np.maximum(np.ceil(np.sqrt((gap**2).sum(axis=1)) / 8.0), 1).astype(np.intp)
    frac = np.arange(1, int(steps.max()) + 1)[None, :] / steps[:, None]  # (k, S)
    valid = frac <= 1.0 + 1e-9
    jitter = rng.normal(0.0, 1.6, (*frac.shape, 3)) * (frac < 1.0 - 1e-9)[:, :, None]
    points = start[:, None, :] + gap[:, None, :] * np.minimum(frac, 1.0)[:, :, None] + jitter
    flat = points.reshape(-1, 3)
    near_hilum = ((flat - hilum) ** 2).sum(axis=1) < 30.0**2
    ok = (probe.inside(flat) | near_hilum).reshape(frac.shape) | ~valid
    return points, np.where(ok.all(axis=1), steps, 0)


def _leaf_counts(parents: NDArray[np.intp]) -> NDArray[np.int64]:
    """How many leaves each node feeds (children always come after their parent)."""
    has_child = np.zeros(len(parents), dtype=bool)
    has_child[parents[1:]] = True
    feeds = (~has_child).astype(np.int64)
    for j in range(len(parents) - 1, 0, -1):
        feeds[parents[j]] += feeds[j]
    return feeds


def _lung_point(
    anat: _Anatomy, rng: np.random.Generator, z: float, side: int, depth: float, posterior: float
) -> tuple[float, float, float] | None:
    """A point ``depth`` mm inside the pleura of one lung, biased posterolaterally.

    Also returns the direction (radians) from the lung centre, i.e. the pleura's normal there.
    """
    sec = _sections(anat, z)
    lung = sec.lungs[0 if side < 0 else 1]
    if lung is None:
        return None
    base = math.atan2(posterior, side * 0.8)
    for _ in range(12):
        theta = base + float(rng.normal(0.0, 0.7))
        dx, dy = math.cos(theta), math.sin(theta)
        cx, cy = lung.cx, lung.cy
        last: tuple[float, float] | None = None
        for step in range(1, 200):
            x, y = cx + dx * step, cy + dy * step
            if _point_in_lung(sec, x, y):
                last = (x, y)
            elif last is not None:
                break
        if last is None:
            continue
        x, y = last[0] - dx * depth, last[1] - dy * depth
        if _point_in_lung(sec, x, y):
            return x, y, theta
    return None


def _slice_z(anat: _Anatomy, t: float, snap: int) -> float:
    """Table position at fraction t, snapped to a thin-slice centre so small lesions are seen."""
    k = min(max(int(t * snap), 0), snap - 1)
    return anat.z_top - (k + 0.5) * CHEST_LENGTH_MM / snap


_SEVERITY = {  # lesion count range, in-plane radius range (mm), share with consolidation/crazy
    "focal": ((1, 1), (6.0, 10.0), 0.0),
    "mild": ((3, 5), (9.0, 15.0), 0.2),
    "moderate": ((5, 8), (14.0, 26.0), 0.45),
    "severe": ((8, 14), (22.0, 40.0), 0.7),
}
# The paper's positives were admitted patients with lesions on HRCT; the two it missed (of 70)
# each had one solitary focal GGO. Focal disease is as rare here; the rest is multilobar.
SEVERITY_MIX = {"focal": 0.03, "mild": 0.22, "moderate": 0.4, "severe": 0.35}


def check_severity_mix(mix: Mapping[str, float]) -> None:
    """Refuse shares that name an unknown severity, are negative, or do not sum to 1."""
    unknown = sorted(set(mix) - set(_SEVERITY))
    if unknown:
        raise ValueError(f"unknown severity {', '.join(unknown)}; known: {', '.join(SEVERITY_MIX)}")
    if any(not math.isfinite(v) or v < 0 for v in mix.values()):
        raise ValueError("severity shares must be finite and >= 0")
    if abs(sum(mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"severity shares must sum to 1, got {sum(mix.values()):g}")


def parse_severity_mix(text: str) -> dict[str, float]:
    """``"focal=0.05,mild=0.5,moderate=0.25,severe=0.2"`` as shares, checked; unnamed ones are 0.

    The order is always SEVERITY_MIX's, so the same shares written in another order draw the
    same patients.
    """
    given: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"severity share {part!r} is not NAME=SHARE")
        try:
            given[name.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"severity share {part!r}: {value!r} is not a number") from exc
    check_severity_mix(given)
    return {name: given.get(name, 0.0) for name in SEVERITY_MIX}


_MULTILOBAR_T = (0.12, 0.9)  # share of the scan length (apex end 0) that multifocal disease spans


def _covid_lesions(
    anat: _Anatomy, rng: np.random.Generator, severity: str, snap: int
) -> list[_Lesion]:
    """Peripheral, posterior, bilateral opacities; more and larger with severity.

    A focal study has one small GGO, mostly basal. Otherwise the lesions are multilobar: one
    per craniocaudal stratum of ``_MULTILOBAR_T``, alternating sides, each reaching far enough
    along the pleura to meet the next, so that (as in admitted patients) most lung slices
    show disease; severity sets how many and how large in the axial plane.
    """
    (lo, hi), (r_lo, r_hi), mixed = _SEVERITY[severity]
    count = int(rng.integers(lo, hi + 1))
    side = int(rng.choice([-1, 1]))
    t_lo, t_hi = _MULTILOBAR_T
    stratum = (t_hi - t_lo) / count
    out: list[_Lesion] = []
    for k in range(count):
        for _ in range(50):  # a placement can fail (no lung there); never loop forever
            if severity == "focal":
                t = 0.18 + 0.74 * float(rng.beta(2.4, 1.5))
            else:
                t = t_lo + (k + float(rng.uniform(0.35, 0.65))) * stratum
            z = _slice_z(anat, t, snap)
            r = float(rng.uniform(r_lo, r_hi))
            point = _lung_point(anat, rng, z, side, depth=0.4 * r, posterior=1.0)
            if point is not None:
                break
        else:
            continue
        kind = "ggo"
        if rng.random() < mixed:
            kind = str(rng.choice(["consolidation", "crazy"]))
        along, across = r * float(rng.uniform(1.0, 1.5)), r * float(rng.uniform(0.55, 0.85))
        depth = r * float(rng.uniform(0.7, 1.1))
        if severity != "focal":
            depth = max(depth, float(rng.uniform(0.7, 0.9)) * stratum * CHEST_LENGTH_MM)
        out.append(
            _Lesion(
                center=(point[0], point[1], z),
                radii=(along, across, depth),
                kind=kind,
                level=float(rng.uniform(-640.0, -420.0)),
                core_level=float(rng.uniform(-60.0, 40.0)),
                in_mask=True,
                phase=float(rng.uniform(0, 2 * math.pi)),
                angle=point[2] + math.pi / 2,
            )
        )
        side = -side
    return out


def _atelectasis(anat: _Anatomy, rng: np.random.Generator) -> list[_Lesion]:
    """Dependent (posterior, basal, subpleural) atelectasis: a thin dense band, not COVID."""
    out: list[_Lesion] = []
    for side in (-1, 1):
        z = anat.z_top - float(rng.uniform(0.78, 0.9)) * CHEST_LENGTH_MM
        point = _lung_point(anat, rng, z, side, depth=3.0, posterior=4.0)
        if point is None:
            continue
        out.append(
            _Lesion(
                center=(point[0], point[1] + 2.0, z),
                radii=(
                    float(rng.uniform(22, 38)),
                    float(rng.uniform(4, 7)),
                    float(rng.uniform(14, 28)),
                ),
                kind="atelectasis",
                level=float(rng.uniform(-350.0, -150.0)),
                core_level=0.0,
                in_mask=False,
                phase=float(rng.uniform(0, 2 * math.pi)),
                angle=point[2] + math.pi / 2,
            )
        )
    return out


def _vessel_blobs(anat: _Anatomy, rng: np.random.Generator, vessels: _Vessels) -> list[_Lesion]:
    """Like-GGO blobs where a vessel runs obliquely through the slab (partial volume)."""
    mid = np.flatnonzero((vessels.radius > 0.8) & (vessels.radius < 2.2))
    if mid.size == 0:
        return []
    out: list[_Lesion] = []
    for i in rng.choice(mid, size=min(int(rng.integers(2, 6)), mid.size), replace=False):
        c = (vessels.p0[i] + vessels.p1[i]) / 2.0
        r = float(rng.uniform(2.5, 4.5))
        out.append(
            _Lesion(
                center=(float(c[0]), float(c[1]), float(c[2])),
                radii=(r, r * 0.9, r * 1.4),
                kind="blob",
                level=float(rng.uniform(-620.0, -450.0)),
                core_level=0.0,
                in_mask=False,
                phase=float(rng.uniform(0, 2 * math.pi)),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Painting a slice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates (mm) of an image: x along columns, y along rows."""

    x: NDArray[np.float32]
    y: NDArray[np.float32]

    @staticmethod
    def square(n: int, spacing: float) -> _Grid:
        c = ((np.arange(n) - (n - 1) / 2.0) * spacing).astype(np.float32)
        return _Grid(c, c.copy())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.y.size), int(self.x.size)

    def box(self, cx: float, cy: float, hx: float, hy: float) -> Box | None:
        """Rows/columns covering the rectangle cx +- hx, cy +- hy (None when off the image)."""
        cols = _index_range(self.x, cx - hx, cx + hx)
        rows = _index_range(self.y, cy - hy, cy + hy)
        if cols is None or rows is None:
            return None
        return rows, cols

    def ellipse(self, e: _Ellipse) -> tuple[Box, Mask] | None:
        """Bounding box and inside-mask of an ellipse."""
        hx, hy = e.half_extent()
        box = self.box(e.cx, e.cy, hx, hy)
        if box is None:
            return None
        return box, self.q(e, box) <= 1.0

    def q(self, e: _Ellipse, box: Box) -> F32:
        """Squared normalised radius of every pixel in ``box`` (1 on the outline)."""
        dx = self.x[box[1]] - np.float32(e.cx)
        dy = self.y[box[0]] - np.float32(e.cy)
        ax, ay = np.float32(e.ax), np.float32(e.ay)
        if e.angle == 0.0:
            q = ((dx / ax) ** 2)[None, :] + ((dy / ay) ** 2)[:, None]
            return q.astype(np.float32, copy=False)
        c, s = np.float32(math.cos(e.angle)), np.float32(math.sin(e.angle))
        u = dx[None, :] * c + dy[:, None] * s
        v = dy[:, None] * c - dx[None, :] * s
        return ((u / ax) ** 2 + (v / ay) ** 2).astype(np.float32, copy=False)


def _index_range(coords: NDArray[np.float32], lo: float, hi: float) -> slice | None:
    step = float(coords[1] - coords[0])
    first = max(math.floor((lo - float(coords[0])) / step), 0)
    last = min(math.ceil((hi - float(coords[0])) / step) + 1, coords.size)
    return slice(first, last) if last > first else None


def _fill(hu: F32, grid: _Grid, e: _Ellipse | None, value: float) -> None:
    if e is None:
        return
    hit = grid.ellipse(e)
    if hit is not None:
        box, inside = hit
        np.copyto(hu[box], np.float32(value), where=inside)


def _bone(hu: F32, grid: _Grid, e: _Ellipse, core: float, cortex_mm: float = 1.6) -> None:
    """A bone cut: cortical ring around a cancellous (or cartilage) core."""
    _fill(hu, grid, e, CORTEX if core != CARTILAGE else core)
    _fill(hu, grid, e.grow(-cortex_mm), core)


def _paint_table(hu: F32, grid: _Grid, sec: _Sections) -> None:
    """Curved carbon-fibre cradle the patient lies on: two thin shells around a foam core."""
    top = sec.body.cy + sec.body.ay + 1.0 - 0.0008 * grid.x**2  # rises toward the edges
    box = grid.box(0.0, float(top.min() + top.max()) / 2 + 14.0, 1e4, float(np.ptp(top)) / 2 + 16)
    if box is None:
        return
    depth = grid.y[box[0]][:, None] - top[None, :]
    sub = hu[box]
    sub[(depth > 0.0) & (depth < 2.5)] = TABLE_SHELL
    sub[(depth >= 2.5) & (depth < 26.0)] = TABLE_FOAM
    sub[(depth >= 26.0) & (depth < 28.5)] = TABLE_SHELL


def _paint_body(hu: F32, grid: _Grid, sec: _Sections) -> None:
    _fill(hu, grid, sec.body, SKIN)
    _fill(hu, grid, sec.body.grow(-2.0), FAT)
    _fill(hu, grid, sec.muscle, MUSCLE)
    _fill(hu, grid, sec.cavity, MEDIASTINAL_FAT)


def _paint_organs(hu: F32, grid: _Grid, sec: _Sections) -> None:
    """Abdomen under the domes, heart in its fat, great vessels, trachea and oesophagus."""
    for dome, value in zip(sec.domes, (LIVER, MUSCLE), strict=True):
        _fill(hu, grid, dome, value)
    if sec.heart is not None:
        _fill(hu, grid, sec.heart.grow(3.0), MEDIASTINAL_FAT)
        _fill(hu, grid, sec.heart, BLOOD)
    for vessel in sec.soft_vessels:
        _fill(hu, grid, vessel, BLOOD)
    _fill(hu, grid, sec.esophagus, MUSCLE - 5.0)
    if sec.trachea is not None:
        _fill(hu, grid, sec.trachea.grow(2.0), MUSCLE)
        _fill(hu, grid, sec.trachea, AIR)


def _paint_skeleton(hu: F32, grid: _Grid, sec: _Sections) -> None:
    _bone(hu, grid, sec.posterior_arch, MARROW, 2.5)
    for process in sec.processes:
        _bone(hu, grid, process, MARROW)
    _fill(hu, grid, sec.canal, CSF)
    if sec.is_disc:
        _fill(hu, grid, sec.vertebra, DISC)
    else:
        _bone(hu, grid, sec.vertebra, MARROW, 2.0)
    for shape, core in sec.bones:
        _bone(hu, grid, shape, core)


def _lung_mask(grid: _Grid, sec: _Sections) -> Mask:
    """Pixels of lung parenchyma: the lung outlines, cut by chest wall and mediastinal organs."""
    mask = np.zeros(grid.shape, dtype=bool)
    for lung in sec.lungs:
        hit = None if lung is None else grid.ellipse(lung)
        if hit is not None:
            mask[hit[0]] |= hit[1]
    if not mask.any():
        return mask
    hit = grid.ellipse(sec.cavity)
    inside = np.zeros(grid.shape, dtype=bool)
    if hit is not None:
        inside[hit[0]] = hit[1]
    mask &= inside
    for e in sec.lung_exclusions:
        hit = grid.ellipse(e)
        if hit is not None:
            mask[hit[0]] &= ~hit[1]
    return mask


def _texture_at(
    tex: F32, z: float, period: float, phase: float = 0.0, box: Box = (slice(None), slice(None))
) -> F32:
    """Unit-variance texture (within ``box``) that changes smoothly with table position."""
    a = 2.0 * math.pi * z / period + phase
    return tex[0][box] * np.float32(math.cos(a)) + tex[1][box] * np.float32(math.sin(a))


def _paint_lung(
    hu: F32, grid: _Grid, lung: Mask, sec: _Sections, anat: _Anatomy, tex: F32 | None, z: float
) -> None:
    """Aerated lung, a little denser where it is dependent (posterior), with fine texture."""
    front = sec.cavity.cy - sec.cavity.ay
    dependent = np.clip((grid.y - front) / (2.0 * sec.cavity.ay), 0.0, 1.0) ** 2 * 60.0
    value = (anat.lung_level + dependent)[:, None] * np.ones((1, grid.shape[1]), np.float32)
    if tex is not None:
        value = value + 26.0 * _texture_at(tex, z, 23.0)
    np.copyto(hu, value, where=lung)


def _paint_lesions(
    hu: F32, grid: _Grid, lung: Mask, anat: _Anatomy, tex: F32 | None, z: float
) -> Mask:
    """Blend every opacity that reaches this slice into lung; return the COVID lesion mask."""
    mask = np.zeros(grid.shape, dtype=bool)
    if tex is None:
        return mask
    for les in anat.lesions:
        cx, cy, cz = les.center
        rx, ry, rz = les.radii
        dzq = ((z - cz) / rz) ** 2
        if dzq >= 1.0:
            continue
        shape = _Ellipse(cx, cy, rx, ry, les.angle)
        hx, hy = shape.half_extent()
        box = grid.box(cx, cy, hx * 1.35, hy * 1.35)
        if box is None:
            continue
        q = grid.q(shape, box) + np.float32(dzq)
        rough = _texture_at(tex[1:], z, 31.0, les.phase, box)
        weight = np.clip((1.0 - q) * 3.0 + 0.6 * rough, 0.0, 1.0) * lung[box]
        target = _lesion_target(les, grid, box, q, rough, _texture_at(tex, z, 17.0, box=box))
        sub = hu[box]
        sub += (target - sub) * weight
        if les.in_mask:
            mask[box] |= weight > 0.5
    return mask


def _lesion_target(les: _Lesion, grid: _Grid, box: Box, q: F32, rough: F32, fine: F32) -> F32:
    """HU an opacity tends to: ground glass, a consolidated core, or GGO with a septal grid."""
    target = np.float32(les.level) + 30.0 * fine
    if les.kind == "consolidation":
        core = q < 0.4 + 0.15 * rough
        target = np.where(core, np.float32(les.core_level) + 12.0 * fine, target)
    elif les.kind == "crazy":
        spacing = 6.5
        gx = (grid.x[box[1]][None, :] + 2.0 * rough) / spacing
        gy = (grid.y[box[0]][:, None] - 2.0 * rough) / spacing
        near = np.minimum(np.abs(gx - np.round(gx)), np.abs(gy - np.round(gy))) * spacing
        target = target + 220.0 * np.clip(1.0 - near / 0.7, 0.0, 1.0)
    return target.astype(np.float32)


_PAD = 64  # margin of the scratch image capsules are splatted into (no bounds checks needed)


def _capsule_weights(grid: _Grid, tubes: _Vessels, z: float, extra: float = 0.0) -> F32:
    """Coverage (0..1, soft edged) of every tube segment crossing the plane at z.

    Segments are evaluated in batches of equal-sized pixel boxes and splatted with
    ``np.maximum.at``, so thousands of small vessels cost a handful of numpy calls.
    """
    radius = tubes.radius + extra
    act = _crossing(tubes, z, extra)
    rows, cols = grid.shape
    weight = np.zeros((rows + 2 * _PAD, cols + 2 * _PAD), dtype=np.float32)
    if act.size:
        p0, d, r = tubes.p0[act], tubes.p1[act] - tubes.p0[act], radius[act]
        origin, size = _capsule_boxes(grid, p0, d, r, z)
        for lo, hi in ((0, 8), (8, 16), (16, 32), (32, 64), (64, 2 * _PAD)):
            pick = (size > lo) & (size <= hi)
            if pick.any():
                _splat(grid, weight, p0[pick], d[pick], r[pick], z, origin[pick], hi)
    return weight[_PAD : _PAD + rows, _PAD : _PAD + cols]


def _crossing(tubes: _Vessels, z: float, extra: float = 0.0) -> NDArray[np.intp]:
    """Indices of the segments that come within their radius of the plane at z."""
    radius = tubes.radius + extra
    lo_z = np.minimum(tubes.p0[:, 2], tubes.p1[:, 2]) - radius
    hi_z = np.maximum(tubes.p0[:, 2], tubes.p1[:, 2]) + radius
    return np.flatnonzero((lo_z <= z) & (hi_z >= z))


def _capsule_boxes(
    grid: _Grid, p0: NDArray[np.float64], d: NDArray[np.float64], r: NDArray[np.float64], z: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Top-left pixel (row, col) and box size of the part of each segment near the plane."""
    dz = d[:, 2]
    flat = np.abs(dz) < 1e-6
    safe = np.where(flat, 1.0, dz)
    ta, tb = (z - r - p0[:, 2]) / safe, (z + r - p0[:, 2]) / safe
    lo = np.where(flat, 0.0, np.clip(np.minimum(ta, tb), 0.0, 1.0))
    hi = np.where(flat, 1.0, np.clip(np.maximum(ta, tb), 0.0, 1.0))
    a, b = p0 + lo[:, None] * d, p0 + hi[:, None] * d
    spacing = float(grid.x[1] - grid.x[0])
    low = (np.minimum(a[:, :2], b[:, :2]) - r[:, None] - 1.0 - [grid.x[0], grid.y[0]]) / spacing
    span = (np.abs(a[:, :2] - b[:, :2]) + 2.0 * r[:, None] + 2.0) / spacing
    origin = np.floor(low[:, ::-1]).astype(np.int64)  # (row, col)
    size = np.ceil(span.max(axis=1)).astype(np.int64) + 2
    return origin, np.minimum(size, 2 * _PAD)


def _splat(
    grid: _Grid,
    weight: F32,
    p0: NDArray[np.float64],
    d: NDArray[np.float64],
    r: NDArray[np.float64],
    z: float,
    origin: NDArray[np.int64],
    box: int,
) -> None:
    spacing = float(grid.x[1] - grid.x[0])
    steps = np.arange(box)
    rr = np.clip(origin[:, 0:1] + steps, -_PAD, grid.shape[0] + _PAD - 1)  # (n, box)
    cc = np.clip(origin[:, 1:2] + steps, -_PAD, grid.shape[1] + _PAD - 1)
    wy = (float(grid.y[0]) + rr * spacing - p0[:, 1:2])[:, :, None]  # (n, box, 1)
    wx = (float(grid.x[0]) + cc * spacing - p0[:, 0:1])[:, None, :]  # (n, 1, box)
    wz = (z - p0[:, 2])[:, None, None]
    dx, dy, dz = (d[:, i][:, None, None] for i in range(3))
    along = np.clip((wx * dx + wy * dy + wz * dz) / (d * d).sum(axis=1)[:, None, None], 0.0, 1.0)
    dist = np.sqrt((wx - along * dx) ** 2 + (wy - along * dy) ** 2 + (wz - along * dz) ** 2)
    cover = np.clip((r[:, None, None] - dist) / 0.7 + 0.5, 0.0, 1.0).astype(np.float32)
    flat = (rr[:, :, None] + _PAD) * weight.shape[1] + (cc[:, None, :] + _PAD)
    np.maximum.at(weight.reshape(-1), flat.ravel(), cover.ravel())


def _airways(anat: _Anatomy) -> _Vessels:
    """Main bronchi from the carina to each hilum, as capsules."""
    s = anat.size
    z_c = anat.z_top - _CARINA_T * CHEST_LENGTH_MM
    sec = _sections(anat, z_c + 1.0)
    tr = sec.trachea
    y_c = tr.cy if tr is not None else BODY_CY
    p0 = np.array([[0.0, y_c, z_c], [0.0, y_c, z_c]])
    p1 = np.array(
        [
            [-44.0 * s, BODY_CY - 8.0 * s, z_c - 26.0 * s],
            [44.0 * s, BODY_CY - 6.0 * s, z_c - 34.0 * s],
        ]
    )
    return _Vessels(p0, p1, np.array([6.5 * s, 6.0 * s]))


def _paint_tubes(hu: F32, grid: _Grid, lung: Mask, anat: _Anatomy, z: float) -> None:
    """Bronchi (air with a wall) and pulmonary vessels (blood, thinning to the periphery)."""
    airways = _airways(anat)
    if _crossing(airways, z, 2.0).size:
        np.copyto(hu, np.float32(MUSCLE), where=_capsule_weights(grid, airways, z, 1.8) > 0.5)
        np.copyto(hu, np.float32(AIR), where=_capsule_weights(grid, airways, z) > 0.5)
    if anat.vessels is not None and _crossing(anat.vessels, z).size:
        cover = _capsule_weights(grid, anat.vessels, z) * lung
        hu += (BLOOD - hu) * cover


@dataclass(frozen=True)
class _Detail:
    """Fine detail of a full-resolution slice; the localizer's coarse pass goes without."""

    tex: F32  # (3, H, W) texture fields
    noise: F32  # (2, 1.5 H, 1.5 W) unit Gaussian fields, windowed and mixed anew per slice
    rng: np.random.Generator
    blur_passes: int  # 3-tap smoothing passes: the reconstruction kernel's sharpness
    noise_sigma: float

    @staticmethod
    def make(rng: np.random.Generator, shape: tuple[int, int]) -> _Detail:
        noise = rng.standard_normal((2, shape[0] * 3 // 2, shape[1] * 3 // 2), dtype=np.float32)
        return _Detail(_textures(rng, shape), noise, rng, 1, 0.0)

    def sample_noise(self, shape: tuple[int, int]) -> F32:
        """Fresh-looking Gaussian noise without drawing 262k normals per slice: two random
        windows of a larger noise field, mixed at a random angle (still unit variance)."""
        r0, c0, r1, c1 = (int(v) for v in self.rng.integers(0, shape[0] // 2, 4))
        a = float(self.rng.uniform(0.0, 2.0 * math.pi))
        first = self.noise[0, r0 : r0 + shape[0], c0 : c0 + shape[1]]
        second = self.noise[1, r1 : r1 + shape[0], c1 : c1 + shape[1]]
        return first * np.float32(math.cos(a)) + second * np.float32(math.sin(a))


def _render(
    anat: _Anatomy, grid: _Grid, z: float, detail: _Detail | None
) -> tuple[F32, Mask, Mask]:
    """One axial slice in HU at table position z, its lung mask and its COVID lesion mask.

    Without ``detail`` (the localizer's coarse pass) texture, vessels, lesions and noise are
    skipped.
    """
    sec = _sections(anat, z)
    hu = np.full(grid.shape, AIR, dtype=np.float32)
    _paint_table(hu, grid, sec)
    _paint_body(hu, grid, sec)
    _paint_organs(hu, grid, sec)
    _paint_skeleton(hu, grid, sec)
    lung = _lung_mask(grid, sec)
    tex = None if detail is None else detail.tex
    _paint_lung(hu, grid, lung, sec, anat, tex, z)
    lesions = _paint_lesions(hu, grid, lung, anat, tex, z)
    if detail is None:
        return hu, lung, lesions
    _paint_tubes(hu, grid, lung, anat, z)
    _motion(hu, grid, sec, anat, z)
    for _ in range(detail.blur_passes):
        hu = _blur3(hu)
    if detail.noise_sigma > 0:
        hu += detail.sample_noise(grid.shape) * np.float32(detail.noise_sigma)
    return hu, lung, lesions


def _blur3(a: F32, side: float = 0.2) -> F32:
    """Separable 3-tap smoothing (sigma ~0.6 px per pass): the scanner's point-spread."""
    w_side, w_mid = np.float32(side), np.float32(1.0 - 2.0 * side)
    rows = a * w_mid
    rows[1:] += a[:-1] * w_side
    rows[:-1] += a[1:] * w_side
    out = rows * w_mid
    out[:, 1:] += rows[:, :-1] * w_side
    out[:, :-1] += rows[:, 1:] * w_side
    return out


def _motion(hu: F32, grid: _Grid, sec: _Sections, anat: _Anatomy, z: float) -> None:
    """Breathing/cardiac motion at the bases: inside the thorax, a blurred ghost of the slice
    shifted by a few pixels (double contours at the heart and diaphragm, smeared vessels)."""
    t = _t_of(anat, z)
    hit = grid.ellipse(sec.cavity)
    if anat.motion_px == 0 or t < 0.5 or hit is None:
        return
    box, inside = hit
    w = np.float32(0.45 * _smooth01((t - 0.5) / 0.2))
    ghost = np.roll(hu, anat.motion_px, axis=0)[box]
    ghost = ndimage.uniform_filter1d(ghost, anat.motion_px * 2 + 1, axis=0)
    np.copyto(hu[box], (1.0 - w) * hu[box] + w * ghost, where=inside)


def _textures(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """Three unit-variance random fields (fine grain plus blotches) for lung and lesion texture."""
    out = np.empty((3, *shape), dtype=np.float32)
    small = (shape[0] // 8, shape[1] // 8)
    for i in range(3):
        fine = _blur3(_blur3(rng.standard_normal(shape, dtype=np.float32), 0.25), 0.25)
        coarse = ndimage.zoom(rng.standard_normal(small, dtype=np.float32), 8, order=1)
        field = fine / fine.std() + 0.7 * coarse / coarse.std()
        out[i] = field / field.std()
    return out


def _projection(anat: _Anatomy, *, width_mm: float, height_mm: float, z_top: float) -> F32:
    """A frontal projection (water-equivalent cm along y) of the coarse anatomy, 512 x 512."""
    nz, nx, ny = 80, 128, 96
    grid = _Grid(
        ((np.arange(nx) - (nx - 1) / 2.0) * width_mm / nx).astype(np.float32),
        ((np.arange(ny) - (ny - 1) / 2.0) * 380.0 / ny).astype(np.float32),
    )
    dy_cm = 380.0 / ny / 10.0
    rows = []
    for k in range(nz):
        z = z_top - (k + 0.5) * height_mm / nz
        hu, _, _ = _render(anat, grid, z, None)
        rows.append(np.clip(hu + 1000.0, 0.0, None).sum(axis=0) * dy_cm / 1000.0)
    proj = np.stack(rows).astype(np.float32)
    return ndimage.zoom(proj, (MATRIX / nz, MATRIX / nx), order=1).astype(np.float32)


def _to_uint8(projection: F32, *, gamma: float) -> NDArray[np.uint8]:
    scaled = np.clip(projection / max(float(projection.max()), 1e-6), 0.0, 1.0) ** gamma
    return np.round(scaled * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    """Who and when: patient and study attributes plus the UID derivation key."""

    key: tuple[str, ...]
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    accession: str
    study_id: str
    study_seconds: int

    @staticmethod
    def make(
        *,
        seed: int,
        label: str,
        index: int,
        rng: np.random.Generator,
        cohort: tuple[str, ...] = (),
    ) -> _Identity:
        age = int(rng.integers(24, 82))
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        tag = label[0].upper()
        # another cohort is other patients: they must not share an ID with the default one's
        suffix = f"-{zlib.crc32('|'.join(cohort).encode()):08x}" if cohort else ""
        return _Identity(
            key=(str(seed), label, str(index), *cohort),
            patient_name=f"PHANTOM^{label.upper()}^{index:03d}",
            patient_id=f"PHANTOM-S{seed}-{tag}{index:03d}{suffix}",
            birth_date=f"{2025 - age:04d}{month:02d}{day:02d}",
            sex=str(rng.choice(["F", "M"])),
            age=f"{age:03d}Y",
            accession=f"PH{seed % 10000:04d}{tag}{index:05d}",
            study_id=f"{index % 100000}",
            study_seconds=int(rng.integers(7 * 3600, 19 * 3600)),
        )

    def uid(self, *parts: object) -> str:
        return derive_uid(_UID_NAMESPACE, *map(str, self.key), *map(str, parts))

    @property
    def study_uid(self) -> str:
        return self.uid("study")

    def time(self, offset_s: float = 0.0) -> str:
        total = self.study_seconds + offset_s
        h, rest = divmod(total, 3600)
        m, sec = divmod(rest, 60)
        return f"{int(h):02d}{int(m):02d}{sec:09.6f}"


@dataclass(frozen=True)
class _Series:
    number: int
    description: str
    kernel: str
    thickness: float | None
    image_type: str  # "AXIAL" or "LOCALIZER"
    window: tuple[float, float]  # centre, width
    offset_s: float  # seconds after the study started
    blur_passes: int = 1  # the reconstruction kernel's smoothing (see _Detail)
    noise: float = 1.0  # noise standard deviation relative to the patient's noise_sigma


def _ds(v: float) -> str:
    """A decimal string short enough for DS (16 characters)."""
    text = f"{round(v, 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _patient_study(ds: Dataset, ids: _Identity) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = ids.birth_date
    ds.PatientSex = ids.sex
    ds.PatientAge = ids.age
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = ids.study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = ids.time()
    ds.ReferringPhysicianName = ""
    ds.StudyID = ids.study_id
    ds.AccessionNumber = ids.accession
    ds.StudyDescription = "CT CHEST WO CONTRAST"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "Synthetic chest imaging"
    ds.InstitutionName = "hrct-triage synthetic data (not a patient)"
    ds.StationName = "PHANTOM01"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "hrct-triage phantom 1"


def _ct_series_dataset(ids: _Identity, anat: _Anatomy, series: _Series, uid: str) -> Dataset:
    """Everything of a CT image that is the same across one series."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    _patient_study(ds, ids)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = ids.time(series.offset_s)
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ProtocolName = "Chest HRCT"
    ds.FrameOfReferenceUID = ids.uid("frame")
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", series.image_type]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = ids.time(series.offset_s)
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = ids.time(series.offset_s + 30)
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = ids.time(series.offset_s + 30)
    _ct_acquisition(ds, series)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if anat.signed_pixels else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if anat.signed_pixels else 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    if series.image_type != "LOCALIZER":  # a scout's values are no Hounsfield units
        ds.RescaleType = "HU"
    ds.WindowCenter = _ds(series.window[0])
    ds.WindowWidth = _ds(series.window[1])
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    return ds


def _ct_acquisition(ds: Dataset, series: _Series) -> None:
    localizer = series.image_type == "LOCALIZER"
    ds.ScanOptions = "SURVIEW" if localizer else "HELICAL MODE"
    ds.KVP = "120"
    ds.XRayTubeCurrent = 30 if localizer else 180
    ds.ExposureTime = 1500 if localizer else 500
    ds.Exposure = 45 if localizer else 90
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = 22 if localizer else 24
    ds.FocalSpots = "1.2"
    ds.DataCollectionDiameter = "500"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ConvolutionKernel = series.kernel
    if series.thickness is not None:
        ds.SliceThickness = _ds(series.thickness)
    else:
        ds.SliceThickness = None
    if not localizer:
        ds.RevolutionTime = 0.5
        ds.SingleCollimationWidth = 0.625
        ds.TotalCollimationWidth = 40.0
        ds.TableSpeed = 80.0
        ds.TableFeedPerRotation = 40.0
        ds.SpiralPitchFactor = 1.0
        ds.CTDIvol = 6.5
        phantom = Dataset()
        phantom.CodeValue = "113691"
        phantom.CodingSchemeDesignator = "DCM"
        phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
        ds.CTDIPhantomTypeCodeSequence = [phantom]


def _pixels(hu: F32, anat: _Anatomy, outside: Mask | None = None) -> bytes:
    """Stored values for HU = stored - 1024: 12-bit unsigned, or GE-like signed 16-bit with
    the padding value outside the reconstruction circle."""
    stored = np.clip(np.rint(hu) + 1024.0, 0.0, 4095.0)
    if not anat.signed_pixels:
        return stored.astype("<u2").tobytes()
    out = stored.astype("<i2")
    if outside is not None:
        out[outside] = _PADDING
    return out.tobytes()


_PADDING = -2000


def _outside_circle(grid: _Grid) -> Mask:
    radius = (grid.x.size / 2.0) * float(grid.x[1] - grid.x[0])
    return (grid.x[None, :] ** 2 + grid.y[:, None] ** 2) > radius**2


def _file_meta(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _save(ds: Dataset, path: Path) -> None:
    """Write a Part 10 file: preamble, file meta, Explicit VR Little Endian."""
    ds.file_meta = _file_meta(ds)
    ds.save_as(path, enforce_file_format=True)


def _encode(ds: Dataset) -> dict[int, bytes]:
    """Each element of ``ds`` encoded alone (Explicit VR Little Endian), keyed by tag."""
    out: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem)
        out[int(elem.tag)] = fp.getvalue()
    return out


@dataclass(frozen=True)
class _Format:
    """What an encoder needs to know about the stored values of one frame."""

    rows: int
    columns: int
    bits_stored: int
    pixel_representation: int

    @staticmethod
    def of(ds: Dataset) -> _Format:
        return _Format(
            int(ds.Rows), int(ds.Columns), int(ds.BitsStored), int(ds.PixelRepresentation)
        )


class _SeriesWriter:
    """Writes the images of one series, encoding the elements they share only once.

    pydicom spends milliseconds a file walking ~90 elements, and a series differs in five. Pixel
    data is written as given (Explicit VR Little Endian, or deflated with the rest of the data
    set) or compressed frame by frame and encapsulated, as ``syntax`` says.
    """

    def __init__(self, shared: Dataset, syntax: _Syntax | None = None) -> None:
        self._syntax = syntax or _SYNTAXES["explicit"]
        if self._syntax.lossy_method is not None:
            shared.LossyImageCompression = "01"
            shared.LossyImageCompressionMethod = self._syntax.lossy_method
        correct_ambiguous_vr(shared, is_little_endian=True)
        self._shared = _encode(shared)
        self._sop_class = shared.SOPClassUID
        self._format = _Format.of(shared)

    def write(self, path: Path, own: Dataset, frames: Sequence[bytes]) -> None:
        own.add(self._pixel_data(own, frames))
        parts = self._shared | _encode(own)
        own.SOPClassUID = self._sop_class
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, _file_meta(own, self._syntax.uid), enforce_standard=True)
        body = b"".join(parts[tag] for tag in sorted(parts))
        if self._syntax.encoder == "deflate":
            body = _deflate(body)
        path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body)

    def _pixel_data(self, own: Dataset, frames: Sequence[bytes]) -> DataElement:
        if not self._syntax.encapsulated:
            return DataElement(0x7FE00010, "OW", b"".join(frames))
        encoded = [_encode_frame(self._syntax, frame, self._format) for frame in frames]
        if self._syntax.lossy_method is not None:
            ratio = sum(map(len, frames)) / sum(map(len, encoded))
            own.LossyImageCompressionRatio = _ds(ratio)
        return DataElement(
            0x7FE00010, "OB", encapsulate(encoded, has_bot=True), is_undefined_length=True
        )


def _encode_frame(syntax: _Syntax, frame: bytes, fmt: _Format) -> bytes:
    """One frame's stored values compressed in an encapsulated transfer syntax."""
    if syntax.encoder == "dcmtk":
        return _dcmcjpeg(frame, fmt)
    extra: dict[str, Any] = {"jls_error": syntax.jls_error} if syntax.jls_error else {}
    encoded = get_encoder(syntax.uid).encode(
        frame,
        rows=fmt.rows,
        columns=fmt.columns,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=fmt.bits_stored,
        pixel_representation=fmt.pixel_representation,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
        **extra,
    )
    return bytes(encoded)


def _dcmcjpeg(frame: bytes, fmt: _Format) -> bytes:
    """One frame as JPEG lossless (process 14, selection value 1), encoded by DCMTK's dcmcjpeg.

    pydicom has no encoder for it. dcmcjpeg gets a bare image holding just the frame; its
    encapsulated frame is taken back, so the phantom's own header stays as it is (DCMTK would add
    a DerivationDescription and its own implementation UID).
    """
    tool = shutil.which("dcmcjpeg")
    if tool is None:
        raise RuntimeError("transfer syntax jpeg-lossless needs DCMTK's dcmcjpeg on PATH")
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "2.25.1"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = fmt.rows, fmt.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = fmt.pixel_representation
    ds.PixelData = frame
    with tempfile.TemporaryDirectory(prefix="phantom-jpeg-") as tmp:
        source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        _save(ds, source)
        done = subprocess.run(
            [tool, "+e1", "+un", str(source), str(target)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"dcmcjpeg failed ({done.returncode}): {done.stderr.strip()}")
        encoded = dcmread(target)
        if str(encoded.file_meta.TransferSyntaxUID) != JPEGLosslessSV1:
            raise RuntimeError("dcmcjpeg did not write JPEG lossless, selection value 1")
        return next(generate_frames(encoded.PixelData, number_of_frames=1))


def _deflate(body: bytes) -> bytes:
    """The data set as one raw deflate stream (PS3.5 A.5), padded to an even length."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = packer.compress(body) + packer.flush()
    return out + b"\0" if len(out) % 2 else out


def _axial_plane(ds: Dataset, grid: _Grid) -> None:
    """Geometry shared by every image of an axial series."""
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(float(grid.y[1] - grid.y[0])), _ds(float(grid.x[1] - grid.x[0]))]
    ds.ReconstructionDiameter = _ds(float(grid.x[1] - grid.x[0]) * grid.x.size)
    ds.Rows, ds.Columns = grid.shape


def _axial_image(uid: str, grid: _Grid, z: float, instance: int) -> Dataset:
    """What differs from image to image of an axial series (pixel data aside)."""
    own = Dataset()
    own.SOPInstanceUID = uid
    own.InstanceNumber = instance
    own.ImagePositionPatient = [_ds(float(grid.x[0])), _ds(float(grid.y[0])), _ds(z)]
    own.SliceLocation = _ds(z)
    return own


# --- Enhanced CT Image (one multi-frame instance) ---------------------------------------------

# Value 3 (image flavor) VOLUME: Enhanced CT has no AXIAL term; the orientation says axial.
_ENHANCED_IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
# Top-level attributes an Enhanced CT instance shares with the single-frame images; the
# acquisition and reconstruction ones move into functional groups.
_ENHANCED_COPIED = (
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "PatientPosition",
    "ProtocolName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "AcquisitionNumber",
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "LossyImageCompression",
    "BurnedInAnnotation",
)


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _enhanced_ct_dataset(ids: _Identity, anat: _Anatomy, series: _Series, uid: str) -> Dataset:
    """The Enhanced CT Image modules of a series, with the functional groups all frames share.

    Values are those of the single-frame images (``_ct_series_dataset``), moved where the
    Enhanced CT IOD keeps them: Pixel Measures, Plane Orientation, Pixel Value Transformation,
    Frame VOI LUT, CT Image Frame Type and the CT acquisition, reconstruction and exposure macros.
    """
    single = _ct_series_dataset(ids, anat, series, uid)
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    _patient_study(ds, ids)
    for keyword in _ENHANCED_COPIED:
        ds.add(single[keyword])
    ds.ImageType = _ENHANCED_IMAGE_TYPE
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = STUDY_DATE + ids.time(series.offset_s)
    ds.AcquisitionDuration = CHEST_LENGTH_MM / float(single.TableSpeed)
    ds.ContentQualification = "PRODUCT"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionContextSequence = []
    look = _KERNEL_LOOK.get(series.kernel, _KERNEL_LOOK["STANDARD"])
    shared = _item(
        PlaneOrientationSequence=[_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])],
        PixelValueTransformationSequence=[
            _item(
                RescaleIntercept=single.RescaleIntercept,
                RescaleSlope=single.RescaleSlope,
                RescaleType="HU",
            )
        ],
        FrameVOILUTSequence=[
            _item(WindowCenter=single.WindowCenter, WindowWidth=single.WindowWidth)
        ],
        CTImageFrameTypeSequence=[
            _item(
                FrameType=_ENHANCED_IMAGE_TYPE,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
        CTAcquisitionTypeSequence=[
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        ],
        CTAcquisitionDetailsSequence=[
            _item(
                DataCollectionDiameter=single.DataCollectionDiameter,
                GantryDetectorTilt=single.GantryDetectorTilt,
                TableHeight=single.TableHeight,
                RotationDirection=single.RotationDirection,
                RevolutionTime=single.RevolutionTime,
                SingleCollimationWidth=single.SingleCollimationWidth,
                TotalCollimationWidth=single.TotalCollimationWidth,
            )
        ],
        CTTableDynamicsSequence=[
            _item(
                TableSpeed=single.TableSpeed,
                TableFeedPerRotation=single.TableFeedPerRotation,
                SpiralPitchFactor=single.SpiralPitchFactor,
            )
        ],
        CTGeometrySequence=[
            _item(
                DistanceSourceToDetector=single.DistanceSourceToDetector,
                DistanceSourceToDataCollectionCenter=float(single.DistanceSourceToPatient),
            )
        ],
        CTExposureSequence=[
            _item(
                ExposureTimeInms=float(single.ExposureTime),
                XRayTubeCurrentInmA=float(single.XRayTubeCurrent),
                ExposureInmAs=float(single.Exposure),
                ExposureModulationType="NONE",
                CTDIvol=single.CTDIvol,
                CTDIPhantomTypeCodeSequence=single.CTDIPhantomTypeCodeSequence,
            )
        ],
        CTXRayDetailsSequence=[
            _item(
                KVP=single.KVP,
                FocalSpots=single.FocalSpots,
                FilterType="BUTTERFLY",
                FilterMaterial="ALUMINUM",
            )
        ],
        FrameAnatomySequence=[
            _item(AnatomicRegionSequence=[_code("43799004", "SCT", "Chest")], FrameLaterality="U")
        ],
        IrradiationEventIdentificationSequence=[
            _item(IrradiationEventUID=ids.uid("irradiation", series.number))
        ],
    )
    shared.CTReconstructionSequence = [
        _item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ",
            ConvolutionKernel=series.kernel,
            ConvolutionKernelGroup=look.group,
            ReconstructionAngle=360.0,
            ImageFilter="NONE",
        )
    ]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _enhanced_frames(
    ds: Dataset, ids: _Identity, series: _Series, grid: _Grid, positions: Sequence[float]
) -> None:
    """Image size, dimensions and the per-frame groups: frame k is at ``positions[k - 1]``.

    One stack (StackID 1) whose in-stack position numbers run in table order, apex first, as the
    frames do; those two are the dimensions. Each frame's acquisition time follows the table.
    """
    _axial_plane(ds, grid)  # at the top level for now: moved into functional groups below
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PixelMeasuresSequence = [
        _item(PixelSpacing=ds.PixelSpacing, SliceThickness=_ds(float(series.thickness or 0.0)))
    ]
    reconstruction = shared.CTReconstructionSequence[0]
    reconstruction.ReconstructionDiameter = ds.ReconstructionDiameter
    reconstruction.ReconstructionPixelSpacing = [float(v) for v in ds.PixelSpacing]
    del ds.ImageOrientationPatient, ds.PixelSpacing, ds.ReconstructionDiameter
    ds.NumberOfFrames = len(positions)
    organization = ids.uid("dimensions", series.number)
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organization)]
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=organization,
            DimensionIndexPointer=pointer,
            FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
            DimensionDescriptionLabel=label,
        )
        for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position"))
    ]
    table_speed = float(ds.SharedFunctionalGroupsSequence[0].CTTableDynamicsSequence[0].TableSpeed)
    step_s = CHEST_LENGTH_MM / len(positions) / table_speed
    x0, y0 = _ds(float(grid.x[0])), _ds(float(grid.y[0]))
    frames = []
    for k, z in enumerate(positions, start=1):
        when = STUDY_DATE + ids.time(series.offset_s + (k - 1) * step_s)
        frames.append(
            _item(
                FrameContentSequence=[
                    _item(
                        FrameAcquisitionNumber=1,
                        FrameReferenceDateTime=when,
                        FrameAcquisitionDateTime=when,
                        FrameAcquisitionDuration=round(step_s * 1000.0, 3),
                        StackID="1",
                        InStackPositionNumber=k,
                        DimensionIndexValues=[1, k],
                    )
                ],
                PlanePositionSequence=[_item(ImagePositionPatient=[x0, y0, _ds(z)])],
                CTPositionSequence=[
                    _item(
                        TablePosition=z,
                        ReconstructionTargetCenterPatient=[0.0, 0.0, z],
                        DataCollectionCenterPatient=[0.0, 0.0, z],
                    )
                ],
            )
        )
    ds.PerFrameFunctionalGroupsSequence = frames


def _slice_positions(anat: _Anatomy, count: int) -> list[float]:
    """Slice centres spread evenly from the apex end to the bases (table order)."""
    step = CHEST_LENGTH_MM / count
    return [round(anat.z_top - (k + 0.5) * step, 4) for k in range(count)]


THIN = _Series(2, "CHEST 1.0 LUNG", "LUNG", 1.0, "AXIAL", (-600.0, 1200.0), 40.0)
# soft-tissue kernel on 5 mm: smoother, less noise
THICK = _Series(
    3, "CHEST 5.0 STANDARD", "STANDARD", 5.0, "AXIAL", (40.0, 400.0), 40.0, blur_passes=4, noise=0.4
)
SCOUT = _Series(1, "Topogram 0.6 T20s", "T20s", None, "LOCALIZER", (1800.0, 3000.0), 0.0)


def _thin_series(options: _Options) -> _Series:
    """The thin series as the options reconstruct it (THIN itself for the defaults).

    Quantum noise goes with 1 / sqrt(slice thickness); the kernel sets sharpness and noise.
    """
    look = _KERNEL_LOOK[options.kernel]
    mm = options.thickness
    shown = f"{mm:.1f}" if mm == round(mm) else _ds(mm)
    return replace(
        THIN,
        description=f"CHEST {shown} {options.kernel}",
        kernel=options.kernel,
        thickness=mm,
        blur_passes=look.blur_passes,
        noise=look.noise / math.sqrt(mm),
    )


def _render_series(
    anat: _Anatomy, grid: _Grid, series: _Series, count: int, detail: _Detail
) -> Iterator[tuple[int, float, F32, Mask]]:
    """The slices of an axial series in table order: (index, z, HU, COVID lesion mask)."""
    detail = replace(
        detail, blur_passes=series.blur_passes, noise_sigma=anat.noise_sigma * series.noise
    )
    for k, z in enumerate(_slice_positions(anat, count)):
        hu, _, lesions = _render(anat, grid, z, detail)
        yield k, z, hu, lesions


def _padding(ds: Dataset, grid: _Grid, anat: _Anatomy, syntax: _Syntax) -> Mask | None:
    """Declare GE-like padding outside the reconstruction circle; where it goes (signed only).

    Near-lossless compression moves the padding by up to NEAR, so a lossy syntax declares a
    padding range (value and range limit) around it instead of one value.
    """
    if not anat.signed_pixels:
        return None
    outside = _outside_circle(grid)
    spread = syntax.jls_error
    ds.add_new(0x00280120, "SS", _PADDING - spread)  # Pixel Padding Value
    if spread:
        ds.add_new(0x00280121, "SS", _PADDING + spread)  # Pixel Padding Range Limit
    return outside


def _write_axial_series(
    folder: Path,
    anat: _Anatomy,
    ids: _Identity,
    series: _Series,
    *,
    count: int,
    detail: _Detail,
    thin: bool,
    syntax: _Syntax,
    variant: tuple[str, ...] = (),
) -> tuple[list[str], Mask]:
    """Render and write one axial series; returns its SOP Instance UIDs and lesion masks."""
    grid = _Grid.square(MATRIX, anat.pixel_spacing)
    shared = _ct_series_dataset(ids, anat, series, ids.uid("series", series.number, *variant))
    _axial_plane(shared, grid)
    outside = _padding(shared, grid, anat, syntax)
    writer = _SeriesWriter(shared, syntax)
    uids: list[str] = []
    masks = np.zeros((count if thin else 0, *grid.shape), dtype=bool)
    for k, z, hu, lesions in _render_series(anat, grid, series, count, detail):
        if thin:
            masks[k] = lesions
        uid = ids.uid("image", series.number, k + 1, *variant)
        own = _axial_image(uid, grid, z, k + 1)
        path = folder / f"CT_{series.number:02d}_{k + 1:04d}.dcm"
        writer.write(path, own, [_pixels(hu, anat, outside)])
        uids.append(uid)
    return uids, masks


def _write_enhanced_series(
    folder: Path,
    anat: _Anatomy,
    ids: _Identity,
    series: _Series,
    *,
    count: int,
    detail: _Detail,
    syntax: _Syntax,
    variant: tuple[str, ...],
) -> tuple[str, Mask]:
    """Render the series as one Enhanced CT Image instance; returns its UID and lesion masks.

    Frame k (1-based) is slice k of the single-frame series: same table position, same pixels.
    """
    grid = _Grid.square(MATRIX, anat.pixel_spacing)
    positions = _slice_positions(anat, count)
    ds = _enhanced_ct_dataset(ids, anat, series, ids.uid("series", series.number, *variant))
    _enhanced_frames(ds, ids, series, grid, positions)
    outside = _padding(ds, grid, anat, syntax)
    masks = np.zeros((count, *grid.shape), dtype=bool)
    frames: list[bytes] = []
    for k, _, hu, lesions in _render_series(anat, grid, series, count, detail):
        masks[k] = lesions
        frames.append(_pixels(hu, anat, outside))
    own = Dataset()
    own.SOPInstanceUID = ids.uid("image", series.number, 1, *variant)
    _SeriesWriter(ds, syntax).write(folder / f"CT_{series.number:02d}_enhanced.dcm", own, frames)
    return str(own.SOPInstanceUID), masks


def _write_localizer(
    folder: Path,
    anat: _Anatomy,
    ids: _Identity,
    syntax: _Syntax | None = None,
    variant: tuple[str, ...] = (),
) -> None:
    """A frontal scout image, as the scanner sends first."""
    width, height = 420.0, 420.0
    top = anat.z_top + 70.0
    proj = _projection(anat, width_mm=width, height_mm=height, z_top=top)
    ds = _ct_series_dataset(ids, anat, SCOUT, ids.uid("series", SCOUT.number, *variant))
    sop_instance_uid = ids.uid("image", SCOUT.number, 1, *variant)
    ds.InstanceNumber = 1
    col, row = width / MATRIX, height / MATRIX
    ds.ImagePositionPatient = [_ds(-width / 2 + col / 2), "0", _ds(top - row / 2)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [_ds(row), _ds(col)]
    hu = proj * np.float32(140.0) - np.float32(1024.0)
    ds.Rows, ds.Columns = hu.shape
    path = folder / f"CT_{SCOUT.number:02d}_0001.dcm"
    if syntax is None or syntax.encoder == "native":
        ds.SOPInstanceUID = sop_instance_uid
        ds.PixelData = _pixels(hu, anat)
        _save(ds, path)
        return
    own = Dataset()
    own.SOPInstanceUID = sop_instance_uid
    _SeriesWriter(ds, syntax).write(path, own, [_pixels(hu, anat)])


def _write_ct_study(
    out_dir: Path,
    *,
    label: Label,
    index: int,
    slices: int,
    seed: int,
    options: _Options | None = None,
) -> PhantomStudy:
    options = options or _Options()
    syntax = options.syntax
    rng = np.random.default_rng([seed, 0 if label == "covid" else 1, index])
    anat = _draw_anatomy(rng, label=label, slices=slices, mix=options.mix)
    ids = _Identity.make(seed=seed, label=label, index=index, rng=rng, cohort=options.cohort())
    folder = out_dir / f"{label}_{index:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.dcm"):
        stale.unlink()
    detail = _Detail.make(rng, (MATRIX, MATRIX))
    others = options.variant(thin=False)
    _write_localizer(folder, anat, ids, syntax, others)
    thin, variant = _thin_series(options), options.variant(thin=True)
    if options.enhanced:
        uid, masks = _write_enhanced_series(
            folder, anat, ids, thin, count=slices, detail=detail, syntax=syntax, variant=variant
        )
        uids = [uid] * slices
    else:
        uids, masks = _write_axial_series(
            folder,
            anat,
            ids,
            thin,
            count=slices,
            detail=detail,
            thin=True,
            syntax=syntax,
            variant=variant,
        )
    thick = max(8, round(slices / 5))
    _write_axial_series(
        folder,
        anat,
        ids,
        THICK,
        count=thick,
        detail=detail,
        thin=False,
        syntax=syntax,
        variant=others,
    )
    # InstanceNumbers of the thin slices, or frame numbers of the Enhanced CT instance: the same
    instances = np.arange(1, slices + 1, dtype=np.int32)
    np.savez_compressed(
        folder / LESION_MASKS_NAME,
        masks=masks,
        instance_numbers=instances,
        sop_instance_uids=np.array(uids),
    )
    lesion_instances = [int(n) for n, m in zip(instances, masks, strict=True) if m.any()]
    return PhantomStudy(
        study_uid=ids.study_uid,
        folder=folder,
        label=label,
        patient_id=ids.patient_id,
        lung_series_uid=ids.uid("series", THIN.number, *variant),
        lesion_instances=lesion_instances,
        severity=anat.severity,
    )


def _write_labels(path: Path, studies: Iterable[PhantomStudy]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            ["study_uid", "folder", "label", "patient_id", "lesion_instances", "severity"]
        )
        for st in studies:
            lesions = ";".join(str(n) for n in st.lesion_instances)
            writer.writerow(
                [st.study_uid, st.folder.name, st.label, st.patient_id, lesions, st.severity]
            )


def _sc_dataset(
    ids: _Identity, *, series_uid: str, instance: int, pixels: NDArray[np.uint8]
) -> Dataset:
    """A Secondary Capture of a chest radiograph-like picture (no CT in the study)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ids.uid("sc", instance)
    _patient_study(ds, ids)
    ds.StudyDescription = "XR CHEST"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Chest radiograph capture"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = ids.time(60.0 * instance)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.tobytes()
    return ds
