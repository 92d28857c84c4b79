"""The drift panel of the web worklist: ``/drift`` (groups, statistics, alarms, plots),
``/drift/{group}.png`` (one group's daily distributions, drawn by matplotlib on the server) and
``/api/drift`` (the document of ``hrct-triage stats --drift --json``)."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from hrct_triage.common.settings import Settings, get_settings
from hrct_triage.db import drift

#: The input statistics drawn, when a group has them: mean lung HU and noise, the two a
#: kernel or dose change moves first; every other one is in the table and the JSON.
PLOTTED_INPUTS = ("lung_hu_mean", "noise_hu")


def _baseline_means(group: drift.GroupDrift) -> dict[str, float]:
    return {q.quantity: q.baseline_mean for q in group.quantities if q.baseline_mean is not None}


def plot_png(group: drift.GroupDrift) -> bytes:
    """Daily distributions of one group: probability p10-p90 with its median and the positive
    rate, domain score, and the plotted input statistics; the baseline's means dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [d.day for d in group.days]
    baseline = _baseline_means(group)
    panels: list[tuple[str, str]] = [
        (drift.PROBABILITY, "study probability"),
        (drift.DOMAIN_SCORE, "domain score"),
    ]
    panels += [(name, name) for name in PLOTTED_INPUTS]
    alarmed = {q.quantity for q in group.alarms}
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 2.6), dpi=100, sharex=True)
    for axis, (name, title) in zip(axes, panels, strict=True):
        if name == drift.PROBABILITY:
            rows = [(d.day, d.probability) for d in group.days if d.probability]
            _band(axis, rows)
            rates = [(d.day, d.positive_rate) for d in group.days if d.positive_rate is not None]
            if rates:
                axis.plot(
                    *zip(*rates, strict=True), "s", color="#dc2626", ms=4, label="positive rate"
                )
                axis.legend(loc="upper left", fontsize=7, frameon=False)
            axis.set_ylim(-0.02, 1.02)
        elif name == drift.DOMAIN_SCORE:
            _band(axis, [(d.day, d.domain_score) for d in group.days if d.domain_score])
        else:
            points = [(d.day, d.input_means[name]) for d in group.days if name in d.input_means]
            if points:
                axis.plot(*zip(*points, strict=True), "o-", color="#334155", ms=3)
        if name in baseline:
            axis.axhline(baseline[name], color="#0f766e", ls="--", lw=1, label="baseline mean")
        axis.set_title(
            title,
            fontsize=9,
            color="#b91c1c" if name in alarmed else "#0f172a",
            fontweight="bold" if name in alarmed else "normal",
        )
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    if days:
        figure.autofmt_xdate(rotation=30)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    plt.close(figure)
    return out.getvalue()


def _band(axis: Any, rows: list[tuple[Any, dict[str, float]]]) -> None:
    """p10-p90 shaded, p50 drawn, per day."""
    rows = [(day, q) for day, q in rows if {"p10", "p50", "p90"} <= set(q)]
    if not rows:
        return
    days = [day for day, _ in rows]
    axis.fill_between(
        days,
        [q["p10"] for _, q in rows],
        [q["p90"] for _, q in rows],
        color="#94a3b8",
        alpha=0.35,
        lw=0,
    )
    axis.plot(days, [q["p50"] for _, q in rows], "o-", color="#334155", ms=3)


def register(
    app: FastAPI,
    templates: Jinja2Templates,
    read: Callable[[], Session],
    *,
    settings: Settings | None,
    clock: Callable[[], datetime],
) -> None:
    """Add the drift pages to the web worklist ``app``."""

    def report() -> drift.DriftReport:
        with read() as session:
            return drift.drift_report(session, settings or get_settings(), now=clock())

    @app.get("/api/drift")
    def api_drift() -> dict[str, Any]:
        """``hrct-triage stats --drift --json``."""
        return report().as_dict()

    @app.get("/drift", response_class=HTMLResponse)
    def drift_page(request: Request) -> Response:
        found = report()
        return templates.TemplateResponse(
            request,
            "drift.html",
            {
                "report": found,
                "config": found.config,
                "alarms": [
                    (group, quantity, group.alarm_message(quantity, found.config))
                    for group, quantity in found.alarms
                ],
            },
        )

    @app.get("/drift/{slug}.png")
    def drift_png(slug: str) -> Response:
        for group in report().groups:
            if group.key.slug == slug:
                return Response(
                    plot_png(group), media_type="image/png", headers={"Cache-Control": "no-store"}
                )
        raise HTTPException(404, f"no scanner and protocol {slug}")
