"""Writing phantom CT studies as a scanner sends them, and their labels.

Each study is a localizer, the thin axial series the model reads and a thick soft-tissue series
the series picker must pass over, plus the ground truth (lesion masks, findings, lung). One
patient is drawn per study (``generator.draw_body``) and rendered once per series, so both
series show the same body and lesions. A study depends only on (seed, label, index, slices,
options), so asking for more studies never changes the ones already asked for.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from hrct_triage.phantoms.cohort import draw_case, group_of
from hrct_triage.phantoms.enhanced import write_enhanced_series
from hrct_triage.phantoms.generator import draw_body, render
from hrct_triage.phantoms.identity import Identity
from hrct_triage.phantoms.labels import LABELS_NAME, PhantomStudy, write_labels, write_lesion_masks
from hrct_triage.phantoms.options import MATRIX, THIN_THICKNESS_LIMIT, Options
from hrct_triage.phantoms.series import (
    THICK,
    THIN,
    thick_count,
    thick_spec,
    thin_series,
    thin_spec,
    write_axial_series,
    write_localizer,
)

Label = Literal["covid", "healthy"]


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
    negative_mix: Mapping[str, float] | None = None,
    matrix: int = MATRIX,
    randomise_acquisition: bool = False,
) -> list[PhantomStudy]:
    """Write ``covid`` positive and ``healthy`` negative (non-COVID) studies under ``out_dir``.

    Each study gets its own folder (``covid_001``, ``healthy_001``, ...) holding a localizer, the
    thin series of ``slices`` images and a thick soft-tissue series, plus ``lesion_masks.npz``
    (per thin slice: the COVID-19 lesion mask, for checking heat maps later; every finding's id;
    the lung). ``out_dir/labels.csv`` lists every study with its label (covid or healthy), group
    and findings. A study depends only on (seed, label, index, slices, options), so asking for
    more studies never changes the ones already asked for; ``progress(done, total)`` is called
    after each study so a CLI can show a bar.

    ``thickness`` (mm, at most 5) and ``kernel`` (one of ``KERNELS``, or ``RANDOM`` for one drawn
    per study) are the thin series' SliceThickness and ConvolutionKernel, and the generator
    renders it so (partial volume, sharpness, noise); its slice positions do not change.
    ``matrix`` is the Rows and Columns of every CT image (the same field of view).
    ``transfer_syntax`` (a ``TRANSFER_SYNTAXES`` name) applies to every CT image. With
    ``enhanced`` the thin series is one Enhanced CT Image instance (``CT_02_enhanced.dcm``) whose
    frame k is the single-frame series' slice k (table order, apex first): ``lesion_instances``
    and the masks' ``instance_numbers`` are then frame numbers, and its ``sop_instance_uids``
    repeat the one instance's UID. The patient (body, findings, noise draws) depends on the seed
    alone, never on these options. ``randomise_acquisition`` draws the thin series' kernel, noise
    level, field of view, slice thickness and matrix per study (domain randomisation for
    training sets), under series UIDs of their own.

    ``workers`` > 1 writes that many studies at once in child processes (a study takes seconds
    of one core); the files are the same as with one.

    ``severity_mix`` (shares of ``SEVERITY_MIX``'s keys, summing to 1) replaces the default
    cohort of positive studies, e.g. to train on more mild disease; ``negative_mix`` (shares of
    ``NEGATIVE_CHOICES``) sets the negatives' groups, which otherwise follow the generator's own
    draw of confounders. Other shares give a seed's studies other patients, so they get other
    UIDs and patient IDs; labels.csv names each study's severity, group and findings.
    """
    if covid < 0 or healthy < 0:
        raise ValueError("covid and healthy must be >= 0")
    if slices < 8:
        raise ValueError("slices must be >= 8 to cover the chest")
    options = Options(
        thickness=float(thickness),
        kernel=kernel.upper(),
        transfer_syntax=transfer_syntax.lower(),
        enhanced=enhanced,
        severity_mix=None if severity_mix is None else tuple(severity_mix.items()),
        negative_mix=None if negative_mix is None else tuple(negative_mix.items()),
        matrix=matrix,
        randomise=randomise_acquisition,
    )
    options.check()
    if (options.thickness >= THIN_THICKNESS_LIMIT or options.randomise) and slices <= thick_count(
        slices
    ):
        raise ValueError(
            f"a thin series as thick as the soft-tissue series needs more slices than it "
            f"({thick_count(slices)}), so the series picker tells them apart; got {slices}"
        )
    if workers < 1:
        raise ValueError("workers must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[Label, int]] = [("covid", i + 1) for i in range(covid)]
    plan += [("healthy", i + 1) for i in range(healthy)]
    studies: list[PhantomStudy] = []
    write = partial(_write_planned, out_dir, slices, seed, options)
    with ExitStack() as stack:
        mapper = map if workers == 1 else stack.enter_context(ProcessPoolExecutor(workers)).map
        for done, study in enumerate(mapper(write, plan), start=1):
            studies.append(study)
            if progress is not None:
                progress(done, len(plan))
    write_labels(out_dir / LABELS_NAME, studies)
    return studies


def _write_planned(
    out_dir: Path, slices: int, seed: int, options: Options, planned: tuple[Label, int]
) -> PhantomStudy:
    """``_write_ct_study`` for one (label, index) of the plan; a module-level target for pools."""
    label, index = planned
    return _write_ct_study(
        out_dir, label=label, index=index, slices=slices, seed=seed, options=options
    )


def _write_ct_study(
    out_dir: Path,
    *,
    label: Label,
    index: int,
    slices: int,
    seed: int,
    options: Options | None = None,
) -> PhantomStudy:
    options = options or Options()
    syntax = options.syntax
    covid = label == "covid"
    cohort = options.cohort()
    # the study's own streams: who the patient is, who the header says, how it is reconstructed
    stream = [seed, 0 if covid else 1, index, zlib.crc32("|".join(cohort).encode())]
    rng = np.random.default_rng([*stream, 0])
    patient_seed = int(rng.integers(1 << 31))
    case = draw_case(rng, covid=covid, severity_mix=options.mix, negative_mix=options.negatives)
    signed = bool(rng.random() < 0.5)  # half the studies GE-like 16-bit signed, half 12-bit
    body = draw_body(patient_seed, label=label, findings=case.findings, severity=case.severity)
    ids = Identity.make(
        seed=seed,
        label=label,
        index=index,
        rng=np.random.default_rng([*stream, 1]),
        cohort=cohort,
        age=round(body.patient.age),
        sex="F" if body.patient.female else "M",
    )
    acquisition = options.acquisition(np.random.default_rng([*stream, 2]))
    folder = out_dir / f"{label}_{index:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.dcm"):
        stale.unlink()
    others = options.variant(thin=False)
    write_localizer(folder, body, ids, signed=signed, syntax=syntax, variant=others)
    thin = render(body, thin_spec(acquisition, slices))
    series, variant = thin_series(acquisition), options.variant(thin=True)
    if options.enhanced:
        uid = write_enhanced_series(
            folder, thin, ids, series, signed=signed, syntax=syntax, variant=variant
        )
        uids = [uid] * slices
    else:
        uids = write_axial_series(
            folder, thin, ids, series, signed=signed, syntax=syntax, variant=variant
        )
    thick = render(body, thick_spec(slices, options.matrix))
    write_axial_series(folder, thick, ids, THICK, signed=signed, syntax=syntax, variant=others)
    lesion_instances = write_lesion_masks(
        folder, thin.lesion, uids, findings=thin.findings, lung=thin.lung
    )
    return PhantomStudy(
        study_uid=ids.study_uid,
        folder=folder,
        label=label,
        patient_id=ids.patient_id,
        lung_series_uid=ids.uid("series", THIN.number, *variant),
        lesion_instances=lesion_instances,
        severity=body.plan.severity,
        group=group_of(covid=covid, findings=body.findings),
        findings=body.findings,
    )
