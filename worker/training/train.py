"""The paper's training recipe, single process or DistributedDataParallel under ``torchrun``.

Recipe (Yang et al. 2020, "Algorithm development"): DenseNet-121, SGD with momentum 0.9, a step
learning rate with step size 5, random flips, 20 epochs, batch size 32, two GPUs. The paper does
not give the initial learning rate, the decay factor or any weight decay: we use 0.01 (the usual
start for SGD fine-tuning of a DenseNet at batch 32), a decay of 0.1 (StepLR's customary factor)
and no weight decay (the paper names none); all are options. The checkpoint kept is the epoch
with the best validation AUC at subject level (lung slices, trimmed mean, exactly as inference
scores a study); ties go to the lower subject-level log loss, i.e. the better calibrated model,
since the decision threshold is fixed beforehand.

``batch_size`` is the global batch: under ``torchrun`` each of the N processes takes
batch_size / N, so the recipe is the same on one GPU, two GPUs as in the paper, or CPU processes.
Backend: NCCL on CUDA, gloo on CPU. Rank 0 writes the files and draws the progress bars.

Files in ``output_dir``: ``split.csv`` (the labels with their split, for ``evaluate``),
``state.pt`` (everything ``--resume`` needs, rewritten after every epoch; plain tensors and
numbers, read with ``torch.load(weights_only=True)``), ``history.jsonl`` (one line per epoch) and,
unless ``checkpoint`` says otherwise, ``densenet121.safetensors`` with its ``.sha256``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from hrct_triage.common import paper
from hrct_triage.common.diagnostic_metrics import auc_interval
from hrct_triage.worker.method.inference import DEFAULT_BATCH_SIZE, forward, study_probability
from hrct_triage.worker.method.model import (
    MODEL_NAME,
    CheckpointMetadata,
    LoadedModel,
    build_densenet121,
    model_info,
    native_bf16,
    save_checkpoint,
)
from hrct_triage.worker.training.dataset import (
    DEFAULT_NEGATIVE_STRIDE,
    CachedStudy,
    PreprocessSettings,
    SliceDataset,
    cache_study,
    random_flips,
)
from hrct_triage.worker.training.freezing import (
    check_freeze_point,
    freeze_stages,
    set_training_mode,
)
from hrct_triage.worker.training.labels import (
    PAPER_TEST_FRACTION,
    PAPER_VALIDATION_FRACTION,
    LabelledStudy,
    assign_splits,
    read_labels,
    write_labels,
)
from hrct_triage.worker.training.steps import EagerStep, GraphedStep, StepOutput

__all__ = ["EpochLog", "TrainConfig", "TrainResult", "load_pretrained", "train"]

log = logging.getLogger(__name__)

_STATE_FORMAT = 1
# Changing any of these between a run and its resumption would silently train a different model.
_RECIPE_FIELDS = (
    "batch_size",
    "learning_rate",
    "momentum",
    "weight_decay",
    "step_size",
    "gamma",
    "flip_probability",
    "negative_stride",
    "seed",
    "input_size",
    "window_width",
    "window_level",
    "validation_fraction",
    "test_fraction",
    "freeze_through",
)
# torchvision's released DenseNet weights use old names such as "norm.1.weight" for "norm1.weight".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; the defaults are the paper's recipe (see the module doc)."""

    data_dir: Path
    labels: Path | None = None  # default: data_dir / "labels.csv"
    output_dir: Path = Path("runs/train")
    checkpoint: Path | None = None  # default: output_dir / "densenet121.safetensors"
    cache_dir: Path | None = None  # default: output_dir / "cache"
    epochs: int = 20
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    step_size: int = 5
    gamma: float = 0.1
    flip_probability: float = 0.5
    negative_stride: int = DEFAULT_NEGATIVE_STRIDE
    validation_fraction: float = PAPER_VALIDATION_FRACTION
    test_fraction: float = PAPER_TEST_FRACTION
    seed: int = 0
    input_size: int = paper.INPUT_SIZE
    window_width: float = paper.LUNG_WINDOW_WIDTH
    window_level: float = paper.LUNG_WINDOW_LEVEL
    threshold: float = paper.THRESHOLD
    trim_fraction: float = paper.TRIM_FRACTION
    min_slices: int = 20
    pretrained: Path | None = None
    freeze_through: str = "none"  # "denseblock1"/"denseblock2": those stages keep their weights
    resume: Path | None = None
    model_version: str | None = None  # default: <date>[-phantom]
    trained_on: str | None = None  # default: a description of the data and the split
    workers: int = 0  # DataLoader worker processes; the cache is memory-mapped, 0 is usually fine
    preprocess_workers: int = 1  # processes (per rank) decoding studies into the cache
    device: str | None = None  # default: cuda:<local rank> when available, else cpu
    cuda_graphs: bool = False  # replay each training step as a CUDA graph (one CUDA process)
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "step_size": self.step_size,
            "negative_stride": self.negative_stride,
            "input_size": self.input_size,
            "window_width": self.window_width,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        check_freeze_point(self.freeze_through)
        if self.freeze_through != "none" and self.pretrained is None and self.resume is None:
            raise ValueError("freezing stages needs --pretrained weights to keep")

    @property
    def labels_path(self) -> Path:
        return self.labels or self.data_dir / "labels.csv"

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint or self.output_dir / "densenet121.safetensors"

    @property
    def state_path(self) -> Path:
        return self.output_dir / "state.pt"

    def recipe(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _RECIPE_FIELDS}


