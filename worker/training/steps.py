"""One optimisation step of the recipe, run eagerly or replayed from a captured CUDA graph.

DenseNet-121 at the paper's batch of 32 is a long chain of small kernels (about 1,500 per
forward and backward); on a fast GPU the step is bound by the CPU launching them, not by the
GPU running them. A CUDA graph records the whole step (forward under autocast, loss, backward,
SGD update) once and replays it with a single launch, so the same arithmetic runs with the
launch cost paid once per step instead of per kernel.

The graphed step follows PyTorch's "whole network capture" recipe: a few eager warm-up steps
on a side stream (they are real steps of the recipe, on real batches, and let cuDNN pick its
algorithms and SGD create its momentum buffers), then the capture, with gradients set to None
so the backward writes them into the graph's own memory. The learning rate is a number inside
the captured update, so the step is captured again whenever the schedule changes it. A batch of
another size (the last, partial batch of an epoch) runs eagerly on the same parameters,
momentum buffers and BatchNorm statistics, which the graph updates in place as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["EagerStep", "GraphedStep", "StepOutput"]


@dataclass(frozen=True)
class StepOutput:
    """What the epoch's bookkeeping needs: the batch's mean loss and its logits, on the device."""

    loss: torch.Tensor
    logits: torch.Tensor


@dataclass
class EagerStep:
    """Forward, cross-entropy, backward and optimiser step, kernel by kernel."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    bf16: bool
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)

    def __call__(self, batch: torch.Tensor, target: torch.Tensor) -> StepOutput:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(batch)
        loss = self.loss_fn(logits.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepOutput(loss.detach(), logits.detach())


class GraphedStep:
    """The eager step captured once as a CUDA graph and replayed for every full batch."""

    def __init__(self, eager: EagerStep, *, batch_size: int, warmup_steps: int = 3) -> None:
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self._eager = eager
        self._batch_size = batch_size
        self._warmup_left = warmup_steps
        self._graph: torch.cuda.CUDAGraph | None = None
        self._learning_rates: list[float] = []
        self._input: torch.Tensor | None = None
        self._target: torch.Tensor | None = None
        self._output: StepOutput | None = None
        self.captures = 0  # how often the step was captured, for logs and tests

    def __call__(self, batch: torch.Tensor, target: torch.Tensor) -> StepOutput:
        if batch.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and its batches on a CUDA device")
        if batch.shape[0] != self._batch_size:
            return self._eager(batch, target)
        if self._warmup_left:
            self._warmup_left -= 1
            return self._on_side_stream(batch, target)
        if self._graph is None or self._learning_rates != self._current_learning_rates():
            self._capture(batch, target)
        assert self._graph is not None and self._input is not None and self._target is not None
        self._input.copy_(batch)
        self._target.copy_(target)
        self._graph.replay()
        assert self._output is not None
        return StepOutput(self._output.loss.clone(), self._output.logits.clone())

    def _current_learning_rates(self) -> list[float]:
        return [float(group["lr"]) for group in self._eager.optimizer.param_groups]

    def _on_side_stream(self, batch: torch.Tensor, target: torch.Tensor) -> StepOutput:
        main = torch.cuda.current_stream(batch.device)
        side = torch.cuda.Stream(device=batch.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self._eager(batch, target)
        main.wait_stream(side)
        # made on the side stream, read on the main one: not to be reused before it has read
        out.loss.record_stream(main)
        out.logits.record_stream(main)
        return out

    def _capture(self, batch: torch.Tensor, target: torch.Tensor) -> None:
        """Record one whole step on static input buffers (recording runs nothing)."""
        self._graph = self._output = None  # the old graph's memory goes back first
        self._input = torch.empty_like(batch)
        self._target = torch.empty_like(target)
        eager = self._eager
        eager.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pinning thread may call CUDA while this thread records
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            # autocast's cast cache would keep the bf16 weights of the capture: cast every replay
            with torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=eager.bf16, cache_enabled=False
            ):
                logits = eager.model(self._input)
            loss = eager.loss_fn(logits.float(), self._target)
            loss.backward()
            eager.optimizer.step()
        self._graph = graph
        self._output = StepOutput(loss.detach(), logits.detach())
        self._learning_rates = self._current_learning_rates()
        self.captures += 1
