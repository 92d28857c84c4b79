"""Fixtures shared by the training and evaluation tests: a tiny phantom set and one short run.

Kept small so both files run in about a minute on two shared cores: four studies of 24 slices
(two COVID-19-like, two healthy), a 32-pixel input instead of the production 224 (DenseNet-121
accepts any size down to 32), one epoch at batch 8. The run is made once per session and copied
by tests that change it.

Both test modules import these fixtures, which makes two fixture definitions; the builders are
memoised per session base folder so the phantoms and the run are still made only once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from hrct_triage.worker.training.train import TrainConfig, TrainResult, train

torch.set_num_threads(2)

SMALL_INPUT = 32  # pixels; the production default stays 224
SLICES = 24


@dataclass(frozen=True)
class TrainedRun:
    config: TrainConfig
    result: TrainResult


@functools.cache
def _phantoms(base: Path) -> Path:
    from hrct_triage.phantoms import write_phantom_studies

    out = base / "training-phantoms"
    write_phantom_studies(out, covid=2, healthy=2, slices=SLICES, seed=11)
    return out


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two COVID-19-like and two healthy phantom studies with labels.csv and lesion masks."""
    return _phantoms(tmp_path_factory.getbasetemp())


def tiny_config(data_dir: Path, output_dir: Path, **overrides: object) -> TrainConfig:
    """The paper's recipe shrunk for a test: 1 epoch, batch 8, 32 px, one patient per class
    in validation and none in test; StepLR steps every epoch so a resumed run shows it."""
    base = TrainConfig(
        data_dir=data_dir,
        output_dir=output_dir,
        epochs=1,
        batch_size=8,
        step_size=1,
        input_size=SMALL_INPUT,
        validation_fraction=0.25,
        test_fraction=0.0,
        progress=False,
    )
    return replace(base, **overrides)


@functools.cache
def _trained(data: Path, base: Path) -> TrainedRun:
    # two spawned processes fill the cache, as `--preprocess-workers 2` does
    config = tiny_config(data, base / "training-run", preprocess_workers=2)
    return TrainedRun(config, train(config))


@pytest.fixture(scope="session")
def trained_run(tiny_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One epoch of training on the tiny phantoms."""
    return _trained(tiny_phantoms, tmp_path_factory.getbasetemp())