@dataclass(frozen=True)
class EpochLog:
    """What one epoch did; one line of ``history.jsonl``."""

    epoch: int  # 1-based
    learning_rate: float
    train_loss: float
    train_accuracy: float
    train_slices: int
    validation_auc: float | None
    validation_log_loss: float | None
    seconds: float
    best: bool = False


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    sha256: str
    best_epoch: int
    history: list[EpochLog] = field(default_factory=list)
    world_size: int = 1


@dataclass(frozen=True)
class _Rank:
    """This process's place in the job: rank, world size, device and whether it set up dist."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class _Best:
    epoch: int = 0
    auc: float = -math.inf
    log_loss: float = math.inf
    sha256: str = ""

    def beaten_by(self, auc: float, log_loss: float) -> bool:
        return (auc, -log_loss) > (self.auc, -self.log_loss)


def train(config: TrainConfig, *, console: Console | None = None) -> TrainResult:
    """Run the recipe; under ``torchrun`` (WORLD_SIZE > 1) as one rank of a DDP job."""
    rank = _join_job(config.device)
    try:
        return _train(config, rank, console or Console(stderr=True))
    finally:
        if rank.owns_group:
            dist.destroy_process_group()


def _join_job(device: str | None) -> _Rank:
    """Initialise the process group when torchrun started us; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    target = torch.device(device or (f"cuda:{local_rank}" if cuda else "cpu"))
    if target.type == "cuda":
        torch.cuda.set_device(target)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _Rank(rank=rank, world=world, device=target, owns_group=owns)


