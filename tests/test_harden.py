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


# -- 11: only the listed decoders ----------------------------------------------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")


@pytest.fixture()
def decoders_used(monkeypatch) -> list[str]:
    """Every Pillow plugin asked whether it can read a file (its `accept` check, or its opener), by format."""
    from PIL import Image

    Image.init()
    used: list[str] = []
    for name, (factory, accept) in list(Image.OPEN.items()):
        def opener(*args, _factory=factory, _name=name, **kwargs):
            used.append(_name)
            return _factory(*args, **kwargs)

        def check(prefix, _accept=accept, _name=name):
            used.append(_name)
            return _accept(prefix)

        monkeypatch.setitem(Image.OPEN, name, (opener, check if accept else None))
    return used


def test_an_eps_named_jpg_never_reaches_a_decoder_the_readme_does_not_list(tmp_path, decoders_used):
    from fastapi.testclient import TestClient

    from facerace.apps.serve.app import create_app
    from facerace.images import DECODERS

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(EPS)
    code, out, err = run_cli("predict", photo, "--format", "jsonl", "--workers", "1", "-q")
    assert code == 0 and '"status": "error"' in out and "not an image" in out, err
    r = TestClient(create_app()).post("/v1/analyze", files={"file": ("photo.jpg", EPS, "image/jpeg")})
    assert r.status_code == 422 and "not an image" in r.json()["detail"]
    assert decoders_used and set(decoders_used) <= set(DECODERS), set(decoders_used) - set(DECODERS)
    readme = (ROOT / "README.md").read_text()
    assert "JPEG, PNG, BMP, GIF,\n  WebP, TIFF, PPM/PGM, HEIC/HEIF (`pillow-heif`) and AVIF are read" in readme \
        or "JPEG, PNG, BMP, GIF, WebP, TIFF, PPM/PGM, HEIC/HEIF" in readme.replace("\n  ", " ")


# -- 10: model folders ---------------------------------------------------------------------------------------

