"""DICOM studies -> cached network inputs -> the paper's training slices.

Training sees exactly what inference sees: the series is picked by ``worker.method.series``, the
volume is built by ``worker.method.volume``, lung slices come from
``worker.method.preprocess.lung_slices`` and the pixels from
``worker.method.preprocess.model_input``. Decoding a DICOM study costs far more than a training step
on a GPU, so each study is preprocessed once and kept as a ``.npy`` of its lung and lesion slices
(float16, one channel: the lung window maps to [0, 1], where float16 is exact to 2^-11, about 0.6
HU, far below CT noise) that later epochs memory-map.

Slice sampling follows the paper: a COVID-19 study contributes the slices that show a lesion,
a healthy study every third lung slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from hrct_triage.common import paper
from hrct_triage.worker.method.preprocess import LungSettings, lung_slices, model_input
from hrct_triage.worker.method.series import select_series
from hrct_triage.worker.method.volume import CTVolume, load_volume
from hrct_triage.worker.training.labels import LabelledStudy

__all__ = [
    "DEFAULT_NEGATIVE_STRIDE",
    "CachedStudy",
    "PreprocessSettings",
    "SliceDataset",
    "cache_study",
    "random_flips",
    "slice_numbers",
    "study_paths",
]

log = logging.getLogger(__name__)

DEFAULT_NEGATIVE_STRIDE = 3  # the paper: healthy studies give every third lung slice
_CACHE_FORMAT = 1  # bump when the cached content changes meaning
PHANTOM_MANUFACTURER = "hrct-triage phantom"  # what hrct_triage.phantoms writes in Manufacturer


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the pixels a study becomes; part of the cache key."""

    input_size: int = paper.INPUT_SIZE
    window_width: float = paper.LUNG_WINDOW_WIDTH
    window_level: float = paper.LUNG_WINDOW_LEVEL
    min_slices: int = 20
    lung: LungSettings = field(default_factory=LungSettings)


@dataclass(frozen=True)
class CachedStudy:
    """The preprocessed slices of one study that training or validation may use.

    Rows of ``inputs`` are the study's lung slices and lesion slices, in table order;
    ``lung[i]`` and ``lesion[i]`` say which kind row ``i`` is.
    """

    study: LabelledStudy
    inputs: npt.NDArray[np.float16]  # (rows, size, size), memory-mapped
    numbers: npt.NDArray[np.int64]  # InstanceNumber (frame number for Enhanced CT) of each row
    lung: npt.NDArray[np.bool_]
    lesion: npt.NDArray[np.bool_]
    phantom: bool  # written by hrct_triage.phantoms: the model card must say so

    def lung_rows(self) -> npt.NDArray[np.intp]:
        """Rows of the lung slices in table order: what inference averages over."""
        return np.flatnonzero(self.lung)

    def training_rows(
        self, *, negative_stride: int = DEFAULT_NEGATIVE_STRIDE
    ) -> npt.NDArray[np.intp]:
        """The paper's sampling: lesion slices of a positive study, every n-th lung slice else.

        A positive study without per-slice labels falls back to all its lung slices (the study
        label for every slice: noisier, and logged); one whose labels list no lesion slice gives
        none, as the paper excluded patients without lesions on CT.
        """
        if negative_stride < 1:
            raise ValueError(f"negative_stride must be >= 1, got {negative_stride}")
        if not self.study.positive:
            return self.lung_rows()[::negative_stride]
        if self.study.lesion_instances is None:
            return self.lung_rows()
        return np.flatnonzero(self.lesion)


def study_paths(folder: Path) -> list[Path]:
    """The study's DICOM files: every regular file except our own non-DICOM sidecars."""
    if not folder.is_dir():
        raise FileNotFoundError(f"study folder {folder} does not exist")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() not in {".npz", ".npy", ".csv", ".json"}
    )


def slice_numbers(volume: CTVolume) -> npt.NDArray[np.int64]:
    """InstanceNumber of each slice (frame number for Enhanced CT), -1 where there is none."""
    if volume.frame_numbers is not None:
        return np.asarray(volume.frame_numbers, dtype=np.int64)
    return np.asarray(
        [int(ds.get("InstanceNumber", -1) or -1) for ds in volume.headers], dtype=np.int64
    )


