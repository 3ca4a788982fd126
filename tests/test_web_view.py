"""The web view in a real browser (Debian's headless chromium): a digits federation runs,
and the page shows its clients, its rounds as they finish, the chart's points and a
rejection, without a reload. Screenshots (1280x800 and a phone's 390x844) are kept in
``$FEDRAY_TEST_ARTIFACTS`` (default ``test-artifacts/``) for people to look at."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_federation import SlowWorker
from test_service import served

from fedray.deploy.config_file import config_from_dict
from tests.waiting import wait_connected, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("FEDRAY_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, selector: str) -> str:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText).join('\\n')",
        selector)


def test_the_page_shows_clients_rounds_chart_and_rejections_live(
        ray_session, tracking_uri, fleet, tmp_path, browser):
    from examples.digits.data import write_partitions

    config = config_from_dict({
        "federation": "web-view", "seed_model": "examples.digits.seed:seed_model",
        "data_dir": str(tmp_path / "fed"),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 2, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5},
        "tracking": {"uri": tracking_uri, "database": "t_web_view"},
        "api": {"port": 0},
        "session": {"rounds": 12, "min_clients": 3, "round_timeout_s": 20,
                    "wait_for_clients_s": 60, "round_config": {"epochs": 20, "lr": 0.1,
                                                               "batch_size": 8}},
    })
    paths = write_partitions(tmp_path / "data", 3, seed=2)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    clients = []
    with served(config) as fed:
        gateway = fed.info()["gateway"]
        try:
            for i, path in enumerate(paths):
                clients.append(subprocess.Popen(
                    [sys.executable, "-m", "fedray", "edge", "start", "--gateway", gateway,
                     "--name", f"site-{i}", "--attr", f"region=eu-{i % 2}",
                     "--app", "examples.digits.app", "--data", str(path)],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            # A fourth client, slow (each round lasts as long as it trains, so the page is
            # seen while the session runs) and whose every update moves the model far too
            # much: refused, reason norm.
            fleet.add("wild", SlowWorker(1e4, 10, 0.6), gateway, backoff_initial_s=0.2)
            wait_connected(fleet, 1)
            wait_until(lambda: len(fed.clients(status="online")) == 4, "4 clients online",
                       timeout=60)
            browser.get(fed.endpoint.url + "/")
            wait_until(lambda: _text(browser, "#clients tbody tr").count("online") == 4,
                       "the page to list 4 online clients", timeout=30)
            assert "region=eu-1" in _text(browser, "#clients tbody")

            session = fed.start_session()
            # Rounds appear as they finish, while the session still runs (no reload).
            seen_live = wait_until(
                lambda: (finished := _text(browser, "#rounds tbody").count("finished")) >= 2
                and session.info().get("status") == "running" and finished,
                "finished rounds on the page while the session runs", timeout=90)
            browser.save_screenshot(str(ARTIFACTS / "web-view-running-1280x800.png"))
            assert session.wait(timeout=120)["status"] == "finished"
            wait_until(lambda: _text(browser, "#rounds tbody").count("finished") == 12,
                       "all 12 rounds on the page", timeout=30)
            points = wait_until(lambda: browser.execute_script(
                "const c = document.getElementById('chart');"
                "return c.data ? c.data.map(t => t.x.length) : null;"),
                "the chart's traces", timeout=30)
            assert points and max(points) == 12, points
            assert "val accuracy" in _text(browser, "#chart")
            wait_until(lambda: "rejected" in _text(browser, "#events"),
                       "a rejection in the event log", timeout=30)
            assert "norm" in _text(browser, "#breakdown tbody")  # rejections by reason
            browser.save_screenshot(str(ARTIFACTS / "web-view-finished-1280x800.png"))
            browser.set_window_size(390, 844)
            browser.refresh()
            wait_until(lambda: _text(browser, "#rounds tbody").count("finished") == 12,
                       "the phone-sized page", timeout=30)
            width = browser.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390, f"the phone view scrolls sideways ({width}px)"
            browser.save_screenshot(str(ARTIFACTS / "web-view-phone-390x844.png"))
        finally:
            for proc in clients:
                proc.terminate()
            for proc in clients:
                proc.wait(timeout=20)
    assert seen_live >= 2
