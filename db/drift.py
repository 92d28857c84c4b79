"""Drift watch: per scanner and protocol, do the recent studies still look like the baseline?

A *group* is one calling AE, station name, convolution kernel and slice thickness: the inputs of
one protocol on one scanner, which a software update, a new kernel or a tube change alters
without anyone telling the AI. Per group this computes the daily distributions (study
probability, positive rate, domain score, the input statistics of ``Study.input_stats``) and,
per watched quantity, the two-sample Kolmogorov-Smirnov statistic D with its p-value between the
studies analysed in the last ``window_days`` and the group's baseline. The baseline is the
group's own studies in the site's validation window when it has enough of them, else the
checkpoint's reference (``<checkpoint>.domain.json``, key ``studies``), else there is none.
A quantity alarms when D exceeds ``threshold`` with p below ``alpha`` and both samples hold at
least ``min_studies`` studies; the positive rate is shown but never alarms (it moves with the
epidemic, not with the scanner). Computed in Python over plain rows, as ``db.stats``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ks_2samp
from sqlalchemy import select
from sqlalchemy.orm import Session

from hrct_triage.common.checkpoint_files import checkpoint_in_use, domain_reference_path
from hrct_triage.common.settings import Settings
from hrct_triage.db.models import Study

log = logging.getLogger("hrct.drift")

PROBABILITY = "probability"
DOMAIN_SCORE = "domain_score"
#: Days of daily distributions the report carries (plots, ``stats --drift``), whatever the window.
HISTORY_DAYS = 28
UNKNOWN = "(unknown)"


@dataclass(frozen=True)
class DriftConfig:
    """The knobs of ``WorklistSettings`` the drift watch reads (``HRCT_DRIFT_*``)."""

    baseline_start: date | None = None
    baseline_end: date | None = None
    window_days: int = 7
    min_studies: int = 10
    threshold: float = 0.3
    alpha: float = 0.001

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftConfig:
        worklist = settings.worklist
        return cls(
            baseline_start=worklist.drift_baseline_start,
            baseline_end=worklist.drift_baseline_end,
            window_days=worklist.drift_window_days,
            min_studies=worklist.drift_min_studies,
            threshold=worklist.drift_threshold,
            alpha=worklist.drift_alpha,
        )


@dataclass(frozen=True, order=True)
class GroupKey:
    """One scanner and protocol: calling AE, station name, kernel, slice thickness (mm)."""

    calling_ae: str
    station: str
    kernel: str
    thickness: str

    @classmethod
    def of(cls, study: Study) -> GroupKey:
        return cls(
            calling_ae=study.calling_ae or UNKNOWN,
            station=study.station_name or UNKNOWN,
            kernel=study.convolution_kernel or UNKNOWN,
            thickness=_thickness(study.slice_thickness),
        )

    @property
    def label(self) -> str:
        return f"{self.calling_ae} / {self.station} / {self.kernel} / {self.thickness}"

    @property
    def slug(self) -> str:
        """A stable short name for URLs."""
        return hashlib.sha256(self.label.encode("utf-8")).hexdigest()[:12]

    def as_dict(self) -> dict[str, str]:
        return {
            "calling_ae": self.calling_ae,
            "station": self.station,
            "kernel": self.kernel,
            "thickness": self.thickness,
        }


def _thickness(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value:g} mm"


@dataclass(frozen=True)
class Observation:
    """What one analysed study contributes: its group, day and watched quantities."""

    key: GroupKey
    analysed_at: datetime
    positive: bool | None
    quantities: dict[str, float]


def _quantities(study: Study) -> dict[str, float]:
    """Probability, domain score and every finite numeric scalar of ``input_stats``."""
    found: dict[str, float] = {}
    for name, value in (study.input_stats or {}).items():
        number = _scalar(value)
        if number is not None:
            found[str(name)] = number
    for name, value in ((PROBABILITY, study.probability), (DOMAIN_SCORE, study.domain_score)):
        number = _scalar(value)
        if number is not None:
            found[name] = number
    return found


def _scalar(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def load_observations(
    session: Session, *, since: datetime | None = None, until: datetime | None = None
) -> list[Observation]:
    """Every study with a recorded probability analysed in ``[since, until)``."""
    query = select(Study).where(Study.analysed_at.is_not(None), Study.probability.is_not(None))
    if since is not None:
        query = query.where(Study.analysed_at >= since)
    if until is not None:
        query = query.where(Study.analysed_at < until)
    return [
        Observation(GroupKey.of(s), s.analysed_at, s.positive, _quantities(s))
        for s in session.scalars(query.order_by(Study.analysed_at)).all()
        if s.analysed_at is not None
    ]


# --- baselines ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What recent studies are compared with: per quantity, the baseline's values."""

    source: str  # "site", "checkpoint" or "none"
    description: str
    studies: int
    values: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def none(cls, why: str) -> Baseline:
        return cls("none", why, 0)

    @classmethod
    def of(cls, source: str, description: str, rows: Iterable[dict[str, float]]) -> Baseline:
        values: dict[str, list[float]] = defaultdict(list)
        count = 0
        for quantities in rows:
            count += 1
            for name, value in quantities.items():
                values[name].append(value)
        return cls(source, description, count, dict(values))


