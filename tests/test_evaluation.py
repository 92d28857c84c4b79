"""Evaluation: the statistics checked against scikit-learn and the definitions they come from,
the paper's Table 2 numbers, and `hrct-triage evaluate` end to end on phantom DICOM studies.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from typer.testing import CliRunner

from hrct_triage.cli.app import app
from hrct_triage.common.diagnostic_metrics import (
    at_threshold,
    auc_interval,
    delong_variance,
    fourfold,
    threshold_sweep,
)
from hrct_triage.worker.method.model import load_model
from hrct_triage.worker.method.pipeline import analyse_study
from hrct_triage.worker.training.dataset import study_paths
from hrct_triage.worker.training.evaluate import read_reader, reader_fourfold, score_study
from hrct_triage.worker.training.labels import read_labels
from hrct_triage.worker.training.report import markdown_report, percent
from tests.helpers.training import TrainedRun


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities that overlap, with ties, like a real validation set."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.5
    probabilities = np.clip(rng.normal(0.35 + 0.35 * truth, 0.2), 0, 1).round(2)
    return truth, probabilities


# --- metrics against scikit-learn --------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_rates_at_a_threshold_match_scikit_learn(threshold: float) -> None:
    # Given overlapping scores of 60 subjects
    truth, probabilities = _scores(60, seed=4)
    predicted = probabilities >= threshold

    # When the fourfold table is taken at the threshold
    table = at_threshold(truth, probabilities, threshold)

    # Then every rate is scikit-learn's
    tn, fp, fn, tp = confusion_matrix(truth, predicted, labels=[False, True]).ravel()
    assert (table.tp, table.fn, table.tn, table.fp) == (tp, fn, tn, fp)
    assert table.sensitivity == pytest.approx(recall_score(truth, predicted, zero_division=0))
    assert table.specificity == pytest.approx(recall_score(~truth, ~predicted, zero_division=0))
    assert table.accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert table.precision == pytest.approx(precision_score(truth, predicted, zero_division=0))
    assert table.f1 == pytest.approx(f1_score(truth, predicted, zero_division=0))


def test_threshold_sweep_is_the_fourfold_table_at_each_step() -> None:
    # Given scores, When swept along the threshold (the paper's Figure 4)
    truth, probabilities = _scores(40, seed=5)
    sweep = threshold_sweep(truth, probabilities)

    # Then there are 101 steps from 0 to 1, each the table at that threshold
    assert [row["threshold"] for row in sweep] == pytest.approx(np.linspace(0, 1, 101))
    for row in sweep[::10]:
        expected = fourfold(truth, probabilities >= row["threshold"])
        assert row["sensitivity"] == expected.sensitivity and row["f1"] == expected.f1


def test_delong_matches_scikit_learn_and_the_structural_component_definition() -> None:
    # Given overlapping scores with ties
    truth, probabilities = _scores(50, seed=6)
    positives, negatives = probabilities[truth], probabilities[~truth]

    # When DeLong's AUC and variance are computed (midrank form)
    auc, variance = delong_variance(truth, probabilities)

    # Then the AUC is scikit-learn's and the variance is DeLong 1988's, written out directly
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (
        positives[:, None] == negatives[None, :]
    )
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    expected = v10.var(ddof=1) / positives.size + v01.var(ddof=1) / negatives.size
    assert auc == pytest.approx(roc_auc_score(truth, probabilities))
    assert variance == pytest.approx(expected)


def test_auc_intervals_contain_the_auc_and_say_how_they_were_made() -> None:
    # Given overlapping scores of 80 subjects
    truth, probabilities = _scores(80, seed=7)

    # When the 95% CI is computed by DeLong and by a seeded bootstrap
    delong = auc_interval(truth, probabilities)
    boot = auc_interval(truth, probabilities, method="bootstrap", n_bootstrap=300, seed=1)
    again = auc_interval(truth, probabilities, method="bootstrap", n_bootstrap=300, seed=1)

    # Then both contain the AUC, name their method, and the bootstrap repeats with its seed
    for interval in (delong, boot):
        assert interval.low is not None and interval.high is not None
        assert 0.0 <= interval.low < interval.auc < interval.high <= 1.0
    assert (delong.method, boot.method) == ("delong", "bootstrap")
    assert boot == again
    assert delong.auc == pytest.approx(roc_auc_score(truth, probabilities))


def test_degenerate_sets_give_no_made_up_interval() -> None:
    # Given one subject per class, and a perfectly separated set
    one_each = auc_interval([True, False], [0.9, 0.1])
    perfect = auc_interval([True, True, False, False], [0.9, 0.8, 0.2, 0.1])

    # Then one subject per class has no interval, and perfect separation has a zero-width one
    assert (one_each.auc, one_each.low, one_each.high) == (1.0, None, None)
    assert (perfect.low, perfect.high) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least one COVID-19 and one healthy"):
        auc_interval([True, True], [0.1, 0.2])


# --- the paper's Table 2 -----------------------------------------------------------------------


def _table2_reader(tmp_path: Path) -> tuple[dict[str, bool], Path]:
    """70 COVID-19 and 70 healthy subjects; the reader calls 66 + 3 positive, 4 + 67 negative."""
    truth = {f"covid-{i}": True for i in range(70)} | {f"healthy-{i}": False for i in range(70)}
    calls = {key: (i >= 4) if positive else (i < 3) for key, positive in truth.items()
             for i in [int(key.split("-")[1])]}  # fmt: skip
    path = tmp_path / "reader.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_uid", "reader"])
        writer.writerows([key, "positive" if call else "negative"] for key, call in calls.items())
    return truth, path


def test_reader_table_reproduces_the_papers_table_2(tmp_path: Path) -> None:
    # Given the paper's reader: 66 of 70 patients and 67 of 70 healthy persons right
    truth, reader_csv = _table2_reader(tmp_path)

    # When the reader's CSV is read and tabulated against the truth
    table = reader_fourfold(truth, read_reader(reader_csv))

    # Then TP 66, FN 4, TN 67, FP 3: sensitivity 94%, specificity 96%, accuracy 95%
    assert (table.tp, table.fn, table.tn, table.fp) == (66, 4, 67, 3)
    assert [percent(table.sensitivity), percent(table.specificity), percent(table.accuracy)] == [
        "94",
        "96",
        "95",
    ]
    document = {
        "model": {"name": "m", "version": "v", "sha256": "0" * 64, "trained_on": "t",
                  "trim_fraction": 0.1},
        "checkpoint": "c", "labels": "l", "threshold": 0.8,
        "ci": {"method": "delong", "confidence": 0.95, "bootstrap_replicates": None},
        "pointing_tolerance_mm": 10.0, "sets": {}, "reader": table.as_dict(),
    }  # fmt: skip
    report = markdown_report(document)
    assert "Sensitivity = 66/70 (94%); specificity = 67/70 (96%)" in report
    assert "accuracy = (66+67)/140 (95%)" in report


def test_a_reader_call_on_an_unknown_study_is_refused(tmp_path: Path) -> None:
    # Given truth for one study and a reader who read another
    # When tabulated, Then the unknown study is named
    with pytest.raises(ValueError, match="not in the labels: other"):
        reader_fourfold({"known": True}, {"other": True})


# --- end to end ----------------------------------------------------------------------------------


def test_evaluation_scores_a_study_exactly_as_the_worker_does(
    trained_run: TrainedRun,
) -> None:
    # Given the trained checkpoint and one phantom study
    model = load_model(trained_run.result.checkpoint, allow_untrained=False, device="cpu")
    study = read_labels(trained_run.config.output_dir / "split.csv", data_dir=Path("/"))[0]

    # When evaluation and the worker's pipeline score it
    scored = score_study(study, model)
    analysis, _ = analyse_study(study.key, study_paths(study.folder), model, heatmaps=0)

    # Then they agree on the subject-level probability and on the slices averaged
    assert scored.probability == pytest.approx(analysis.probability, abs=1e-12)
    assert scored.lung_slices == len(analysis.slices)


def test_evaluate_command_writes_tables_json_and_plots(
    trained_run: TrainedRun,
    tmp_path: Path,
) -> None:
    # Given the trained run's split and a reader who read every study, correctly but one
    split_csv = trained_run.config.output_dir / "split.csv"
    studies = read_labels(split_csv, data_dir=Path("/"))
    reader_csv = tmp_path / "reader.csv"
    rows = [f"{s.key},{'negative' if (s.positive and i == 0) else s.positive}"
            for i, s in enumerate(studies)]  # fmt: skip
    reader_csv.write_text("study_uid,reader\n" + "\n".join(rows) + "\n")
    out = tmp_path / "evaluation"

    # When `hrct-triage evaluate` runs on the validation set
    result = CliRunner().invoke(
        app,
        ["evaluate", str(trained_run.config.data_dir), "--checkpoint",
         str(trained_run.result.checkpoint), "--labels", str(split_csv), "--split", "validation",
         "--reader", str(reader_csv), "--output-dir", str(out), "--no-progress"],
    )  # fmt: skip

    # Then the report, the JSON and both plots are written, and the numbers hold together
    assert result.exit_code == 0, result.output
    document = json.loads((out / "report.json").read_text())
    validation = document["sets"]["validation"]
    assert (validation["studies"], validation["positives"], validation["negatives"]) == (2, 1, 1)
    probabilities = {s["key"]: s["probability"] for s in document["studies"]}
    truth = {s["key"]: s["positive"] for s in document["studies"]}
    keys = sorted(probabilities)
    assert validation["auc"]["auc"] == pytest.approx(
        roc_auc_score([truth[k] for k in keys], [probabilities[k] for k in keys])
    )
    assert validation["auc"]["method"] == "delong"
    assert validation["pointing_game"]["slices"] > 0  # the COVID-19 study's lesion slices
    assert document["reader"]["fn"] == 1 and document["reader"]["tn"] == 2
    report = (out / "report.md").read_text()
    assert "## Table 1" in report and "## Table 2" in report and "DeLong" in report
    for name in ("roc-validation.png", "threshold-validation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
