"""The web app's local validation page and JSON (web.validation), over a real SQLite worklist with
labelled studies: the figures are those of ``db.validation``, behind the same token, and the
page is looked at in headless Chromium.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import sync_playwright
from sklearn.metrics import roc_auc_score
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.web.app import create_app
from tests.helpers.web_server import Served
from tests.test_validation import fill
from tests.test_web import CHROMIUM_ARGS, TOKEN, VIEWPORT, _chromium, _png_size, get


@pytest.fixture
def served(sqlite_sessions: sessionmaker[Session]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    truth, scores = fill(sqlite_sessions, 24, 30)
    server = Served(create_app(sqlite_sessions, token=TOKEN))
    yield f"http://127.0.0.1:{server.port}", truth, scores
    server.stop()


def test_api_validation_needs_the_token_and_gives_the_figures(
    served: tuple[str, np.ndarray, np.ndarray],
) -> None:
    base, truth, scores = served
    assert get(f"{base}/api/validation", token=None)[0] == 401
    assert get(f"{base}/validation", token=None)[0] == 401
    status, _, body = get(f"{base}/api/validation?target_sensitivity=0.9")
    assert status == 200
    document = json.loads(body)
    assert document["auc"]["auc"] == pytest.approx(roc_auc_score(truth, scores))
    assert document["recommendation"]["target_sensitivity"] == 0.9
    refused = json.loads(get(f"{base}/api/validation?min_per_class=25")[2])
    assert (
        refused["recommendation"] is None and "24 positive(s)" in refused["recommendation_refused"]
    )
    assert get(f"{base}/api/validation?target_sensitivity=2")[0] == 422


@pytest.mark.browser
def test_browser_shows_table1_the_plots_and_the_refusal(
    served: tuple[str, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    base, truth, scores = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{base}/validation?token={TOKEN}")
            assert page.url == f"{base}/validation"
            auc = page.locator("#table1 td[data-key=auc]").inner_text()
            assert auc.startswith(f"{roc_auc_score(truth, scores):.3f}")
            assert "Recommended threshold" in page.locator("#recommendation").inner_text()
            widths = page.eval_on_selector_all(
                "img.validation-plot", "els => els.map(e => e.naturalWidth)"
            )
            assert widths == [500, 500]
            page.screenshot(path=str(tmp_path / "validation.png"), full_page=True)

            page.fill("input[name=scanner]", "NOPE")
            page.click("form.validation-filters button")
            page.wait_for_load_state("load")
            assert page.locator("#no-cases").is_visible()

            page.goto(f"{base}/validation?min_per_class=40")
            assert "too few labelled studies" in page.locator("#refusal").inner_text()
            page.screenshot(path=str(tmp_path / "refusal.png"), full_page=True)
        finally:
            browser.close()
    for name in ("validation.png", "refusal.png"):
        width, height = _png_size(tmp_path / name)
        assert width == VIEWPORT["width"] and height >= VIEWPORT["height"]
