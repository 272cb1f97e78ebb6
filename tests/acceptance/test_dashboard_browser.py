"""A real browser (headless Chromium through chromedriver, Debian's ``chromium`` and
``chromium-driver``) signs in to the dashboard with a token, sees its own study and not
another principal's, and saves a screenshot under the test's temp dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service import auth
from service.config import Settings
from tests.servers import InProcessServer, serve_in_thread

SPEC = {
    "task": {"kind": "synthetic"},
    "space": {"num_layers": {"type": "int", "low": 1, "high": 3}, "max_epochs": 1},
    "study": {"n_trials": 2, "sampler": "random", "pruner": "none"},
}


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium; skipped only outside CI when it is not installed (.ci/run installs it)."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver must be installed under CI (.ci/run)")
        pytest.skip("chromium / chromedriver are not installed (apt-get install chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InProcessServer]:
    with serve_in_thread(Settings(data_dir=tmp_path / "data")) as s:
        yield s


def _submit(server: InProcessServer, token: str, name: str) -> dict[str, Any]:
    response = server.http.post(
        "/v1/studies",
        json={**SPEC, "name": name},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_sign_in_and_see_only_ones_own_studies(
    browser: Any, server: InProcessServer, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    alice = auth.create_token(server.backend.sessions, "alice")
    bob = auth.create_token(server.backend.sessions, "bob")
    alices = _submit(server, alice, "alices-secret-study")
    bobs = _submit(server, bob, "bobs-study")

    browser.get(f"{server.url}/dashboard")
    assert "/signin" in browser.current_url  # redirected: no session yet
    browser.find_element(By.ID, "token").send_keys(bob)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 60).until(
        lambda d: bobs["optuna_study_name"] in d.page_source,
        message="bob's study never appeared in the dashboard",
    )
    assert "/dashboard" in browser.current_url and "/signin" not in browser.current_url
    assert alices["optuna_study_name"] not in browser.page_source
    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")

    alices_id = alices["dashboard_url"].rsplit("/", 1)[1]
    browser.get(f"{server.url}/api/studies/{alices_id}")
    assert "not found" in browser.page_source
