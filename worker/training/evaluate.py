"""Subject-level evaluation of a checkpoint, reported as the paper reports it.

Each study is scored from its DICOM files by the same steps the worker runs (series selection,
HU volume, lung slices, ``model_input``, ``forward``, trimmed mean), so the numbers describe the
gateway, not a training-time shortcut. Per set (e.g. validation and test, the columns of the
paper's Table 1): ROC AUC with its 95% CI, accuracy, sensitivity, specificity and F1 at the
threshold, the same along the threshold (Figure 4), and the ROC and threshold plots. A reader's
CSV gives the fourfold table of Table 2. Positive studies with ``lesion_masks.npz`` (the phantom
writes one) also get the pointing game: is the peak of the class activation map, as the secondary
capture shows it, within ``pointing_tolerance_mm`` of a lesion on each lesion slice?

Outputs in ``output_dir``: ``report.md``, ``report.json``, ``roc-<set>.png``,
``threshold-<set>.png``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hrct_triage.common.diagnostic_metrics import (
    DEFAULT_BOOTSTRAP,
    CiMethod,
    Fourfold,
    at_threshold,
    auc_interval,
    fourfold,
    threshold_sweep,
)
from hrct_triage.common.diagnostic_plots import roc_plot, threshold_plot
from hrct_triage.worker.memory import keep_freed_memory
from hrct_triage.worker.method.decision import DecisionRule, decision_rule
from hrct_triage.worker.method.inference import (
    DEFAULT_BATCH_SIZE,
    forward,
    study_probability,
)
from hrct_triage.worker.method.model import LoadedModel, load_model
from hrct_triage.worker.method.preprocess import lung_slices, model_input
from hrct_triage.worker.method.results import NotApplicable
from hrct_triage.worker.method.series import select_series
from hrct_triage.worker.method.volume import CTVolume, load_volume
from hrct_triage.worker.training.dataset import study_paths
from hrct_triage.worker.training.labels import LabelledStudy, parse_label, read_labels
from hrct_triage.worker.training.pointing import DEFAULT_POINTING_TOLERANCE_MM, pointing_game
from hrct_triage.worker.training.report import markdown_report

__all__ = [
    "DEFAULT_POINTING_TOLERANCE_MM",
    "EvaluateConfig",
    "ScoredStudy",
    "evaluate",
    "read_reader",
    "reader_fourfold",
    "score_study",
]

log = logging.getLogger(__name__)

LESION_MASKS_NAME = "lesion_masks.npz"  # as hrct_triage.phantoms writes it next to the DICOM files


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate and how; the defaults are the paper's (the decision rule from the
    checkpoint, ``worker.method.decision``)."""

    data_dir: Path
    checkpoint: Path
    labels: Path | None = None  # default: data_dir / "labels.csv"
    output_dir: Path = Path("runs/evaluate")
    splits: tuple[str, ...] = ()  # sets to report; empty: every study as one set, "all"
    threshold: float | None = None  # default: the checkpoint's threshold
    trim_fraction: float | None = None  # default: the checkpoint's trim fraction
    reader: Path | None = None  # CSV with study_uid and reader (positive/negative)
    ci_method: CiMethod = "delong"
    confidence: float = 0.95
    n_bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    pointing_tolerance_mm: float = DEFAULT_POINTING_TOLERANCE_MM
    batch_size: int = DEFAULT_BATCH_SIZE
    min_slices: int = 20
    device: str | None = None
    progress: bool = True

    @property
    def labels_path(self) -> Path:
        return self.labels or self.data_dir / "labels.csv"


@dataclass(frozen=True)
class ScoredStudy:
    """One study's subject-level result; ``excluded`` says why it has no probability."""

    key: str
    split: str
    positive: bool
    probability: float | None
    lung_slices: int = 0
    excluded: str | None = None
    pointing_hits: int = 0
    pointing_slices: int = 0


