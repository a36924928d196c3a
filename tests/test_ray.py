"""Parquet output and the Ray engine, on a 2-CPU Ray started here: the same rows as the local engine for faces,
bad files and a bad CSV row; an actor killed mid-run and an image that kills every worker still give every image
its row."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray Data: pip install 'facerace[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="needs pyarrow: pip install 'facerace[parquet]'")

from conftest import run_cli  # noqa: E402

from facerace.apps.ray_engine import run  # noqa: E402
from facerace.apps.tables import predict_schema, read_rows  # noqa: E402
from facerace.predictor import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray for the module: 2 CPUs, a small object store, its files in the test's tmp dir, no dashboard."""
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, logging_level="warning",
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, faces, bad_inputs) -> list[str]:
    """A folder of faces, a photo of 30, one with no face, a tiny face and four bad files; a CSV with a bad row."""
    folder = tmp_path_factory.mktemp("photos")
    for f in faces:
        shutil.copy(f, folder / f.name)
    for name in ("not_image", "truncated", "corrupt_png", "empty", "thirty", "blank", "tiny_face"):
        shutil.copy(bad_inputs[name], folder / bad_inputs[name].name)
    listing = tmp_path_factory.mktemp("csv") / "list.csv"
    shutil.copy(faces[1], listing.parent / "face.jpg")
    listing.write_text(f"path\nface.jpg\n{faces[0]}\n", encoding="utf-8")  # the 2nd is outside the CSV's folder
    return [str(folder), str(listing)]


def cli(*args) -> tuple[int, str]:
    code, _, err = run_cli(*args)
    return code, err


def rows(folder: Path) -> list[dict]:
    return sorted(read_rows(folder), key=lambda r: (r["path"], r["face"] is not None, r["face"]))


def test_local_parquet_has_the_schema_and_the_jsonl_rows(inputs, tmp_path):
    import json

    out = tmp_path / "local.parquet"  # the extension picks the format; the output is a folder
    assert cli("predict", *inputs, "--output", out, "--workers", "1")[0] == 0
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.equals(predict_schema(Predictor().classes), check_metadata=True)
    target = tmp_path / "rows.jsonl"
    assert cli("predict", *inputs, "--format", "jsonl", "--output", target, "--workers", "1")[0] == 0
    expected = [{"error": None, **json.loads(line)} for line in target.read_text().splitlines()]
    assert table.to_pylist() == expected
    assert {"ok", "no_face", "too_small", "error"} <= {r["status"] for r in expected}
    code, err = cli("predict", *inputs, "--format", "parquet", "--output", out)
    assert code == 2 and "already holds files" in err


def test_ray_predict_gives_the_local_rows(cluster, inputs, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli("predict", *inputs, "--format", "parquet", "--output", local, "--workers", "1")[0] == 0
    code, err = cli("predict", *inputs, "--engine", "ray", "--output", remote)
    assert code == 0, err
    assert "images" in err and "faces/s" in err
    assert len(list(remote.glob("*.parquet"))) == 1  # rows gathered into files of ROWS_PER_FILE by the driver
    assert pq.read_schema(next(remote.glob("*.parquet"))).equals(pq.read_schema(local / "part-00000.parquet"),
                                                                 check_metadata=True)
    a, b = rows(local), rows(remote)
    assert len(a) == len(b) > 40
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "probabilities"} == {k: v for k, v in y.items() if k != "probabilities"}
        if x["probabilities"] is not None:
            assert np.allclose(list(x["probabilities"].values()), list(y["probabilities"].values()), atol=1e-5)
    errors = [r for r in b if r["status"] == "error"]
    assert len(errors) == 5 and all(r["error"] for r in errors)  # four bad files and the refused CSV row


