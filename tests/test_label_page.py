"""The labelling page (`facerace label`) in headless Chromium that reaches no host but the server: label several
faces with the keyboard, undo one, reload (the page resumes where it was), and check labels.csv.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them), as tests/test_web_page.py.
"""

import csv

import pytest
from conftest import run_cli
from test_web_page import ARTIFACTS, browser, live_server  # noqa: F401 (browser: the fixture)

CLASSES7 = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")


@pytest.fixture()
def sampled(tmp_path, faces, model_with_heldout):
    """An audit folder with a sample of 5 of the fixture faces to label."""
    code, _, err = run_cli("audit", *faces, "--sample", "5", "--out", tmp_path / "audit", "--model",
                           model_with_heldout, "--replicates", "20", "--workers", "1", "-q")
    assert code == 0, err
    return tmp_path / "audit"


@pytest.fixture()
def label_server(sampled):
    from facerace.apps.label.app import create_app

    yield from live_server(create_app(sampled))


def answered(page) -> int:
    return int(page.find_element("id", "progress").get_attribute("data-answered") or -1)


def wait_answered(page, n: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 20).until(lambda b: answered(b) == n)


def shown_face(page) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 20).until(lambda b: b.execute_script(
        "const i = document.getElementById('face'); return i.complete && i.naturalWidth > 0"))
    return int(page.find_element("id", "face").get_attribute("data-index"))


def test_keyboard_labelling_undo_and_resume(label_server, browser, sampled):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(label_server + "/")
    wait_answered(browser, 0)
    buttons = [b.get_attribute("data-choice") for b in browser.find_elements(By.CSS_SELECTOR, "#choices button")]
    assert buttons == [*CLASSES7, "not a face", "skip"]
    assert "0 of 5" in browser.find_element(By.ID, "progress").text
    image = browser.find_element(By.ID, "face")
    assert shown_face(browser) == 0 and image.size["height"] >= 280  # the face is shown large
    keys = ["2", "1", "8", "4"]  # Black, White, not a face, East Asian
    for n, key in enumerate(keys, 1):
        ActionChains(browser).send_keys(key).perform()
        wait_answered(browser, n)
    assert shown_face(browser) == 4 and "4 of 5" in browser.find_element(By.ID, "progress").text
    ActionChains(browser).send_keys(Keys.BACKSPACE).perform()  # undo the last answer: its face comes back
    wait_answered(browser, 3)
    assert shown_face(browser) == 3
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "label_page.png"))

    browser.refresh()  # a new page resumes at the first face without an answer
    wait_answered(browser, 3)
    assert shown_face(browser) == 3
    ActionChains(browser).send_keys("9").perform()  # skip
    wait_answered(browser, 4)
    ActionChains(browser).send_keys("6").perform()  # Indian, the last face
    wait_answered(browser, 5)
    assert "All 5 faces" in browser.find_element(By.ID, "done").text
    with open(sampled / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sample = list(csv.DictReader((sampled / "sample.csv").open()))
    assert [r["label"] for r in rows] == ["Black", "White", "not a face", "skip", "Indian"]
    assert [(r["path"], r["face"]) for r in rows] == [(s["path"], s["face"]) for s in sample]