def cache_study(
    study: LabelledStudy, *, cache_dir: Path, settings: PreprocessSettings = PreprocessSettings()
) -> CachedStudy:
    """Preprocess ``study`` once (or reuse the cache) and return its slices, memory-mapped."""
    paths = study_paths(study.folder)
    key = _cache_key(study, paths, settings)
    # Not ``with_suffix``: the key is a UID full of dots, and every study would share one file.
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if not (array_path.exists() and meta_path.exists()):
        _write_cache(study, paths, settings, array_path, meta_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    numbers = np.asarray(meta["numbers"], dtype=np.int64)
    lesions = study.lesion_instances or frozenset()
    return CachedStudy(
        study=study,
        inputs=np.load(array_path, mmap_mode="r"),
        numbers=numbers,
        lung=np.asarray(meta["lung"], dtype=bool),
        lesion=np.isin(numbers, sorted(lesions)),
        phantom=bool(meta["phantom"]),
    )


def _cache_key(study: LabelledStudy, paths: Sequence[Path], settings: PreprocessSettings) -> str:
    """A name that changes whenever the files, their labels or the preprocessing change."""
    digest = hashlib.sha256()
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    lesions = sorted(study.lesion_instances or ())
    payload: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "settings": asdict(settings),
        "files": files,
        "lesions": lesions,
    }
    digest.update(json.dumps(payload, sort_keys=True).encode())
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in study.key)[-80:]
    return f"{safe}-{digest.hexdigest()[:16]}"


def _write_cache(
    study: LabelledStudy,
    paths: Sequence[Path],
    settings: PreprocessSettings,
    array_path: Path,
    meta_path: Path,
) -> None:
    volume = load_volume(select_series(paths, min_slices=settings.min_slices))
    numbers = slice_numbers(volume)
    lung = lung_slices(volume.hu, pixel_spacing=volume.pixel_spacing, settings=settings.lung)
    lesion = np.isin(numbers, sorted(study.lesion_instances or ()))
    _warn_on_labels(study, numbers, lung, lesion)
    rows = np.flatnonzero(lung | lesion)
    pixels = model_input(
        volume.hu,
        indices=rows,
        size=settings.input_size,
        width=settings.window_width,
        level=settings.window_level,
    )
    array = pixels[:, 0].numpy().astype(np.float16)
    manufacturer = str(volume.headers[0].get("Manufacturer", "")) if volume.headers else ""
    meta = {
        "study": study.key,
        "numbers": numbers[rows].tolist(),
        "lung": lung[rows].tolist(),
        "phantom": manufacturer == PHANTOM_MANUFACTURER,
        "series_uid": volume.series_uid,
    }
    array_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(array_path, lambda handle: np.save(handle, array))
    _atomic_write(meta_path, lambda handle: handle.write(json.dumps(meta).encode()))
    log.info(
        "cached %s: %d of %d slices (%d lung) at %d px",
        study.key,
        len(rows),
        volume.shape[0],
        int(lung.sum()),
        settings.input_size,
    )


def _warn_on_labels(
    study: LabelledStudy,
    numbers: npt.NDArray[np.int64],
    lung: npt.NDArray[np.bool_],
    lesion: npt.NDArray[np.bool_],
) -> None:
    if study.lesion_instances:
        unknown = set(study.lesion_instances) - set(numbers.tolist())
        if unknown:
            log.warning(
                "%s: lesion instance(s) %s are not in the analysed series",
                study.key,
                ", ".join(map(str, sorted(unknown)[:5])),
            )
    if not study.positive:
        return
    if study.lesion_instances is None:
        log.warning(
            "%s: COVID-19 study without lesion_instances; training on all its lung slices",
            study.key,
        )
    elif not lesion.any():
        log.warning(
            "%s: COVID-19 study with no lesion slice; it gives no training slices", study.key
        )
    if not lung.any():
        log.warning("%s: no lung slice found; it cannot be scored", study.key)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file and rename, so a crash or a second rank never sees half."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as handle:
            write(handle)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class SliceDataset(Dataset[tuple[torch.Tensor, int]]):
    """Training slices of cached studies: (1, size, size) float32 in [0, 1] and the class."""

    def __init__(
        self, studies: Sequence[CachedStudy], *, negative_stride: int = DEFAULT_NEGATIVE_STRIDE
    ) -> None:
        self._studies = list(studies)
        self._items: list[tuple[int, int, int]] = [
            (index, int(row), int(study.study.positive))
            for index, study in enumerate(self._studies)
            for row in study.training_rows(negative_stride=negative_stride)
        ]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        study, row, label = self._items[index]
        pixels = np.asarray(self._studies[study].inputs[row], dtype=np.float32)
        return torch.from_numpy(pixels).unsqueeze(0), label

    def class_counts(self) -> tuple[int, int]:
        """(healthy, COVID-19) training slices."""
        positives = sum(label for _, _, label in self._items)
        return len(self._items) - positives, positives


def random_flips(
    batch: torch.Tensor, *, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Flip each image left-right and, independently, front-back with ``probability``.

    The paper's only augmentation, because a lesion means the same on either side; drawn from an
    explicit generator so an epoch's flips are reproducible, on resume too.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {probability}")
    n = batch.shape[0]
    # drawn on the CPU whatever the batch's device, so a run flips alike on a CPU and a GPU
    left_right = (torch.rand(n, generator=generator) < probability).to(batch.device)
    front_back = (torch.rand(n, generator=generator) < probability).to(batch.device)
    out = torch.where(left_right.view(n, 1, 1, 1), batch.flip(-1), batch)
    return torch.where(front_back.view(n, 1, 1, 1), out.flip(-2), out)