def load_checkpoint_reference(path: Path | None) -> Baseline:
    """The ``studies`` of a checkpoint's domain reference as a baseline; never raises: a missing
    or unreadable file is a baseline of kind ``none`` that says why."""
    if path is None:
        return Baseline.none("no checkpoint, so no checkpoint reference")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Baseline.none(f"no checkpoint reference ({path.name} not found)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("checkpoint reference %s unreadable: %s", path, error)
        return Baseline.none(f"checkpoint reference {path.name} unreadable")
    studies = document.get("studies") if isinstance(document, dict) else None
    if not isinstance(studies, list):
        log.warning("checkpoint reference %s has no list 'studies'", path)
        return Baseline.none(f"checkpoint reference {path.name} has no list 'studies'")
    rows = []
    for entry in studies:
        if not isinstance(entry, dict):
            continue
        quantities: dict[str, float] = {}
        stats = entry.get("input_stats")
        for name, value in stats.items() if isinstance(stats, dict) else ():
            number = _scalar(value)
            if number is not None:
                quantities[str(name)] = number
        for name in (PROBABILITY, DOMAIN_SCORE):
            number = _scalar(entry.get(name))
            if number is not None:
                quantities[name] = number
        rows.append(quantities)
    return Baseline.of("checkpoint", f"checkpoint reference {path.name}", rows)


def checkpoint_baseline(settings: Settings) -> Baseline:
    """The reference beside the checkpoint the worker loads (``HRCT_MODEL_PATH`` or the shipped
    one)."""
    checkpoint = checkpoint_in_use(settings.analysis.model_path)
    return load_checkpoint_reference(domain_reference_path(checkpoint) if checkpoint else None)


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def site_baselines(
    session: Session, config: DriftConfig
) -> tuple[str | None, dict[GroupKey, list[Observation]]]:
    """The validation window's studies per group (with the window's words), if configured."""
    if config.baseline_start is None or config.baseline_end is None:
        return None, {}
    found: dict[GroupKey, list[Observation]] = defaultdict(list)
    for observation in load_observations(
        session,
        since=_day_start(config.baseline_start),
        until=_day_start(config.baseline_end + timedelta(days=1)),
    ):
        found[observation.key].append(observation)
    return f"site validation window {config.baseline_start}..{config.baseline_end}", found


# --- the statistics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantityDrift:
    """One watched quantity of one group: recent against baseline."""

    quantity: str
    recent: int
    baseline: int
    recent_mean: float | None
    baseline_mean: float | None
    statistic: float | None  # Kolmogorov-Smirnov D; None when a sample is empty
    p_value: float | None
    alarm: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def compare(
    quantity: str, recent: Sequence[float], baseline: Sequence[float], config: DriftConfig
) -> QuantityDrift:
    """The two-sample KS statistic and p-value, and whether they make an alarm."""
    statistic = p_value = None
    if recent and baseline:
        result = ks_2samp(np.asarray(recent), np.asarray(baseline))
        statistic, p_value = float(result.statistic), float(result.pvalue)
    enough = len(recent) >= config.min_studies and len(baseline) >= config.min_studies
    alarm = bool(
        enough
        and statistic is not None
        and p_value is not None
        and statistic > config.threshold
        and p_value < config.alpha
    )
    return QuantityDrift(
        quantity=quantity,
        recent=len(recent),
        baseline=len(baseline),
        recent_mean=float(np.mean(recent)) if recent else None,
        baseline_mean=float(np.mean(baseline)) if baseline else None,
        statistic=statistic,
        p_value=p_value,
        alarm=alarm,
    )


@dataclass(frozen=True)
class DailyDistribution:
    """One group's studies of one UTC day (by analysis time)."""

    day: date
    studies: int
    positive_rate: float | None
    probability: dict[str, float]  # p10, p50, p90
    domain_score: dict[str, float]  # mean, p50, p90 (empty when none was scored)
    input_means: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "day": self.day.isoformat()}


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    p10, p50, p90 = np.percentile(np.asarray(values, dtype=np.float64), [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90)}


