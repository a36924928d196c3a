"""Hostile and unlucky inputs never stop a run (issue 13): unreadable files, degenerate shapes, crowds,
symlink loops, non-UTF-8 CSVs, damaged caches, model folders and checkpoints, outputs onto inputs."""

import builtins
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from conftest import run_cli as run
from PIL import Image

from facerace.apps.sources import expand
from facerace.detect import MAX_SIDE, SearchingDetector, clip_box, create_detector
from facerace.errors import ImageError, ModelIntegrityError, ModelNotFoundError
from facerace.faces import EMBED_BATCH, FacePipeline
from facerace.images import load_image
from facerace.model import load_config, load_model, shipped_dir


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def locked(monkeypatch):
    """Files whose name starts with `locked` cannot be opened for reading, as for a user without read
    permission (the tests may run as root, who reads anything whatever its mode)."""
    real = builtins.open

    def guarded(file, *args, **kwargs):
        mode = args[0] if args else kwargs.get("mode", "r")
        if isinstance(file, (str, os.PathLike)) and Path(file).name.startswith("locked") and "r" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


@pytest.fixture
def photos(tmp_path, faces) -> Path:
    """A folder of two faces and one unreadable face."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, source in (("a.jpg", faces[0]), ("locked.jpg", faces[1]), ("b.jpg", faces[2])):
        shutil.copy(source, folder / name)
    return folder


# ---- a file the user may not read ----------------------------------------------------------------
def test_unreadable_file_is_an_error_row_and_the_run_goes_on(photos, locked):
    with pytest.raises(ImageError, match="cannot read the file"):
        load_image(photos / "locked.jpg")
    code, out, err = run("predict", photos, "--workers", "1")
    by_path = {Path(r["path"]).name: r for r in rows(out)}
    assert code == 0 and "Traceback" not in err
    assert by_path["locked.jpg"]["status"] == "error" and "Permission denied" in by_path["locked.jpg"]["error"]
    assert by_path["a.jpg"]["status"] == by_path["b.jpg"]["status"] == "ok"

    code, _, err = run("embed", photos, "-o", photos.parent / "faces.npz")
    assert code == 0 and "1 unreadable" in err and "locked.jpg" in err
    assert len(np.load(photos.parent / "faces.npz")["paths"]) == 2


def test_really_unreadable_file(photos):
    """A file of mode 0; as root (CI), the run goes through setpriv without the capabilities that let root read
    any file, so the operating system really refuses it."""
    (photos / "locked.jpg").chmod(0)
    try:
        if os.geteuid() != 0:
            code, out, _ = run("predict", photos, "--workers", "1")
        else:
            import subprocess
            import sys

            setpriv = shutil.which("setpriv")
            assert setpriv, "as root this test needs util-linux's setpriv (to drop CAP_DAC_OVERRIDE)"
            done = subprocess.run([setpriv, "--bounding-set", "-dac_override,-dac_read_search", sys.executable,
                                   "-m", "facerace", "predict", str(photos), "--workers", "1", "--format", "jsonl"],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      p for p in sys.path if p)})
            code, out = done.returncode, done.stdout
        assert code == 0 and [r["status"] for r in rows(out)] == ["ok", "ok", "error"]
        assert "Permission denied" in out
    finally:
        (photos / "locked.jpg").chmod(0o644)


def test_unreadable_dataset_files_are_listed_problems(tmp_path, faces, locked):
    from facerace.training.embeddings import CropEmbedder, embed_files

    data = tmp_path / "data"
    (data / "White").mkdir(parents=True)
    (data / "Black").mkdir()
    shutil.copy(faces[0], data / "White" / "a.jpg")
    shutil.copy(faces[0], data / "White" / "locked.jpg")
    shutil.copy(faces[1], data / "Black" / "b.jpg")
    code, out, _ = run("datasets", "check", f"folder:{data}", "--quiet")
    assert "1 problem(s)" in out and "locked.jpg: cannot read the file" in out and code == 0
    # hashing for the embedding cache (train, evaluate) skips it as unreadable; the others are embedded
    paths = sorted((data / "White").iterdir()) + [data / "Black" / "b.jpg"]
    emb = embed_files(paths, CropEmbedder(FacePipeline(), 0.25), cache_dir=tmp_path / "cache", workers=1,
                      progress=False)
    assert emb.ok.tolist() == [True, False, True] and "Permission denied" in emb.errors[1]
    assert emb.vectors.shape == (2, 128)


def test_unreadable_csv_of_paths_is_a_usage_error(tmp_path, locked):
    (tmp_path / "locked.csv").write_text("path\nx.jpg\n")
    code, out, err = run("predict", tmp_path / "locked.csv")
    assert code == 2 and "locked.csv: cannot read" in err and "Traceback" not in err


# ---- degenerate shapes ---------------------------------------------------------------------------
def test_box_clipping_refuses_non_finite_empty_and_outside_boxes():
    for box in ((np.inf, 0, 10, 10), (0, np.nan, 10, 10), (0, 0, 1e308, 1e308), (5, 5, 0, 10), (5, 5, -3, 10),
                (-90, 0, 100, 100), (200, 0, 50, 50)):
        assert clip_box(*box, 100, 100) is None, box
    assert clip_box(-10, -10, 100, 100, 100, 100) == (0, 0, 90, 90)
    assert clip_box(1e300, 0, 1e300, 10, 100, 100) is None


def test_boxes_given_by_the_caller_are_clipped_or_refused(faces):
    from facerace import Predictor
    from facerace.detect import Detection

    predictor = Predictor()
    for box in ((10**12, 0, 50, 50), (-500, -500, 100, 100), (5000, 5000, 100, 100), (10, 10, 0, 50)):
        result = predictor.predict_image(faces[0], faces=[Detection(box, 1.0)])
        assert result.status == "error" and "outside the 224x224 image" in result.error, box
    (face,) = predictor.predict_image(faces[0], faces=[Detection((-20, 30, 200, 180), 1.0)]).faces
    assert face.box == (0, 30, 180, 180) and face.status == "ok"


@pytest.mark.parametrize("name", ["yunet", "hog", "haar", "none"])
def test_no_detector_crashes_on_degenerate_shapes(name):
    detector = create_detector(name)
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (1, 3000), (3000, 1), (10, 1000), (1000, 10), (3, 3), (600, 20000)):
        for rgb in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.full((h, w, 3), 128, np.uint8)):
            for d in detector.detect(rgb):
                x, y, bw, bh = d.box
                assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h, (name, h, w)


class Scripted(SearchingDetector):
    """Returns fixed candidates; records the size of the image it searched."""

    name = "scripted"

    def __init__(self, candidates):
        self.candidates = candidates
        self.searched = None

    def search(self, rgb):
        self.searched = rgb.shape[:2]
        return self.candidates


def test_plain_colour_and_mostly_outside_boxes_are_dropped():
    rgb = np.full((200, 400, 3), 90, np.uint8)
    rgb[50:150, 250:350] = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    found = Scripted([(10, 10, 80, 80, 0.9), (250, 50, 100, 100, 0.8), (380, 50, 100, 100, 0.8),
                      (np.nan, 0, 5, 5, 0.9), (260, 60, 80, 80, np.inf)]).detect(rgb)
    assert [d.box for d in found] == [(250, 50, 100, 100)]


def test_huge_images_are_searched_at_max_side_and_boxes_scaled_back(face_rgb):
    big = np.asarray(Image.fromarray(face_rgb).resize((MAX_SIDE * 3, MAX_SIDE * 3)))
    scripted = Scripted([(MAX_SIDE / 4, MAX_SIDE / 4, MAX_SIDE / 2, MAX_SIDE / 2, 1.0)])
    (found,) = scripted.detect(big)
    assert scripted.searched == (MAX_SIDE, MAX_SIDE)
    assert found.box == (MAX_SIDE * 3 // 4, MAX_SIDE * 3 // 4, MAX_SIDE * 3 // 2, MAX_SIDE * 3 // 2)
    for name in ("yunet", "hog", "haar"):  # every real detector finds the face in the huge picture
        (face,) = create_detector(name).detect(big)[:1]
        x, y, w, h = face.box
        assert w > big.shape[1] / 4 and abs(x + w / 2 - big.shape[1] / 2) < w / 3, name


# ---- hundreds of faces ---------------------------------------------------------------------------
def test_faces_are_capped_per_image_and_reported(bad_inputs):
    from facerace import Predictor

    result = Predictor(max_faces=4).predict_image(bad_inputs["thirty"])
    statuses = [f.status for f in result.faces]
    assert statuses.count("ok") == 4 and statuses.count("too_many") >= 20
    ok = [f.box[2] * f.box[3] for f in result.faces if f.status == "ok"]
    over = [f.box[2] * f.box[3] for f in result.faces if f.status == "too_many"]
    assert min(ok) >= max(over)  # the largest faces are the ones analysed
    code, out, _ = run("predict", bad_inputs["thirty"], "--max-faces", "2", "--workers", "1")
    assert code == 0 and [r["status"] for r in rows(out)].count("ok") == 2 and "too_many" in out


def test_chips_are_embedded_in_bounded_batches(chips):
    pipeline = FacePipeline(flip_average=True)
    backbone = pipeline.get_backbone()
    sizes = []
    real = backbone.embed
    backbone.embed = lambda c: sizes.append(len(c)) or real(c)
    many = np.concatenate([chips] * 3)  # 84 chips
    vectors = pipeline.embed(many)
    assert vectors.shape == (84, 128) and max(sizes) <= 2 * EMBED_BATCH
    assert np.allclose(vectors[56:], pipeline.embed(chips), atol=1e-5)  # batching does not change a vector


# ---- symlink loops -------------------------------------------------------------------------------
def test_glob_through_symlink_loops_ends_and_gives_each_file_once(tmp_path, faces):
    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    shutil.copy(faces[0], root / "a.jpg")
    shutil.copy(faces[1], root / "sub" / "b.jpg")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "sub" / "again.jpg").symlink_to(root / "a.jpg")
    for arg in (f"{root}/**/*.jpg", f"{root}/**", str(root)):
        found = [s.path for s in expand([arg])]
        assert sorted(os.path.realpath(p) for p in found) == sorted(
            os.path.realpath(p) for p in (root / "a.jpg", root / "sub" / "b.jpg")), arg


# ---- CSV encodings -------------------------------------------------------------------------------
def test_csv_of_paths_not_utf8_is_a_usage_error_naming_it(tmp_path, faces):
    shutil.copy(faces[0], tmp_path / "caf\u00e9.jpg")
    (tmp_path / "list.csv").write_bytes("path\ncaf\u00e9.jpg\n".encode("latin-1"))
    code, out, err = run("predict", tmp_path / "list.csv")
    assert code == 2 and "list.csv: not UTF-8" in err and "Traceback" not in err and out == ""
    (tmp_path / "list.csv").write_text("path\n" + "x" * 200_000 + "\n")  # over the csv module's field limit
    code, out, err = run("predict", tmp_path / "list.csv")
    assert code == 2 and "list.csv: not a CSV file of paths" in err and "Traceback" not in err
    (tmp_path / "list.csv").write_text('path\n"a\x00b.jpg"\ncaf\u00e9.jpg\n')
    code, out, err = run("predict", tmp_path / "list.csv", "--workers", "1")
    assert code == 0 and [r["status"] for r in rows(out)] == ["error", "ok"] and "NUL" in out


def test_label_csvs_with_a_bom_are_read_and_non_utf8_ones_named(tmp_path, faces):
    from facerace.errors import DatasetError
    from facerace.training.datasets import open_dataset

    (tmp_path / "val").mkdir()
    shutil.copy(faces[0], tmp_path / "val" / "a.jpg")
    (tmp_path / "fairface_label_val.csv").write_text("file,age,gender,race\nval/a.jpg,20-29,Male,White\n",
                                                     encoding="utf-8-sig")
    assert len(open_dataset(f"fairface:{tmp_path}", "val").samples) == 1
    (tmp_path / "labels.csv").write_text("path,label\nval/a.jpg,White\n", encoding="utf-8-sig")
    assert len(open_dataset(f"csv:{tmp_path / 'labels.csv'}").samples) == 1
    (tmp_path / "labels.csv").write_bytes("path,label\nval/a.jpg,Wh\u00eete\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="labels.csv: not UTF-8"):
        open_dataset(f"csv:{tmp_path / 'labels.csv'}")


# ---- damaged embedding cache and views -----------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated", "short_vector", "wrong_dimension", "not_finite"])
def test_damaged_embedding_cache_is_recomputed(tmp_path, faces, damage, capsys):
    from facerace.training.embeddings import CropEmbedder, embed_files

    cache = tmp_path / "cache"
    embedder = CropEmbedder(FacePipeline(), 0.25)
    first = embed_files(faces[:2], embedder, cache_dir=cache, workers=1, progress=False)
    db = cache / "embeddings.sqlite"
    if damage == "garbage":
        db.write_bytes(os.urandom(5000))
    elif damage == "truncated":
        with sqlite3.connect(db) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.write_bytes(db.read_bytes()[:3000])
    else:
        blob = {"short_vector": b"\x00" * 10, "wrong_dimension": np.zeros(64, np.float32).tobytes(),
                "not_finite": np.full(128, np.nan, np.float32).tobytes()}[damage]
        with sqlite3.connect(db) as con:
            con.execute("UPDATE embeddings SET vector=?", (blob,))
    again = embed_files(faces[:2], embedder, cache_dir=cache, workers=1, progress=False)
    assert again.computed == 2 and np.allclose(again.vectors, first.vectors, atol=1e-5)
    assert "damaged" in capsys.readouterr().err


def test_failed_evaluation_leaves_no_empty_run_folder(tiny_fairface, tmp_path, monkeypatch):
    import facerace.training.evaluate as evaluate_module

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "embed_files", broken)
    with pytest.raises(KeyboardInterrupt):
        evaluate_module.evaluate("default", f"fairface:{tiny_fairface}", out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_damaged_stored_views_are_computed_again(tmp_path, capsys):
    from facerace.training.finetune import FeatureStore

    store = FeatureStore(tmp_path / "v", 3, (2, 4))
    store.done[:] = True
    store.commit()
    (tmp_path / "v" / "done.npy").write_bytes(b"garbage")
    again = FeatureStore(tmp_path / "v", 3, (2, 4))
    assert not again.done.any() and "damaged" in capsys.readouterr().err
    assert FeatureStore(tmp_path / "v", 5, (2, 4)).features.shape == (5, 2, 4)  # other sizes: recomputed


# ---- malformed model folders ---------------------------------------------------------------------
@pytest.fixture
def model_copy(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(shipped_dir("default"), folder)
    return folder


def _edit(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, error, match", [
    ("bad_json", ModelIntegrityError, "config.json: not valid JSON"),
    ("not_object", ModelIntegrityError, "config.json: holds a JSON list"),
    ("missing_key", ModelIntegrityError, "config.json: missing key.*classes"),
    ("wrong_type", ModelIntegrityError, "config.json: 'threshold' is str"),
    ("classes_type", ModelIntegrityError, "config.json: 'classes' is int"),
    ("unknown_detector", ModelIntegrityError, "config.json: unknown detector"),
    ("nan_threshold", ModelIntegrityError, "config.json: threshold nan is outside"),
    ("huge_chips", ModelIntegrityError, "config.json: chip_size 1000000 is outside"),
    ("escaping_weights", ModelIntegrityError, "'weights' must name a file in the model folder"),
    ("missing_weights", ModelNotFoundError, "head.safetensors is missing .named by .*config.json"),
    ("garbled_weights", ModelIntegrityError, "head.safetensors has SHA-256"),
])
def test_malformed_model_folders_name_the_right_file(model_copy, damage, error, match):
    if damage == "bad_json":
        (model_copy / "config.json").write_text('{"name": "x",')
    elif damage == "not_object":
        (model_copy / "config.json").write_text("[1, 2]")
    elif damage == "missing_key":
        _edit(model_copy, classes=KeyError)
    elif damage == "wrong_type":
        _edit(model_copy, threshold="high")
    elif damage == "classes_type":
        _edit(model_copy, classes=7)
    elif damage == "unknown_detector":
        _edit(model_copy, detector="mtcnn")
    elif damage == "nan_threshold":
        _edit(model_copy, threshold=float("nan"))
    elif damage == "huge_chips":
        _edit(model_copy, chip_size=1_000_000)
    elif damage == "escaping_weights":
        _edit(model_copy, weights="../../head.safetensors")
    elif damage == "missing_weights":
        (model_copy / "head.safetensors").unlink()
    else:
        (model_copy / "head.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(error, match=match):
        load_model(model_copy)
    code, out, err = run("predict", FIXTURES / "354.jpg", "--model", model_copy)
    assert code in (1, 2) and out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_config_saved_with_a_bom_is_read(model_copy):
    text = (model_copy / "config.json").read_text()
    (model_copy / "config.json").write_text(text, encoding="utf-8-sig")
    assert load_config(model_copy).name == "default"


def test_a_head_that_matches_its_hash_but_is_not_a_head(model_copy):
    from facerace.files import sha256_file

    (model_copy / "head.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _edit(model_copy, sha256=sha256_file(model_copy / "head.safetensors"))
    with pytest.raises(ModelIntegrityError, match="head.safetensors: not a head"):
        load_model(model_copy)


def test_malformed_run_folder_is_refused_on_resume(tmp_path):
    (tmp_path / "run").mkdir()
    for text in ('{"data": ', "[]", '"text"'):
        (tmp_path / "run" / "config.json").write_text(text)
        code, out, err = run("train", "--resume", tmp_path / "run")
        assert code == 2 and "config.json was not written by this facerace version" in err and "Traceback" not in err


def test_unfinished_training_run_is_named_as_such(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": ["fairface:x"], "scheme": "fairface7"}))
    with pytest.raises(ModelNotFoundError, match="training run whose model is not finished.*--resume"):
        load_config(tmp_path / "run")


# ---- skipped extensions, HEIC and AVIF ----------------------------------------------------------
def test_folder_walk_says_what_it_skipped_and_reads_heic_and_avif(tmp_path, faces, capsys):
    face = Image.open(faces[0]).convert("RGB")
    face.save(tmp_path / "phone.heic", "HEIF")
    face.save(tmp_path / "web.avif", "AVIF")
    for name in ("logo.svg", "notes.txt", "raw.cr2"):
        (tmp_path / name).write_text("x")
    found = [Path(s.path).name for s in expand([str(tmp_path)])]
    err = capsys.readouterr().err
    assert found == ["phone.heic", "web.avif"]
    assert "skipped 3 file(s) that are not images (.cr2, .svg, .txt)" in err and "logo.svg" in err
    for name in found:
        assert load_image(tmp_path / name).shape == (224, 224, 3)


def test_folder_dataset_lists_non_image_files_as_problems(tmp_path, faces):
    from facerace.training.datasets import open_dataset

    (tmp_path / "White").mkdir()
    shutil.copy(faces[0], tmp_path / "White" / "a.jpg")
    (tmp_path / "White" / "b.svg").write_text("<svg/>")
    ds = open_dataset(f"folder:{tmp_path}")
    assert len(ds.samples) == 1 and ds.problems == ["White/b.svg: not an image file (.svg), skipped"]


# ---- integrity: the cached ONNX network, checkpoints -------------------------------------------
@pytest.mark.parametrize("network", ["dlib", "sface"])
def test_cached_onnx_network_is_verified_and_rebuilt(network, tmp_path, capsys):
    from facerace.backbones.dlib_onnx import cached_onnx
    from facerace.backbones.sface import cached_sface_onnx
    from facerace.files import sha256_file

    cached = {"dlib": cached_onnx, "sface": cached_sface_onnx}[network]
    path = cached(cache_dir=tmp_path)
    good = sha256_file(path)
    assert path.with_name(path.name + ".sha256").read_text().strip() == good
    for damage in (lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: os.urandom(1000)):
        path.write_bytes(damage(path.read_bytes()))
        assert cached(cache_dir=tmp_path) == path and sha256_file(path) == good
        assert "rebuilding it" in capsys.readouterr().err
    assert cached(cache_dir=tmp_path) == path and capsys.readouterr().err == ""


def test_checkpoints_are_loaded_as_tensors_only(tmp_path):
    torch = pytest.importorskip("torch")
    from facerace.errors import CheckpointError
    from facerace.training.finetune import load_checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"suffix": {}, "history": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt is not a checkpoint this facerace wrote"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "checkpoint.pt")


# ---- outputs never overwrite inputs --------------------------------------------------------------
def test_output_onto_an_input_is_refused(tmp_path, faces, model_copy):
    photo = tmp_path / "photo.jpg"
    shutil.copy(faces[0], photo)
    (tmp_path / "alias.jpg").symlink_to(photo)
    (tmp_path / "list.csv").write_text("path\nphoto.jpg\n")
    before = photo.read_bytes()
    shutil.copy(faces[0], tmp_path / "picture.npz")  # a JPEG under the name embed writes
    for args in (("predict", photo, "-o", photo, "--format", "csv"),
                 ("predict", photo, "-o", tmp_path / "alias.jpg", "--format", "csv"),
                 ("predict", tmp_path, "-o", photo, "--format", "csv"),
                 ("predict", tmp_path / "list.csv", "-o", tmp_path / "list.csv"),
                 ("embed", tmp_path / "picture.npz", "-o", tmp_path / "picture.npz"),
                 ("export", "--model", model_copy, "-o", model_copy / "head.safetensors"),
                 ("stream", "--source", photo, "-o", photo)):
        code, out, err = run(*args)
        assert code == 2 and "never overwrites its inputs" in err and "Traceback" not in err, args
    assert photo.read_bytes() == before and (tmp_path / "list.csv").read_text() == "path\nphoto.jpg\n"
    load_model(model_copy)  # its head is untouched
