"""The server client's retries, against a real HTTP server on 127.0.0.1 that answers 429/503/404 on purpose:
429 and 5xx are retried with backoff, any other 4xx is the row's error at once, and each error names the status."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stage1_reason.openai_backend import RowHttpError, ServerClient, ServerUnavailableError


class FlakyServer(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        count = self.calls[self.path] = self.calls.get(self.path, 0) + 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/twice-busy" and count <= 2:
            self._answer(429, {"error": {"message": "rate limited"}})
        elif self.path == "/v1/down":
            self._answer(503, {"error": {"message": "overloaded"}})
        elif self.path == "/v1/missing":
            self._answer(404, {"error": {"message": "no such model"}})
        else:
            self._answer(200, {"ok": True, "attempt": count})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def server():
    FlakyServer.calls = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_429_and_5xx_are_retried_other_4xx_are_not(server):
    client = ServerClient(server, None, timeout=10, retries=3, backoff=0.01)
    try:
        assert client.request("POST", "/v1/twice-busy", {"x": 1}) == {"ok": True, "attempt": 3}
        with pytest.raises(RowHttpError) as down:
            client.request("POST", "/v1/down", {})
        assert down.value.status == 503 and str(down.value) == "HTTP 503 after 4 attempts: overloaded"
        with pytest.raises(RowHttpError) as missing:
            client.request("POST", "/v1/missing", {})
        assert missing.value.status == 404 and str(missing.value) == "HTTP 404: no such model"
    finally:
        client.close()
    assert FlakyServer.calls == {"/v1/twice-busy": 3, "/v1/down": 4, "/v1/missing": 1}


def test_a_server_that_is_not_there_is_unavailable_after_the_retries():
    client = ServerClient("http://127.0.0.1:9", None, timeout=2, retries=1, backoff=0.01)  # the discard port: closed
    try:
        with pytest.raises(ServerUnavailableError, match="server unreachable after 2 attempts"):
            client.request("POST", "/v1/chat/completions", {})
    finally:
        client.close()