def _model(tmp_path, **changes) -> Path:
    """A copy of the shipped model with config.json changed (None removes a key)."""
    import json

    from facerace.model import shipped_dir

    folder = tmp_path / "model"
    if not folder.exists():
        shutil.copytree(shipped_dir("default"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _sha(path: Path) -> str:
    from facerace.files import sha256_file

    return sha256_file(path)


def _integrity_error(call, *names: str):
    from facerace.errors import ModelIntegrityError

    with pytest.raises(ModelIntegrityError) as caught:
        call()
    message = str(caught.value)
    assert len(message) < 600 and all(n in message for n in names), message
    return message


def test_every_file_a_model_config_names_stays_inside_the_model_folder(tmp_path):
    from facerace.model import load_config, load_heldout, load_model, training_digests

    secret = tmp_path / "secret.safetensors"
    shutil.copy(ROOT / "src/facerace/weights/default/heldout.safetensors", secret)
    for value in ("../secret.safetensors", str(secret), "link.safetensors"):
        folder = _model(tmp_path / value.replace("/", "_"), heldout=value, heldout_sha256=_sha(secret))
        (folder / "link.safetensors").symlink_to(secret)
        _integrity_error(lambda: load_heldout(folder, load_config(folder)), "heldout")
    for key, sha in (("weights", "sha256"), ("training_files", "training_files_sha256")):
        folder = _model(tmp_path / key, **{key: "link", sha: _sha(secret)})
        (folder / "link").symlink_to(secret)
        _integrity_error(lambda: load_model(folder) and training_digests(folder, load_config(folder)), key)


def test_a_damaged_heldout_file_is_a_short_integrity_error_naming_it(tmp_path):
    from safetensors.numpy import save_file

    from facerace.model import load_config, load_heldout

    cases = {"no_labels": {"probabilities": np.full((4, 7), 1 / 7, np.float32)},
             "nan": {"probabilities": np.full((4, 7), np.nan, np.float32), "labels": np.zeros(4, np.int32)},
             "shape": {"probabilities": np.full((4, 3), 1 / 3, np.float32), "labels": np.zeros(4, np.int32)},
             "label": {"probabilities": np.full((4, 7), 1 / 7, np.float32), "labels": np.full(4, 9, np.int32)}}
    for name, tensors in cases.items():
        folder = _model(tmp_path / name)
        save_file(tensors, str(folder / "h.safetensors"))
        _model(tmp_path / name, heldout="h.safetensors", heldout_sha256=_sha(folder / "h.safetensors"))
        _integrity_error(lambda: load_heldout(folder, load_config(folder)), "h.safetensors")


def test_training_files_of_another_dtype_or_shape_is_an_integrity_error(tmp_path):
    from facerace.model import load_config, training_digests

    for name, array in (("float", np.zeros(3)), ("matrix", np.zeros((2, 2), np.uint64))):
        folder = _model(tmp_path / name)
        np.save(folder / "t.npy", array)
        _model(tmp_path / name, training_files="t.npy", training_files_sha256=_sha(folder / "t.npy"))
        _integrity_error(lambda: training_digests(folder, load_config(folder)), "t.npy")


def test_a_hostile_config_json_is_a_short_integrity_error(tmp_path):
    from facerace.model import load_config, load_model

    folder = _model(tmp_path)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _integrity_error(lambda: load_config(folder), "config.json")
    folder = _model(tmp_path / "many", classes=[f"class{i}" for i in range(1_000_000)])
    _integrity_error(lambda: load_model(folder), "config.json")
    folder = _model(tmp_path / "more", classes=[f"c{i}" for i in range(5000)])
    _integrity_error(lambda: load_model(folder), "config.json", "classes")


# -- 19: annotation labels inside the picture ----------------------------------------------------------------

def test_annotate_labels_stay_inside_small_pictures(tmp_path):
    from PIL import ImageDraw

    from facerace.apps.draw import annotate, label_layout, label_size
    from facerace.results import FaceResult

    for side in (48, 96, 160, 224, 640):
        img = np.full((side, side, 3), 90, np.uint8)
        boxes = [(0, 0, side, side), (side - side // 4, side // 3, side // 4, side // 4),
                 (side // 3, side - side // 5, side // 5, side // 5)]
        faces = [FaceResult(box, label="Latino_Hispanic", confidence=0.38, uncertain=True) for box in boxes]
        annotate(img, faces).save(tmp_path / f"annotated-{side}.png")
        draw = ImageDraw.Draw(annotate(img, []))
        text = "Latino_Hispanic 38% (uncertain)"
        for box in boxes:
            short = "Latino_Hispanic 38% ?"
            (left, top), shown, font = label_layout(draw, (text, short), box, (side, side), max(8, side // 40), 1)
            width, height = label_size(draw, shown, font)
            assert 0 <= left and left + width + 2 <= side and 0 <= top and top + height + 2 <= side, (side, box)
            assert shown == text or (side < 160 and shown == short) or side < 96, (side, shown)


# -- 15: service memory: one copy of a body in flight --------------------------------------------------------

def test_a_request_in_flight_holds_at_most_one_copy_of_its_body(monkeypatch):
    """Peak memory of one 8 MiB upload, and what it holds while it waits for the analysis thread (no copy)."""
    import asyncio
    import tracemalloc

    from facerace.apps.serve import app as service
    from facerace.apps.serve.app import create_app

    waiting: list[int] = []
    real = service._analyse

    def analyse(*args):
        waiting.append(tracemalloc.get_traced_memory()[0])  # what the request holds when its turn comes
        return real(*args)

    monkeypatch.setattr(service, "_analyse", analyse)

    app = create_app(max_upload_bytes=12 * 2**20)
    size, block = 8 * 2**20, 64 * 1024
    head = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n")
    tail = b"\r\n--b--\r\n"
    chunks = [head, *([None] * (size // block)), tail]
    answer: dict = {}

    async def receive():
        chunk = chunks.pop(0) if chunks else b""
        body = bytes([65 + len(chunks) % 26]) * block if chunk is None else chunk  # made now, never kept here
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    async def send(message):
        answer.setdefault(message["type"], message)

    scope = {"type": "http", "method": "POST", "path": "/v1/analyze", "raw_path": b"/v1/analyze",
             "query_string": b"", "headers": [(b"content-type", b"multipart/form-data; boundary=b"),
                                              (b"content-length", str(size + len(head) + len(tail)).encode())],
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
    tracemalloc.start()
    try:
        asyncio.run(app(scope, receive, send))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer["http.response.start"]["status"] == 422  # not an image, after it was read whole
    assert waiting and waiting[0] < size / 4, f"{waiting[0] / 2**20:.1f} MiB held while waiting"
    assert peak < 1.5 * size, f"peak {peak / 2**20:.1f} MiB for a body of {size / 2**20:.0f} MiB"


def test_undecodable_file_and_folder_names_reach_every_audit_file(tmp_path, faces):
    import csv
    import json

    group = tmp_path / "in" / os.fsdecode(b"gr\xfcn")
    group.mkdir(parents=True)
    shutil.copy(faces[0], group / UNDECODABLE)
    code, _, err = run_cli("audit", tmp_path / "in", "--by", "folder", "--out", tmp_path / "out", "--workers", "1",
                           "--replicates", "20", "-q")
    assert code == 0, err
    texts = {p.name: p.read_bytes().decode("utf-8") for p in (tmp_path / "out").iterdir() if p.suffix != ".png"}
    assert {"composition.csv", "composition.json", "faces.jsonl", "report.md"} <= set(texts)
    groups = {r["group"] for r in csv.DictReader(texts["composition.csv"].splitlines())}
    assert any(g.endswith("gr\\udcfcn") for g in groups), groups
    assert json.loads(texts["faces.jsonl"].splitlines()[0])["path"].endswith(UNDECODABLE)


def test_outputs_that_are_links_or_fifos_are_written_through_not_replaced(tmp_path, faces):
    import threading

    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    assert run_cli("predict", faces[0], "-o", link, "--workers", "1", "-q")[0] == 0
    assert link.is_symlink() and len(_text_rows(real, "jsonl")) == 1
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert run_cli("predict", faces[0], "-o", fifo, "--workers", "1", "-q")[0] == 0
    reader.join(30)
    assert fifo.is_fifo() and b'"status": "ok"' in got[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "pipe.jsonl", "real.jsonl"]


def test_two_runs_started_into_the_same_parquet_folder_refuse_the_second(tmp_path):
    from facerace.apps.tables import new_output_folder
    from facerace.errors import InvalidParameterError

    out = tmp_path / "faces"
    new_output_folder(out)  # the first run (local or Ray) has claimed it, and written nothing yet
    with pytest.raises(InvalidParameterError, match="already holds files|another run"):
        new_output_folder(out)


def test_a_ray_job_that_wrote_nothing_leaves_its_folder_free_for_the_rerun(tmp_path, faces):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    code, _, err = run_cli("predict", faces[0], "--engine", "ray", "--ray-address", "127.0.0.1:1", "-o", out, "-q")
    assert code == 2 and "nothing answers" in err
    assert not out.exists() or not any(out.iterdir())  # the rerun with the right address may use it
