"""Browser test of ``npinv serve`` (``make e2e``): Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, loads the page, gets a readable error for a bad upload, picks a bundled example,
inverts, edits, and saves a screenshot of the result (docs/webapp.png by default).

Not collected by ``make test`` (the file name does not match ``test_*.py``); run it as
``pytest tests/e2e/browser_e2e.py``. It needs /usr/bin/chromium, /usr/bin/chromedriver and the
``e2e`` extra (selenium); it fails rather than skips without them, since ``make e2e`` installs them.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NPINV_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("NPINV_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = Path(os.environ.get("NPINV_E2E_SCREENSHOT", Path(__file__).parents[2] / "docs" / "webapp.png"))
TIMEOUT = 180  # seconds for one invert or edit at 50 steps on a busy 2-core CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from npinv import load_model
    from npinv.webapp.app import ServeOptions, build_app, launch
    from npinv.webapp.engine import Engine

    engine = Engine(load_model(None, device="cpu"), files_dir=tmp_path_factory.mktemp("files"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = ServeOptions(port=port)
    demo = build_app(engine, options)
    yield launch(demo, engine, options)
    demo.close()
    engine.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} is missing: run make e2e (it installs Debian's chromium and chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The machine has no network: without the background-networking flags Chromium keeps trying
    # Google's hosts. A fresh profile each run keeps runs independent.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = TIMEOUT, what: str = "condition"):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except WebDriverException as exc:
        page = driver.find_element("tag name", "body").text[-2000:]
        raise AssertionError(f"timed out waiting for {what}; page text ends with:\n{page}") from exc


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def image_src(driver, element_id: str) -> str | None:
    imgs = driver.find_elements("css selector", f"#{element_id} img")
    return imgs[0].get_attribute("src") if imgs else None


def test_bad_upload_shows_a_readable_message(server, browser, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    browser.get(server)
    upload = wait_for(browser, lambda d: d.find_element("css selector", "#npinv-image input[type=file]"),
                      60, "the upload field")
    upload.send_keys(str(bad))
    browser.find_element("css selector", "#npinv-source textarea, #npinv-source input").send_keys("a red circle")
    browser.find_element("id", "npinv-invert").click()
    message = "notes.png is not an image file Pillow can read"
    wait_for(browser, lambda d: message in d.find_element("tag name", "body").text, 60, "the error message")
    assert "Traceback" not in browser.find_element("tag name", "body").text


def test_pick_example_invert_edit_and_screenshot(server, browser):
    from npinv.demo import bundled_examples

    example = bundled_examples()[0]
    browser.get(server)  # a fresh page: a new session, no toast left from the previous test
    first_row = wait_for(browser, lambda d: d.find_element("css selector", "#npinv-examples [data-testid=dataset-cell-0-0]"),
                         60, "the examples")
    first_row.click()
    wait_for(browser, lambda d: image_src(d, "npinv-image"), 30, "the example image in the upload field")
    source = browser.find_element("css selector", "#npinv-source textarea, #npinv-source input")
    assert source.get_attribute("value") == example["prompt"]

    start = time.perf_counter()
    browser.find_element("id", "npinv-invert").click()
    wait_for(browser, lambda d: "Inverted" in text_of(d, "npinv-status"), what="the inversion")
    invert_s = time.perf_counter() - start
    assert image_src(browser, "npinv-reconstruction")
    psnr = float(browser.find_element("css selector", "#npinv-psnr input").get_attribute("value"))
    assert psnr > 25

    # Ask for the per-word cross-attention maps too (in the closed "Controller settings" accordion).
    browser.find_element("css selector", "#npinv-controller-settings button, #npinv-controller-settings .label-wrap").click()
    toggle = wait_for(browser, lambda d: d.find_element("css selector", "#npinv-maps-toggle input[type=checkbox]"),
                      30, "the attention-maps checkbox")
    wait_for(browser, lambda d: toggle.is_displayed(), 30, "the accordion to open")
    toggle.click()
    assert toggle.is_selected()

    start = time.perf_counter()
    browser.find_element("id", "npinv-edit").click()
    wait_for(browser, lambda d: "Edited" in text_of(d, "npinv-status") and image_src(d, "npinv-edited"), what="the edit")
    edit_s = time.perf_counter() - start
    status = text_of(browser, "npinv-status")
    assert "inversion cached" in status, status  # the edit reused the inversion made by Invert
    assert example["edits"][0] in status
    edited = browser.find_element("css selector", "#npinv-edited img")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", edited),
             30, "the edited image to load")
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", edited)
    assert size == [64, 64]

    words = len(example["prompt"].split()) + len(example["edits"][0].split())
    wait_for(browser, lambda d: len(d.find_elements("css selector", "#npinv-maps img")) >= words, 30,
             "one attention map per word")

    # The whole page in one picture, for the README.
    for _ in range(3):  # the page reflows at each new window size: resize until it fits
        height = browser.execute_script("return document.documentElement.scrollHeight")
        inner = browser.execute_script("return window.innerHeight")
        if height <= inner or inner >= 2400:
            break
        browser.set_window_size(1280, min(browser.get_window_size()["height"] + height - inner, 2400))
        time.sleep(0.5)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    print(f"\ninvert {invert_s:.1f} s, edit {edit_s:.1f} s (in the browser, 50 steps); screenshot: {SCREENSHOT}")
