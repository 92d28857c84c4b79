"""Seconds per training step and per validation slice on this machine, for the model card.

``python -m worker.training.bench [--input-size 224] [--batch-size 32] [--steps 3] [--freeze]``
times the training loop's own step (flips, channels_last, forward, cross-entropy, backward, SGD)
on random inputs after one warm-up step, and the inference forward used by validation; with
``--freeze`` also the step with each ``--freeze-through`` choice, as a ratio to the full step of
the same run. Random inputs are
enough: DenseNet-121's cost does not depend on the pixel values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hrct_triage.common import paper
from hrct_triage.worker.method.inference import forward
from hrct_triage.worker.method.model import build_densenet121, native_bf16
from hrct_triage.worker.training.dataset import random_flips
from hrct_triage.worker.training.freezing import FREEZE_POINTS, freeze_stages, set_training_mode
from hrct_triage.worker.training.train import TrainConfig, _as_loaded

__all__ = ["time_training_step", "time_validation_slice"]


def time_training_step(
    module: nn.Module,
    *,
    input_size: int,
    batch_size: int,
    steps: int,
    device: torch.device,
    bf16: bool = False,
    freeze_through: str = "none",
) -> list[float]:
    """Wall seconds of each of ``steps`` SGD steps, after one untimed warm-up step.

    ``bf16`` runs the forward under bf16 autocast, as training does where the hardware has it;
    ``freeze_through`` trains only the stages after it, as ``hrct-triage train`` does.
    """
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    freeze_stages(module, freeze_through)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 1, input_size, input_size, generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    set_training_mode(module, freeze_through)
    times: list[float] = []
    for step in range(steps + 1):
        started = time.perf_counter()
        batch = random_flips(pixels, probability=0.5, generator=generator)
        batch = batch.expand(-1, 3, -1, -1).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = module(batch)
        loss = loss_fn(logits.float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - started)
    return times


def time_validation_slice(
    module: nn.Module, *, input_size: int, slices: int, device: torch.device
) -> float:
    """Wall seconds per slice of the inference forward that validation runs."""
    config = TrainConfig(data_dir=Path("."), input_size=input_size)
    wrapper = _as_loaded(module, config, device)
    module.eval()
    inputs = torch.rand(slices, 1, input_size, input_size).expand(-1, 3, -1, -1)
    forward(wrapper, inputs[:2])
    started = time.perf_counter()
    forward(wrapper, inputs)
    return (time.perf_counter() - started) / slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=paper.INPUT_SIZE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--freeze", action="store_true", help="also time each --freeze-through")
    args = parser.parse_args()
    device = torch.device(args.device)
    module = build_densenet121(seed=0).to(device).to(memory_format=torch.channels_last)

    def step_times(precision: str, freeze_through: str = "none") -> list[float]:
        return time_training_step(
            module,
            input_size=args.input_size,
            batch_size=args.batch_size,
            steps=args.steps,
            device=device,
            bf16=precision == "bf16",
            freeze_through=freeze_through,
        )

    timed = {
        precision: step_times(precision)
        for precision in (["fp32", "bf16"] if native_bf16(device) else ["fp32"])
    }
    steps = timed["bf16" if "bf16" in timed else "fp32"]  # what training uses here
    per_slice = time_validation_slice(
        module, input_size=args.input_size, slices=args.batch_size, device=device
    )
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "step_seconds": {k: [round(t, 3) for t in v] for k, v in timed.items()},
        "step_seconds_median": round(statistics.median(steps), 3),
        "bf16_speedup": (
            round(statistics.median(timed["fp32"]) / statistics.median(timed["bf16"]), 2)
            if "bf16" in timed
            else None
        ),
        "validation_seconds_per_slice": round(per_slice, 4),
    }
    if args.freeze:
        precision = "bf16" if "bf16" in timed else "fp32"
        frozen = {point: statistics.median(step_times(precision, point)) for point in FREEZE_POINTS}
        result["freeze_precision"] = precision
        result["freeze_step_seconds_median"] = {k: round(v, 3) for k, v in frozen.items()}
        result["freeze_speedup"] = {k: round(frozen["none"] / v, 2) for k, v in frozen.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
