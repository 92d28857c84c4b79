"""Per-slice COVID-19 probabilities, the paper's study probability, and class activation maps.

The forward pass is torchvision's ``DenseNet.forward`` spelled out (features, ReLU, global average
pooling, classifier) so that the ReLU'd feature maps of the last dense block are at hand: the
class activation map of Zhou et al. 2016, which the paper's Figure 2 shows, is those maps weighted
by the classifier row of the COVID class. Weighting the 1024 x 7 x 7 maps costs ~50k
multiply-adds per slice against ~2.9 GFLOPs for the network, so the 7 x 7 map of every slice is
computed in the same pass and only the few slices that get a secondary capture are normalised and
upsampled; neither keeping the features nor running chosen slices again is needed.

Study probability, as in the paper: lung slices in table order, drop round(10%) at each end, mean
of the rest; positive when it reaches the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torchvision.models import DenseNet

from hrct_triage.worker.method.model import COVID_CLASS, LoadedModel

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "SliceScores",
    "StudyScore",
    "cam_image",
    "forward",
    "study_probability",
    "top_slices",
    "trim_count",
]

# 32 slices per batch, the paper's batch size: ~0.3 GB of activations in fp32, fills a GPU well.
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class SliceScores:
    """Network output for n slices: COVID probability and the raw CAM at feature resolution."""

    probabilities: npt.NDArray[np.float64]  # (n,), softmax of the COVID class
    cams: npt.NDArray[np.float32]  # (n, 7, 7) for 224 input: sum_k w[COVID, k] * relu(F_k)
    # (n, 1024): the globally average-pooled features the classifier reads (the domain guard's
    # view of the input; already computed for the logits, so keeping them is free)
    features: npt.NDArray[np.float32] = field(
        default_factory=lambda: np.zeros((0, 0), dtype=np.float32)
    )


@dataclass(frozen=True)
class StudyScore:
    """The paper's subject-level result over the lung slices."""

    probability: float
    kept: range  # indices into the lung slices that were averaged


def forward(
    model: LoadedModel, inputs: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> SliceScores:
    """Run the network over (n, 3, S, S) inputs in batches; probabilities and raw CAMs."""
    if inputs.ndim != 4 or inputs.shape[1] != 3:
        raise ValueError(f"inputs must be (n, 3, size, size), got shape {tuple(inputs.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    network = cast(DenseNet, model.module)
    covid_row = network.classifier.weight[COVID_CLASS].detach().float()
    probabilities: list[torch.Tensor] = []
    cams: list[torch.Tensor] = []
    pooled_features: list[torch.Tensor] = []
    with (
        torch.inference_mode(),
        torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.bf16),
    ):
        for start in range(0, inputs.shape[0], batch_size):
            batch = _to_device(inputs[start : start + batch_size], model)
            features = F.relu(network.features(batch))
            pooled = torch.flatten(F.adaptive_avg_pool2d(features, (1, 1)), 1)
            logits = network.classifier(pooled).float()
            probabilities.append(torch.softmax(logits, dim=1)[:, COVID_CLASS].cpu())
            pooled_features.append(pooled.float().cpu())
            with torch.autocast(model.device.type, enabled=False):  # einsum would go bf16
                cams.append(torch.einsum("k,nkhw->nhw", covid_row, features.float()).cpu())
    if not probabilities:
        return SliceScores(np.zeros(0), np.zeros((0, 0, 0), dtype=np.float32))
    return SliceScores(
        probabilities=torch.cat(probabilities).double().numpy(),
        cams=torch.cat(cams).numpy().astype(np.float32, copy=False),
        features=torch.cat(pooled_features).numpy().astype(np.float32, copy=False),
    )


def _to_device(batch: torch.Tensor, model: LoadedModel) -> torch.Tensor:
    if model.device.type == "cuda" and batch.device.type == "cpu":
        batch = batch.contiguous().pin_memory()  # pinned: the copy overlaps the GPU's work
    batch = batch.to(model.device, non_blocking=True)
    if model.channels_last:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch.contiguous()


def trim_count(n: int, fraction: float) -> int:
    """Slices dropped at each end: round(n * fraction), half up, leaving at least one slice."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    if n < 1:
        return 0
    return min(math.floor(n * fraction + 0.5), (n - 1) // 2)


def study_probability(probabilities: Sequence[float], *, trim_fraction: float) -> StudyScore:
    """Mean probability of the slices left after trimming each end (slices in table order)."""
    n = len(probabilities)
    if n == 0:
        raise ValueError("no slice probabilities to average")
    k = trim_count(n, trim_fraction)
    kept = range(k, n - k)
    return StudyScore(float(np.mean([probabilities[i] for i in kept])), kept)


def top_slices(
    probabilities: Sequence[float], kept: range, *, count: int = 3
) -> list[tuple[int, float]]:
    """The ``count`` kept slices with the highest probability, with their weight in the mean.

    A slice's weight is its probability over the sum of the kept probabilities, i.e. its share
    of the study probability. Ties go to the slice earlier in table order.
    """
    if count <= 0 or len(kept) == 0:
        return []
    total = float(sum(probabilities[i] for i in kept))
    ranked = sorted(kept, key=lambda i: (-probabilities[i], i))[:count]
    return [(i, float(probabilities[i]) / total if total > 0 else 1.0 / len(kept)) for i in ranked]


def cam_image(
    cam: npt.NDArray[np.float32],
    *,
    rows: int,
    columns: int,
    region: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.float32]:
    """A raw CAM -> ReLU, bilinearly upsampled to the slice, scaled to [0, 1] by its maximum.

    With ``region`` (the slice's lung field, ``worker.method.preprocess.lung_field``) the map is
    zero outside it and scaled by its maximum inside it. The CAM's cells are 32 input pixels (about
    5 cm) wide, so for a subpleural lesion the cell that straddles the pleura often peaks in the
    chest wall beside it; inside the lungs the same map peaks on the lesion (held-out phantoms:
    from 46% to 95% of the lesion slices of eight studies, where a random lung point scores 9%).
    """
    positive = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32)).clamp(min=0.0)
    heat = F.interpolate(
        positive[None, None], size=(rows, columns), mode="bilinear", align_corners=False
    )[0, 0]
    if region is not None:
        if region.shape != (rows, columns):
            raise ValueError(f"region is {region.shape}, the slice is {(rows, columns)}")
        heat = heat * torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))
    peak = float(heat.max()) if heat.numel() else 0.0
    if peak > 0.0:
        heat = heat / peak
    return heat.clamp_(0.0, 1.0).numpy()