def daily(observations: Sequence[Observation]) -> list[DailyDistribution]:
    """The daily distributions of one group's observations, oldest day first."""
    by_day: dict[date, list[Observation]] = defaultdict(list)
    for observation in observations:
        by_day[observation.analysed_at.astimezone(UTC).date()].append(observation)
    found = []
    for day in sorted(by_day):
        rows = by_day[day]
        decided = [o.positive for o in rows if o.positive is not None]
        scores = [o.quantities[DOMAIN_SCORE] for o in rows if DOMAIN_SCORE in o.quantities]
        inputs: dict[str, list[float]] = defaultdict(list)
        for o in rows:
            for name, value in o.quantities.items():
                if name not in (PROBABILITY, DOMAIN_SCORE):
                    inputs[name].append(value)
        score_quantiles = _quantiles(scores)
        found.append(
            DailyDistribution(
                day=day,
                studies=len(rows),
                positive_rate=sum(decided) / len(decided) if decided else None,
                probability=_quantiles(
                    [o.quantities[PROBABILITY] for o in rows if PROBABILITY in o.quantities]
                ),
                domain_score=(
                    {"mean": float(np.mean(scores)), **score_quantiles} if scores else {}
                ),
                input_means={name: float(np.mean(v)) for name, v in sorted(inputs.items())},
            )
        )
    return found


@dataclass(frozen=True)
class GroupDrift:
    """One group: its recent studies, its baseline, the statistics and the daily history."""

    key: GroupKey
    recent: int
    baseline: Baseline
    quantities: list[QuantityDrift]
    days: list[DailyDistribution]

    @property
    def alarms(self) -> list[QuantityDrift]:
        return [q for q in self.quantities if q.alarm]

    def alarm_message(self, quantity: QuantityDrift, config: DriftConfig) -> str:
        """The log line: the group, the quantity, the statistic and the baseline; group names
        are scanner and protocol names, never patient data."""
        return (
            f"drift alarm: scanner {self.key.calling_ae}, station {self.key.station}, "
            f"kernel {self.key.kernel}, thickness {self.key.thickness}: {quantity.quantity} "
            f"KS D={quantity.statistic:.2f} (p={quantity.p_value:.1e}), mean "
            f"{quantity.recent_mean:.4g} over {quantity.recent} studies of the last "
            f"{config.window_days} days vs {quantity.baseline_mean:.4g} over "
            f"{quantity.baseline} studies of the {self.baseline.description}; "
            f"alarm at D>{config.threshold:g} with p<{config.alpha:g}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.key.as_dict(),
            "label": self.key.label,
            "recent_studies": self.recent,
            "baseline": {
                "source": self.baseline.source,
                "description": self.baseline.description,
                "studies": self.baseline.studies,
            },
            "alarm": bool(self.alarms),
            "quantities": [q.as_dict() for q in self.quantities],
            "days": [d.as_dict() for d in self.days],
        }


