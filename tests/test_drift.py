"""Drift watch (db.drift), its ``stats --drift`` command and the listener's check (log line and
gauges), on SQLite and PostgreSQL, over studies recorded through the worklist's transitions.

The values are drawn with a seeded generator and kept, so every statistic is checked against
scipy's ``ks_2samp`` and numpy on the same numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import typer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import ks_2samp
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from hrct_triage.cli import operations as ops_cli
from hrct_triage.common.checkpoint_files import (
    SHIPPED_CHECKPOINT,
    checkpoint_in_use,
    domain_reference_path,
)
from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.db import drift
from hrct_triage.db.session import transaction
from hrct_triage.listener.drift_watch import DriftCollector, DriftWatch
from tests.helpers.drift_rows import Protocol, input_stats, record_analysed

NOW = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
WINDOW = (date(2026, 3, 1), date(2026, 3, 10))
CT1_LUNG = Protocol("CT1", "CT1_STATION", "LUNG", 1.0)
CT2_STANDARD = Protocol("CT2", "CT2_STATION", "STANDARD", 1.25)


def _key(protocol: Protocol) -> drift.GroupKey:
    return drift.GroupKey(
        protocol.calling_ae, protocol.station, protocol.kernel, f"{protocol.thickness:g} mm"
    )


def _batch(
    sessions: sessionmaker[Session],
    rng: np.random.Generator,
    protocol: Protocol,
    *,
    first: datetime,
    count: int,
    noise: float = 20.0,
    every: timedelta = timedelta(hours=9),
) -> list[dict[str, float]]:
    """``count`` analysed studies from ``first`` on; the values each recorded."""
    recorded = []
    for i in range(count):
        stats = input_stats(rng, noise=noise)
        probability = float(rng.beta(1.2, 4.0))
        score = float(rng.gamma(4.0, 0.12))
        record_analysed(
            sessions,
            at=first + i * every,
            protocol=protocol,
            probability=probability,
            stats=stats,
            domain_score=score,
        )
        recorded.append({**stats, "probability": probability, "domain_score": score})
    return recorded


def _settings(tmp_path: Path, **values: object) -> Settings:
    """No ``.env``; the checkpoint (and so its reference) in ``tmp_path``."""
    return Settings(_env_file=None, model_path=tmp_path / "model.pt", **values)


def _write_reference(path: Path, rows: list[dict[str, float]]) -> None:
    studies = [
        {
            "input_stats": {
                k: v for k, v in row.items() if k not in ("probability", "domain_score")
            },
            "probability": row["probability"],
            "domain_score": row["domain_score"],
        }
        for row in rows
    ]
    path.write_text(json.dumps({"checkpoint_sha256": "0" * 64, "studies": studies}))


def test_kernel_noise_change_alarms_against_the_validation_window_and_matches_scipy(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # given two protocols validated in early March, and a last week in which CT1's noise rose
    rng = np.random.default_rng(11)
    first = datetime(2026, 3, 1, 8, tzinfo=UTC)
    base_ct1 = _batch(sessions, rng, CT1_LUNG, first=first, count=20)
    base_ct2 = _batch(sessions, rng, CT2_STANDARD, first=first, count=20)
    recent_first = NOW - timedelta(days=6)
    recent_ct1 = _batch(sessions, rng, CT1_LUNG, first=recent_first, count=12, noise=34.0)
    recent_ct2 = _batch(sessions, rng, CT2_STANDARD, first=recent_first, count=12)
    config = drift.DriftConfig(baseline_start=WINDOW[0], baseline_end=WINDOW[1])
    # when the report is built
    with transaction(sessions) as session:
        report = drift.build_drift_report(
            session, config, now=NOW, reference=drift.Baseline.none("no reference")
        )
    # then CT1 alarms on its noise alone, CT2 not at all, both against the site's window
    groups = {g.key: g for g in report.groups}
    ct1, ct2 = groups[_key(CT1_LUNG)], groups[_key(CT2_STANDARD)]
    assert [q.quantity for q in ct1.alarms] == ["noise_hu"]
    assert ct2.alarms == []
    assert [(g.key, q.quantity) for g, q in report.alarms] == [(_key(CT1_LUNG), "noise_hu")]
    for group in (ct1, ct2):
        assert group.baseline.source == "site"
        assert group.baseline.studies == 20
        assert group.recent == 12
    # and every statistic is scipy's two-sample KS over the same values
    for group, recent, base in ((ct1, recent_ct1, base_ct1), (ct2, recent_ct2, base_ct2)):
        by_name = {q.quantity: q for q in group.quantities}
        assert "lung_hu_histogram" not in by_name  # not a scalar
        for name in ("noise_hu", "lung_hu_mean", "lung_slices", "probability", "domain_score"):
            expected = ks_2samp([r[name] for r in recent], [r[name] for r in base])
            assert by_name[name].statistic == pytest.approx(expected.statistic)
            assert by_name[name].p_value == pytest.approx(expected.pvalue)
            assert by_name[name].recent_mean == pytest.approx(np.mean([r[name] for r in recent]))
    # and the message names the group, the quantity, the statistic and the baseline
    message = ct1.alarm_message(ct1.alarms[0], config)
    assert "scanner CT1, station CT1_STATION, kernel LUNG, thickness 1 mm: noise_hu" in message
    assert "site validation window 2026-03-01..2026-03-10" in message
    assert f"D={ct1.alarms[0].statistic:.2f}" in message


def test_daily_distributions_are_numpys(sessions: sessionmaker[Session]) -> None:
    # given 6 studies on one day and 3 on the next, one protocol
    rng = np.random.default_rng(5)
    day1 = _batch(
        sessions,
        rng,
        CT1_LUNG,
        first=NOW - timedelta(days=2, hours=10),
        count=6,
        every=timedelta(hours=1),
    )
    day2 = _batch(
        sessions,
        rng,
        CT1_LUNG,
        first=NOW - timedelta(days=1, hours=10),
        count=3,
        every=timedelta(hours=1),
    )
    # when the report is built
    with transaction(sessions) as session:
        report = drift.build_drift_report(
            session, drift.DriftConfig(), now=NOW, reference=drift.Baseline.none("none")
        )
    # then each day's count, probability quantiles, positive rate and means are numpy's
    (group,) = report.groups
    assert [d.studies for d in group.days] == [6, 3]
    for distribution, rows in zip(group.days, (day1, day2), strict=True):
        p10, p50, p90 = np.percentile([r["probability"] for r in rows], [10, 50, 90])
        assert distribution.probability == pytest.approx({"p10": p10, "p50": p50, "p90": p90})
        positives = [r["probability"] >= 0.8 for r in rows]
        assert distribution.positive_rate == pytest.approx(sum(positives) / len(rows))
        assert distribution.domain_score["mean"] == pytest.approx(
            np.mean([r["domain_score"] for r in rows])
        )
        assert distribution.input_means["noise_hu"] == pytest.approx(
            np.mean([r["noise_hu"] for r in rows])
        )
    # and with no baseline there are recent figures but no statistic and no alarm
    assert all(q.statistic is None and not q.alarm for q in group.quantities)


def test_checkpoint_reference_is_the_baseline_before_a_validation_window(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # given the checkpoint's reference of 30 training-like studies, and no validation window
    rng = np.random.default_rng(21)
    reference_rows = [
        {**input_stats(rng), "probability": float(rng.beta(1.2, 4.0)), "domain_score": 0.5}
        for _ in range(30)
    ]
    settings = _settings(tmp_path)
    _write_reference(tmp_path / "model.domain.json", reference_rows)
    # and a week with a BONE protocol whose noise doubled, and an unchanged LUNG one
    bone = Protocol("CT1", "CT1_STATION", "BONE", 1.0)
    recent_first = NOW - timedelta(days=6)
    _batch(sqlite_sessions, rng, bone, first=recent_first, count=10, noise=42.0)
    _batch(sqlite_sessions, rng, CT1_LUNG, first=recent_first, count=10)
    # when the report is built as the settings say
    with transaction(sqlite_sessions) as session:
        report = drift.drift_report(session, settings, now=NOW)
    # then BONE alarms on noise against the checkpoint reference, LUNG does not
    groups = {g.key: g for g in report.groups}
    assert groups[_key(bone)].baseline.source == "checkpoint"
    assert groups[_key(bone)].baseline.studies == 30
    assert "noise_hu" in [q.quantity for q in groups[_key(bone)].alarms]
    assert groups[_key(CT1_LUNG)].alarms == []
    assert [g.key for g, _ in report.alarms] == [_key(bone)] * len(report.alarms)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no checkpoint reference (model.domain.json not found)"),
        ("{not json", "checkpoint reference model.domain.json unreadable"),
        ('{"studies": 3}', "checkpoint reference model.domain.json has no list 'studies'"),
    ],
)
def test_no_usable_baseline_is_said_and_never_alarms(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path, content: str | None, words: str
) -> None:
    # given a missing, broken or wrong reference file, and a protocol far off any reference
    if content is not None:
        (tmp_path / "model.domain.json").write_text(content)
    rng = np.random.default_rng(2)
    _batch(sqlite_sessions, rng, CT1_LUNG, first=NOW - timedelta(days=5), count=12, noise=90)
    # when the report is built
    with transaction(sqlite_sessions) as session:
        report = drift.drift_report(session, _settings(tmp_path), now=NOW)
    # then it says why there is no baseline, and raises nothing
    (group,) = report.groups
    assert group.baseline.source == "none"
    assert group.baseline.description == words
    assert report.alarms == []


def test_too_few_recent_studies_never_alarm(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # given a validated protocol and only 5 recent studies, far off it
    rng = np.random.default_rng(8)
    _batch(sqlite_sessions, rng, CT1_LUNG, first=datetime(2026, 3, 1, tzinfo=UTC), count=20)
    _batch(sqlite_sessions, rng, CT1_LUNG, first=NOW - timedelta(days=3), count=5, noise=80)
    config = drift.DriftConfig(baseline_start=WINDOW[0], baseline_end=WINDOW[1])
    # when the report is built with 10 required, and with 5 required
    with transaction(sqlite_sessions) as session:
        strict = drift.build_drift_report(
            session, config, now=NOW, reference=drift.Baseline.none("none")
        )
        lenient = drift.build_drift_report(
            session,
            drift.DriftConfig(baseline_start=WINDOW[0], baseline_end=WINDOW[1], min_studies=5),
            now=NOW,
            reference=drift.Baseline.none("none"),
        )
    # then the statistic is the same, but only the lenient one alarms
    noise = {q.quantity: q for q in strict.groups[0].quantities}["noise_hu"]
    assert noise.statistic == 1.0
    assert not noise.alarm and strict.alarms == []
    assert [q.quantity for _, q in lenient.alarms] == ["noise_hu"]


def test_listener_check_logs_the_alarm_and_serves_gauges(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given a validated CT1 protocol whose noise rose in the last days, and an unchanged CT2
    rng = np.random.default_rng(13)
    first = datetime(2026, 3, 1, 8, tzinfo=UTC)
    _batch(sessions, rng, CT1_LUNG, first=first, count=15)
    _batch(sessions, rng, CT2_STANDARD, first=first, count=15)
    _batch(sessions, rng, CT1_LUNG, first=NOW - timedelta(days=4), count=10, noise=40.0)
    _batch(sessions, rng, CT2_STANDARD, first=NOW - timedelta(days=4), count=10)
    settings = _settings(tmp_path, drift_baseline_start=WINDOW[0], drift_baseline_end=WINDOW[1])
    watch = DriftWatch(settings, sessions, clock=lambda: NOW)
    registry = CollectorRegistry()
    registry.register(DriftCollector(watch))
    assert b"hrct_drift" not in generate_latest(registry)  # nothing before the first check
    # when the check runs
    with caplog.at_level(logging.INFO, logger="hrct.drift"):
        watch.run_once()
    # then one WARNING names CT1's noise, none CT2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        "drift alarm: scanner CT1, station CT1_STATION, kernel LUNG, thickness 1 mm: noise_hu KS D="
    )
    assert "site validation window 2026-03-01..2026-03-10" in warnings[0]
    # and the gauges say the same
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    ct1 = {"calling_ae": "CT1", "station": "CT1_STATION", "kernel": "LUNG", "thickness": "1 mm"}
    ct2 = {"calling_ae": "CT2", "station": "CT2_STATION", "kernel": "STANDARD"}
    ct2["thickness"] = "1.25 mm"

    def value(name: str, labels: dict[str, str]) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("hrct_drift_alarm", ct1) == 1.0
    assert value("hrct_drift_alarm", ct2) == 0.0
    assert value("hrct_drift_recent_studies", ct1) == 10.0
    assert value("hrct_drift_statistic", {**ct1, "quantity": "noise_hu"}) == 1.0
    assert value("hrct_drift_p_value", {**ct1, "quantity": "noise_hu"}) < 0.001
    assert value("hrct_drift_statistic", {**ct2, "quantity": "noise_hu"}) < 0.5


@pytest.fixture
def cli_env(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HRCT_DATABASE_URL", database_url)
    monkeypatch.setenv("HRCT_MODEL_PATH", str(tmp_path / "model.pt"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("stats")(ops_cli.stats_command)
    app.command("noop")(lambda: None)
    return app


def test_stats_drift_prints_groups_statistics_and_alarms(
    cli_env: None, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # given the checkpoint reference, a noisier BONE protocol and an unchanged LUNG one this week
    rng = np.random.default_rng(4)
    rows = [
        {**input_stats(rng), "probability": float(rng.beta(1.2, 4.0)), "domain_score": 0.5}
        for _ in range(25)
    ]
    _write_reference(tmp_path / "model.domain.json", rows)
    bone = Protocol("CT_ER1", "ER_STATION", "BONE", 1.0)
    now = datetime.now(UTC)
    _batch(
        sessions,
        rng,
        bone,
        first=now - timedelta(days=2),
        count=10,
        noise=45.0,
        every=timedelta(hours=2),
    )
    _batch(
        sessions, rng, CT1_LUNG, first=now - timedelta(days=2), count=10, every=timedelta(hours=2)
    )
    # when stats --drift runs, as tables and as JSON
    tables = CliRunner().invoke(_cli(), ["stats", "--drift"])
    as_json = CliRunner().invoke(_cli(), ["stats", "--drift", "--json"])
    # then the tables show both groups and the alarm line of the BONE one
    assert tables.exit_code == 0, tables.output
    assert "CT_ER1" in tables.output and "CT1_STATION" in tables.output
    assert "drift alarm: scanner CT_ER1, station ER_STATION, kernel BONE" in tables.output
    assert "checkpoint reference model.domain.json" in tables.output
    assert "noise_hu" in tables.output
    # and the JSON carries the groups and the alarms
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    assert {a["group"]["kernel"] for a in document["alarms"]} == {"BONE"}
    assert "noise_hu" in {a["quantity"] for a in document["alarms"]}
    assert {g["group"]["kernel"]: g["alarm"] for g in document["groups"]} == {
        "BONE": True,
        "LUNG": False,
    }


def test_the_reference_path_rule_is_the_workers() -> None:
    from hrct_triage.worker.method.checkpoints import DEMO_CHECKPOINT, default_checkpoint

    assert SHIPPED_CHECKPOINT.resolve() == DEMO_CHECKPOINT.resolve()
    assert checkpoint_in_use(None) == default_checkpoint()
    assert domain_reference_path(Path("/m/densenet.pt")) == Path("/m/densenet.domain.json")
    assert domain_reference_path(Path("/m/a.safetensors")) == Path("/m/a.domain.json")
    assert checkpoint_in_use(Path("/x/y.pt")) == Path("/x/y.pt")


def test_baseline_window_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="go together"):
        Settings(_env_file=None, drift_baseline_start=date(2026, 3, 1))
    with pytest.raises(ValueError, match="before"):
        Settings(
            _env_file=None,
            drift_baseline_start=date(2026, 3, 9),
            drift_baseline_end=date(2026, 3, 1),
        )
