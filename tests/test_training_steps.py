"""Tests of the training step, eager and replayed as a CUDA graph (worker/training/steps.py).

The graphed step must train exactly as the eager one: same parameters, momentum buffers and
BatchNorm statistics after the same batches, through a learning-rate change and a partial last
batch. That comparison needs a GPU; it runs on the GPU machine a session is lent (see
docs/model-card.md) and is skipped here, where the CPU-side refusals are tested instead.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from hrct_triage.worker.training.steps import EagerStep, GraphedStep
from hrct_triage.worker.training.train import TrainConfig, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _small_net(seed: int) -> nn.Module:
    """Convolutions, BatchNorm and a classifier: every kind of state a DenseNet step updates."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def _batches(device: torch.device, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.rand(n, 3, 16, 16, generator=generator).to(device),
            torch.randint(0, 2, (n,), generator=generator).to(device),
        )
        for n in sizes
    ]


def test_an_eager_step_changes_the_weights_and_reports_the_loss() -> None:
    model = _small_net(0)
    before = copy.deepcopy(model.state_dict())
    step = EagerStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), bf16=False)
    ((batch, target),) = _batches(torch.device("cpu"), [4])
    out = step(batch, target)
    assert out.logits.shape == (4, 2)
    expected = nn.functional.cross_entropy(out.logits, target)  # logits before the update
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"])
    assert int(model.state_dict()["1.num_batches_tracked"]) == 1


def test_a_graphed_step_refuses_a_cpu_batch() -> None:
    model = _small_net(0)
    eager = EagerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), bf16=False)
    ((batch, target),) = _batches(torch.device("cpu"), [4])
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(eager, batch_size=4)(batch, target)


def test_training_with_cuda_graphs_on_a_cpu_is_refused_before_reading_any_study(
    tmp_path: Path,
) -> None:
    # given a data folder without even a labels file
    config = TrainConfig(data_dir=tmp_path / "none", cuda_graphs=True, device="cpu")
    # then the refusal names the device, not the missing data
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        train(config)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_graph_replays_train_as_the_eager_step_does(bf16: bool) -> None:
    # given two copies of one network, one trained eagerly and one through the graphed step
    device = torch.device("cuda")
    nets = [_small_net(0).to(device).to(memory_format=torch.channels_last) for _ in range(2)]
    optimisers = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9) for n in nets]
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.3) for o in optimisers]
    eager = EagerStep(nets[0], optimisers[0], bf16=bf16)
    graphed = GraphedStep(EagerStep(nets[1], optimisers[1], bf16=bf16), batch_size=8)
    # when both see the same batches over two "epochs" with a learning-rate change in between,
    # each epoch ending in a partial batch
    epochs = [_batches(device, [8] * 6 + [3]), _batches(device, [8] * 5 + [5])]
    for batches in epochs:
        for batch, target in batches:
            batch = batch.contiguous(memory_format=torch.channels_last)
            expected, got = eager(batch, target), graphed(batch, target)
            torch.testing.assert_close(got.loss, expected.loss, rtol=1e-3, atol=1e-4)
        for schedule in schedules:
            schedule.step()
    # then weights, BatchNorm statistics and momentum buffers are the same
    torch.cuda.synchronize()
    assert graphed.captures == 2  # once per learning rate
    expected_state, got_state = nets[0].state_dict(), nets[1].state_dict()
    for name, value in expected_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=1e-3, atol=1e-4, msg=name)
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(
            optimisers[1].state[q]["momentum_buffer"],
            optimisers[0].state[p]["momentum_buffer"],
            rtol=1e-3,
            atol=1e-4,
        )


@pytest.mark.gpu
@cuda
def test_a_thread_pinning_memory_does_not_break_the_capture() -> None:
    # given a thread that pins host memory all along, as a DataLoader's pinning thread does
    # (on the H200 this invalidated captures recorded in the global mode)
    device = torch.device("cuda")
    net = _small_net(0).to(device)
    graphed = GraphedStep(
        EagerStep(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), bf16=False),
        batch_size=8,
        warmup_steps=1,
    )
    stop = threading.Event()

    def pin() -> None:
        while not stop.is_set():
            torch.empty(1 << 20).pin_memory()

    pinning = threading.Thread(target=pin, daemon=True)
    pinning.start()
    try:
        # when steps are captured and replayed meanwhile
        losses = [float(graphed(b, t).loss) for b, t in _batches(device, [8] * 6)]
    finally:
        stop.set()
        pinning.join()
    # then the capture held and the replays trained
    assert graphed.captures == 1
    assert all(torch.isfinite(torch.tensor(losses)))
