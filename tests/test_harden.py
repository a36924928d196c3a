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


# -- 1: file names that are not UTF-8 ------------------------------------------------------------------------

UNDECODABLE = os.fsdecode(b"caf\xe9.jpg")  # "caf\udce9.jpg": the byte 0xe9 is not UTF-8 on its own


@pytest.fixture()
def undecodable(tmp_path, faces) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(faces[0], folder / UNDECODABLE)
    shutil.copy(faces[1], folder / "ok.jpg")
    return folder


def _text_rows(path: Path, fmt: str) -> list[str]:
    """The path cells of a written file (text formats), read as strict UTF-8."""
    import csv
    import json

    text = path.read_bytes().decode("utf-8")  # strict: every output is valid UTF-8
    if fmt == "csv":
        return [r["path"] for r in csv.DictReader(text.splitlines())]
    if fmt == "json":
        return [r["path"] for r in json.loads(text)]
    if fmt == "jsonl":
        return [json.loads(line)["path"] for line in text.splitlines()]
    return [line.split()[0] for line in text.splitlines()[1:]]


@pytest.mark.parametrize("fmt", ["table", "json", "jsonl", "csv", "parquet"])
def test_undecodable_file_names_are_written_losslessly_in_every_format(undecodable, tmp_path, fmt):
    out = tmp_path / f"out.{ {'table': 'txt'}.get(fmt, fmt) }"
    code, _, err = run_cli("predict", undecodable, "-o", out, "--format", fmt, "--workers", "1", "-q")
    assert code == 0, err
    if fmt == "parquet":
        import pyarrow.parquet as pq

        paths = pq.read_table(out).column("path").to_pylist()
    else:
        paths = _text_rows(out, fmt)
    name = {"json": "caf\udce9.jpg", "jsonl": "caf\udce9.jpg", "table": "caf\\xe9.jpg"}.get(fmt, "caf\\udce9.jpg")
    assert sorted(Path(p).name for p in paths) == sorted([name, "ok.jpg"])


def test_undecodable_file_names_are_kept_by_embed_and_annotate(undecodable, tmp_path):
    import pyarrow.parquet as pq

    assert run_cli("embed", undecodable, "-o", tmp_path / "e.npz", "-q")[0] == 0
    with np.load(tmp_path / "e.npz") as npz:
        assert sorted(Path(p).name for p in npz["paths"]) == sorted([UNDECODABLE, "ok.jpg"])
    assert run_cli("embed", undecodable, "-o", tmp_path / "e", "--format", "parquet", "-q")[0] == 0
    assert sorted(Path(p).name for p in pq.read_table(tmp_path / "e").column("path").to_pylist()) == \
        sorted(["caf\\udce9.jpg", "ok.jpg"])
    code, _, err = run_cli("predict", undecodable, "--annotate", tmp_path / "ann", "-o", tmp_path / "r.jsonl",
                           "--workers", "1", "-q")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == sorted([UNDECODABLE, "ok.jpg"])


# -- 4: two runs writing the same output ---------------------------------------------------------------------

def _second_run_during_the_first(monkeypatch, args: tuple, second: tuple) -> dict:
    """Run `ARGS`, running `SECOND` (to its end) while the first is half-way."""
    from facerace.predictor import Predictor

    real = Predictor.predict_paths
    state: dict = {}

    def predict_paths(self, paths, workers=None):
        for i, result in enumerate(real(self, paths, workers=1)):
            if i == 1 and "second" not in state:
                state["second"] = None
                state["second"] = run_cli(*second)
            yield result

    monkeypatch.setattr(Predictor, "predict_paths", predict_paths)
    state["first"] = run_cli(*args)
    return state


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "table"])
def test_two_runs_writing_the_same_output_leave_one_whole_file(monkeypatch, faces, tmp_path, fmt):
    out = tmp_path / "same.out"
    options = ("-o", out, "--format", fmt, "--workers", "1", "-q")
    state = _second_run_during_the_first(monkeypatch, ("predict", *faces[:4], *options),
                                         ("predict", *faces[4:], *options))
    assert state["first"][0] == 0 and state["second"][0] == 0
    assert sorted(Path(p).name for p in _text_rows(out, fmt)) == sorted(f.name for f in faces[:4])  # the last run
    assert [p.name for p in tmp_path.iterdir()] == ["same.out"]  # no partial file left


def test_two_runs_writing_the_same_parquet_folder_refuse_the_second(monkeypatch, faces, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "same.parquet"
    options = ("-o", out, "--workers", "1", "-q")
    state = _second_run_during_the_first(monkeypatch, ("predict", *faces[:4], *options),
                                         ("predict", *faces[4:], *options))
    assert state["first"][0] == 0 and state["second"][0] == 2
    assert "another run" in state["second"][2] or "already holds files" in state["second"][2]
    assert sorted(Path(p).name for p in pq.read_table(out).column("path").to_pylist()) == \
        sorted(f.name for f in faces[:4])


def test_two_runs_given_the_same_run_folder_refuse_the_second(tmp_path, monkeypatch):
    from facerace.errors import InvalidParameterError
    from facerace.training.runs import new_run_dir

    first = new_run_dir(tmp_path / "run", "evaluate")
    with pytest.raises(InvalidParameterError, match="not empty|another run"):
        new_run_dir(tmp_path / "run", "evaluate")
    monkeypatch.chdir(tmp_path)
    numbered = [new_run_dir(None, "train") for _ in range(3)]
    assert first.is_dir() and len(set(numbered)) == 3


# -- 5: Ctrl-C keeps and says what was done ------------------------------------------------------------------

def _interrupt_after(monkeypatch, images: int) -> None:
    from facerace.predictor import Predictor

    real = Predictor.predict_paths

    def predict_paths(self, paths, workers=None):
        for i, result in enumerate(real(self, paths, workers=1)):
            if i == images:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(Predictor, "predict_paths", predict_paths)


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_ctrl_c_keeps_the_finished_rows_and_says_how_many_images_were_done(monkeypatch, faces, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    _interrupt_after(monkeypatch, 2)
    code, _, err = run_cli("predict", *faces[:5], "-o", out, "--workers", "1")
    assert code == 130 and "2 of 5 images done" in err and str(out) in err and "()" not in err
    if fmt == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).num_rows == 2
    else:
        assert len(_text_rows(out, fmt)) == 2


def test_ctrl_c_in_embed_keeps_the_finished_embeddings(monkeypatch, faces, tmp_path):
    from facerace.predictor import Predictor

    real, calls = Predictor.embed_faces, []

    def embed_faces(self, image):
        calls.append(image)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, image)

    monkeypatch.setattr(Predictor, "embed_faces", embed_faces)
    code, _, err = run_cli("embed", *faces[:5], "-o", tmp_path / "e.npz")
    assert code == 130 and "2 of 5 images embedded" in err, err
    with np.load(tmp_path / "e.npz") as npz:
        assert len(npz["paths"]) == 2
