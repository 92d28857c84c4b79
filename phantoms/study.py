"""Writing phantom CT studies as a scanner sends them, and their labels.

Each study is a localizer, the thin axial lung-kernel series the model reads and a thick
soft-tissue series the series picker must pass over, plus ground-truth lesion masks. A study
depends only on (seed, label, index, slices, options), so asking for more studies never changes
the ones already asked for, and the defaults write the same bytes they always have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np

from hrct_triage.phantoms.anatomy import Label
from hrct_triage.phantoms.enhanced import write_enhanced_series
from hrct_triage.phantoms.identity import Identity
from hrct_triage.phantoms.labels import LABELS_NAME, PhantomStudy, write_labels, write_lesion_masks
from hrct_triage.phantoms.options import Options
from hrct_triage.phantoms.patient import draw_anatomy
from hrct_triage.phantoms.rendering import MATRIX, Detail
from hrct_triage.phantoms.series import (
    THICK,
    THIN,
    thin_series,
    write_axial_series,
    write_localizer,
)


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
    options = Options(
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
    rng = np.random.default_rng([seed, 0 if label == "covid" else 1, index])
    anat = draw_anatomy(rng, label=label, slices=slices, mix=options.mix)
    ids = Identity.make(seed=seed, label=label, index=index, rng=rng, cohort=options.cohort())
    folder = out_dir / f"{label}_{index:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.dcm"):
        stale.unlink()
    detail = Detail.make(rng, (MATRIX, MATRIX))
    others = options.variant(thin=False)
    write_localizer(folder, anat, ids, syntax, others)
    thin, variant = thin_series(options), options.variant(thin=True)
    if options.enhanced:
        uid, masks = write_enhanced_series(
            folder, anat, ids, thin, count=slices, detail=detail, syntax=syntax, variant=variant
        )
        uids = [uid] * slices
    else:
        uids, masks = write_axial_series(
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
    write_axial_series(
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
    lesion_instances = write_lesion_masks(folder, masks, uids)
    return PhantomStudy(
        study_uid=ids.study_uid,
        folder=folder,
        label=label,
        patient_id=ids.patient_id,
        lung_series_uid=ids.uid("series", THIN.number, *variant),
        lesion_instances=lesion_instances,
        severity=anat.severity,
    )