def test_ray_embed_gives_the_local_rows(cluster, inputs, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli("embed", *inputs, "--format", "parquet", "--output", local)[0] == 0
    assert cli("embed", *inputs, "--engine", "ray", "--output", remote)[0] == 0
    a, b = rows(local), rows(remote)
    assert [(r["path"], r["face"], r["status"], r["box"]) for r in a] == [(r["path"], r["face"], r["status"], r["box"])
                                                                         for r in b]
    ok = [(x["embedding"], y["embedding"]) for x, y in zip(a, b) if x["status"] == "ok"]
    assert len(ok) > 30 and np.allclose([x for x, _ in ok], [y for _, y in ok], atol=1e-5)
    assert pq.read_schema(local / "part-00000.parquet").metadata[b"facerace.backbone"]


def test_usage_errors_of_the_ray_engine(inputs, tmp_path):
    code, err = cli("predict", *inputs, "--engine", "ray", "--format", "csv", "--output", tmp_path / "x")
    assert code == 2 and "writes Parquet" in err
    assert cli("predict", *inputs, "--engine", "ray")[0] == 2
    assert "needs --engine ray" in cli("predict", *inputs, "--ray-address", "auto")[1]
    assert "needs --output" in cli("predict", *inputs, "--format", "parquet")[1]
    code, err = cli("predict", *inputs, "--engine", "ray", "--ray-address", "127.0.0.1:1", "-o", tmp_path / "y")
    assert code == 2 and "nothing answers there" in err


def _busy_actor() -> int | None:
    """The process of a Ray Data actor running RowsActor on a batch now (Ray names it in its command line)."""
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"MapBatches(RowsActor)).submit" in cmd.read_bytes():
                return int(cmd.parent.name)
        except OSError:
            continue
    return None


def copies(faces, n: int, folder):
    """`folder`, created, holding `n` copies of every fixture face (named `{i}_{name}`)."""
    folder.mkdir()
    for i in range(n):
        for f in faces:
            shutil.copy(f, folder / f"{i}_{f.name}")
    return folder


@pytest.mark.skipif(sys.platform != "linux", reason="finds the actor's process in /proc")
def test_an_actor_killed_mid_run_loses_no_image(cluster, faces, tmp_path):
    folder = copies(faces, 5, tmp_path / "many")
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(target=lambda: result.update(s=run("predict", [str(folder)], str(out), Predictor())))
    job.start()
    deadline, pid = time.time() + 300, None
    while pid is None and job.is_alive() and time.time() < deadline:
        time.sleep(0.05)
        pid = _busy_actor()  # an actor in the middle of its first batch
    assert pid and job.is_alive(), "the run ended before an actor could be killed"
    os.kill(pid, signal.SIGKILL)
    job.join()
    got = rows(out)
    assert sorted(r["path"] for r in got) == sorted(str(p) for p in folder.iterdir())
    assert all(r["status"] == "ok" for r in got) and result["s"].images == result["s"].faces == 35
    assert result["s"].retried == 0  # the restarted actor redid the lost batches, no image needed the slow path


class PoisonPredictor(Predictor):
    """Kills its own process on any image named poison*."""

    def predict_image(self, image, faces=None):
        if "poison" in str(image):
            os._exit(1)
        return super().predict_image(image, faces)


def test_an_image_that_kills_every_worker_becomes_an_error_row(cluster, faces, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    folder = tmp_path / "in"
    folder.mkdir()
    for f in faces:
        shutil.copy(f, folder / f.name)
    shutil.copy(faces[0], folder / "poison.jpg")
    summary = run("predict", [str(folder)], str(tmp_path / "out"), PoisonPredictor())
    got = {r["path"]: r for r in rows(tmp_path / "out")}
    assert len(got) == 8 and summary.errors == 1 and summary.faces == 7 and summary.retried >= 1
    assert "worker died" in got[str(folder / "poison.jpg")]["error"]


def test_neither_import_facerace_nor_the_local_engine_loads_ray(faces, tmp_path):
    import subprocess

    code = ("import sys; from facerace.apps.cli import main; "
            f"assert main(['predict', {str(faces[0])!r}, '--format', 'parquet', '-o', {str(tmp_path / 'o')!r}]) == 0; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_audit_on_ray_gives_the_local_composition(cluster, inputs, tmp_path):
    import json

    local, remote, again = tmp_path / "a-local", tmp_path / "a-ray", tmp_path / "a-from"
    assert cli("audit", *inputs, "-o", local, "--replicates", "50", "--workers", "1")[0] == 0
    code, err = cli("audit", *inputs, "-o", remote, "--replicates", "50", "--engine", "ray")
    assert code == 0, err
    assert any((remote / "faces").glob("*.parquet")) and not (remote / "faces.jsonl").exists()
    a, b = (json.loads((f / "composition.json").read_text()) for f in (local, remote))
    assert (a["images"], a["faces"], a["skipped"]) == (b["images"], b["faces"], b["skipped"])
    for x, y in zip(a["rows"], b["rows"]):  # rows come back in another order: estimates agree, not resamples
        assert (x["group"], x["class"], x["faces"]) == (y["group"], y["class"], y["faces"])
        assert abs(x["estimate"] - y["estimate"]) < 1e-4 and abs(x["count_share"] - y["count_share"]) < 1e-9
    # the cluster's Parquet folder is a predictions file for a later audit
    assert cli("audit", "--from", remote / "faces", "-o", again, "--replicates", "50")[0] == 0
    c = json.loads((again / "composition.json").read_text())
    assert [r["estimate"] for r in c["rows"]] == [r["estimate"] for r in b["rows"]]


def test_undecodable_file_names_are_written_losslessly_by_ray(cluster, faces, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(faces[0], folder / os.fsdecode(b"caf\xe9.jpg"))
    shutil.copy(faces[1], folder / "ok.jpg")
    code, err = cli("predict", folder, "--engine", "ray", "--output", tmp_path / "out", "-q")
    assert code == 0, err
    assert sorted(Path(r["path"]).name for r in rows(tmp_path / "out")) == ["caf\\udce9.jpg", "ok.jpg"]


def test_ctrl_c_on_ray_keeps_the_finished_rows_as_valid_parquet(cluster, faces, tmp_path, monkeypatch):
    """Ctrl-C once the first rows came back: what the driver holds is written, the message counts the images."""
    import _thread

    from facerace.apps import ray_engine

    monkeypatch.setattr(ray_engine, "FLUSH_SECONDS", 0.0)  # every table written at once: the test sees rows early
    folder = copies(faces, 6, tmp_path / "many")
    out = tmp_path / "out"

    def interrupt() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob("*.parquet")):
            time.sleep(0.05)
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    code, err = cli("predict", folder, "--engine", "ray", "--output", out, "-q")
    assert code == 130 and "images done" in err and "kept in" in err, err
    done = int(err.split("interrupted: ")[1].split(" of ")[0])
    table = pq.read_table(out)  # every file valid
    assert 0 < done < 42 and len(set(table.column("path").to_pylist())) == done == table.num_rows


def test_audit_labels_on_ray_gives_the_local_validated_composition(cluster, inputs, faces, tmp_path):
    """--labels with --engine ray: the labelled faces are matched in the cluster's Parquet rows as in the local ones."""
    import csv
    import json

    images = [Path(inputs[0]) / f.name for f in faces]
    labels = tmp_path / "labels" / "labels.csv"
    labels.parent.mkdir()
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([f"{p}", "White" if i % 2 else "Black"]
                                                      for i, p in enumerate(images[:4]))])
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli("audit", *inputs, "-o", local, "--labels", labels, "--replicates", "50", "--workers", "1")[0] == 0
    code, err = cli("audit", *inputs, "-o", remote, "--labels", labels, "--replicates", "50", "--engine", "ray")
    assert code == 0, err
    a, b = (json.loads((f / "composition.json").read_text()) for f in (local, remote))
    assert a["labels"]["used"] == b["labels"]["used"] > 0 and a["method"] == b["method"] == "validated"
    assert [(r["class"], r["method"], r["labelled"]) for r in a["rows"]] == \
        [(r["class"], r["method"], r["labelled"]) for r in b["rows"]]
    for x, y in zip(a["rows"], b["rows"]):
        assert abs(x["estimate"] - y["estimate"]) < 1e-4 and abs(x["ci_high"] - y["ci_high"]) < 1e-4
