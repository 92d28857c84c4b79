"""The web worklist (web.app) served by uvicorn on a free port, over a real SQLite worklist
filled through the worklist's own transitions, with real SR and heat-map SC files; the pages are
driven in headless Chromium (Debian's ``chromium``) with Playwright.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image
from playwright.sync_api import ViewportSize, sync_playwright
from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.session import make_engine, make_sessionmaker, transaction
from hrct_triage.web.app import (
    COOKIE,
    WebConfigError,
    create_app,
    required_token,
    slice_plot_svg,
)
from hrct_triage.worker.outputs import Analysed, write_outputs
from tests.helpers.fake_study import ct_series, make_analysis
from tests.helpers.ports import free_port
from tests.helpers.ports import wait_for_port as _wait_for_port

TOKEN = "test-token-0123456789abcdef"
PACS = "PACS@127.0.0.1:104"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VIEWPORT: ViewportSize = {"width": 1360, "height": 900}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass(frozen=True)
class Worklist:
    base_url: str
    positive_uid: str
    negative_uid: str
    heatmap_uids: list[str]


# ------------------------------------------------------------------ a worklist, the real way


def _facts(ds: Dataset, *, accession: str, scanner: str) -> worklist.InstanceFacts:
    return worklist.InstanceFacts(
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=CT_IMAGE,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/spool/{ds.SOPInstanceUID}.dcm",
        size_bytes=1000,
        sha256=ds.SOPInstanceUID.replace(".", "")[:64].ljust(64, "0"),
        modality="CT",
        series_number=3,
        series_description="Thorax 1.0 B70f",
        accession_number=accession,
        calling_ae=scanner,
    )


def _receive(
    sessions: sessionmaker[Session], headers: list[Dataset], at: datetime, **labels: str
) -> None:
    """The listener's part: every instance recorded, one second apart."""
    with transaction(sessions) as session:
        for i, ds in enumerate(headers):
            facts = _facts(ds, **labels)
            worklist.record_instance(
                session, facts, association_id=None, now=at + timedelta(seconds=i)
            )


def _complete(sessions: sessionmaker[Session], at: datetime) -> None:
    with transaction(sessions) as session:
        worklist.complete_ready_studies(session, quiet_seconds=10, now=at)


def _claim(sessions: sessionmaker[Session], uid: str, at: datetime) -> worklist.Claim:
    from hrct_triage.db.queries import find_study

    with transaction(sessions) as session:
        study = find_study(session, uid)
        assert study is not None
        claim = worklist.claim(session, study.id, worker="test", lease_seconds=60, now=at)
    assert claim is not None
    return claim


def _slice_curve(count: int, peak: float) -> list[float]:
    """A believable per-slice curve: low at the apices and bases, high mid-lung."""
    middle = (count - 1) / 2
    return [round(peak * (1 - ((i - middle) / (middle + 1)) ** 2), 4) for i in range(count)]


def _analyse(
    sessions: sessionmaker[Session],
    headers: list[Dataset],
    at: datetime,
    *,
    positive: bool,
    out_dir: Path,
    destinations: list[str],
) -> list[worklist.OutputRecord]:
    """The worker's part: claim, real SR and SC files, the result recorded."""
    claim = _claim(sessions, headers[0].StudyInstanceUID, at)
    analysis = make_analysis(headers, positive=positive, heatmaps=3)
    records = write_outputs(
        Analysed(analysis, headers),
        generation=claim.generation,
        content_datetime=at,
        predecessor=None,
        out_dir=out_dir,
    )
    curve = _slice_curve(len(headers), 0.99 if positive else 0.25)
    record = worklist.AnalysisRecord(
        probability=analysis.probability,
        positive=analysis.positive,
        threshold=analysis.threshold,
        model_version=analysis.model.version,
        series_uid=analysis.series_uid,
        slice_probabilities=[[ds.SOPInstanceUID, p] for ds, p in zip(headers, curve, strict=True)],
        timings={"inference": 1.5},
    )
    with transaction(sessions) as session:
        assert worklist.finish_analysis(
            session,
            claim,
            analysis=record,
            outputs=records,
            destinations=destinations,
            now=at + timedelta(seconds=40),
            delivery_grace_seconds=60,
        )
    return records