def evaluate(config: EvaluateConfig, *, console: Console | None = None) -> dict[str, Any]:
    """Score the studies, compute the statistics, write report, JSON and plots; return the JSON."""
    studies = _chosen(read_labels(config.labels_path, data_dir=config.data_dir), config.splits)
    keep_freed_memory()  # study after study, as in the worker (worker.memory)
    model = load_model(config.checkpoint, allow_untrained=False, device=config.device)
    rule = decision_rule(
        model.metadata, threshold=config.threshold, trim_fraction=config.trim_fraction
    )
    threshold = rule.threshold
    scored = _score_all(studies, model, rule, config, console or Console(stderr=True))
    config.output_dir.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in dict.fromkeys(s.split for s in scored):
        members = [s for s in scored if s.split == name]
        sets[name] = _set_report(name, members, threshold, config)
    reader = None
    if config.reader is not None:
        truth = {
            s.key: s.positive for s in read_labels(config.labels_path, data_dir=config.data_dir)
        }
        reader = reader_fourfold(truth, read_reader(config.reader)).as_dict()
    document = {
        "model": {
            **asdict(model.info),
            "threshold": threshold,
            "trim_fraction": rule.trim_fraction,
            "metrics": json.loads(model.metadata.metrics or "{}"),
        },
        "checkpoint": str(config.checkpoint),
        "labels": str(config.labels_path),
        "threshold": threshold,
        "trim_fraction": rule.trim_fraction,
        "ci": {
            "method": config.ci_method,
            "confidence": config.confidence,
            "bootstrap_replicates": config.n_bootstrap if config.ci_method == "bootstrap" else None,
        },
        "pointing_tolerance_mm": config.pointing_tolerance_mm,
        "sets": sets,
        "reader": reader,
        "studies": [asdict(s) for s in scored],
    }
    (config.output_dir / "report.json").write_text(
        json.dumps(document, indent=2) + "\n", encoding="utf-8"
    )
    (config.output_dir / "report.md").write_text(markdown_report(document), encoding="utf-8")
    return document


def _chosen(studies: Sequence[LabelledStudy], splits: Sequence[str]) -> list[LabelledStudy]:
    if not splits:
        return [
            LabelledStudy(s.key, s.folder, s.positive, s.patient_id, s.lesion_instances, "all")
            for s in studies
        ]
    if any(s.split is None for s in studies):
        raise ValueError(
            "--split needs a labels CSV with a split column (training writes one: "
            "<output-dir>/split.csv)"
        )
    chosen = [s for s in studies if s.split in splits]
    if not chosen:
        raise ValueError(f"no study in split(s) {', '.join(splits)}")
    order = {name: i for i, name in enumerate(splits)}
    return sorted(chosen, key=lambda s: order[s.split or ""])


def _score_all(
    studies: Sequence[LabelledStudy],
    model: LoadedModel,
    rule: DecisionRule,
    config: EvaluateConfig,
    console: Console,
) -> list[ScoredStudy]:
    scored: list[ScoredStudy] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not config.progress) as bars:
        task = bars.add_task("evaluate", total=len(studies))
        for study in studies:
            scored.append(
                score_study(
                    study,
                    model,
                    trim_fraction=rule.trim_fraction,
                    min_slices=config.min_slices,
                    batch_size=config.batch_size,
                    tolerance_mm=config.pointing_tolerance_mm,
                )
            )
            bars.advance(task)
    return scored


def score_study(
    study: LabelledStudy,
    model: LoadedModel,
    *,
    trim_fraction: float | None = None,
    min_slices: int = 20,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tolerance_mm: float = DEFAULT_POINTING_TOLERANCE_MM,
) -> ScoredStudy:
    """The study probability as the worker computes it, plus the pointing game on lesion slices.

    ``trim_fraction``: None for the checkpoint's, as in ``worker.method.decision``.

    A study the worker would answer with ``not_applicable`` is excluded, with the reason.
    """
    split = study.split or "all"
    try:
        volume = load_volume(select_series(study_paths(study.folder), min_slices=min_slices))
        lung = np.flatnonzero(lung_slices(volume.hu, pixel_spacing=volume.pixel_spacing))
        if lung.size == 0:
            raise NotApplicable("no slice shows lung parenchyma")
    except NotApplicable as exc:
        log.warning("%s excluded: %s", study.key, exc.reason)
        return ScoredStudy(study.key, split, study.positive, None, excluded=exc.reason)
    info = model.info
    inputs = model_input(
        volume.hu,
        indices=lung,
        size=info.input_size,
        width=info.window_width,
        level=info.window_level,
    )
    scores = forward(model, inputs, batch_size=batch_size)
    rule = decision_rule(model.metadata, trim_fraction=trim_fraction)
    probability = study_probability(
        scores.probabilities.tolist(), trim_fraction=rule.trim_fraction
    ).probability
    hits, total = 0, 0
    if study.positive:
        hits, total = _pointing_game(study.folder, volume, lung, scores.cams, tolerance_mm)
    return ScoredStudy(
        study.key,
        split,
        study.positive,
        probability,
        int(lung.size),
        pointing_hits=hits,
        pointing_slices=total,
    )


