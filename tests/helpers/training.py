"""A tiny training recipe for the training and evaluation tests: four studies of 24 slices (two
COVID-19-like, two healthy), a 32-pixel input instead of the production 224 (DenseNet-121
accepts any size down to 32), one epoch at batch 8, so both files run in about a minute on two
shared cores. The phantoms and the one run are made once per session (fixtures
``tiny_phantoms`` and ``trained_run`` in ``tests/conftest.py``); tests that change a run copy it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hrct_triage.worker.training.train import TrainConfig, TrainResult, train

torch.set_num_threads(2)

SMALL_INPUT = 32  # pixels; the production default stays 224
SLICES = 24


@dataclass(frozen=True)
class TrainedRun:
    config: TrainConfig
    result: TrainResult


def write_tiny_phantoms(out: Path) -> Path:
    """Two COVID-19-like and two healthy phantom studies with labels.csv and lesion masks."""
    from hrct_triage.phantoms import write_phantom_studies

    write_phantom_studies(out, covid=2, healthy=2, slices=SLICES, seed=11)
    return out


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


def train_tiny(data: Path, output_dir: Path) -> TrainedRun:
    """One epoch on the tiny phantoms; two spawned processes fill the cache, as
    ``--preprocess-workers 2`` does."""
    config = tiny_config(data, output_dir, preprocess_workers=2)
    return TrainedRun(config, train(config))
