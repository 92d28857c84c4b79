"""Local validation (db.validation_cases, db.validation, ``hrct-triage validate``): studies with
known probabilities and reference labels are written to the worklist, and every figure is checked
against scikit-learn, or an independent computation, on the same data.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from hrct_triage.cli.app import app
from hrct_triage.db.models import ReferenceLabel, Study, StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.db.validation import (
    THRESHOLD_RESAMPLES,
    ValidationOptions,
    recommend_threshold,
    validation_figures,
)
from hrct_triage.db.validation_cases import CaseFilter, labelled_cases

T0 = datetime(2026, 4, 1, 8, 0, tzinfo=UTC)
MODEL = "2.0.0-phantom"


def add_study(
    session: Session,
    index: int,
    probability: float,
    label: str | None,
    *,
    threshold: float = 0.5,
    scanner: str = "CT1",
    model: str = MODEL,
    mode: str = "live",
    analysed_at: datetime = T0,
    by_accession: bool = False,
) -> str:
    """An analysed study and (unless ``label`` is None) its reference label."""
    uid = f"1.2.826.0.9.{index}"
    accession = f"ACC{index}"
    session.add(
        Study(
            study_uid=uid,
            accession_number=accession,
            status=StudyStatus.DONE,
            calling_ae=scanner,
            probability=probability,
            positive=probability >= threshold,
            threshold=threshold,
            model_version=model,
            mode=mode,
            analysed_at=analysed_at,
        )
    )
    if label is not None:
        session.add(
            ReferenceLabel(
                study_uid=None if by_accession else uid,
                accession_number=accession if by_accession else None,
                label=label,
                imported_at=T0,
            )
        )
    return uid


def fill(
    sessions: sessionmaker[Session], positives: int, negatives: int, seed: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """``positives`` covid and ``negatives`` other/normal studies with overlapping, tied scores."""
    rng = np.random.default_rng(seed)
    truth = np.array([True] * positives + [False] * negatives)
    scores = np.round(np.clip(rng.normal(np.where(truth, 0.7, 0.4), 0.2), 0, 1), 2)
    with transaction(sessions) as session:
        for i, (t, p) in enumerate(zip(truth, scores, strict=True)):
            label = "covid" if t else ("normal" if i % 2 else "other")
            add_study(
                session,
                i,
                float(p),
                label,
                mode="shadow" if i % 3 == 0 else "live",
                by_accession=i % 4 == 0,
            )
    return truth, scores


def figures(sessions: sessionmaker[Session], **options: object) -> dict[str, object]:
    with transaction(sessions) as session:
        found = labelled_cases(session, CaseFilter())
    return validation_figures(found, ValidationOptions(configured_threshold=0.8, **options))  # type: ignore[arg-type]


def test_table1_equals_scikit_learn(sessions: sessionmaker[Session]) -> None:
    truth, scores = fill(sessions, 30, 40)
    document = figures(sessions)
    assert document["threshold"] == 0.5 and document["threshold_source"] == "recorded"
    table = document["table"]
    predicted = scores >= 0.5
    assert isinstance(table, dict)
    assert document["auc"]["auc"] == pytest.approx(roc_auc_score(truth, scores))  # type: ignore[index]
    assert table["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert table["sensitivity"] == pytest.approx(recall_score(truth, predicted))
    assert table["specificity"] == pytest.approx(recall_score(truth, predicted, pos_label=False))
    assert table["f1"] == pytest.approx(f1_score(truth, predicted))
    assert (document["positives"], document["negatives"]) == (30, 40)
    # shadow-mode results count; labels by accession number match
    assert document["studies"]["modes"] == {"live": 46, "shadow": 24}  # type: ignore[index]


def _delong_by_definition(truth: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong et al. 1988 from the pairwise kernel (1 if X > Y, 1/2 if equal), O(m n)."""
    x, y = scores[truth], scores[~truth]
    kernel = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    auc = kernel.mean()
    v10, v01 = kernel.mean(axis=1), kernel.mean(axis=0)
    variance = v10.var(ddof=1) / x.size + v01.var(ddof=1) / y.size
    return float(auc), float(variance)


def test_auc_interval_is_delongs(sessions: sessionmaker[Session]) -> None:
    truth, scores = fill(sessions, 25, 35, seed=3)
    auc = figures(sessions)["auc"]
    expected_auc, variance = _delong_by_definition(truth, scores)
    half = norm.ppf(0.975) * math.sqrt(variance)
    assert isinstance(auc, dict) and auc["method"] == "delong"
    assert auc["auc"] == pytest.approx(expected_auc)
    assert auc["low"] == pytest.approx(max(0.0, expected_auc - half))
    assert auc["high"] == pytest.approx(min(1.0, expected_auc + half))


def _wilson(successes: int, trials: int) -> tuple[float, float]:
    z = norm.ppf(0.975)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    return centre - half, centre + half


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_recommended_threshold_is_the_highest_reaching_the_target(
    sqlite_sessions: sessionmaker[Session], target: float
) -> None:
    truth, scores = fill(sqlite_sessions, 30, 40, seed=11)
    recommendation = figures(sqlite_sessions, target_sensitivity=target)["recommendation"]
    assert isinstance(recommendation, dict)
    reaching = [t for t in np.unique(scores) if recall_score(truth, scores >= t) >= target - 1e-12]
    assert recommendation["threshold"] == pytest.approx(max(reaching))
    predicted = scores >= recommendation["threshold"]
    tp = int((truth & predicted).sum())
    tn = int((~truth & ~predicted).sum())
    assert (recommendation["tp"], recommendation["tn"]) == (tp, tn)
    assert recommendation["sensitivity"] >= target
    assert recommendation["sensitivity_ci"] == pytest.approx(_wilson(tp, 30))
    assert recommendation["specificity_ci"] == pytest.approx(_wilson(tn, 40))
    assert (recommendation["positives"], recommendation["negatives"]) == (30, 40)


