"""Training: labels and the patient-level split, the paper's slice sampling, one real epoch on
phantom DICOM studies, its checkpoint, resuming, ImageNet weights from a file, and DDP with two
CPU processes over gloo started by torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchvision.models import densenet121

from hrct_triage.worker.method.model import (
    CheckpointError,
    build_densenet121,
    load_model,
    sidecar_path,
)
from hrct_triage.worker.training.dataset import (
    CachedStudy,
    PreprocessSettings,
    SliceDataset,
    cache_study,
    random_flips,
)
from hrct_triage.worker.training.labels import (
    LabelledStudy,
    assign_splits,
    read_labels,
    split_patients,
    write_labels,
)
from hrct_triage.worker.training.train import load_pretrained, train
from tests.helpers.training import SMALL_INPUT, TrainedRun, tiny_config


def _studies(patients: int, *, studies_per_patient: int = 1) -> list[LabelledStudy]:
    """Half COVID-19, half healthy patients, each with one or more studies."""
    return [
        LabelledStudy(
            key=f"study-{p}-{s}",
            folder=Path(f"p{p}s{s}"),
            positive=p % 2 == 0,
            patient_id=f"patient-{p}",
        )
        for p in range(patients)
        for s in range(studies_per_patient)
    ]


# --- labels and split ---------------------------------------------------------------------------


def test_split_is_patient_level_stratified_and_independent_of_row_order() -> None:
    # Given 40 patients (20 per class), two studies each, listed in two different orders
    studies = _studies(40, studies_per_patient=2)
    shuffled = list(reversed(studies))

    # When both lists are split with the same seed
    first = split_patients(studies, validation_fraction=0.1, test_fraction=0.5, seed=3)
    second = split_patients(shuffled, validation_fraction=0.1, test_fraction=0.5, seed=3)

    # Then the split is the same, no patient spans two splits, and each class is cut alike
    assert first == second
    by_patient: dict[str, set[str]] = {}
    for study in studies:
        by_patient.setdefault(study.patient_id, set()).add(first[study.key])
    assert all(len(splits) == 1 for splits in by_patient.values())
    for positive in (True, False):
        counts = {
            split: sum(1 for s in studies if s.positive is positive and first[s.key] == split)
            for split in ("train", "validation", "test")
        }
        assert counts == {"train": 16, "validation": 4, "test": 20}  # studies: 2 per patient


def test_split_changes_with_the_seed_and_keeps_both_classes_in_small_sets() -> None:
    # Given six patients, three per class
    studies = _studies(6)

    # When split with the paper's small validation fraction under two seeds
    a = split_patients(studies, validation_fraction=0.07, test_fraction=0.2, seed=0)
    b = split_patients(studies, validation_fraction=0.07, test_fraction=0.2, seed=1)

    # Then validation still holds one patient of each class (an AUC needs both)
    for split in (a, b):
        validation = [s.positive for s in studies if split[s.key] == "validation"]
        assert sorted(validation) == [False, True]
    assert a != b


def test_a_given_split_column_is_used_and_shared_patients_are_refused(tmp_path: Path) -> None:
    # Given a labels CSV with a split column, and one where a patient is in two splits
    good = tmp_path / "good.csv"
    good.write_text(
        "folder,label,patient_id,split\na,covid,P1,train\nb,healthy,P2,test\nc,covid,P1,train\n"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("folder,label,patient_id,split\na,covid,P1,train\nb,covid,P1,test\n")

    # When the splits are assigned
    studies = assign_splits(read_labels(good, data_dir=tmp_path))

    # Then the column wins, and sharing a patient across cohorts is an error
    assert [s.split for s in studies] == ["train", "test", "train"]
    with pytest.raises(ValueError, match="patient P1 is in both"):
        assign_splits(read_labels(bad, data_dir=tmp_path))


def test_written_split_reads_back_with_absolute_folders(tmp_path: Path) -> None:
    # Given studies with lesion labels and a split
    studies = [
        LabelledStudy("s1", tmp_path / "a", True, "P1", frozenset({3, 4}), "train"),
        LabelledStudy("s2", tmp_path / "b", False, "P2", None, "validation"),
    ]

    # When written and read back from another folder
    write_labels(tmp_path / "split.csv", studies)
    again = read_labels(tmp_path / "split.csv", data_dir=Path("/elsewhere"))

    # Then nothing is lost
    assert [(s.key, s.folder, s.positive, s.split) for s in again] == [
        ("s1", tmp_path / "a", True, "train"),
        ("s2", tmp_path / "b", False, "validation"),
    ]
    assert again[0].lesion_instances == frozenset({3, 4})


# --- sampling and augmentation ------------------------------------------------------------------


def _cached(positive: bool, lesions: frozenset[int] | None) -> CachedStudy:
    """Twelve cached rows: rows 1-10 are lung slices, rows 0 and 11 lesion-only edge slices."""
    numbers = np.arange(1, 13, dtype=np.int64)
    lung = np.zeros(12, dtype=bool)
    lung[1:11] = True
    study = LabelledStudy("s", Path("s"), positive, "p", lesions)
    return CachedStudy(
        study=study,
        inputs=np.zeros((12, 4, 4), dtype=np.float16),
        numbers=numbers,
        lung=lung,
        lesion=np.isin(numbers, sorted(lesions or ())),
        phantom=True,
    )


def test_sampling_takes_lesion_slices_of_positives_and_every_third_lung_slice_of_negatives() -> (
    None
):
    # Given a COVID-19 study with lesions on instances 1, 5 and 6, and a healthy study
    positive = _cached(True, frozenset({1, 5, 6}))
    negative = _cached(False, frozenset())

    # When the paper's sampling picks their training rows
    # Then the positive gives exactly its lesion slices, the negative lung rows 1, 4, 7, 10
    assert positive.training_rows().tolist() == [0, 4, 5]
    assert negative.training_rows().tolist() == [1, 4, 7, 10]
    assert negative.training_rows(negative_stride=1).tolist() == list(range(1, 11))


def test_positives_without_slice_labels_use_lung_slices_and_empty_labels_give_none() -> None:
    # Given a positive study without per-slice labels and one whose labels list no lesion
    unlabelled = _cached(True, None)
    lesion_free = _cached(True, frozenset())

    # When sampled, Then the first falls back to its lung slices and the second gives nothing
    assert unlabelled.training_rows().tolist() == list(range(1, 11))
    assert lesion_free.training_rows().size == 0
    dataset = SliceDataset([unlabelled, _cached(False, frozenset())])
    assert dataset.class_counts() == (4, 10)
    pixels, label = dataset[0]
    assert pixels.shape == (1, 4, 4) and pixels.dtype == torch.float32 and label == 1


def test_every_study_gets_its_own_cache_files(
    tiny_phantoms: Path,
    tmp_path: Path,
) -> None:
    # Given the phantom studies (their UIDs are full of dots, which once made Path.with_suffix
    # give every study the same cache file, so training saw one study under many labels)
    studies = read_labels(tiny_phantoms / "labels.csv", data_dir=tiny_phantoms)
    settings = PreprocessSettings(input_size=SMALL_INPUT)

    # When each is cached, Then each has its own pair of files and its own pixels
    cached = [cache_study(s, cache_dir=tmp_path, settings=settings) for s in studies]
    assert len(list(tmp_path.glob("*.npy"))) == len(list(tmp_path.glob("*.json"))) == len(studies)
    first, second = cached[0].inputs, cached[-1].inputs
    assert first.shape != second.shape or not np.array_equal(first, second)


def test_random_flips_only_mirror_and_repeat_with_the_same_generator() -> None:
    # Given a batch of distinct images
    batch = torch.arange(4 * 1 * 3 * 3, dtype=torch.float32).reshape(4, 1, 3, 3)

    # When flipped twice with identically seeded generators
    a = random_flips(batch, probability=0.5, generator=torch.Generator().manual_seed(1))
    b = random_flips(batch, probability=0.5, generator=torch.Generator().manual_seed(1))

    # Then the draws repeat and every image is one of its four mirror images
    assert torch.equal(a, b)
    for original, flipped in zip(batch, a, strict=True):
        mirrors = [original, original.flip(-1), original.flip(-2), original.flip(-1).flip(-2)]
        assert any(torch.equal(flipped, m) for m in mirrors)
    assert torch.equal(random_flips(batch, probability=0.0, generator=torch.Generator()), batch)


# --- training ------------------------------------------------------------------------------------


def test_one_epoch_writes_a_checkpoint_that_load_model_accepts(
    trained_run: TrainedRun,
) -> None:
    # Given one epoch of training on phantom DICOM studies
    config, result = trained_run.config, trained_run.result

    # When the worker loads the chosen checkpoint
    model = load_model(result.checkpoint, allow_untrained=False, device="cpu")

    # Then its hash, input size and metadata say what was trained, on what
    assert model.info.sha256 == result.sha256
    assert not model.info.untrained
    assert model.metadata.input_size == SMALL_INPUT
    assert (model.metadata.window_width, model.metadata.window_level) == (1200.0, -600.0)
    assert model.metadata.threshold == 0.8
    assert model.metadata.trained_on.startswith("synthetic phantoms")
    assert model.metadata.version.endswith("-phantom")
    metrics = json.loads(model.metadata.metrics)
    assert metrics["epoch"] == 1 and metrics["recipe"]["momentum"] == 0.9
    assert 0.0 <= metrics["validation_auc"] <= 1.0
    assert [entry.epoch for entry in result.history] == [1]
    history = (config.output_dir / "history.jsonl").read_text().splitlines()
    assert json.loads(history[0])["train_slices"] == result.history[0].train_slices
    splits = {s.split for s in read_labels(config.output_dir / "split.csv", data_dir=Path("/"))}
    assert splits == {"train", "validation"}


def test_a_damaged_checkpoint_is_refused(trained_run: TrainedRun, tmp_path: Path) -> None:
    # Given a copy of the checkpoint with one byte changed
    copy = tmp_path / "model.safetensors"
    shutil.copy(trained_run.result.checkpoint, copy)
    shutil.copy(sidecar_path(trained_run.result.checkpoint), sidecar_path(copy))
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))

    # When loaded, Then the SHA-256 check refuses it
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(copy, allow_untrained=False, device="cpu")


def test_resume_continues_after_the_saved_epoch(
    trained_run: TrainedRun,
    tmp_path: Path,
) -> None:
    # Given a copy of a finished one-epoch run (StepLR steps every epoch in this recipe)
    run = tmp_path / "run"
    shutil.copytree(trained_run.config.output_dir, run)
    config = tiny_config(
        trained_run.config.data_dir,
        run,
        epochs=2,
        resume=run / "state.pt",
        cache_dir=trained_run.config.output_dir / "cache",
    )

    # When it is resumed with two epochs in all
    result = train(config)

    # Then only epoch 2 ran, with the decayed learning rate, and epoch 1 is kept as it was
    assert [entry.epoch for entry in result.history] == [1, 2]
    assert result.history[0] == trained_run.result.history[0]
    assert result.history[1].learning_rate == pytest.approx(0.001)
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2


def test_resume_refuses_a_changed_recipe(trained_run: TrainedRun, tmp_path: Path) -> None:
    # Given a run's state and a different learning rate
    config = tiny_config(
        trained_run.config.data_dir,
        tmp_path,
        epochs=2,
        learning_rate=0.5,
        resume=trained_run.config.state_path,
        cache_dir=trained_run.config.output_dir / "cache",
    )

    # When resumed, Then it is refused, naming what changed
    with pytest.raises(ValueError, match="learning_rate changed"):
        train(config)


def test_fine_tuning_with_frozen_stages_moves_only_the_later_ones(
    trained_run: TrainedRun, tmp_path: Path
) -> None:
    # Given the weights of a finished run as the starting point
    start = trained_run.result.checkpoint
    before = dict(load_file(str(start)))
    config = tiny_config(
        trained_run.config.data_dir,
        tmp_path / "frozen",
        pretrained=start,
        freeze_through="denseblock2",
        cache_dir=trained_run.config.output_dir / "cache",
    )

    # When one epoch fine-tunes it with the stem and the first two dense blocks frozen
    result = train(config)

    # Then those stages, batch-norm statistics included, are exactly the starting weights, the
    # later blocks moved, and the recipe in the checkpoint says what was frozen
    after = dict(load_file(str(result.checkpoint)))
    frozen = [k for k in after if k.startswith(FROZEN_THROUGH_BLOCK2)]
    later = [k for k in after if k.startswith("features.denseblock4.") and k.endswith("weight")]
    assert frozen and later
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in later)
    metrics = json.loads(load_model(result.checkpoint, allow_untrained=False).metadata.metrics)
    assert metrics["recipe"]["freeze_through"] == "denseblock2"


def test_freezing_needs_weights_to_keep_and_a_known_stage(tmp_path: Path) -> None:
    # Given no starting weights, or an unknown stage, When configured, Then refused
    with pytest.raises(ValueError, match="needs --pretrained"):
        tiny_config(tmp_path, tmp_path, freeze_through="denseblock1")
    with pytest.raises(ValueError, match="freeze_through must be one of"):
        tiny_config(tmp_path, tmp_path, freeze_through="denseblock3", pretrained=tmp_path)


FROZEN_THROUGH_BLOCK2 = tuple(
    f"features.{name}."
    for name in ("conv0", "norm0", "denseblock1", "transition1", "denseblock2", "transition2")
)


def test_pretrained_imagenet_weights_load_from_a_local_torchvision_file(tmp_path: Path) -> None:
    # Given an ImageNet-shaped DenseNet-121 saved with torchvision's legacy key names
    imagenet = densenet121(weights=None)
    legacy = {
        key.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): value
        for key, value in imagenet.state_dict().items()
    }
    path = tmp_path / "densenet121-imagenet.pth"
    torch.save(legacy, path)
    module = build_densenet121(seed=1)
    classifier = module.classifier.weight.detach().clone()

    # When our two-class model starts from it
    load_pretrained(module, path)

    # Then every feature weight is ImageNet's and the two-class classifier is untouched
    for key, value in imagenet.features.state_dict().items():
        assert torch.equal(module.features.state_dict()[key], value), key
    assert torch.equal(module.classifier.weight, classifier)
    with pytest.raises(FileNotFoundError):
        load_pretrained(module, tmp_path / "absent.pth")


def test_ddp_with_two_cpu_processes_over_gloo(
    trained_run: TrainedRun,
    tmp_path: Path,
) -> None:
    # Given the tiny phantoms, already cached by the single-process run
    data = trained_run.config.data_dir
    out = tmp_path / "ddp"

    # When torchrun starts two training processes of the CLI
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "hrct_triage", "train", str(data), "--output-dir", str(out),
        "--cache-dir", str(trained_run.config.output_dir / "cache"), "--epochs", "1",
        "--batch-size", "8", "--step-size", "1", "--input-size", str(SMALL_INPUT),
        "--validation-fraction", "0.25", "--test-fraction", "0", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    # Then both ranks trained one epoch on all the slices and rank 0 wrote a loadable checkpoint
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    model = load_model(out / "densenet121.safetensors", allow_untrained=False, device="cpu")
    assert json.loads(model.metadata.metrics)["processes"] == 2
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]
    # (DistributedSampler gives both ranks as many slices, repeating one when the count is odd)
    single = trained_run.result.history[0].train_slices
    assert history[0]["train_slices"] == single + single % 2
