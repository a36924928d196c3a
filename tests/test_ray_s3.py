"""The Ray engine against object storage: s3:// in and out, through a local S3 server (moto), offline.

The server and the endpoint are set before Ray starts, so the actors see them the way a
cluster's nodes see AWS_ENDPOINT_URL / credentials in their environment (MinIO, Ceph, AWS).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs Ray Data: pip install 'facerace[ray]'")
pytest.importorskip("pyarrow", reason="needs pyarrow: pip install 'facerace[parquet]'")
moto_server = pytest.importorskip("moto.server", reason="needs moto's S3 server: pip install 'moto[server]'")

from conftest import run_cli  # noqa: E402

from facerace.apps.tables import read_rows  # noqa: E402

ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server with an empty bucket `photos`; the environment points pyarrow at it."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="photos")
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, logging_level="warning",
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload(files, prefix: str) -> None:
    from facerace.apps.tables import filesystem

    filesys, path = filesystem(prefix)
    for f in files:
        with filesys.open_output_stream(f"{path}/{f.name}") as out:
            out.write(f.read_bytes())


def test_predict_from_s3_to_s3_gives_the_local_rows(s3, faces, bad_inputs, tmp_path):
    files = [*faces[:3], bad_inputs["not_image"], bad_inputs["thirty"]]
    upload(files, "s3://photos/in")
    local_dir = tmp_path / "in"
    local_dir.mkdir()
    for f in files:
        (local_dir / f.name).write_bytes(f.read_bytes())
    code, _, err = run_cli("predict", str(local_dir), "--format", "parquet", "-o", str(tmp_path / "local"),
                           "--workers", "1")
    assert code == 0, err
    code, _, err = run_cli("predict", "s3://photos/in/", "--engine", "ray", "-o", "s3://photos/out/run1", "--quiet")
    assert code == 0, err

    def key(r: dict) -> tuple:
        return os.path.basename(r["path"]), r["face"] is not None, r["face"]

    local = sorted(read_rows(tmp_path / "local"), key=key)
    remote = sorted(read_rows("s3://photos/out/run1"), key=key)
    assert all(r["path"].startswith("s3://photos/in/") for r in remote)
    assert len(local) == len(remote) > 30  # the photo of thirty faces is in both
    for a, b in zip(local, remote):
        assert key(a) == key(b) and (a["status"], a["label"], a["box"]) == (b["status"], b["label"], b["box"])
        if a["probabilities"] is not None:
            assert np.allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-5)
    assert [r["status"] for r in remote if r["path"].endswith(bad_inputs["not_image"].name)] == ["error"]


def test_an_empty_or_missing_s3_prefix_is_a_usage_error(s3, tmp_path):
    code, _, err = run_cli("predict", "s3://photos/nothing-here/", "--engine", "ray", "-o", str(tmp_path / "o"))
    assert code == 2 and "no image files" in err


def test_a_bucket_that_does_not_exist_is_a_usage_error(s3, faces, tmp_path):
    for args in (("s3://no-such-bucket/photos/", "--engine", "ray", "-o", tmp_path / "o"),
                 (faces[0], "--format", "parquet", "-o", "s3://no-such-bucket/out"),
                 (faces[0], "--engine", "ray", "-o", "s3://no-such-bucket/out")):
        code, _, err = run_cli("predict", *args)
        assert code == 2 and "no-such-bucket" in err and "Traceback" not in err, err


def test_gcs_calls_give_up_within_the_retry_limit():
    """google-cloud-cpp retries for 15 minutes by default: without credentials gs:// would look like a hang."""
    from datetime import timedelta

    from facerace.apps.tables import GCS_RETRY_SECONDS, filesystem

    options = filesystem("gs://bucket/photos")[0].__reduce__()[1][0]  # pyarrow's own pickled options
    assert options["retry_time_limit"] == timedelta(seconds=GCS_RETRY_SECONDS) <= timedelta(minutes=1)
    explicit = filesystem("gs://bucket/photos?retry_limit_seconds=300")[0].__reduce__()[1][0]
    assert explicit["retry_time_limit"] == timedelta(seconds=300)