def _deliver(sessions: sessionmaker[Session], uid: str, at: datetime) -> None:
    """The delivery round: every object acknowledged by the PACS, the study settles done."""
    from hrct_triage.db.queries import find_study

    with transaction(sessions) as session:
        study = find_study(session, uid)
        assert study is not None
        for delivery, _ in worklist.pending_deliveries(session, study.id):
            worklist.record_delivery(
                session, delivery.id, status_code=0, error=None, max_attempts=3, now=at
            )
        worklist.settle_delivery(session, study.id, now=at, retry_at=at)


def _fill(sessions: sessionmaker[Session], out_dir: Path) -> Worklist:
    """A positive study delivered, a negative one, one queued, one failed, one arriving."""
    start = datetime.now(UTC) - timedelta(hours=1)
    negative, positive, queued, failed, arriving = (ct_series(slices=20) for _ in range(5))
    _receive(sessions, negative, start, accession="ACC1001", scanner="CT_SOUTH")
    _receive(
        sessions, positive, start + timedelta(minutes=5), accession="ACC1002", scanner="CT_NORTH"
    )
    _receive(
        sessions, queued, start + timedelta(minutes=8), accession="ACC1003", scanner="CT_NORTH"
    )
    _receive(
        sessions, failed, start + timedelta(minutes=9), accession="ACC1004", scanner="CT_SOUTH"
    )
    _complete(sessions, start + timedelta(minutes=15))
    _analyse(
        sessions,
        negative,
        start + timedelta(minutes=16),
        positive=False,
        out_dir=out_dir / "negative",
        destinations=[],
    )
    records = _analyse(
        sessions,
        positive,
        start + timedelta(minutes=17),
        positive=True,
        out_dir=out_dir / "positive",
        destinations=[PACS],
    )
    _deliver(sessions, positive[0].StudyInstanceUID, start + timedelta(minutes=18))
    claim = _claim(sessions, failed[0].StudyInstanceUID, start + timedelta(minutes=19))
    with transaction(sessions) as session:
        worklist.fail_analysis(
            session,
            claim,
            reason="series selection: no axial series with 20 or more slices",
            max_attempts=1,
            retry_after_seconds=0,
            now=start + timedelta(minutes=20),
        )
    _receive(
        sessions,
        arriving,
        datetime.now(UTC) - timedelta(minutes=1),
        accession="ACC1005",
        scanner="CT_EAST",
    )
    return Worklist(
        base_url="",
        positive_uid=positive[0].StudyInstanceUID,
        negative_uid=negative[0].StudyInstanceUID,
        heatmap_uids=[r.sop_instance_uid for r in records if r.kind == "sc"],
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worklist]:
    """The web app on a free port over a migrated, filled SQLite worklist."""
    folder = tmp_path_factory.mktemp("web")
    url = f"sqlite:///{folder / 'worklist.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    filled = _fill(sessions, folder / "outputs")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(sessions, token=TOKEN, target_seconds=900),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for_port(port)
    yield Worklist(f"http://127.0.0.1:{port}", *list(vars(filled).values())[1:])
    server.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