def _pointing_game(
    folder: Path,
    volume: CTVolume,
    lung: npt.NDArray[np.intp],
    cams: npt.NDArray[np.float32],
    tolerance_mm: float,
) -> tuple[int, int]:
    """(hits, lesion slices): heat-map peaks within ``tolerance_mm`` of the lesion mask.

    The peak is sought where the worker draws its heat maps, in the slice's lung field
    (``worker.training.pointing``).
    """
    masks = _lesion_masks(folder, volume)
    if not masks:
        return 0, 0
    outcome = pointing_game(
        volume.hu,
        lung,
        cams,
        masks,
        pixel_spacing=volume.pixel_spacing,
        tolerance_mm=tolerance_mm,
    )
    return sum(outcome.values()), len(outcome)


def _lesion_masks(folder: Path, volume: CTVolume) -> dict[int, npt.NDArray[np.bool_]]:
    """Volume slice index -> lesion mask, matched by SOP Instance UID (frame for Enhanced CT)."""
    path = folder / LESION_MASKS_NAME
    if not path.exists():
        return {}
    with np.load(path) as data:
        masks = np.asarray(data["masks"], dtype=bool)
        uids = [str(u) for u in data["sop_instance_uids"]]
        numbers = [int(n) for n in data["instance_numbers"]]
    if masks.shape[1:] != volume.shape[1:]:
        log.warning(
            "%s: lesion masks are %s, images %s; pointing game skipped",
            path,
            masks.shape[1:],
            volume.shape[1:],
        )
        return {}
    if volume.frame_numbers is not None:
        by_number = {n: i for i, n in enumerate(numbers)}
        return {
            index: masks[by_number[frame]]
            for index, frame in enumerate(volume.frame_numbers)
            if frame in by_number
        }
    by_uid = {uid: i for i, uid in enumerate(uids)}
    return {
        index: masks[by_uid[uid]]
        for index, uid in enumerate(volume.sop_instance_uids)
        if uid in by_uid
    }


def _set_report(
    name: str, members: Sequence[ScoredStudy], threshold: float, config: EvaluateConfig
) -> dict[str, Any]:
    scored = [s for s in members if s.probability is not None]
    truth = np.asarray([s.positive for s in scored], dtype=bool)
    probabilities = np.asarray([s.probability for s in scored], dtype=np.float64)
    table = at_threshold(truth, probabilities, threshold)
    both = bool(truth.any() and not truth.all())
    auc = (
        auc_interval(
            truth,
            probabilities,
            method=config.ci_method,
            confidence=config.confidence,
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
        ).as_dict()
        if both
        else None
    )
    hits = sum(s.pointing_hits for s in scored)
    slices = sum(s.pointing_slices for s in scored)
    figures = {}
    if both:
        figures["roc"] = roc_plot(
            config.output_dir / f"roc-{name}.png",
            truth,
            probabilities,
            threshold=threshold,
            title=f"ROC, {name} set",
            auc=auc,
        )
    sweep = threshold_sweep(truth, probabilities) if scored else []
    if scored:
        figures["threshold"] = threshold_plot(
            config.output_dir / f"threshold-{name}.png",
            sweep,
            threshold=threshold,
            title=f"{name} set",
        )
    return {
        "studies": len(scored),
        "positives": int(truth.sum()),
        "negatives": int((~truth).sum()),
        "excluded": {s.key: s.excluded for s in members if s.excluded is not None},
        "auc": auc,
        "at_threshold": table.as_dict(),
        "pointing_game": {
            "hits": hits,
            "slices": slices,
            "rate": hits / slices if slices else None,
        },
        "sweep": sweep,
        "figures": {k: v.name for k, v in figures.items()},
    }


def read_reader(path: Path) -> dict[str, bool]:
    """A reader's calls: CSV with ``study_uid`` and ``reader`` (positive/negative, 1/0, ...)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.DictReader(handle)
        missing = {"study_uid", "reader"} - set(rows.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        calls: dict[str, bool] = {}
        for line, row in enumerate(rows, 2):
            key = (row.get("study_uid") or "").strip()
            if key in calls:
                raise ValueError(f"{path}:{line}: study {key} read twice")
            calls[key] = parse_label(row.get("reader") or "", where=f"{path}:{line}")
    return calls


def reader_fourfold(truth: Mapping[str, bool], reader: Mapping[str, bool]) -> Fourfold:
    """The reader's fourfold table (the paper's Table 2) over the studies the reader read."""
    unknown = sorted(set(reader) - set(truth))
    if unknown:
        raise ValueError(f"reader read studies not in the labels: {', '.join(unknown[:5])}")
    keys = sorted(reader)
    return fourfold([truth[k] for k in keys], [reader[k] for k in keys])
