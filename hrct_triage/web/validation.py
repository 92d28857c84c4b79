"""The ``/validation`` page and ``/api/validation``: the local validation figures computed live
from the worklist and its reference labels, the same as ``hrct-triage validate`` writes.

Registered on the web app by ``register_validation``; the app's token check covers these paths.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from hrct_triage.common.settings import get_settings
from hrct_triage.db.validation import (
    DEFAULT_MIN_PER_CLASS,
    DEFAULT_TARGET_SENSITIVITY,
    ValidationOptions,
    validation_figures,
)
from hrct_triage.db.validation_cases import CaseFilter, Cases, labelled_cases
from hrct_triage.db.validation_plots import validation_pngs

T = TypeVar("T")

_SOURCES = {
    "option": "as asked",
    "recorded": "the one every study was decided with",
    "configured": "HRCT_THRESHOLD or the paper's; the studies recorded none or several",
}


def _figures(
    read: Callable[[], Session],
    since: datetime | None,
    scanner: str | None,
    model: str | None,
    threshold: float | None,
    target: float,
    min_per_class: int,
) -> tuple[Cases, dict[str, Any]]:
    selection = CaseFilter(
        since=since if since is None or since.tzinfo else since.replace(tzinfo=UTC),
        scanner=scanner or None,
        model_version=model or None,
    )
    try:
        options = ValidationOptions(
            configured_threshold=get_settings().analysis.threshold,
            threshold=threshold,
            target_sensitivity=target,
            min_positives=min_per_class,
            min_negatives=min_per_class,
        )
    except ValueError as error:
        raise HTTPException(400, str(error)) from error
    with read() as session:
        found = labelled_cases(session, selection)
    return found, {"filters": selection.as_dict(), **validation_figures(found, options)}


def _form_value(text: str, parse: Callable[[str], T], name: str) -> T | None:
    if not text.strip():
        return None
    try:
        return parse(text.strip())
    except ValueError as error:
        raise HTTPException(400, f"{name}: {text[:40]!r} is not understood") from error


def register_validation(
    app: FastAPI, read: Callable[[], Session], templates: Jinja2Templates
) -> None:
    """Add the page and its JSON to ``app``."""

    @app.get("/api/validation")
    def api_validation(
        since: Annotated[datetime | None, Query()] = None,
        scanner: Annotated[str | None, Query()] = None,
        model: Annotated[str | None, Query()] = None,
        threshold: Annotated[float | None, Query(ge=0, le=1)] = None,
        target_sensitivity: Annotated[float, Query(ge=0, le=1)] = DEFAULT_TARGET_SENSITIVITY,
        min_per_class: Annotated[int, Query(ge=1)] = DEFAULT_MIN_PER_CLASS,
    ) -> dict[str, Any]:
        """The figures as ``hrct-triage validate --json`` prints them."""
        _, document = _figures(
            read, since, scanner, model, threshold, target_sensitivity, min_per_class
        )
        return document

    @app.get("/validation", response_class=HTMLResponse)
    def validation_page(
        request: Request,
        since_text: Annotated[str, Query(alias="since")] = "",
        scanner: Annotated[str | None, Query()] = None,
        model: Annotated[str | None, Query()] = None,
        threshold_text: Annotated[str, Query(alias="threshold")] = "",
        target_text: Annotated[str, Query(alias="target_sensitivity")] = "",
        min_per_class: Annotated[int, Query(ge=1)] = DEFAULT_MIN_PER_CLASS,
    ) -> Response:
        # The form sends its empty fields too: empty means the default, not an error.
        since = _form_value(since_text, datetime.fromisoformat, "since")
        threshold = _form_value(threshold_text, float, "threshold")
        target = _form_value(target_text, float, "target_sensitivity")
        target_sensitivity = DEFAULT_TARGET_SENSITIVITY if target is None else target
        found, document = _figures(
            read, since, scanner, model, threshold, target_sensitivity, min_per_class
        )
        title = f"{', '.join(found.model_versions) or 'all models'}, n={len(found.cases)}"
        pngs = validation_pngs(found, document, title=title) if found.cases else {}
        return templates.TemplateResponse(
            request,
            "validation.html",
            {
                "v": document,
                "source": _SOURCES[document["threshold_source"]],
                "pngs": {
                    name: "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                    for name, data in pngs.items()
                },
                "form": {
                    "since": since.isoformat() if since else "",
                    "scanner": scanner or "",
                    "model": model or "",
                    "threshold": "" if threshold is None else threshold,
                    "target_sensitivity": target_sensitivity,
                },
            },
        )
