"""The web page in headless Chromium: upload a real face photo, see a box, a label and probability bars.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Without them the test
is skipped, unless FACERACE_REQUIRE_BROWSER=1 (as in CI), where it fails.
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("FACERACE_ARTIFACTS", Path(__file__).parents[1] / "runs" / "test-artifacts"))


def browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
        if os.environ.get("FACERACE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from facerace.apps.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_upload_shows_box_label_and_bars(server, tmp_path):
    chromium, driver_path = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(server + "/")
        photo = Path(__file__).parents[1] / "examples" / "group.jpg"
        browser.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".face")))
        cards = browser.find_elements(By.CSS_SELECTOR, ".face")
        assert len(cards) == 4
        labels = [c.get_attribute("data-label") for c in cards]
        assert all(labels)
        bars = cards[0].find_elements(By.CSS_SELECTOR, ".bar .fill")
        assert len(bars) == 7 and all(b.size["width"] >= 0 for b in bars) and bars[0].size["width"] > 0
        assert "face" in browser.find_element(By.ID, "status").text
        # the canvas holds the photo with boxes: its size is the photo's and it is not blank
        width = browser.execute_script("return document.getElementById('canvas').width")
        assert width == 520
        drawn = browser.execute_script(
            "const c=document.getElementById('canvas').getContext('2d');"
            "return Array.from(c.getImageData(0,0,520,520).data).filter((v,i)=>i%4==1 && v>190).length")
        assert drawn > 1000
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "web_page.png"))
    finally:
        browser.quit()
