"""The images API client against a real HTTP server on 127.0.0.1 that replays scripted answers and records requests."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import make_subject
from PIL import Image

from dreamrelation.engine.images_api import (
    ImagesAPIClient,
    ImagesAPIConfig,
    ImagesAPIError,
    from_env,
)

KEY = "sk-test-secret-key-123"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (longer than the client's timeout: a timeout)

    @classmethod
    def json(cls, payload, status: int = 200, headers: dict | None = None, delay: float = 0.0) -> "Reply":
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})},
                   delay)

    @classmethod
    def image(cls, image: Image.Image) -> "Reply":
        return cls.json({"created": 1, "data": [{"b64_json": base64.b64encode(_png(image)).decode()}]})


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: bytes


class FakeImagesServer:
    """Answers requests with the scripted replies in order (an unscripted request gets HTTP 599)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[Recorded] = []
        self.files: dict[str, bytes] = {}  # GET path -> PNG bytes
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with server.lock:
                    server.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
                    if self.command == "GET" and self.path in server.files:
                        reply = Reply(200, server.files[self.path], {"Content-Type": "image/png"})
                    else:
                        reply = server.replies.pop(0) if server.replies else Reply(599, b"no scripted reply")
                time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            do_GET = do_POST = _handle

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.base_url = f"{self.root}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)


@pytest.fixture
def server():
    srv = FakeImagesServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def client_for(server: FakeImagesServer, sleeps: list | None = None, **kwargs) -> ImagesAPIClient:
    options = dict(api_key=KEY, size="64x64", timeout=2.0, max_retries=2, backoff=0.01)
    options.update(kwargs)
    config = ImagesAPIConfig(base_url=server.base_url, **options)
    return ImagesAPIClient(config, sleep=sleeps.append if sleeps is not None else time.sleep)


def multipart_parts(recorded: Recorded) -> list:
    """The parts of a multipart/form-data body, parsed with the standard library's email parser."""
    head = f"Content-Type: {recorded.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + recorded.body)
    assert message.is_multipart()
    return list(message.iter_parts())


def assert_same_pixels(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size
    np.testing.assert_array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# ------------------------------------------------------------------------------------------------------ success paths

def test_generate_sends_json_and_decodes_b64(server):
    expected = make_subject(7)
    server.script(Reply.image(expected))
    image = client_for(server).generate("  a photo of a dog  ")
    assert_same_pixels(image, expected)
    assert image.mode == "RGB"
    [req] = server.requests
    assert (req.method, req.path) == ("POST", "/v1/images/generations")
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["Content-Type"] == "application/json"
    assert json.loads(req.body) == {"model": "gpt-image-1", "prompt": "a photo of a dog", "n": 1, "size": "64x64"}


def test_dalle_models_ask_for_b64_json(server):
    server.script(Reply.image(make_subject(1)))
    client_for(server, model="dall-e-3").generate("a cat")
    assert json.loads(server.requests[0].body)["response_format"] == "b64_json"


def test_no_authorization_header_without_key(server):
    server.script(Reply.image(make_subject(1)))
    client_for(server, api_key=None).generate("a cat")
    assert "Authorization" not in server.requests[0].headers


def test_edit_sends_multipart_with_each_image(server):
    subjects = [make_subject(1), make_subject(2, size=48)]
    expected = make_subject(3)
    server.script(Reply.image(expected))
    image = client_for(server).edit("The photo of the same dog, cat: a dog hugs a cat", subjects)
    assert_same_pixels(image, expected)
    [req] = server.requests
    assert (req.method, req.path) == ("POST", "/v1/images/edits")
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    parts = multipart_parts(req)
    fields = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True).decode()
              for p in parts if p.get_filename() is None}
    assert fields == {"model": "gpt-image-1", "prompt": "The photo of the same dog, cat: a dog hugs a cat",
                      "n": "1", "size": "64x64"}  # no response_format for gpt-image-1
    files = [p for p in parts if p.get_filename() is not None]
    assert [p.get_param("name", header="content-disposition") for p in files] == ["image[]", "image[]"]
    assert all(p.get_content_type() == "image/png" for p in files)
    for part, subject in zip(files, subjects):
        data = part.get_payload(decode=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert_same_pixels(Image.open(io.BytesIO(data)), subject)


def test_url_answer_is_fetched_without_the_key(server):
    expected = make_subject(5)
    server.files["/files/out.png"] = _png(expected)
    server.script(Reply.json({"data": [{"url": f"{server.root}/files/out.png"}]}))
    image = client_for(server).generate("a dog")
    assert_same_pixels(image, expected)
    assert [(r.method, r.path) for r in server.requests] == [("POST", "/v1/images/generations"),
                                                             ("GET", "/files/out.png")]
    assert "Authorization" not in server.requests[1].headers


# ----------------------------------------------------------------------------------------------------------- retries

def test_server_error_is_retried_with_exponential_backoff(server, caplog):
    expected = make_subject(4)
    server.script(Reply.json({"error": {"message": "overloaded"}}, status=500),
                  Reply(502, b"bad gateway"), Reply.image(expected))
    sleeps: list[float] = []
    with caplog.at_level(logging.DEBUG, logger="dreamrelation.engine.images_api"):
        image = client_for(server, sleeps, max_retries=3, backoff=0.5).generate("a dog")
    assert_same_pixels(image, expected)
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]  # backoff * 2**attempt
    assert "overloaded" in caplog.text and "HTTP 502" in caplog.text
    assert KEY not in caplog.text


