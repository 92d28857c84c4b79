"""Which threshold and trim fraction decide a study: a setting set explicitly wins over the
checkpoint's own value, which wins over the paper's; in the worker and in ``evaluate`` alike.

The checkpoint here states values that are not the paper's (threshold 0.35, trim fraction 0.25),
and each case sets one setting to a third value, so every value stated could only have come from
the place the rule names. The worker's case runs the real task over a phantom study on a SQLite
worklist and reads the SR, the SCs, the worklist row and ``show --json`` back.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes
from typer.testing import CliRunner

from hrct_triage.cli.app import app
from hrct_triage.common import paper
from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.db import queries, worklist
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.models import StudyStatus
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.listener import spool
from hrct_triage.listener.reconcile import reconcile
from hrct_triage.processes import settings_env
from hrct_triage.worker.jobs import WorkerContext, run_triage
from hrct_triage.worker.method.decision import DecisionRule, decision_rule
from hrct_triage.worker.method.inference import study_probability
from hrct_triage.worker.method.model import (
    CheckpointMetadata,
    build_densenet121,
    load_model,
    model_info,
    save_checkpoint,
)
from hrct_triage.worker.outputs.sc import _legend_strip, decision_text
from hrct_triage.worker.outputs.sr import THRESHOLD_VALUE

CHECKPOINT_THRESHOLD, CHECKPOINT_TRIM = 0.35, 0.25
METADATA = CheckpointMetadata(
    name="densenet121-covid19-hrct",
    version="9.9.9-rule-test",
    trained_on="nothing: seeded initial weights",
    created="2026-12-07",
    threshold=CHECKPOINT_THRESHOLD,
    trim_fraction=CHECKPOINT_TRIM,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded DenseNet weights saved with metadata that differs from the paper's values."""
    path = tmp_path_factory.mktemp("checkpoint") / "rule-test.safetensors"
    save_checkpoint(path, build_densenet121(seed=3), metadata=METADATA)
    return path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One COVID-like and one healthy phantom of 24 thin slices, with their labels.csv."""
    from hrct_triage.phantoms import write_phantom_studies

    out = tmp_path_factory.mktemp("rule-phantoms")
    write_phantom_studies(out, covid=1, healthy=1, slices=24, seed=13)
    return out


@pytest.fixture
def hrct_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No HRCT_* from the shell: each test sets what it means to set; settings read afresh."""
    for name in ("HRCT_THRESHOLD", "HRCT_TRIM_FRACTION", "HRCT_DESTINATIONS", "HRCT_MODEL_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    get_settings.cache_clear()
    return tmp_path


def test_the_paper_checkpoint_and_explicit_values_take_precedence_in_that_order() -> None:
    # given a checkpoint of its own values and untrained weights, which carry the paper's
    untrained = CheckpointMetadata(name="n", version="untrained", trained_on="-", created="")
    # then each value given explicitly wins, and each left out is the checkpoint's
    assert decision_rule(untrained) == DecisionRule(paper.THRESHOLD, paper.TRIM_FRACTION)
    assert decision_rule(METADATA) == DecisionRule(CHECKPOINT_THRESHOLD, CHECKPOINT_TRIM)
    assert decision_rule(METADATA, threshold=0.6) == DecisionRule(0.6, CHECKPOINT_TRIM)
    assert decision_rule(METADATA, trim_fraction=0.05) == DecisionRule(CHECKPOINT_THRESHOLD, 0.05)
    # and a value out of range is refused, naming it
    with pytest.raises(ValueError, match="trim_fraction"):
        decision_rule(METADATA, trim_fraction=0.5)


def test_a_setting_overrides_only_when_set_even_to_the_papers_value(
    hrct_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given no HRCT_THRESHOLD or HRCT_TRIM_FRACTION, then neither overrides the checkpoint
    unset = Settings().analysis
    assert (unset.threshold_override, unset.trim_fraction_override) == (None, None)
    # given HRCT_THRESHOLD set in the environment to the paper's own value, and the trim
    # fraction in a .env file, then both override: set is set
    monkeypatch.setenv("HRCT_THRESHOLD", str(paper.THRESHOLD))
    (hrct_env / ".env").write_text("HRCT_TRIM_FRACTION=0.2\n")
    both = Settings().analysis
    assert (both.threshold_override, both.trim_fraction_override) == (paper.THRESHOLD, 0.2)


def test_up_hands_its_workers_only_the_settings_that_were_set(
    hrct_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given up's own settings with the threshold unset and the trim fraction set
    monkeypatch.delenv("HRCT_THRESHOLD", raising=False)
    monkeypatch.setenv("HRCT_TRIM_FRACTION", "0.2")
    env = settings_env(Settings(port=4242))
    # when a worker reads its settings from the environment up gives it
    for key in [key for key in env if key.startswith("HRCT_")]:
        monkeypatch.setenv(key, env[key])
    child = Settings().analysis
    # then the checkpoint's threshold still applies there, and what was set is passed on
    assert "HRCT_THRESHOLD" not in env
    assert (child.threshold_override, child.trim_fraction_override) == (None, 0.2)
    assert env["HRCT_PORT"] == "4242"


def _queued_study(spool_dir: Path, url: str, paths: list[Path]) -> int:
    """The study as the listener leaves it: files in the spool, adopted into the worklist by
    start-up reconciliation, complete once its quiet period is over."""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        folder = spool.instance_dir(spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        spool.write_instance(folder, ds.SOPInstanceUID, b"", path.read_bytes())
    sessions = make_sessionmaker(make_engine(url))
    assert reconcile(spool_dir, sessions).adopted == len(paths)
    with transaction(sessions) as session:
        later = datetime.now(UTC) + timedelta(seconds=1)
        (study_id,) = worklist.complete_ready_studies(session, quiet_seconds=0, now=later)
    return study_id


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("HRCT_THRESHOLD", "0.6", DecisionRule(0.6, CHECKPOINT_TRIM)),
        ("HRCT_TRIM_FRACTION", "0.05", DecisionRule(CHECKPOINT_THRESHOLD, 0.05)),
    ],
)
def test_the_worker_applies_and_states_the_rule_everywhere(
    hrct_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    checkpoint: Path,
    phantoms: Path,
    variable: str,
    value: str,
    expected: DecisionRule,
) -> None:
    # given a queued phantom study, the checkpoint, and one decision setting set explicitly
    url = f"sqlite:///{hrct_env / 'worklist.sqlite'}"
    upgrade(url)
    monkeypatch.setenv("HRCT_DATA_DIR", str(hrct_env / "var"))
    monkeypatch.setenv("HRCT_DATABASE_URL", url)
    monkeypatch.setenv(variable, value)
    settings = Settings(model_path=checkpoint, heatmaps=2, min_slices=16)
    study_id = _queued_study(
        settings.spool_dir, url, sorted((phantoms / "covid_001").rglob("*.dcm"))
    )
    # when a worker runs the triage task
    model = load_model(checkpoint, allow_untrained=False, device="cpu")
    context = WorkerContext(settings, make_sessionmaker(make_engine(url)), lambda: model, "w1")
    assert run_triage(context, study_id) == StudyStatus.DONE
    # then the study probability is the mean after trimming by the rule's fraction
    with transaction(context.sessions) as session:
        (row,) = queries.worklist_rows(session)
        detail = queries.study_detail(session, row["study_uid"])
    assert detail is not None
    slices = [probability for _, probability in detail["slice_probabilities"]]
    trimmed = study_probability(slices, trim_fraction=expected.trim_fraction).probability
    assert row["probability"] == pytest.approx(trimmed, abs=1e-5)
    assert row["positive"] == (row["probability"] >= expected.threshold)
    # and the worklist row states the rule
    assert (row["threshold"], row["trim_fraction"]) == (expected.threshold, expected.trim_fraction)
    # and so does `show --json`
    get_settings.cache_clear()
    shown = CliRunner().invoke(app, ["show", row["study_uid"], "--json"], catch_exceptions=False)
    document = json.loads(shown.stdout)
    assert (document["threshold"], document["trim_fraction"]) == (
        expected.threshold,
        expected.trim_fraction,
    )
    # and the SR, in its algorithm parameters and its threshold measurement
    paths = {output["kind"]: Path(output["path"]) for output in detail["outputs"]}
    report = hd.sr.srread(paths["sr"])
    root = report.content[0]
    parameters = {
        item.value
        for item in find_content_items(root, name=codes.DCM.AlgorithmParameters, recursive=True)
    }
    stated = {f"threshold={expected.threshold:g}", f"trim_fraction={expected.trim_fraction:g}"}
    assert stated <= parameters
    assert {p for p in parameters if p.startswith(("threshold=", "trim_fraction="))} == stated
    (threshold,) = find_content_items(root, name=THRESHOLD_VALUE, recursive=True)
    assert float(threshold.value) == expected.threshold
    # and every SC, in its legend strip and its comments
    probabilities = dict(detail["slice_probabilities"])
    decision = decision_text(expected.threshold, expected.trim_fraction)
    info = model_info(METADATA, sha256=None, untrained=False)
    sc_paths = [Path(o["path"]) for o in detail["outputs"] if o["kind"] == "sc"]
    assert len(sc_paths) == 2
    for path in sc_paths:
        sc = pydicom.dcmread(path)
        assert decision in sc.ImageComments
        source = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        pixels = sc.pixel_array
        legend = _legend_strip(pixels.shape[1], probabilities[source], info, decision)
        assert (pixels[-legend.shape[0] :] == legend).all()


def test_evaluate_applies_the_same_rule(
    hrct_env: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path, phantoms: Path
) -> None:
    # given the checkpoint, two labelled phantom studies and HRCT_TRIM_FRACTION set
    monkeypatch.setenv("HRCT_TRIM_FRACTION", "0.05")

    def evaluate(*options: str) -> dict[str, object]:
        out = hrct_env / "evaluation"
        arguments = ["evaluate", str(phantoms), "--checkpoint", str(checkpoint)]
        arguments += ["--output-dir", str(out), "--no-progress", *options]
        get_settings.cache_clear()
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, result.output
        document: dict[str, object] = json.loads((out / "report.json").read_text())
        return document

    # when `hrct-triage evaluate` runs, then it judges by the setting's trim fraction and the
    # checkpoint's threshold, and reports both
    document = evaluate()
    assert (document["threshold"], document["trim_fraction"]) == (CHECKPOINT_THRESHOLD, 0.05)
    # and an option wins over the setting
    document = evaluate("--trim-fraction", "0.15", "--threshold", "0.7")
    assert (document["threshold"], document["trim_fraction"]) == (0.7, 0.15)
    model = document["model"]
    assert isinstance(model, dict) and model["trim_fraction"] == 0.15
    report = (hrct_env / "evaluation" / "report.md").read_text()
    assert "15% dropped at each end" in report and "positive when >= 0.7" in report
