"""HTTP API: every status code, the same face keys as `facerace predict`, and the web page."""

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from facerace.apps.serve.app import create_app
from facerace.results import ROW_KEYS


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(max_upload_bytes=2_000_000, max_pixels=5_000_000))


def post(client, content: bytes, name="photo.jpg", **params):
    return client.post("/v1/analyze", files={"file": (name, content, "image/jpeg")}, params=params)


def test_analyze_returns_predict_rows(client, faces):
    r = post(client, faces[0].read_bytes())
    assert r.status_code == 200
    (face,) = r.json()["faces"]
    assert tuple(face) == ROW_KEYS and face["path"] == "photo.jpg" and face["status"] == "ok"
    assert abs(sum(face["probabilities"].values()) - 1) < 1e-3


def test_query_options(client, faces):
    r = post(client, faces[1].read_bytes(), scheme="race6", threshold=0.0)
    (face,) = r.json()["faces"]
    assert "Asian" in face["probabilities"] and face["uncertain"] is False
    assert post(client, faces[1].read_bytes(), detector="none").status_code == 200


def test_no_face_is_200_with_empty_list(client, bad_inputs):
    r = post(client, bad_inputs["blank"].read_bytes())
    assert r.status_code == 200 and r.json() == {"faces": []}


@pytest.mark.parametrize("kind", ["not_image", "truncated", "corrupt_png", "bomb"])
def test_bad_images_are_422_with_a_message(client, bad_inputs, kind):
    r = post(client, bad_inputs[kind].read_bytes())
    assert r.status_code == 422 and r.json()["detail"]


def test_too_many_pixels_is_refused(client):
    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, "PNG")  # 6 MP > the 5 MP limit, small file
    r = post(client, buf.getvalue(), name="big.png")
    assert r.status_code == 422 and "too large" in r.json()["detail"]


def test_limits_and_bad_requests(client):
    assert post(client, b"x" * 2_000_001).status_code == 413
    assert post(client, b"").status_code == 400
    assert client.post("/v1/analyze").status_code == 422  # no file field
    r = post(client, b"abc", scheme="race9")
    assert r.status_code == 422 and "race6" in r.json()["detail"]
    assert post(client, b"abc", threshold=3).status_code == 422


def test_timeout_is_504(faces):
    slow = TestClient(create_app(timeout_s=0.0001))
    assert post(slow, faces[0].read_bytes()).status_code == 504


def test_health_models_docs_and_page(client):
    assert client.get("/v1/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["models"][0]["name"] == "default"
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/analyze", "/v1/health", "/v1/models"}
    page = client.get("/")
    assert page.status_code == 200 and "/v1/analyze" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