def _train(config: TrainConfig, rank: _Rank, console: Console) -> TrainResult:
    if config.batch_size % rank.world:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {rank.world} processes"
        )
    _check_graphs(config, rank)
    torch.manual_seed(config.seed)
    studies = assign_splits(
        read_labels(config.labels_path, data_dir=config.data_dir),
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    if rank.main:
        write_labels(config.output_dir / "split.csv", studies)
    with _progress(console, enabled=config.progress and rank.main) as bars:
        cached = _prepare(config, studies, rank, bars)
        train_set = [c for c in cached if c.study.split == "train"]
        validation_set = [c for c in cached if c.study.split == "validation"]
        dataset = SliceDataset(train_set, negative_stride=config.negative_stride)
        healthy, covid = dataset.class_counts()
        if not healthy or not covid:
            raise ValueError(
                f"training needs slices of both classes; got {healthy} healthy and "
                f"{covid} COVID-19 slices from {len(train_set)} studies"
            )
        module, model = _model(config, rank)
        optimizer, scheduler = _optimisation(module, config)
        bf16 = native_bf16(rank.device)  # measured: AMX CPUs train about 3x faster in bf16
        step = _step(model, optimizer, config, rank, bf16=bf16)
        start, best, history = 0, _Best(), list[EpochLog]()
        if config.resume is not None:
            start, best, history = _resume(config, studies, module, optimizer, scheduler)
        sampler, loader = _loader(dataset, config, rank)
        if rank.main:
            log.info(
                "training on %d slices (%d healthy, %d COVID-19) of %d studies; validation "
                "on %d studies; %d process(es) on %s",
                len(dataset), healthy, covid, len(train_set), len(validation_set), rank.world,
                rank.device,
            )  # fmt: skip
        for epoch in range(start + 1, config.epochs + 1):
            started = time.perf_counter()
            sampler.set_epoch(epoch)  # a fresh, reproducible shuffle per epoch, on resume too
            learning_rate = float(optimizer.param_groups[0]["lr"])
            loss, accuracy, seen = _train_epoch(
                model, loader, step, config, rank, bars, epoch=epoch
            )
            scheduler.step()
            auc, log_loss = _validate(module, validation_set, config, rank, bars)
            improved = _improves(best, auc, log_loss)
            entry = EpochLog(
                epoch, learning_rate, loss, accuracy, seen, auc, log_loss,
                seconds=time.perf_counter() - started, best=improved,
            )  # fmt: skip
            history.append(entry)
            if improved:
                sha = _save_best(module, config, cached, entry, rank.world) if rank.main else ""
                best = _Best(epoch, _or_nan(auc), _or_nan(log_loss), sha)
            if rank.main:
                _save_state(config, studies, module, optimizer, scheduler, best, history)
                _log_epoch(entry, config.epochs)
            _barrier(rank)
    sha = _broadcast_text(best.sha256, rank)
    return TrainResult(config.checkpoint_path, sha, best.epoch, history, rank.world)


def _model(config: TrainConfig, rank: _Rank) -> tuple[nn.Module, nn.Module]:
    """(the DenseNet, what the training step calls): the same module, DDP-wrapped when N > 1."""
    module = build_densenet121(seed=config.seed)
    if config.pretrained is not None:
        load_pretrained(module, config.pretrained)
    freeze_stages(module, config.freeze_through)
    module = module.to(rank.device).to(memory_format=torch.channels_last)
    if rank.world == 1:
        return module, module
    return module, DistributedDataParallel(module, device_ids=_device_ids(rank))


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    rank: _Rank,
    *,
    bf16: bool,
) -> EagerStep | GraphedStep:
    """The eager step, or the same step replayed as a CUDA graph when asked for and possible."""
    eager = EagerStep(model, optimizer, bf16=bf16)
    if rank.device.type == "cuda":
        # DenseNet's many convolution shapes repeat every step: let cuDNN pick the fastest once
        torch.backends.cudnn.benchmark = True
    if not config.cuda_graphs:
        return eager
    return GraphedStep(eager, batch_size=config.batch_size)


def _check_graphs(config: TrainConfig, rank: _Rank) -> None:
    """Refuse CUDA graphs where they cannot run, before any study is decoded."""
    if not config.cuda_graphs:
        return
    if rank.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; training would run on {rank.device}")
    if rank.world > 1:
        raise ValueError("CUDA graphs are supported for one training process, not under DDP")


def _optimisation(
    module: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """The paper's SGD with momentum and a step learning rate."""
    optimizer = torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad],
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.step_size, gamma=config.gamma
    )
    return optimizer, scheduler


def _loader(
    dataset: SliceDataset, config: TrainConfig, rank: _Rank
) -> tuple[DistributedSampler[int], DataLoader[tuple[torch.Tensor, int]]]:
    """Each rank reads its 1/N of a seeded shuffle, batch_size / N slices at a time.

    The distributed sampler serves the single process too (N = 1), so the order of the slices
    depends only on the seed and the epoch, which makes a resumed run draw what the
    uninterrupted one would have.
    """
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=rank.world, rank=rank.rank, shuffle=True, seed=config.seed
    )
    per_rank = config.batch_size // rank.world
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        # A last batch of a slice or two makes BatchNorm's batch statistics noise and can send
        # the weights to NaN; it is dropped unless it is the only batch there is.
        drop_last=len(sampler) >= per_rank,
        num_workers=config.workers,
        pin_memory=rank.device.type == "cuda",
        persistent_workers=config.workers > 0,
    )
    return sampler, loader


def _improves(best: _Best, auc: float | None, log_loss: float | None) -> bool:
    """Keep an epoch with a better validation AUC (then log loss); without one, the latest."""
    if auc is None or log_loss is None:
        return True  # so the checkpoint is the last epoch when training ends, resumed or not
    return best.beaten_by(auc, log_loss)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _device_ids(rank: _Rank) -> list[int] | None:
    return [rank.device.index or 0] if rank.device.type == "cuda" else None


def _barrier(rank: _Rank) -> None:
    if rank.world > 1:
        dist.barrier()


