"""HTTP API: every status code, the same face keys as `facerace predict`, and what a hostile or unlucky
client cannot do (oversized, slow or malformed requests; nothing of the server's file system leaks)."""

import gc
import io
import os
import re
import shutil
import socket
import threading
import time
import weakref
from contextlib import contextmanager
from http.client import HTTPConnection

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from facerace.apps.cli import main
from facerace.apps.serve.app import create_app
from facerace.errors import ModelIntegrityError
from facerace.model import shipped_dir
from facerace.results import LANDMARK_NAMES, ROW_KEYS

INSTALL = str(shipped_dir("default").parents[1])  # the package folder: never in a response


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(max_upload_bytes=2_000_000, max_pixels=5_000_000))


def post(client, content: bytes, name="photo.jpg", **params):
    return client.post("/v1/analyze", files={"file": (name, content, "image/jpeg")}, params=params)


def assert_clean_error(r, status: int) -> str:
    """A JSON error with a plain sentence: no traceback, no pydantic list, no server path, no hash."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == "error" and isinstance(body["detail"], str) and body["detail"]
    assert INSTALL not in r.text and "Traceback" not in r.text and not re.search(r"[0-9a-f]{32}", r.text)
    return body["detail"]


def png(width: int, height: int, colour=(128, 128, 128)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def test_analyze_returns_predict_rows(client, faces):
    r = post(client, faces[0].read_bytes())
    assert r.status_code == 200 and r.json()["status"] == "ok"
    (face,) = r.json()["faces"]
    assert tuple(face) == ROW_KEYS
    assert face["path"] == "photo.jpg" and face["status"] == "ok" and 0 < face["detection_score"] <= 1
    assert abs(sum(face["probabilities"].values()) - 1) < 1e-3
    marks = face["landmarks"]
    assert tuple(marks) == LANDMARK_NAMES
    x, y, w, h = face["box"]
    assert marks["right_eye"][0] < marks["nose"][0] < marks["left_eye"][0]  # the person's right eye: picture's left
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in marks.values())


def test_query_options(client, faces):
    r = post(client, faces[1].read_bytes(), scheme="race6", threshold=0.0)
    (face,) = r.json()["faces"]
    assert "Asian" in face["probabilities"] and face["uncertain"] is False
    assert post(client, faces[1].read_bytes(), detector="none").status_code == 200


def test_no_face_says_so(client, bad_inputs):
    r = post(client, bad_inputs["blank"].read_bytes())
    assert r.status_code == 200 and r.json() == {"status": "no_face", "faces": []}


@pytest.mark.parametrize("kind", ["not_image", "truncated", "corrupt_png", "bomb"])
def test_bad_images_are_422_with_a_message(client, bad_inputs, kind):
    assert_clean_error(post(client, bad_inputs[kind].read_bytes()), 422)


def test_too_many_pixels_is_refused(client):
    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, "PNG")  # 6 MP > the 5 MP limit, small file
    assert "too large" in assert_clean_error(post(client, buf.getvalue(), name="big.png"), 422)


def test_limits_and_bad_requests(client):
    assert_clean_error(post(client, b"x" * 2_000_001), 413)
    assert_clean_error(post(client, b""), 400)
    assert "race6" in assert_clean_error(post(client, b"abc", scheme="race9"), 422)
    assert "'threshold'" in assert_clean_error(post(client, b"abc", threshold=3), 422)


@pytest.mark.parametrize("request_kwargs", [
    {},  # nothing
    {"files": {"image": ("a.jpg", b"abc", "image/jpeg")}},  # the wrong field name
    {"content": b"\xff\xd8 raw jpeg", "headers": {"content-type": "image/jpeg"}},  # a raw body
    {"data": {"file": "photo.jpg"}},  # text instead of a file
], ids=["empty", "wrong_field", "raw_body", "text_field"])
def test_requests_without_the_file_field_name_it(client, request_kwargs):
    detail = assert_clean_error(client.post("/v1/analyze", **request_kwargs), 422)
    assert "multipart/form-data in the field 'file'" in detail and "loc" not in detail


def test_timeout_is_504(faces):
    slow = TestClient(create_app(timeout_s=0.0001))
    assert_clean_error(post(slow, faces[0].read_bytes()), 504)


def test_health_models_docs_card_and_page(client):
    health = client.get("/v1/health")
    assert health.json() == {"status": "ok", "model": "default", "version": health.json()["version"]}
    models = client.get("/v1/models")
    assert models.json()["models"][0]["name"] == "default"
    for r in (health, models):
        assert INSTALL not in r.text and "/work/" not in r.text and str(os.getpid()) not in r.text
    assert "Model card" in client.get("/model-card").text
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/analyze", "/v1/health", "/v1/models"}
    page = client.get("/")
    assert page.status_code == 200 and "/v1/analyze" in page.text and 'href="/model-card"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_come_from_the_package(client, path):
    html = client.get(path).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and not [a for a in assets if "//" in a]  # no CDN, no other host
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset


def test_errors_never_show_paths_or_hashes(client, faces, monkeypatch):
    def damaged(*args, **kwargs):
        raise ModelIntegrityError(f"{INSTALL}/weights/default/head.safetensors has SHA-256 {'ab' * 32}")

    monkeypatch.setattr(client.app.state.predictor, "predict_image", damaged)
    detail = assert_clean_error(post(client, faces[0].read_bytes()), 422)
    assert "error id" in detail


def test_damaged_weights_refuse_to_start(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(shipped_dir("default"), model)
    weights = model / "head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelIntegrityError):
        create_app(model)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["serve", "--model", str(model), "--port", "1"]) == 1
    assert "SHA-256" in capsys.readouterr().err


def test_the_server_keeps_no_result(client, faces, monkeypatch):
    predictor = client.app.state.predictor
    kept = []

    def tracked(*args, **kwargs):
        result = type(predictor).predict_image(predictor, *args, **kwargs)
        kept.append(weakref.ref(result))
        return result

    monkeypatch.setattr(predictor, "predict_image", tracked)
    assert post(client, faces[2].read_bytes()).status_code == 200
    gc.collect()
    assert kept and kept[0]() is None


# ---- a real server on a socket: keep-alive, sizes and timeouts ---------------------------------------------
LIMIT = 1_000_000
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def server():
    """(host, port, app) of a uvicorn server with the service's options, 1 s header and body timeouts."""
    import uvicorn

    from facerace.apps.serve.server import uvicorn_options

    app = create_app(max_upload_bytes=LIMIT, body_timeout_s=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = os.environ.get("FACERACE_HEADER_TIMEOUT_S")
    os.environ["FACERACE_HEADER_TIMEOUT_S"] = "1"
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options(MAX_CONNECTIONS)))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield "127.0.0.1", port, app
    srv.should_exit = True
    thread.join(timeout=10)
    if old is None:
        os.environ.pop("FACERACE_HEADER_TIMEOUT_S")
    else:
        os.environ["FACERACE_HEADER_TIMEOUT_S"] = old


