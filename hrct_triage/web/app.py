"""A small read-only web worklist and JSON API, served by ``hrct-triage web``.

Pages: the worklist, urgent first, with the instances each scanner sent that the listener
refused, one page per study with its heat-map thumbnails and the per-slice probability plot,
``/validation`` (``web.validation``) and ``/drift`` (``web.drift_panel``). JSON: ``/api/worklist``
and ``/api/studies/{uid}``, the same documents as ``hrct-triage worklist --json`` and ``show
--json`` (less server file paths), ``/api/refusals``, ``/api/validation`` and ``/api/drift``.
``/healthz`` answers without a token, for container health checks.

Every other path needs the token of ``HRCT_WEB_TOKEN``: as ``Authorization: Bearer <token>``
(scripts), or once as ``?token=<token>`` in the browser, which is answered with a cookie and a
redirect to the same page without the token, so it does not stay in the address bar or the
history. Nothing here writes to the worklist. The database holds no patient names or IDs, so
none can be shown; studies are named by accession number, study UID and scanner AE.
"""

from __future__ import annotations

import hmac
import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.common.errors import ConfigurationError
from hrct_triage.common.settings import Settings
from hrct_triage.db import queries, stats
from hrct_triage.db.models import Output, Study, StudyStatus
from hrct_triage.db.refusal_summary import ScannerRefusals, refusals_by_scanner
from hrct_triage.web import drift_panel
from hrct_triage.web.validation import register_validation

log = logging.getLogger(__name__)

TOKEN_ENV = "HRCT_WEB_TOKEN"
COOKIE = "hrct_web_token"
_HERE = Path(__file__).parent
_PUBLIC_PREFIXES = ("/healthz", "/static/")
#: Worklist rows on one page: a busy department's day; older studies are in ``--json``.
DEFAULT_LIMIT = 200
#: The study page shows heat maps this wide (px); the full picture is one click away.
THUMBNAIL_PX = 320
FULL_PX = 1024
#: Rendered PNGs kept in memory: outputs never change under one SOP Instance UID, and a
#: worklist screen reloads the same few studies all day.
_PNG_CACHE_ENTRIES = 128
#: How often the worklist page reloads itself, seconds.
REFRESH_SECONDS = 30
#: Refusals the worklist page counts: a week, so a scanner that fails only now and then (a
#: weekend's misconfiguration) still shows on Monday; older ones are in ``hrct-triage stats``.
REFUSALS_WINDOW = timedelta(days=7)
_MIN_TOKEN_LENGTH = 16


class WebConfigError(ConfigurationError):
    """The web worklist cannot start as configured (no token, for one)."""


def required_token(setting: str | None) -> str:
    """``HRCT_WEB_TOKEN`` (``WebSettings.web_token``), required: a worklist reachable without
    one would show every study."""
    token = (setting or "").strip()
    if not token:
        raise WebConfigError(
            f"{TOKEN_ENV} is not set: the web worklist needs a shared secret. Make one with "
            f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'` and set {TOKEN_ENV}."
        )
    if len(token) < _MIN_TOKEN_LENGTH:
        log.warning(
            "%s is shorter than %d characters; use a long random one", TOKEN_ENV, _MIN_TOKEN_LENGTH
        )
    return token


# --- authentication -------------------------------------------------------------------------


def _presented_token(request: Request) -> tuple[str | None, bool]:
    """The token the request carries and whether it came in the query string."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip(), False
    if "token" in request.query_params:
        return request.query_params["token"], True
    return request.cookies.get(COOKIE), False


def _same_token(presented: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak the token."""
    return presented is not None and hmac.compare_digest(
        presented.encode("utf-8"), expected.encode("utf-8")
    )


def _without_token(request: Request) -> str:
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    return request.url.path + (f"?{urlencode(query)}" if query else "")


def _unauthorised(request: Request, templates: Jinja2Templates) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="hrct-triage"'}
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": "token needed"}, status_code=401, headers=headers)
    return templates.TemplateResponse(
        request,
        "error.html",
        {"code": 401, "title": "Token needed", "message": _TOKEN_HELP},
        status_code=401,
        headers=headers,
    )


_TOKEN_HELP = (
    "Open this page once as …/?token=YOUR_TOKEN (the HRCT_WEB_TOKEN of the server); "
    "the browser then keeps it in a cookie."
)

_TITLES = {400: "Bad request", 404: "Not found"}

Handler = Callable[[Request], Awaitable[Response]]