def _broadcast_text(text: str, rank: _Rank) -> str:
    if rank.world == 1:
        return text
    box: list[object] = [text]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


# --- data ------------------------------------------------------------------------------------


def _one_thread_each() -> None:
    """A decoding process among N uses one thread: N processes of all cores each thrash."""
    os.environ["HRCT_CPU_THREADS"] = "1"
    torch.set_num_threads(1)


def _cache_only(study: LabelledStudy, *, cache_dir: Path, settings: PreprocessSettings) -> None:
    """Fill the cache for one study; returns nothing, so a pool sends no pixels back."""
    cache_study(study, cache_dir=cache_dir, settings=settings)


def _prepare(
    config: TrainConfig, studies: Sequence[LabelledStudy], rank: _Rank, bars: Progress
) -> list[CachedStudy]:
    """Cache every training and validation study; ranks share the decoding, then all read."""
    needed = [s for s in studies if s.split in ("train", "validation")]
    settings = PreprocessSettings(
        input_size=config.input_size,
        window_width=config.window_width,
        window_level=config.window_level,
        min_slices=config.min_slices,
    )
    cache_dir = config.cache_dir or config.output_dir / "cache"
    task = bars.add_task("preprocess", total=len(needed))
    mine = needed[rank.rank :: rank.world]
    cache = partial(_cache_only, cache_dir=cache_dir, settings=settings)
    with ExitStack() as stack:
        mapper: Callable[..., Iterable[object]] = map
        if config.preprocess_workers > 1:  # spawned: a forked child of a CUDA process can hang
            pool = ProcessPoolExecutor(
                config.preprocess_workers,
                mp_context=get_context("spawn"),
                initializer=_one_thread_each,
            )
            mapper = stack.enter_context(pool).map
        for _ in mapper(cache, mine):
            bars.advance(task, rank.world)
    _barrier(rank)
    bars.update(task, completed=len(needed))
    return [cache_study(s, cache_dir=cache_dir, settings=settings) for s in needed]


def load_pretrained(module: nn.Module, path: Path) -> None:
    """Start from ImageNet weights in a local file (torchvision's ``.pth`` or safetensors).

    Nothing is downloaded: a hospital network often cannot, and the weights a model started from
    must be a file someone chose. The 1000-class classifier is dropped (ours has two classes);
    every feature weight must be present, so a wrong file fails here rather than training from
    half-random weights.
    """
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found")
    if path.suffix == ".safetensors":
        state: dict[str, Any] = dict(load_file(str(path)))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    renamed = {
        _LEGACY_KEY.sub(lambda m: m.group(1) + m.group(2), k): v
        for k, v in state.items()
        if not k.startswith("classifier.")
    }
    renamed = {k.removeprefix("module."): v for k, v in renamed.items()}
    missing, unexpected = module.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a DenseNet-121 state dict: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    log.info("started from pretrained features in %s", path)


# --- one epoch -------------------------------------------------------------------------------


_PROGRESS_EVERY = 20  # steps between running-loss readings (each waits for the device)


def _train_epoch(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, int]],
    step: Callable[[torch.Tensor, torch.Tensor], StepOutput],
    config: TrainConfig,
    rank: _Rank,
    bars: Progress,
    *,
    epoch: int,
) -> tuple[float, float, int]:
    """One pass over this rank's share; returns the global mean loss, accuracy and slice count.

    The single-channel slices travel to the device as they are and are flipped and widened to
    three channels there (a third of the bytes to copy, no CPU pass over the pixels). The
    running loss stays on the device and is read only every few steps, so the host keeps
    queueing work instead of waiting for each step to finish.
    """
    set_training_mode(model, config.freeze_through)
    flips = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 1009 + rank.rank)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rank.device)
    correct = torch.zeros((), dtype=torch.int64, device=rank.device)
    seen = 0
    task = bars.add_task(f"epoch {epoch}/{config.epochs}", total=len(loader))
    for index, (pixels, labels) in enumerate(loader, start=1):
        on_device = pixels.to(rank.device, non_blocking=True)
        batch = random_flips(on_device, probability=config.flip_probability, generator=flips)
        batch = batch.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        target = labels.to(rank.device, non_blocking=True)
        out = step(batch, target)
        loss_sum += out.loss.double() * len(target)
        correct += (out.logits.argmax(1) == target).sum()
        seen += len(target)
        description = None
        if index % _PROGRESS_EVERY == 0 or index == len(loader):
            description = f"epoch {epoch}/{config.epochs} loss {float(loss_sum) / seen:.4f}"
        bars.update(task, advance=1, description=description)
    bars.remove_task(task)
    totals = torch.tensor([float(loss_sum), float(correct), seen], dtype=torch.float64)
    if rank.world > 1:  # NCCL reduces device tensors only
        on_device = totals.to(rank.device)
        dist.all_reduce(on_device)
        totals = on_device.cpu()
    count = max(float(totals[2]), 1.0)
    return float(totals[0]) / count, float(totals[1]) / count, int(totals[2])


