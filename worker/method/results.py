"""Plain data that flows between the pipeline stages and into the outputs.

Kept free of torch so that output building and recording can be tested and typed on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hrct_triage.common import paper
from hrct_triage.common.errors import AnalysisError


class NotApplicable(AnalysisError):
    """The study holds no series fit for analysis; ``reason`` names the rule that failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ModelInfo:
    """What the SR, the worklist and the model card say about the weights that were used.

    The decision values (threshold, trim fraction) are not here but in :class:`StudyAnalysis`:
    a setting may override the checkpoint's, and the outputs state the values applied.
    """

    name: str
    version: str
    sha256: str | None
    untrained: bool
    trained_on: str
    input_size: int = paper.INPUT_SIZE
    window_width: float = paper.LUNG_WINDOW_WIDTH
    window_level: float = paper.LUNG_WINDOW_LEVEL
    manufacturer: str = "hrct-triage"


@dataclass(frozen=True)
class SliceResult:
    """COVID-19 probability of one analysed slice (softmax of the COVID class)."""

    sop_instance_uid: str
    probability: float
    frame_number: int | None = None  # 1-based frame of an Enhanced CT instance; None otherwise


@dataclass(frozen=True)
class HeatMap:
    """One slice chosen for a secondary capture, with its class activation map.

    ``lung_window`` and ``cam`` have the source image's rows x columns; both are in [0, 1].
    ``weight`` is the slice's share of the study decision (its probability among the kept slices).
    """

    sop_instance_uid: str
    weight: float
    probability: float
    lung_window: npt.NDArray[np.float32]
    cam: npt.NDArray[np.float32]
    frame_number: int | None = None  # 1-based frame of an Enhanced CT instance; None otherwise


@dataclass(frozen=True)
class StudyAnalysis:
    """The result of analysing one series of a study, as the paper defines it."""

    study_uid: str
    series_uid: str
    probability: float
    threshold: float
    positive: bool
    slices: list[SliceResult]  # every analysed (lung) slice, in table order
    kept: list[str]  # SOP Instance UIDs averaged after trimming each end
    heatmaps: list[HeatMap]
    model: ModelInfo
    # Share of the lung slices dropped at each end before the mean (with ``threshold``, the
    # decision rule this analysis applied).
    trim_fraction: float = paper.TRIM_FRACTION
    timings: dict[str, float] = field(default_factory=dict)
    # Which analysis of the study this is (the worklist's generation): part of the output UIDs,
    # so a requeued study gets new objects that supersede the old ones.
    analysis_id: str = ""
    # Statistics of the analysed input (``worker.method.input_statistics``) and the acquisition
    # of the analysed series, recorded for drift watch and the domain guard.
    input_stats: dict[str, Any] | None = None
    station_name: str | None = None  # (0008,1010)
    convolution_kernel: str | None = None  # (0018,1210), values joined with "\\"
    slice_thickness: float | None = None  # (0018,0050), mm
    # How far the input lies from the checkpoint's training inputs (``worker.method.domain``:
    # 1.0 is the cut-off) and whether it lies inside; None when the checkpoint has no reference.
    domain_score: float | None = None
    in_domain: bool | None = None