def _auth_middleware(
    token: str, templates: Jinja2Templates
) -> Callable[[Request, Handler], Awaitable[Response]]:
    """Check the token on every path but the public ones; trade a query token for a cookie."""

    async def check(request: Request, call_next: Handler) -> Response:
        response = await _checked(request, call_next)
        # Our own access log: the path only, since a query string may carry the token.
        log.info("%s %s %d", request.method, request.url.path, response.status_code)
        return response

    async def _checked(request: Request, call_next: Handler) -> Response:
        if request.url.path.startswith(_PUBLIC_PREFIXES):
            return await call_next(request)
        presented, from_query = _presented_token(request)
        if not _same_token(presented, token):
            return _unauthorised(request, templates)
        if from_query and request.method == "GET" and not request.url.path.startswith("/api/"):
            redirect = RedirectResponse(_without_token(request), status_code=303)
            redirect.set_cookie(
                COOKIE,
                token,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return redirect
        return await call_next(request)

    return check


# --- presentation helpers -------------------------------------------------------------------


duration = stats.format_seconds


def local_time(value: str | datetime | None) -> str:
    """A stamp in the server's time zone, to the second, with the zone's name."""
    if value is None:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def short_uid(uid: str, keep: int = 10) -> str:
    """The end of a UID (the part that differs between studies), for a narrow column."""
    return uid if len(uid) <= keep + 1 else f"…{uid[-keep:]}"


@dataclass(frozen=True)
class PlotPoint:
    x: float
    y: float


_PLOT_W, _PLOT_H = 720, 220
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 44, 14, 14, 30


def slice_plot_svg(
    probabilities: list[float], threshold: float | None, marked: set[int] | None = None
) -> Markup:
    """Inline SVG of the per-slice COVID-19 probability in table order, with the decision
    threshold and the heat-map slices marked. Built by hand: crisp at any zoom, and the page
    needs no image request and no plotting library."""
    if not probabilities:
        return Markup('<p class="muted">No slice probabilities recorded.</p>')
    width, height = _PLOT_W - _PAD_L - _PAD_R, _PLOT_H - _PAD_T - _PAD_B
    count = len(probabilities)

    def at(index: int, p: float) -> PlotPoint:
        x = _PAD_L + (width * index / (count - 1) if count > 1 else width / 2)
        return PlotPoint(round(x, 1), round(_PAD_T + height * (1 - min(max(p, 0.0), 1.0)), 1))

    points = [at(i, p) for i, p in enumerate(probabilities)]
    line = " ".join(f"{pt.x},{pt.y}" for pt in points)
    base = _PAD_T + height
    area = f"{points[0].x},{base} {line} {points[-1].x},{base}"
    parts = [
        f'<svg class="plot" viewBox="0 0 {_PLOT_W} {_PLOT_H}" role="img" '
        f'aria-label="Per-slice COVID-19 probability, {count} slices">'
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = at(0, tick).y
        parts.append(
            f'<line class="gridline" x1="{_PAD_L}" x2="{_PAD_L + width}" y1="{y}" y2="{y}"/>'
        )
        parts.append(f'<text class="tick" x="{_PAD_L - 6}" y="{y + 4}">{tick:.2f}</text>')
    parts.append(f'<polygon class="area" points="{area}"/>')
    parts.append(f'<polyline class="line" points="{line}"/>')
    if threshold is not None:
        y = at(0, threshold).y
        parts.append(
            f'<line class="threshold" x1="{_PAD_L}" x2="{_PAD_L + width}" y1="{y}" y2="{y}"/>'
            f'<text class="threshold-label" x="{_PAD_L + width - 4}" y="{y - 5}">'
            f"threshold {threshold:.2f}</text>"
        )
    for index in sorted(marked or ()):
        pt = points[index]
        parts.append(
            f'<circle class="marked" cx="{pt.x}" cy="{pt.y}" r="4">'
            f"<title>heat map: slice {index + 1}, p={probabilities[index]:.3f}</title></circle>"
        )
    for index in {0, count - 1}:
        parts.append(
            f'<text class="xtick" x="{points[index].x}" y="{base + 18}">{index + 1}</text>'
        )
    parts.append(
        f'<text class="xlabel" x="{_PAD_L + width / 2}" y="{base + 18}">slice (table order)</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))


# --- heat-map pictures ----------------------------------------------------------------------


@lru_cache(maxsize=_PNG_CACHE_ENTRIES)
def _png(path: str, mtime_ns: int, max_px: int) -> bytes:
    """The SC's pixels as a PNG no larger than ``max_px`` (``mtime_ns`` keys the cache)."""
    import numpy as np
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if ds.get("PhotometricInterpretation", "") != "RGB":
        pixels = pixels.astype(np.float64)
        span = float(pixels.max() - pixels.min()) or 1.0
        pixels = ((pixels - pixels.min()) / span * 255).astype(np.uint8)
    if pixels.ndim == 4 or (pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1):
        pixels = pixels[0]  # a multi-frame object: its first frame
    image = Image.fromarray(pixels)
    image.thumbnail((max_px, max_px))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def sc_source_uid(path: str) -> str | None:
    """The CT image a heat map was computed from (its Source Image Sequence)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    except (OSError, AttributeError, IndexError, pydicom.errors.InvalidDicomError):
        return None


# --- view models ----------------------------------------------------------------------------


def _worklist_view(
    rows: list[dict[str, Any]],
    timelines: dict[str, stats.StudyTimeline],
    *,
    now: datetime,
    target_seconds: float,
) -> list[dict[str, Any]]:
    """Worklist rows plus what the page shows beside their keys: time waiting, turnaround,
    whether it is over the target."""
    view = []
    for row in rows:
        timeline = timelines.get(row["study_uid"])
        waited = timeline.waiting_seconds(now) if timeline else None
        notified = timeline is not None and timeline.sr_acknowledged_at is not None
        view.append(
            {
                **row,
                "received_ago": stats.seconds_between(
                    timeline.last_instance_at if timeline else None, now
                ),
                "turnaround": waited,
                "notified": notified,
                "over_target": bool(
                    timeline
                    and timeline.owes_notification
                    and waited is not None
                    and waited > target_seconds
                ),
            }
        )
    return view


def _public_outputs(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outputs without the server's file paths, which a browser has no use for."""
    return [{k: v for k, v in output.items() if k != "path"} for output in outputs]


def _api_detail(detail: dict[str, Any], timeline: stats.StudyTimeline | None) -> dict[str, Any]:
    document = {**detail}
    document["outputs"] = _public_outputs(detail["outputs"])
    document["all_outputs"] = _public_outputs(detail["all_outputs"])
    document.update(timeline.as_dict() if timeline else {})
    return document


# --- the application ------------------------------------------------------------------------


def create_app(
    sessions: sessionmaker[Session],
    *,
    token: str,
    target_seconds: float = stats.DEFAULT_TARGET_SECONDS,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    settings: Settings | None = None,
) -> FastAPI:
    """The web worklist over ``sessions``; every page but ``/healthz`` needs ``token``;
    ``settings`` configure the drift panel (None: the process's)."""
    if not token:
        raise WebConfigError(f"{TOKEN_ENV} is empty")
    app = FastAPI(title="hrct-triage worklist", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    templates.env.filters.update(duration=duration, local_time=local_time, short_uid=short_uid)
    templates.env.globals.update(refresh_seconds=REFRESH_SECONDS, statuses=StudyStatus.ALL)
    app.mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static")
    app.middleware("http")(_auth_middleware(token, templates))

    def read() -> Session:
        return sessions()

    @app.exception_handler(HTTPException)
    async def _errors(request: Request, error: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": error.detail}, status_code=error.status_code)
        return templates.TemplateResponse(
            request,
            "error.html",
            {
                "code": error.status_code,
                "title": _TITLES.get(error.status_code, "Error"),
                "message": str(error.detail),
            },
            status_code=error.status_code,
        )

    register_validation(app, read, templates)

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        """Database reachable: what a container health check needs to know."""
        with read() as session:
            session.execute(text("SELECT 1"))
        return {"ok": True}

    @app.get("/api/worklist")
    def api_worklist(
        status: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = DEFAULT_LIMIT,
    ) -> list[dict[str, Any]]:
        """Studies, urgent first (``hrct-triage worklist --json``)."""
        _check_status(status)
        with read() as session:
            rows = queries.worklist_rows(session, status=status, limit=limit)
        return [{**row, "outputs": _public_outputs(row["outputs"])} for row in rows]

    @app.get("/api/studies/{study_uid}")
    def api_study(study_uid: str) -> dict[str, Any]:
        """One study (``hrct-triage show --json``) with its time to notification."""
        with read() as session:
            detail = queries.study_detail(session, study_uid)
            timeline = stats.load_timeline(session, study_uid)
        if detail is None:
            raise HTTPException(404, f"no study {study_uid}")
        return _api_detail(detail, timeline)

    @app.get("/api/refusals")
    def api_refusals() -> dict[str, Any]:
        """Refused C-STOREs per scanner over ``REFUSALS_WINDOW`` (``stats --json`` has all)."""
        since = clock() - REFUSALS_WINDOW
        with read() as session:
            found = refusals_by_scanner(session, since=since)
        return {"since": since.isoformat(), "by_scanner": [s.as_dict() for s in found]}

    drift_panel.register(app, templates, read, settings=settings, clock=clock)

    @app.get("/", response_class=HTMLResponse)
    def worklist_page(
        request: Request,
        status: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = DEFAULT_LIMIT,
    ) -> Response:
        status = status or None
        _check_status(status)
        with read() as session:
            rows = queries.worklist_rows(session, status=status, limit=limit)
            timelines = {
                t.study_uid: t
                for t in stats.load_timelines(session, study_uids=[r["study_uid"] for r in rows])
            }
            now = clock()
            refused: list[ScannerRefusals] = refusals_by_scanner(
                session, since=now - REFUSALS_WINDOW
            )
        view = _worklist_view(rows, timelines, now=now, target_seconds=target_seconds)
        return templates.TemplateResponse(
            request,
            "worklist.html",
            {
                "rows": view,
                "status": status,
                "limit": limit,
                "now": now,
                "target_seconds": target_seconds,
                "counts": _counts(view),
                "refusals": [
                    {**vars(r), "last_ago": stats.seconds_between(r.last_at, now)} for r in refused
                ],
                "refusals_days": REFUSALS_WINDOW.days,
            },
        )

    @app.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str) -> Response:
        with read() as session:
            detail = queries.study_detail(session, study_uid)
            timeline = stats.load_timeline(session, study_uid)
        if detail is None:
            raise HTTPException(404, f"no study {study_uid}")
        heatmaps = _heatmaps(detail)
        return templates.TemplateResponse(
            request,
            "study.html",
            {
                "study": detail,
                "timeline": timeline,
                "stages": timeline.stages if timeline else {},
                "heatmaps": heatmaps,
                "plot": _plot(detail, heatmaps),
                "target_seconds": target_seconds,
                "now": clock(),
            },
        )

    @app.get("/studies/{study_uid}/sc/{sop_instance_uid}.png")
    def heatmap_png(
        study_uid: str, sop_instance_uid: str, size: Annotated[str, Query()] = "thumb"
    ) -> Response:
        """A heat-map SC as PNG. The file is found through the worklist, never from the URL."""
        with read() as session:
            path = session.scalar(
                select(Output.path)
                .join(Study, Study.id == Output.study_id)
                .where(
                    Study.study_uid == study_uid,
                    Output.sop_instance_uid == sop_instance_uid,
                    Output.kind == "sc",
                )
            )
        if path is None or not Path(path).is_file():
            raise HTTPException(404, f"no heat map {sop_instance_uid} in study {study_uid}")
        max_px = FULL_PX if size == "full" else THUMBNAIL_PX
        png = _png(path, Path(path).stat().st_mtime_ns, max_px)
        # Private: the picture shows a patient's anatomy; immutable under its SOP Instance UID.
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
        )

    return app


def _check_status(status: str | None) -> None:
    if status is not None and status not in StudyStatus.ALL:
        raise HTTPException(400, f"unknown status {status!r}; one of {', '.join(StudyStatus.ALL)}")


def _counts(view: list[dict[str, Any]]) -> dict[str, int]:
    """The header line: how many positive (live), shadow, waiting and over-target studies are
    listed; a shadow positive is counted as a shadow result, not as a positive."""
    return {
        "studies": len(view),
        "positive": sum(1 for r in view if r["positive"] and r.get("mode") != "shadow"),
        "shadow": sum(1 for r in view if r.get("mode") == "shadow"),
        "open": sum(
            1
            for r in view
            if r["status"] in (StudyStatus.RECEIVING, StudyStatus.QUEUED, StudyStatus.PROCESSING)
        ),
        "over_target": sum(1 for r in view if r["over_target"]),
    }


def _heatmaps(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """The latest analysis' SCs, once each (an output has a row per destination)."""
    seen: dict[str, dict[str, Any]] = {}
    for output in detail["outputs"]:
        if output["kind"] == "sc" and output["sop_instance_uid"] not in seen:
            seen[output["sop_instance_uid"]] = {
                "sop_instance_uid": output["sop_instance_uid"],
                "source_uid": sc_source_uid(output["path"]),
            }
    return list(seen.values())


def _plot(detail: dict[str, Any], heatmaps: list[dict[str, Any]]) -> Markup:
    pairs = detail.get("slice_probabilities") or []
    uids = [str(pair[0]) for pair in pairs]
    sources = {h["source_uid"] for h in heatmaps}
    marked = {i for i, uid in enumerate(uids) if uid in sources}
    return slice_plot_svg([float(pair[1]) for pair in pairs], detail.get("threshold"), marked)


# --- serving ----------------------------------------------------------------------------------


def serve(
    *,
    host: str,
    port: int,
    database_url: str,
    token: str,
    target_seconds: float = stats.DEFAULT_TARGET_SECONDS,
    log_level: str = "info",
) -> None:
    """Run the web worklist with uvicorn until interrupted."""
    import uvicorn

    from hrct_triage.db.session import make_engine, make_sessionmaker

    app = create_app(
        make_sessionmaker(make_engine(database_url)),
        token=required_token(token),
        target_seconds=target_seconds,
    )
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # uvicorn's access log prints query strings, and with them a browser's ?token=.
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, proxy_headers=True, access_log=False
    )