def _validate(
    module: nn.Module,
    studies: Sequence[CachedStudy],
    config: TrainConfig,
    rank: _Rank,
    bars: Progress,
) -> tuple[float | None, float | None]:
    """Subject-level AUC and log loss on the validation studies, scored as inference does.

    Each rank scores its share of the studies and the probabilities are gathered, so every rank
    reaches the same decision. BatchNorm statistics are first copied from rank 0, because DDP
    only synchronises them at the start of each training forward.
    """
    if not studies:
        return None, None
    if rank.world > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    wrapper = _as_loaded(module, config, rank.device)
    module.eval()
    task = bars.add_task("validate", total=len(studies))
    mine: list[tuple[int, float]] = []
    for index in range(rank.rank, len(studies), rank.world):
        study = studies[index]
        rows = study.lung_rows()
        if rows.size:
            pixels = torch.from_numpy(np.asarray(study.inputs[rows], dtype=np.float32))
            scores = forward(wrapper, pixels.unsqueeze(1).expand(-1, 3, -1, -1))
            probability = study_probability(
                scores.probabilities.tolist(), trim_fraction=config.trim_fraction
            ).probability
            mine.append((index, probability))
        bars.advance(task, rank.world)
    bars.remove_task(task)
    set_training_mode(module, config.freeze_through)
    gathered = _gather(mine, rank)
    truth = np.asarray([studies[i].study.positive for i, _ in gathered])
    probabilities = np.asarray([p for _, p in gathered])
    if truth.all() or not truth.any():
        log.warning("validation set lacks one class; AUC undefined, keeping the last epoch")
        return None, None
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    log_loss = float(-np.mean(np.where(truth, np.log(clipped), np.log(1 - clipped))))
    return auc_interval(truth, probabilities).auc, log_loss


def _gather(mine: list[tuple[int, float]], rank: _Rank) -> list[tuple[int, float]]:
    if rank.world == 1:
        return mine
    everyone: list[list[tuple[int, float]] | None] = [None] * rank.world
    dist.all_gather_object(everyone, mine)
    return sorted(item for part in everyone for item in (part or []))


def _as_loaded(module: nn.Module, config: TrainConfig, device: torch.device) -> LoadedModel:
    """The training module seen through the inference API, so validation scores like the worker."""
    metadata = _metadata(config, version="training", trained_on="in training", metrics={})
    info = model_info(metadata, sha256=None, untrained=False)
    return LoadedModel(module, info, metadata, device, native_bf16(device), channels_last=True)


# --- files -----------------------------------------------------------------------------------


def _metadata(
    config: TrainConfig, *, version: str, trained_on: str, metrics: dict[str, Any]
) -> CheckpointMetadata:
    return CheckpointMetadata(
        name=MODEL_NAME,
        version=version,
        trained_on=trained_on,
        created=datetime.now(UTC).date().isoformat(),
        input_size=config.input_size,
        window_width=config.window_width,
        window_level=config.window_level,
        threshold=config.threshold,
        trim_fraction=config.trim_fraction,
        metrics=json.dumps(metrics, sort_keys=True),
    )


def describe_training_data(config: TrainConfig, cached: Sequence[CachedStudy]) -> str:
    """What the weights were trained on, in words for the SR, the worklist and the model card.

    When every study came from the phantom generator the text starts by saying so, whatever the
    user wrote, because demo weights must never pass for weights trained on patients.
    """
    phantom = bool(cached) and all(c.phantom for c in cached)
    counts = {
        split: [c.study.positive for c in cached if c.study.split == split]
        for split in ("train", "validation")
    }
    text = config.trained_on or (
        f"{len(cached)} studies from {config.data_dir.name or config.data_dir}: "
        + "; ".join(
            f"{split} {len(v)} ({sum(v)} COVID-19, {len(v) - sum(v)} healthy)"
            for split, v in counts.items()
        )
        + f"; patient-level split, seed {config.seed}"
    )
    if phantom and "synthetic phantom" not in text.lower():
        text = "synthetic phantoms (hrct-triage phantom), not patient data: " + text
    return text


