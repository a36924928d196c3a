"""The web page in headless Chromium that reaches no host but the server: upload real face photos, see
boxes, labels apart from each other and outside the boxes, probability bars beside the photo; an error
clears the previous photo; the API docs render offline.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Without them the test
is skipped, unless FACERACE_REQUIRE_BROWSER=1 (as in CI), where it fails.
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

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


def live_server(app) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn on a free loopback port in a thread; yield its URL, stop it after."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    from facerace.apps.serve.app import create_app

    yield from live_server(create_app())


@pytest.fixture()
def browser(tmp_path):
    """Headless Chromium, 1280x800, that can reach 127.0.0.1 only (every other host name fails to resolve)."""
    chromium, driver_path = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    yield browser
    browser.quit()


def upload(browser, path: Path, wait_for: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), wait_for))


def rects(browser, key: str) -> list[tuple[float, float, float, float]]:
    return [(r["x"], r["y"], r["w"], r["h"]) for r in
            browser.execute_script(f"return JSON.parse(document.getElementById('canvas').dataset.{key})")]


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_upload_shows_box_label_and_bars(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    upload(browser, Path(__file__).parents[1] / "examples" / "group.jpg", "found")
    cards = browser.find_elements(By.CSS_SELECTOR, ".face")
    assert len(cards) == 4
    labels = [c.get_attribute("data-label") for c in cards]
    assert all(labels)
    bars = cards[0].find_elements(By.CSS_SELECTOR, ".bar .fill")
    assert len(bars) == 7 and all(b.size["width"] >= 0 for b in bars) and bars[0].size["width"] > 0
    assert "4 faces" in browser.find_element(By.ID, "status").text
    # the canvas holds the photo with boxes: its size is the photo's and it is not blank
    width = browser.execute_script("return document.getElementById('canvas').width")
    assert width == 520
    drawn = browser.execute_script(
        "const c=document.getElementById('canvas').getContext('2d');"
        "return Array.from(c.getImageData(0,0,520,520).data).filter((v,i)=>i%4==1 && v>190).length")
    assert drawn > 1000
    # labels sit outside every box and apart from each other
    placed, boxes = rects(browser, "labels"), rects(browser, "boxes")
    assert len(placed) == 4
    assert not [(a, b) for a in placed for b in boxes + [p for p in placed if p is not a] if overlap(a, b)]
    card = browser.find_element(By.ID, "card")
    assert card.get_attribute("href") == server + "/model-card"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_page.png"))


def test_crowded_labels_never_overlap(server, browser, faces, tmp_path):
    from PIL import Image

    crowd = Image.new("RGB", (3 * 224, 2 * 224))
    for i, path in enumerate(faces[:6]):
        crowd.paste(Image.open(path).convert("RGB"), ((i % 3) * 224, (i // 3) * 224))
    crowd.save(tmp_path / "crowd.png")
    browser.get(server + "/")
    upload(browser, tmp_path / "crowd.png", "found")
    placed = rects(browser, "labels")
    assert len(placed) >= 5
    assert not [(a, b) for i, a in enumerate(placed) for b in placed[i + 1:] if overlap(a, b)]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_page_crowd.png"))


def test_large_photo_keeps_cards_above_the_fold_and_errors_clear_it(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    big = Image.open(Path(__file__).parents[1] / "examples" / "group.jpg").resize((1600, 1600))
    big.save(tmp_path / "big.jpg")
    browser.get(server + "/")
    upload(browser, tmp_path / "big.jpg", "found")
    fold = browser.execute_script("return window.innerHeight")
    first = browser.execute_script("return document.querySelector('.face').getBoundingClientRect().top")
    picture = browser.execute_script("return document.getElementById('canvas').getBoundingClientRect().bottom")
    assert first < fold / 2 and picture <= fold
    (tmp_path / "notes.jpg").write_text("not a photo\n")
    upload(browser, tmp_path / "notes.jpg", "Error")
    assert not browser.find_elements(By.CSS_SELECTOR, ".face")
    assert not browser.find_element(By.ID, "canvas").is_displayed()


def test_api_docs_render_offline(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/docs")  # the browser reaches no host but the server
    title = WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".swagger-ui .info .title")))
    assert "facerace" in title.text
    assert "/v1/analyze" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