@contextmanager
def raw(server):
    sock = socket.create_connection(server[:2], timeout=10)
    try:
        yield sock
    finally:
        sock.close()


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 10 s pass)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def multipart(content: bytes) -> tuple[bytes, str]:
    boundary = "facerace-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_unexpected_errors_are_json_and_keep_the_connection(server, faces, monkeypatch):
    def trips(*args, **kwargs):
        raise OverflowError("Python int too large to convert to C int")

    monkeypatch.setattr(server[2].state.predictor, "predict_image", trips)
    conn = HTTPConnection(*server[:2], timeout=30)
    body, ctype = multipart(faces[0].read_bytes())
    conn.request("POST", "/v1/analyze", body=body, headers={"Content-Type": ctype})
    first = conn.getresponse()
    assert first.status == 422 and b"could not analyse this image" in first.read()
    sock = conn.sock
    monkeypatch.undo()
    conn.request("POST", "/v1/analyze", body=body, headers={"Content-Type": ctype})
    second = conn.getresponse()
    assert second.status == 200 and b'"status":"ok"' in second.read()
    assert conn.sock is sock  # the same keep-alive connection
    conn.close()


def test_a_failing_route_answers_500_json_and_keeps_the_connection(server, monkeypatch):
    import facerace.apps.serve.app as app_module

    def broken():
        raise RuntimeError(f"cannot read {INSTALL}/weights")

    monkeypatch.setattr(app_module, "list_models", broken)
    conn = HTTPConnection(*server[:2], timeout=30)
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    body = r.read()
    assert r.status == 500 and b"internal error" in body and INSTALL.encode() not in body
    sock = conn.sock
    conn.request("GET", "/v1/health")
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


@pytest.mark.parametrize("size", [(1000, 10), (10, 1000), (640, 480)], ids=["strip", "column", "plain"])
def test_degenerate_images_are_answered(server, size):
    conn = HTTPConnection(*server[:2], timeout=60)
    body, ctype = multipart(png(*size))
    for _ in range(2):
        conn.request("POST", "/v1/analyze", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        assert r.status in (200, 422) and b'"status"' in r.read()
    conn.close()


def test_oversized_content_length_is_refused_before_the_body(server):
    with raw(server) as sock:
        body, ctype = multipart(b"")
        sock.sendall(f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {1_500_000_000}\r\n\r\n".encode())  # no body follows
        start = time.monotonic()
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - start < 5


def test_chunked_upload_is_cut_off_past_the_limit(server):
    chunk = b"x" * 65536
    sent, reset = 0, False
    with raw(server) as sock:
        sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        sock.settimeout(0.05)
        answer = b""
        while sent < 200 * LIMIT and not answer:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                reset = True
                break
        sock.settimeout(10)
        answer += read_response(sock)
    # the server stopped reading (what is sent past the limit sits in socket buffers); its 413 may be lost
    # when it closes a connection with unread bytes (a TCP reset)
    assert sent < 20 * LIMIT
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than the limit" in answer or reset and not answer


def test_slow_body_gets_408(server):
    with raw(server) as sock:
        sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 1000\r\n\r\n0123456789")
        start = time.monotonic()
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5


def test_slow_headers_are_disconnected(server):
    with raw(server) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        sock.settimeout(0.3)
        closed = False
        while time.monotonic() - start < 6 and not closed:
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # one header line at a time, never the blank line
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    assert closed and time.monotonic() - start < 4


def test_connections_are_capped(server, monkeypatch):
    monkeypatch.setenv("FACERACE_HEADER_TIMEOUT_S", "60")  # read per connection: these idle ones stay open
    idle = [socket.create_connection(server[:2]) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        conn = HTTPConnection(*server[:2], timeout=10)
        conn.request("GET", "/v1/health")
        assert conn.getresponse().status == 503
        conn.close()
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    conn = HTTPConnection(*server[:2], timeout=10)
    conn.request("GET", "/v1/health")
    assert conn.getresponse().status == 200