def _save_best(
    module: nn.Module,
    config: TrainConfig,
    cached: Sequence[CachedStudy],
    entry: EpochLog,
    world: int,
) -> str:
    phantom = bool(cached) and all(c.phantom for c in cached)
    version = config.model_version or (
        datetime.now(UTC).strftime("%Y%m%d") + ("-phantom" if phantom else "")
    )
    metrics = {
        "epoch": entry.epoch,
        "validation_auc": entry.validation_auc,
        "validation_log_loss": entry.validation_log_loss,
        "train_loss": entry.train_loss,
        "train_accuracy": entry.train_accuracy,
        "processes": world,
        "recipe": config.recipe(),
        "epochs": config.epochs,
    }
    metadata = _metadata(
        config, version=version, trained_on=describe_training_data(config, cached), metrics=metrics
    )
    digest = save_checkpoint(config.checkpoint_path, module, metadata=metadata)
    log.info(
        "epoch %d is the best so far; saved %s (sha256 %s)",
        entry.epoch,
        config.checkpoint_path,
        digest[:12],
    )
    return digest


def _split_of(studies: Sequence[LabelledStudy]) -> str:
    return json.dumps(sorted((s.key, s.split or "") for s in studies))


def _save_state(
    config: TrainConfig,
    studies: Sequence[LabelledStudy],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    best: _Best,
    history: Sequence[EpochLog],
) -> None:
    """Everything a resumption needs, written atomically after every epoch."""
    state = {
        "format": _STATE_FORMAT,
        "epoch": history[-1].epoch if history else 0,
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best": json.dumps(asdict(best)),
        "history": json.dumps([asdict(h) for h in history]),
        "recipe": json.dumps(config.recipe(), sort_keys=True),
        "split": _split_of(studies),
        "checkpoint": str(config.checkpoint_path),
    }
    config.output_dir.mkdir(parents=True, exist_ok=True)
    partial = config.state_path.with_name(config.state_path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, config.state_path)
    with (config.output_dir / "history.jsonl").open("w", encoding="utf-8") as handle:
        for entry in history:
            handle.write(json.dumps(asdict(entry)) + "\n")


def _resume(
    config: TrainConfig,
    studies: Sequence[LabelledStudy],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, _Best, list[EpochLog]]:
    """Load a state file; refuse it when it belongs to another recipe, split or format."""
    assert config.resume is not None
    state = torch.load(config.resume, map_location="cpu", weights_only=True)
    if state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{config.resume} is not a training state of format {_STATE_FORMAT}")
    recipe = json.loads(state["recipe"])
    changed = sorted(k for k, v in config.recipe().items() if recipe.get(k) != v)
    if changed:
        raise ValueError(
            f"cannot resume {config.resume}: {', '.join(changed)} changed "
            f"(was {', '.join(f'{k}={recipe.get(k)}' for k in changed)})"
        )
    if state["split"] != _split_of(studies):
        raise ValueError(f"cannot resume {config.resume}: the studies or their split changed")
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    best = _Best(**json.loads(state["best"]))
    history = [EpochLog(**entry) for entry in json.loads(state["history"])]
    log.info(
        "resuming after epoch %d of %d (best epoch %d)",
        int(state["epoch"]),
        config.epochs,
        best.epoch,
    )
    return int(state["epoch"]), best, history


# --- progress and logs -----------------------------------------------------------------------


@contextmanager
def _progress(console: Console, *, enabled: bool) -> Iterator[Progress]:
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with bars:
        yield bars


def _log_epoch(entry: EpochLog, epochs: int) -> None:
    """One log line per epoch; the CLI routes logging above the progress bars."""
    auc = "n/a" if entry.validation_auc is None else f"{entry.validation_auc:.4f}"
    log.info(
        "epoch %d/%d: lr %.2e, loss %.4f, slice accuracy %.3f, validation AUC %s, %.1f s%s",
        entry.epoch,
        epochs,
        entry.learning_rate,
        entry.train_loss,
        entry.train_accuracy,
        auc,
        entry.seconds,
        " (best)" if entry.best else "",
    )