@dataclass(frozen=True)
class DriftReport:
    """Everything ``stats --drift``, the log, the gauges and the web panel show."""

    now: datetime
    config: DriftConfig
    groups: list[GroupDrift]

    @property
    def alarms(self) -> list[tuple[GroupDrift, QuantityDrift]]:
        return [(group, quantity) for group in self.groups for quantity in group.alarms]

    def as_dict(self) -> dict[str, Any]:
        config = self.config
        return {
            "now": self.now.isoformat(),
            "window_days": config.window_days,
            "min_studies": config.min_studies,
            "threshold": config.threshold,
            "alpha": config.alpha,
            "baseline_window": (
                [config.baseline_start.isoformat(), config.baseline_end.isoformat()]
                if config.baseline_start and config.baseline_end
                else None
            ),
            "groups": [g.as_dict() for g in self.groups],
            "alarms": [
                {"label": g.key.label, "group": g.key.as_dict(), **q.as_dict()}
                for g, q in self.alarms
            ],
        }


def _group_drift(
    key: GroupKey,
    history: list[Observation],
    recent_since: datetime,
    baseline: Baseline,
    config: DriftConfig,
) -> GroupDrift:
    recent = [o for o in history if o.analysed_at >= recent_since]
    recent_values: dict[str, list[float]] = defaultdict(list)
    for o in recent:
        for name, value in o.quantities.items():
            recent_values[name].append(value)
    names = sorted(set(recent_values), key=lambda n: (n not in (PROBABILITY, DOMAIN_SCORE), n))
    return GroupDrift(
        key=key,
        recent=len(recent),
        baseline=baseline,
        quantities=[
            compare(name, recent_values[name], baseline.values.get(name, []), config)
            for name in names
        ],
        days=daily(history),
    )


def build_drift_report(
    session: Session, config: DriftConfig, *, now: datetime, reference: Baseline
) -> DriftReport:
    """Per group seen in the last ``HISTORY_DAYS`` (or the recent window, if longer): recent
    against its baseline; ``reference`` is the checkpoint's (``load_checkpoint_reference``)."""
    recent_since = now - timedelta(days=config.window_days)
    history_since = now - timedelta(days=max(HISTORY_DAYS, config.window_days))
    by_group: dict[GroupKey, list[Observation]] = defaultdict(list)
    for observation in load_observations(session, since=history_since):
        by_group[observation.key].append(observation)
    window, site = site_baselines(session, config)
    groups = []
    for key in sorted(by_group):
        own = site.get(key, [])
        if window is not None and len(own) >= config.min_studies:
            baseline = Baseline.of("site", window, (o.quantities for o in own))
        else:
            baseline = reference
        groups.append(_group_drift(key, by_group[key], recent_since, baseline, config))
    return DriftReport(now=now, config=config, groups=groups)


def log_drift_alarms(report: DriftReport, *, logger: logging.Logger = log) -> int:
    """One WARNING line per alarming quantity; returns the count."""
    for group, quantity in report.alarms:
        logger.warning(group.alarm_message(quantity, report.config))
    return len(report.alarms)


def drift_report(session: Session, settings: Settings, *, now: datetime) -> DriftReport:
    """The report as the settings configure it, against the checkpoint in use."""
    return build_drift_report(
        session,
        DriftConfig.from_settings(settings),
        now=now,
        reference=checkpoint_baseline(settings),
    )
