"""The drift panel of the web worklist (web.drift_panel) over a real SQLite worklist: the JSON,
the plots, the token, and the page in headless Chromium with a screenshot."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import ViewportSize, sync_playwright

from hrct_triage.common.settings import Settings
from hrct_triage.db.migrate import upgrade
from hrct_triage.db.session import make_engine, make_sessionmaker
from hrct_triage.web.app import create_app
from tests.helpers.drift_rows import Protocol, input_stats, record_analysed
from tests.helpers.web_server import Served
from tests.test_web import CHROMIUM_ARGS, TOKEN, get

NOW = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
VIEWPORT: ViewportSize = {"width": 1360, "height": 900}
BONE = Protocol("CT_ER1", "ER_STATION", "BONE", 1.0)
LUNG = Protocol("CT1", "CT1_STATION", "LUNG", 1.0)


@dataclass(frozen=True)
class Panel:
    base_url: str


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Panel]:
    """Two weeks of a LUNG protocol like the checkpoint's reference, and a BONE protocol whose
    last week is far noisier; the web app over them, its clock at ``NOW``."""
    folder = tmp_path_factory.mktemp("drift-web")
    url = f"sqlite:///{folder / 'worklist.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    rng = np.random.default_rng(17)
    reference = [
        {
            "input_stats": input_stats(rng),
            "probability": float(rng.beta(1.2, 4.0)),
            "domain_score": float(rng.gamma(4.0, 0.12)),
        }
        for _ in range(30)
    ]
    (folder / "model.domain.json").write_text(json.dumps({"studies": reference}))
    for i in range(28):
        at = NOW - timedelta(days=13, hours=-12 * i)
        for protocol, noise in ((LUNG, 20.0), (BONE, 20.0 if i < 14 else 45.0)):
            record_analysed(
                sessions,
                at=at,
                protocol=protocol,
                probability=float(rng.beta(1.2, 4.0)),
                stats=input_stats(rng, noise=noise),
                domain_score=float(rng.gamma(4.0, 0.12 if noise < 30 else 0.3)),
            )
    settings = Settings(_env_file=None, model_path=folder / "model.pt")
    server = Served(create_app(sessions, token=TOKEN, settings=settings, clock=lambda: NOW))
    yield Panel(f"http://127.0.0.1:{server.port}")
    server.stop()
    engine.dispose()


def test_api_drift_names_the_alarming_protocol_only(panel: Panel) -> None:
    status, _, body = get(f"{panel.base_url}/api/drift")
    assert status == 200
    document = json.loads(body)
    assert {g["group"]["kernel"]: g["alarm"] for g in document["groups"]} == {
        "BONE": True,
        "LUNG": False,
    }
    assert "noise_hu" in {a["quantity"] for a in document["alarms"]}
    assert {g["baseline"]["description"] for g in document["groups"]} == {
        "checkpoint reference model.domain.json"
    }


def test_plots_are_pngs_and_an_unknown_group_is_named(panel: Panel) -> None:
    _, _, body = get(f"{panel.base_url}/api/drift")
    status, headers, png = get(f"{panel.base_url}/drift/{_slug(body, 'BONE')}.png")
    assert status == 200 and headers["content-type"] == "image/png"
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    status, _, body = get(f"{panel.base_url}/drift/000000000000.png")
    assert status == 404 and b"no scanner and protocol" in body


def test_drift_page_needs_the_token(panel: Panel) -> None:
    assert get(f"{panel.base_url}/drift", token=None)[0] == 401
    assert get(f"{panel.base_url}/api/drift", token=None)[0] == 401


def _slug(document: bytes, kernel: str) -> str:
    from hrct_triage.db.drift import GroupKey

    (group,) = [g for g in json.loads(document)["groups"] if g["group"]["kernel"] == kernel]
    return GroupKey(**group["group"]).slug


@pytest.mark.browser
def test_browser_shows_the_alarm_and_the_plots(panel: Panel, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            # given the drift page opened with the token
            page.goto(f"{panel.base_url}/drift?token={TOKEN}")
            assert page.url == f"{panel.base_url}/drift"
            # then the alarm line names the BONE protocol's noise, and only it
            alarms = page.locator("li.drift-alarm")
            assert alarms.count() >= 1
            texts = alarms.all_inner_texts()
            assert all(
                t.startswith("drift alarm: scanner CT_ER1, station ER_STATION") for t in texts
            )
            assert any(": noise_hu KS D=" in t for t in texts)
            assert page.locator("section.drift-group.has-alarm").count() == 1
            assert page.locator("section.drift-group").count() == 2
            # and both groups' plots are real pictures
            widths = page.eval_on_selector_all(
                "img.drift-plot", "els => els.map(e => e.naturalWidth)"
            )
            assert widths == [1200, 1200]
            page.screenshot(path=str(tmp_path / "drift.png"), full_page=True)
        finally:
            browser.close()
    with Image.open(tmp_path / "drift.png") as image:
        assert image.size[0] == VIEWPORT["width"] and image.size[1] >= VIEWPORT["height"]
