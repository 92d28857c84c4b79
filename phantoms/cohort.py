"""Who is in a run of phantom studies: the positives' severities and the negatives' groups.

A triage model must tell COVID-19 from normal lungs and from other lung disease, so a run's
negatives fall into groups (normal lungs, other pneumonia, other findings) whose shares can be
set, as can the positives' severities. Each study's group, findings and severity are drawn from
its own random stream, so asking for more studies never changes the ones already asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hrct_triage.phantoms.findings import CONFOUNDER_WEIGHTS, CONFOUNDERS, SEVERITY_MIX

__all__ = [
    "GROUPS",
    "NEGATIVE_CHOICES",
    "SEVERITY_MIX",
    "Case",
    "check_negative_mix",
    "check_severity_mix",
    "draw_case",
    "group_of",
    "parse_negative_mix",
    "parse_severity_mix",
]

GROUPS = ("covid", "normal", "other_pneumonia", "other_finding")
"""What a study is, in labels.csv's ``group`` column; all but ``covid`` are labelled healthy."""

NEGATIVE_CHOICES: tuple[str, ...] = (
    "normal",
    "other_pneumonia",
    "other_finding",
    *(name for name in CONFOUNDERS if name != "other_pneumonia"),
)
"""Names a negative mix may give shares to: a group (``other_finding`` draws one or two
confounders other than pneumonia, as often as the generator draws them), or one confounder."""


@dataclass(frozen=True)
class Case:
    """What one study is drawn to show; None leaves the choice to the generator's own draw."""

    findings: tuple[str, ...] | None  # confounders to paint (``findings.CONFOUNDERS`` names)
    severity: str | None  # COVID-19 extent (a SEVERITY_MIX key); None for negatives


def _check_shares(mix: Mapping[str, float], known: tuple[str, ...], what: str) -> None:
    unknown = [name for name in mix if name not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    if any(not math.isfinite(v) or v < 0 for v in mix.values()):
        raise ValueError(f"{what} shares must be finite and >= 0")
    if abs(sum(mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"{what} shares must sum to 1, got {sum(mix.values()):g}")


def _parse_shares(text: str, what: str) -> dict[str, float]:
    given: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{what} share {part!r} is not NAME=SHARE")
        try:
            given[name.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"{what} share {part!r}: {value!r} is not a number") from exc
    return given


def check_severity_mix(mix: Mapping[str, float]) -> None:
    """Refuse shares that name an unknown severity, are negative, or do not sum to 1."""
    _check_shares(mix, tuple(SEVERITY_MIX), "severity")


def parse_severity_mix(text: str) -> dict[str, float]:
    """``"focal=0.05,mild=0.5,moderate=0.25,severe=0.2"`` as shares, checked; unnamed ones are 0.

    The order is always SEVERITY_MIX's, so the same shares written in another order draw the
    same patients.
    """
    given = _parse_shares(text, "severity")
    check_severity_mix(given)
    return {name: given.get(name, 0.0) for name in SEVERITY_MIX}


def check_negative_mix(mix: Mapping[str, float]) -> None:
    """Refuse shares that name an unknown group or confounder, are negative, or do not sum to 1."""
    _check_shares(mix, NEGATIVE_CHOICES, "negative group")


def parse_negative_mix(text: str) -> dict[str, float]:
    """``"normal=0.4,other_pneumonia=0.2,other_finding=0.4"`` (or confounder names such as
    ``nodule=0.1``) as shares, checked, in NEGATIVE_CHOICES' order whatever the text's order."""
    given = _parse_shares(text, "negative group")
    check_negative_mix(given)
    return {name: given[name] for name in NEGATIVE_CHOICES if name in given}


def draw_case(
    rng: np.random.Generator,
    *,
    covid: bool,
    severity_mix: Mapping[str, float],
    negative_mix: Mapping[str, float] | None,
) -> Case:
    """The severity of a positive study, or the findings of a negative one.

    Positives and, without a ``negative_mix``, negatives keep the generator's own draw of
    confounders (some of both labels get them, so none gives the label away).
    """
    if covid:
        names = list(severity_mix)
        shares = np.array([severity_mix[n] for n in names], dtype=np.float64)
        return Case(None, str(names[int(rng.choice(len(names), p=shares / shares.sum()))]))
    if negative_mix is None:
        return Case(None, None)
    names = list(negative_mix)
    shares = np.array([negative_mix[n] for n in names], dtype=np.float64)
    choice = names[int(rng.choice(len(names), p=shares / shares.sum()))]
    if choice == "normal":
        return Case((), None)
    if choice != "other_finding":
        return Case((choice,), None)
    pool = [name for name in CONFOUNDERS if name != "other_pneumonia"]
    weights = np.array([CONFOUNDER_WEIGHTS[n] for n in pool], dtype=np.float64)
    count = 1 + int(rng.random() < 0.3)
    picked = rng.choice(len(pool), size=count, replace=False, p=weights / weights.sum())
    return Case(tuple(pool[int(i)] for i in sorted(picked)), None)


def group_of(*, covid: bool, findings: tuple[str, ...] | list[str]) -> str:
    """The labels.csv group of a study from its label and the confounders it shows."""
    if covid:
        return "covid"
    if "other_pneumonia" in findings:
        return "other_pneumonia"
    return "other_finding" if findings else "normal"