def test_retry_after_seconds_are_honoured_and_capped(server):
    server.script(Reply.json({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0"}),
                  Reply.json({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "30"}),
                  Reply.image(make_subject(1)))
    sleeps: list[float] = []
    client_for(server, sleeps, max_retries=2, backoff=5.0, max_wait=2.0).generate("a dog")
    assert sleeps == [0.0, 2.0]  # the server's 0 s instead of 5 s; its 30 s capped at max_wait
    assert len(server.requests) == 3


def test_429_is_retried_for_real(server):
    expected = make_subject(2)
    server.script(Reply.json({"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": "0"}),
                  Reply.image(expected))
    start = time.monotonic()
    image = client_for(server, backoff=10.0).generate("a dog")  # would wait 10 s if Retry-After were ignored
    assert time.monotonic() - start < 5.0
    assert_same_pixels(image, expected)
    assert len(server.requests) == 2


def test_client_error_is_not_retried_and_quotes_the_server(server):
    server.script(Reply.json({"error": {"message": "Unknown parameter: 'response_format'.",
                                        "type": "invalid_request_error"}}, status=400))
    sleeps: list[float] = []
    with pytest.raises(ImagesAPIError, match=r"HTTP 400: Unknown parameter: 'response_format'\.") as info:
        client_for(server, sleeps).generate("a dog")
    assert info.value.status == 400
    assert "invalid_request_error" in info.value.body
    assert len(server.requests) == 1 and sleeps == []
    assert KEY not in str(info.value)


def test_timeouts_are_retried_then_fail(server):
    late = Reply.image(make_subject(0))
    late.delay = 0.6  # longer than the client's 0.2 s timeout
    server.script(late, late)
    start = time.monotonic()
    with pytest.raises(ImagesAPIError, match=r"failed after 2 attempts; last: timed out after 0.2 s") as info:
        client_for(server, timeout=0.2, max_retries=1).generate("a dog")
    assert time.monotonic() - start < 3.0
    assert info.value.status is None
    assert len(server.requests) == 2


def test_retries_exhausted_report_attempts_and_last_cause(server):
    server.script(*[Reply.json({"error": {"message": f"down {i}"}}, status=503) for i in range(3)])
    sleeps: list[float] = []
    with pytest.raises(ImagesAPIError, match=r"failed after 3 attempts; last: HTTP 503: down 2") as info:
        client_for(server, sleeps, max_retries=2, backoff=0.25).generate("a dog")
    assert info.value.status == 503
    assert len(server.requests) == 3
    assert sleeps == [0.25, 0.5]


def test_connection_refused_is_retried_then_fails():
    srv = FakeImagesServer()  # bound, then closed before serving: nothing listens on the port
    srv.httpd.server_close()
    sleeps: list[float] = []
    client = ImagesAPIClient(ImagesAPIConfig(srv.base_url, timeout=1.0, max_retries=1, backoff=0.01),
                             sleep=sleeps.append)
    with pytest.raises(ImagesAPIError, match=r"failed after 2 attempts; last: connection error"):
        client.generate("a dog")
    assert sleeps == [0.01]


# ---------------------------------------------------------------------------------------------------- bad answers

def test_answer_without_image_raises(server):
    server.script(Reply.json({"data": []}), Reply.json({"data": [{"b64_json": base64.b64encode(b"nope").decode()}]}))
    client = client_for(server)
    with pytest.raises(ImagesAPIError, match=r"no data\[0\]\.b64_json or data\[0\]\.url"):
        client.generate("a dog")
    with pytest.raises(ImagesAPIError, match=r"data\[0\]\.b64_json is not a decodable image"):
        client.generate("a dog")


# ------------------------------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize("kwargs, field_name", [
    (dict(base_url=""), "base_url"),
    (dict(base_url="ftp://example.com/v1"), "base_url"),
    (dict(base_url="localhost:8000"), "base_url"),
    (dict(timeout=0), "timeout"),
    (dict(timeout=-1.0), "timeout"),
    (dict(max_retries=-1), "max_retries"),
    (dict(max_retries=1.5), "max_retries"),
    (dict(size="1024"), "size"),
    (dict(size="1024x0"), "size"),
    (dict(backoff=-0.1), "backoff"),
    (dict(model=" "), "model"),
])
def test_bad_config_names_the_field(kwargs, field_name):
    options = dict(base_url="http://127.0.0.1:1/v1")
    options.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field_name} must") as info:
        ImagesAPIConfig(**options)
    assert repr(kwargs[field_name]) in str(info.value)


def test_config_hides_the_key_and_normalizes_the_url():
    config = ImagesAPIConfig("https://api.example.com/v1/", api_key=KEY)
    assert config.base_url == "https://api.example.com/v1"
    assert KEY not in repr(config)


def test_from_env_reads_the_named_variable(monkeypatch, server, caplog):
    monkeypatch.setenv("DR_TEST_IMAGES_KEY", KEY)
    client = from_env(server.base_url, api_key_env="DR_TEST_IMAGES_KEY", size="64x64", model="dall-e-2")
    assert client.config.api_key == KEY and client.config.model == "dall-e-2"
    server.script(Reply.image(make_subject(1)))
    client.generate("a dog")
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    monkeypatch.delenv("DR_TEST_IMAGES_KEY")
    with caplog.at_level(logging.WARNING, logger="dreamrelation.engine.images_api"):
        assert ImagesAPIConfig.from_env(server.base_url, "DR_TEST_IMAGES_KEY").api_key is None
    assert "DR_TEST_IMAGES_KEY" in caplog.text


def test_bad_call_arguments():
    client = ImagesAPIClient(ImagesAPIConfig("http://127.0.0.1:1/v1"))
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        client.generate("  ")
    with pytest.raises(ValueError, match="images must be a non-empty list of PIL images"):
        client.edit("a dog", [])
