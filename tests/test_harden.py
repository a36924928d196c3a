"""Issue 19, second hardening round: one test per class of problem, named after it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

ROOT = Path(__file__).parents[1]


# -- 12: RAY_ADDRESS -----------------------------------------------------------------------------------------

def test_ray_address_from_the_environment_is_named_in_the_message(tmp_path, faces, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    code, _, err = run_cli("predict", faces[0], "--engine", "ray", "-o", tmp_path / "out", "-q")
    assert code == 2, err
    assert "RAY_ADDRESS=127.0.0.1:1" in err and "None" not in err and "Traceback" not in err


# -- 17: serve on a port in use ------------------------------------------------------------------------------

def test_serve_on_a_port_in_use_is_a_usage_error_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_cli("serve", "--port", port)
    assert code == 2, err
    assert f"127.0.0.1:{port}" in err and "--port" in err and "serving on" not in out + err


# -- 18: README's embed claims -------------------------------------------------------------------------------

def test_readme_embed_claims_match_what_embed_writes(tmp_path, faces):
    from facerace.predictor import Predictor

    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("facerace embed photos/"))
    claim = re.search(r"one (\d+)-d embedding per face: arrays ([a-z_, ]+)$", line)
    assert claim, line
    dim, keys = int(claim[1]), [k.strip() for k in claim[2].split(",")]
    out = tmp_path / "faces.npz"
    assert run_cli("embed", faces[0], "-o", out, "-q")[0] == 0
    with np.load(out) as npz:
        assert sorted(npz.files) == sorted(keys)
        assert npz["embeddings"].shape == (1, dim)
    assert Predictor().get_backbone().dim == dim


# -- 20: skips say why; CI runs everything -------------------------------------------------------------------

def test_skipped_tests_say_why_and_fail_where_every_test_must_run(tmp_path):
    import tomllib

    assert "-ra" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    (tmp_path / "test_skips.py").write_text("import pytest\n\ndef test_a():\n    pytest.skip('needs the moon')\n")
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("FACERACE_REQUIRE_ALL_TESTS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path)]
    free = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert free.returncode == 0 and "SKIPPED" in free.stdout and "needs the moon" in free.stdout
    strict = subprocess.run(command, env={**env, "FACERACE_REQUIRE_ALL_TESTS": "1"}, capture_output=True, text=True,
                            cwd=tmp_path)
    assert strict.returncode == 1 and "needs the moon" in strict.stdout
    ci = (ROOT / ".ci" / "run").read_text()
    assert "FACERACE_REQUIRE_ALL_TESTS=1" in ci and "../shared/datasets" in ci


def test_readme_says_what_the_full_test_run_needs():
    text = (ROOT / "README.md").read_text()
    assert "chromium" in text and "../shared/datasets" in text and "FACERACE_REQUIRE_ALL_TESTS" in text


# -- 21: the model card as a page ----------------------------------------------------------------------------

def test_model_card_is_an_html_page_and_its_markdown_stays_at_model_card_md(tmp_path):
    from fastapi.testclient import TestClient

    from facerace.apps.serve.app import create_app
    from facerace.model import shipped_dir

    model = tmp_path / "model"
    shutil.copytree(shipped_dir("default"), model)
    card = ("# Card\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<script>alert(1)</script>\n\n"
            "[click](javascript:alert(2)) <img src=x onerror=alert(3)>\n")
    (model / "MODEL_CARD.md").write_text(card)
    client = TestClient(create_app(model))
    page = client.get("/model-card")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<h1>Card</h1>" in page.text and "<table>" in page.text
    assert "<script>" not in page.text and "href=\"javascript" not in page.text and "<img" not in page.text
    assert "http://" not in page.text and "https://" not in page.text
    source = client.get("/model-card.md")
    assert source.headers["content-type"].startswith("text/plain") and source.text == card