def test_recommendation_on_tied_scores() -> None:
    truth = np.array([True, True, True, True, False])
    scores = np.array([0.9, 0.6, 0.6, 0.2, 0.1])
    # 3 of 4 positives needed for 0.75: the tie at 0.6 gives them
    assert recommend_threshold(truth, scores, 0.75)["threshold"] == 0.6
    assert recommend_threshold(truth, scores, 0.76)["threshold"] == 0.2


def test_threshold_interval_is_the_bootstrap_of_the_positives() -> None:
    generator = np.random.default_rng(5)
    truth = np.array([True] * 40 + [False] * 60)
    scores = np.concatenate([generator.beta(5, 2, 40), generator.beta(2, 5, 60)])
    recommendation = recommend_threshold(truth, scores, 0.9)
    low, high = recommendation["threshold_ci"]
    # The same resamples, drawn one by one, each giving the highest threshold that keeps 36 of
    # its 40 positives: an independent reading of the same bootstrap.
    positives = np.sort(scores[truth])[::-1]
    resampler = np.random.default_rng(0)
    draws = resampler.choice(positives, size=(THRESHOLD_RESAMPLES, 40), replace=True)
    taken = [float(np.sort(row)[::-1][35]) for row in draws]
    assert (low, high) == pytest.approx(tuple(np.quantile(taken, [0.025, 0.975])))
    assert low <= recommendation["threshold"] <= high
    assert low < high  # 40 positives leave room: the interval is not a point
    # More positives from the same population narrow it.
    many = np.concatenate([generator.beta(5, 2, 400), generator.beta(2, 5, 60)])
    wide = recommend_threshold(np.array([True] * 400 + [False] * 60), many, 0.9)
    assert wide["threshold_ci"][1] - wide["threshold_ci"][0] < high - low


def test_too_few_studies_are_refused(sessions: sessionmaker[Session]) -> None:
    fill(sessions, 19, 40)
    document = figures(sessions)
    assert document["recommendation"] is None
    assert "19 positive(s)" in str(document["recommendation_refused"])
    assert document["table"] is not None  # Table 1 is still given
    lowered = figures(sessions, min_positives=10, min_negatives=10)
    assert lowered["recommendation"] is not None and lowered["recommendation_refused"] is None


def test_filters_unknown_unlabelled_and_threshold_source(
    sqlite_sessions: sessionmaker[Session],
) -> None:
    with transaction(sqlite_sessions) as session:
        add_study(session, 1, 0.9, "covid", threshold=0.8)
        add_study(session, 2, 0.2, "normal", threshold=0.7, scanner="CT2")
        add_study(session, 3, 0.6, "unknown")
        add_study(session, 4, 0.6, None)
        add_study(session, 5, 0.3, "other", model="1.0.0", analysed_at=T0 - timedelta(days=3))
        session.add(Study(study_uid="1.2.826.0.9.6", status=StudyStatus.QUEUED))
        session.add(ReferenceLabel(study_uid="1.2.826.0.9.6", label="covid", imported_at=T0))
    with transaction(sqlite_sessions) as session:
        everything = labelled_cases(session, CaseFilter())
        ct1 = labelled_cases(session, CaseFilter(scanner="CT1"))
        recent = labelled_cases(session, CaseFilter(since=T0 - timedelta(days=1)))
        old_model = labelled_cases(session, CaseFilter(model_version="1.0.0"))
    assert everything.as_dict() == {
        "analysed": 5,  # the queued study has no result yet
        "labelled": 3,
        "unlabelled": 1,
        "unknown_excluded": 1,
        "labels_held": 5,
        "modes": {"live": 3},
        "model_versions": ["1.0.0", MODEL],
    }
    assert [c.study_uid[-1] for c in ct1.cases] == ["1", "5"]
    assert [c.study_uid[-1] for c in recent.cases] == ["1", "2"]
    assert [c.study_uid[-1] for c in old_model.cases] == ["5"]
    options = ValidationOptions(configured_threshold=0.8)
    assert validation_figures(everything, options)["threshold_source"] == "configured"
    assert validation_figures(old_model, options)["threshold"] == 0.5
    given = ValidationOptions(configured_threshold=0.8, threshold=0.25)
    assert validation_figures(everything, given)["threshold_source"] == "option"


def test_cli_writes_markdown_json_and_pngs(
    sqlite_url: str,
    sqlite_sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    truth, scores = fill(sqlite_sessions, 24, 30)
    monkeypatch.setenv("HRCT_DATABASE_URL", sqlite_url)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["validate", "--out", str(out), "--json", "--target-sensitivity", "0.9"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    assert document["auc"]["auc"] == pytest.approx(roc_auc_score(truth, scores))
    assert document["recommendation"]["target_sensitivity"] == 0.9
    assert document["figures"] == ["roc.png", "threshold.png"]
    for name in document["figures"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (out / "validation.md").read_text(encoding="utf-8")
    assert "| AUC (95% CI, DeLong) |" in markdown and "Recommended threshold" in markdown
    assert "![roc](roc.png)" in markdown
    refused = CliRunner().invoke(app, ["validate", "--out", str(out), "--min-positives", "50"])
    assert refused.exit_code == 0
    assert "Not recommended" in refused.output
    nothing = CliRunner().invoke(app, ["validate", "--out", str(out), "--scanner", "NOPE"])
    assert nothing.exit_code == 3 and "no analysed study" in nothing.output