def get(
    url: str, *, token: str | None = TOKEN, follow: bool = True
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET, 4xx included; redirects followed unless asked not to."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# ------------------------------------------------------------------ the JSON API and the token


def test_api_lists_the_worklist_urgent_first_with_spec_keys(served: Worklist) -> None:
    # when the worklist is asked for with the token
    status, headers, body = get(f"{served.base_url}/api/worklist")
    rows = json.loads(body)
    # then the positive study leads, the negative one closes, with the worklist's keys, no paths
    assert status == 200 and headers["content-type"] == "application/json"
    assert rows[0]["study_uid"] == served.positive_uid and rows[0]["positive"] is True
    assert rows[-1]["study_uid"] == served.negative_uid
    assert [r["status"] for r in rows] == ["done", "queued", "failed", "receiving", "done"]
    spec_keys = {"study_uid", "status", "reason", "probability", "positive", "threshold"}
    spec_keys |= {"priority", "model_version", "instances", "first_instance_at", "outputs"}
    spec_keys |= {"last_instance_at", "analysed_at", "delivered_at"}
    assert spec_keys <= rows[0].keys()
    assert {o["kind"] for o in rows[0]["outputs"]} == {"sr", "sc"}
    assert all("path" not in o for o in rows[0]["outputs"])


def test_api_study_carries_its_time_to_notification(served: Worklist) -> None:
    # when one study is asked for
    status, _, body = get(f"{served.base_url}/api/studies/{served.positive_uid}")
    detail = json.loads(body)
    # then it has the show --json record plus the clock: last image at +5 min 19 s, SR
    # acknowledged at +18 min
    assert status == 200
    assert detail["study_uid"] == served.positive_uid and detail["status"] == "done"
    assert len(detail["slice_probabilities"]) == 20
    assert detail["time_to_notification_seconds"] == 12 * 60 + 41
    assert detail["stage_seconds"]["receiving"] == 19


def test_api_unknown_study_and_bad_status_are_named(served: Worklist) -> None:
    missing = get(f"{served.base_url}/api/studies/1.2.3.4.5")
    bad = get(f"{served.base_url}/api/worklist?status=lost")
    assert missing[0] == 404 and b"no study 1.2.3.4.5" in missing[2]
    assert bad[0] == 400 and b"unknown status" in bad[2]


@pytest.mark.parametrize(
    "path",
    ["/api/worklist", "/api/studies/1.2.3", "/", "/studies/1.2.3", "/studies/1.2.3/sc/1.2.png"],
)
def test_every_page_needs_the_token(served: Worklist, path: str) -> None:
    # when a page is asked for without the token, and with a wrong one
    without = get(served.base_url + path, token=None)
    wrong = get(served.base_url + path, token="not-the-token-at-all")
    # then both are 401 and say how to authenticate
    assert without[0] == wrong[0] == 401
    assert without[1]["www-authenticate"].startswith("Bearer")


def test_health_needs_no_token(served: Worklist) -> None:
    assert get(f"{served.base_url}/healthz", token=None)[:3:2] == (200, b'{"ok":true}')


def test_query_token_becomes_a_cookie_and_leaves_the_address(served: Worklist) -> None:
    # when a browser opens the worklist with ?token=
    status, headers, _ = get(
        f"{served.base_url}/?status=done&token={TOKEN}", token=None, follow=False
    )
    # then it is sent to the same page without the token, holding an HttpOnly cookie
    assert status == 303
    assert headers["location"] == "/?status=done"
    assert headers["set-cookie"].startswith(f"{COOKIE}={TOKEN};")
    assert "httponly" in headers["set-cookie"].lower()


def test_heatmap_is_served_as_a_png_thumbnail(served: Worklist) -> None:
    uid = served.heatmap_uids[0]
    status, headers, body = get(f"{served.base_url}/studies/{served.positive_uid}/sc/{uid}.png")
    assert status == 200 and headers["content-type"] == "image/png"
    assert body.startswith(b"\x89PNG\r\n\x1a\n")


def test_missing_token_setting_is_a_clear_error() -> None:
    with pytest.raises(WebConfigError, match="HRCT_WEB_TOKEN is not set"):
        required_token(None)


def test_slice_plot_marks_threshold_and_heatmap_slices() -> None:
    svg = slice_plot_svg([0.1, 0.9, 0.95, 0.2], 0.8, {1, 2})
    assert svg.count('class="marked"') == 2 and "threshold 0.80" in svg


# ------------------------------------------------------------------ in a browser


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Debian package chromium is not installed (scripts/bootstrap installs it)")
    return path


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as image:
        return image.size


@pytest.mark.browser
def test_browser_shows_urgent_first_and_the_study_page(served: Worklist, tmp_path: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            # given the worklist opened once with the token in the address
            page.goto(f"{served.base_url}/?token={TOKEN}")
            # then the token left the address, and the positive study is the first row
            assert page.url == f"{served.base_url}/"
            rows = page.locator("tr.study")
            assert rows.count() == 5
            assert rows.first.get_attribute("data-study-uid") == served.positive_uid
            assert "is-positive" in (rows.first.get_attribute("class") or "")
            assert rows.first.locator(".result").inner_text() == "POSITIVE"
            page.screenshot(path=str(tmp_path / "worklist.png"))

            # when the study is opened from its row
            rows.first.locator("a.uid").click()
            page.wait_for_load_state("load")
            # then its heat maps are real pictures and the plot is drawn
            assert page.url.endswith(f"/studies/{served.positive_uid}")
            widths = page.eval_on_selector_all(".thumb img", "els => els.map(e => e.naturalWidth)")
            assert len(widths) == 3 and all(w > 0 for w in widths)
            assert page.locator("svg.plot circle.marked").count() >= 1
            assert "COVID-19 POSITIVE" in page.locator(".verdict").inner_text()
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        finally:
            browser.close()
    assert _png_size(tmp_path / "worklist.png") == (VIEWPORT["width"], VIEWPORT["height"])
    width, height = _png_size(tmp_path / "study.png")
    assert width == VIEWPORT["width"] and height >= VIEWPORT["height"]
