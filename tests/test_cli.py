"""`facerace` end to end, in-process, on real faces and on every awkward input."""

import csv
import json
import shutil

import pytest
from conftest import run_cli as run

from facerace.results import ROW_KEYS


@pytest.fixture(scope="module")
def jsonl_rows(faces):
    code, out, _ = run("predict", *faces, "--format", "jsonl", "--workers", "1")
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def test_jsonl_has_exactly_the_documented_keys(jsonl_rows, faces):
    assert len(jsonl_rows) == len(faces)
    for row in jsonl_rows:
        assert tuple(row) == ROW_KEYS
        assert row["status"] == "ok" and row["face"] == 0
        assert len(row["probabilities"]) == 7


def test_json_is_a_list_of_the_same_rows(faces, jsonl_rows):
    code, out, _ = run("predict", *faces, "--format", "json", "--workers", "1")
    assert code == 0 and json.loads(out) == jsonl_rows


def test_csv_and_table_and_output_file(faces, jsonl_rows, tmp_path):
    target = tmp_path / "out.csv"
    code, out, _ = run("predict", *faces, "--format", "csv", "--output", target, "--workers", "1")
    assert code == 0 and out == ""
    rows = list(csv.DictReader(target.open()))
    assert [r["label"] for r in rows] == [r["label"] for r in jsonl_rows]
    assert float(rows[0]["p_White"]) == jsonl_rows[0]["probabilities"]["White"]
    code, out, _ = run("predict", faces[0], "--format", "table")
    assert code == 0 and jsonl_rows[0]["label"] in out and "uncertain" in out.splitlines()[0]


def test_folder_glob_and_csv_sources(faces, tmp_path):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for f in faces[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "readme.txt").write_text("not an image, skipped by the folder walk")
    code, out, _ = run("predict", tmp_path / "photos", "--workers", "2")
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = run("predict", f"{tmp_path}/photos/**/*.jpg", "--workers", "1")
    assert code == 0 and len(out.splitlines()) == 3
    listing = tmp_path / "photos" / "list.csv"
    listing.write_text(f"file,note\nnested/{faces[0].name},a\nnested/missing.jpg,b\n../../etc/passwd,c\n,d\n")
    code, out, _ = run("predict", listing)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["status"] for r in rows] == ["ok", "error", "error", "error"]
    assert "no such file" in rows[1]["error"] and "outside the allowed folder" in rows[2]["error"]
    assert set(rows[1]) == {*ROW_KEYS, "error"}


def test_bad_csv_column_is_a_usage_error(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("image,label\na.jpg,x\n")
    code, _, err = run("predict", listing)
    assert code == 2 and "its columns are: image, label" in err and "--column" in err
    code, _, _ = run("predict", listing, "--column", "image")
    assert code == 0


def test_every_awkward_input_gives_a_row_and_the_run_goes_on(bad_inputs, faces):
    paths = [*bad_inputs.values(), faces[0]]
    code, out, err = run("predict", *paths, "--workers", "2")
    assert code == 0 and "Traceback" not in err
    rows = [json.loads(line) for line in out.splitlines()]
    by_path = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert set(by_path) == {str(p) for p in paths}
    expect_error = ("not_image", "truncated", "corrupt_png", "empty", "bomb")
    for kind, path in bad_inputs.items():
        statuses = {r["status"] for r in by_path[str(path)]}
        if kind in expect_error:
            assert statuses == {"error"} and by_path[str(path)][0]["error"], kind
        elif kind in ("blank",):
            assert statuses == {"no_face"}, kind
        elif kind == "tiny_face":
            assert statuses <= {"no_face", "too_small"}, kind
        else:
            assert statuses == {"ok"}, kind
    assert len(by_path[str(bad_inputs["thirty"])]) >= 27


def test_usage_errors_exit_2_with_one_line(faces, tmp_path):
    for args in (("predict", "no/such/file.jpg"), ("predict", faces[0], "--scheme", "race9"),
                 ("predict", faces[0], "--model", "nope"), ("predict", faces[0], "--detector", "mtcnn"),
                 ("predict", "nothing*.png"), ("predict", tmp_path)):
        code, out, err = run(*args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, args


def test_annotate_writes_copies(faces, tmp_path):
    code, _, _ = run("predict", faces[0], faces[1], "--annotate", tmp_path / "ann", "--workers", "1")
    written = sorted((tmp_path / "ann").iterdir())
    assert code == 0 and len(written) == 2 and all(p.stat().st_size > 1000 for p in written)


def test_version_and_models():
    code, out, _ = run("models")
    assert code == 0 and "default" in out and "Middle Eastern" in out
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("facerace ")


def test_embed_writes_one_vector_per_face(faces, bad_inputs, tmp_path):
    import numpy as np

    from facerace import Predictor

    out = tmp_path / "faces.npz"
    code, _, err = run("embed", faces[0], bad_inputs["thirty"], bad_inputs["empty"], "--output", out,
                       "--backbone", "dlib-resnet-v1-onnx")
    data = np.load(out)
    n = len(data["paths"])
    assert code == 0 and n >= 28 and data["embeddings"].shape == (n, 128) and data["boxes"].shape == (n, 4)
    assert "dlib-resnet-v1-onnx" in str(data["backbone"]) and len(data["errors"]) == 1 and "1 unreadable" in err
    reference = Predictor(backbone="dlib-resnet-v1").embed_image(faces[0])[1]
    assert np.allclose(data["embeddings"][0], reference[0], atol=1e-4)
