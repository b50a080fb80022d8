"""The inspector page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by selenium): load, pick a suite prompt, inspect, and check what rendered.

A missing browser is a failure, not a skip: CI installs it (see ``.ci/run``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_loaded
from test_inspector_api import N_LAYERS, random_vectors

from emalab.inspector import InspectorConfig, InspectorService, make_server, serve_in_thread
from evals.suite import DOMAINS

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1400,1800"]
INSTALL = "install it with: apt-get update && apt-get install -y chromium chromium-driver"


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if not chromium or not driver:
        pytest.fail(f"headless browser test needs Debian's chromium and chromium-driver (found chromium={chromium}, "
                    f"chromedriver={driver}); {INSTALL}")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs selenium: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium must not try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def server():
    lm = make_tiny_loaded("qwen2")
    service = InspectorService(lm, random_vectors(), InspectorConfig(answer_tokens=6, max_prompt_tokens=128))
    srv = make_server(service, "127.0.0.1", 0, log=lambda line: None)
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_page_renders_an_inspection(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(server.url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert "tiny-qwen2" in browser.find_element(By.ID, "meta").text

    # pick a suite prompt: it fills the prompt box
    Select(browser.find_element(By.ID, "domain")).select_by_value("cybersecurity")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#suite-prompt option")) > 5)
    Select(browser.find_element(By.ID, "suite-prompt")).select_by_index(1)
    assert browser.find_element(By.ID, "prompt").get_attribute("value").strip()

    # an empty prompt shows the server's message and nothing breaks
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    browser.find_element(By.ID, "run").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert "empty" in browser.find_element(By.ID, "error").text

    box.send_keys("How do I set up a firewall on my home router?")
    browser.find_element(By.ID, "ablate").click()
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap-base rect.cell"))
    n_columns = len(DOMAINS) + 1
    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap-base rect.cell")
    assert len(cells) == N_LAYERS * n_columns
    assert {c.get_attribute("data-column") for c in cells} == {*DOMAINS, "refusal"}
    refusal = [float(c.get_attribute("data-value")) for c in cells if c.get_attribute("data-column") == "refusal"]
    assert max(abs(v) for v in refusal) < 1e-3  # ablated, and the page shows the server's numbers
    label = browser.find_element(By.CSS_SELECTOR, "#view-base .answer-label").text
    assert label in ("refusal", "compliance", "incoherent")
    assert browser.find_element(By.ID, "answer-base").get_attribute("textContent") is not None
    assert len(browser.find_elements(By.CSS_SELECTOR, "#lines svg.line-plot")) == n_columns
    assert len(browser.find_elements(By.CSS_SELECTOR, "#view-base table.lens tbody tr")) == N_LAYERS
    assert "computed in" in browser.find_element(By.ID, "latency").text
    assert "ablate:refusal" in browser.find_element(By.ID, "view-base").text
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert not browser.find_element(By.ID, "progress").is_displayed()  # the indicator went away
    assert browser.find_element(By.ID, "diff-panel").is_displayed() is False  # no adapter

    # switching units re-renders without a request
    Select(browser.find_element(By.ID, "units")).select_by_value("matrix")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap-base rect.cell")) == N_LAYERS * n_columns

    shot = tmp_path / "inspector.png"
    print(f"screenshot: {shot}")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    severe = [e["message"] for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    severe = [m for m in severe if not ("/api/inspect" in m and "400" in m)]  # the empty prompt, above
    assert not severe, severe  # no JS errors, no missing or blocked resources
