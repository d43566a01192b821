"""A real OpenAI-compatible HTTP server on 127.0.0.1 with scripted answers, for tests.

It speaks ``POST /v1/chat/completions`` (also ``/chat/completions``) in the OpenAI wire
format, so the real ``openai`` client talks to it over loopback. What it answers is a
*script*: a queue of :class:`Reply` objects consumed one per request (content strings,
HTTP errors such as 429/500/400, raw malformed bodies, delays, logprobs), then a default
responder function when the queue is empty. Every request body it received is recorded in
:attr:`FakeOpenAIServer.requests` so tests can assert what was sent (few-shot content...).

Use it through the pytest fixture::

    from tests.fakes.openai_server import openai_server  # noqa: F401

    def test_x(openai_server):
        openai_server.push("hello", Reply(status=429), Reply(content='{"a": 1}'))
        client = LLMClient(model="m", base_url=openai_server.base_url, api_key="k")
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Reply:
    """One scripted answer.

    ``status`` != 200 answers an OpenAI-style error body with ``error_message`` (or ``raw``).
    ``raw`` replaces the whole body with these bytes (e.g. malformed JSON).
    ``logprobs``: per generated token ``(token, logprob, [(alt_token, alt_logprob), ...])``.
    ``delay_s`` sleeps before answering (to provoke client timeouts).
    """

    content: str = ""
    status: int = 200
    error_message: str = ""
    error_param: str | None = None
    raw: bytes | None = None
    delay_s: float = 0.0
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str = "stop"


Responder = Callable[[dict[str, Any]], "Reply | str"]


def rejects_response_format(inner: Responder) -> Responder:
    """A responder for a server without structured outputs: 400 when ``response_format`` is sent."""

    def respond(body: dict[str, Any]) -> Reply | str:
        if "response_format" in body:
            return Reply(
                status=400,
                error_message="response_format of type json_schema is not supported by this server",
            )
        return inner(body)

    return respond


class ConcurrencyProbe:
    """A responder that holds every request ``hold_s`` seconds and records the peak in flight."""

    def __init__(self, inner: Responder, hold_s: float = 0.1) -> None:
        self.inner = inner
        self.hold_s = hold_s
        self.peak = 0
        self._now = 0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        with self._lock:
            self._now += 1
            self.peak = max(self.peak, self._now)
        try:
            time.sleep(self.hold_s)
            return self.inner(body)
        finally:
            with self._lock:
                self._now -= 1


def _no_default(body: dict[str, Any]) -> Reply:
    return Reply(
        status=500,
        error_message="fake server: the script is empty and no default responder is set",
    )


class FakeOpenAIServer:
    """OpenAI-compatible chat-completions server on 127.0.0.1 answering from a script."""

    def __init__(self, default: Responder | None = None, api_key: str | None = None) -> None:
        self.script: deque[Reply | str] = deque()
        self.default: Responder = default or _no_default
        self.api_key = api_key  # when set, other keys get 401
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # lower-cased names
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- script ---------------------------------------------------------------------------
    def push(self, *replies: Reply | str) -> None:
        """Queue answers, consumed one per request in order (a str is a 200 with that content)."""
        with self._lock:
            self.script.extend(replies)

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            item = self.script.popleft() if self.script else None
        if item is None:
            item = self.default(body)
        return Reply(content=item) if isinstance(item, str) else item

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("fake OpenAI server is not started: call start() or use the fixture")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def env(self) -> dict[str, str]:
        """Environment variables that point emc's settings at this server (for subprocesses)."""
        return {"EMC_OPENAI_BASE_URL": self.base_url, "EMC_OPENAI_API_KEY": self.api_key or "test"}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length)
                if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                    self._send(404, _error_body(f"no route {self.path}", "not_found"))
                    return
                if server.api_key is not None:
                    auth = self.headers.get("Authorization", "")
                    if auth != f"Bearer {server.api_key}":
                        with server._lock:
                            server.requests.append({"_unauthorized": True})
                        self._send(
                            401, _error_body("Incorrect API key provided", "invalid_api_key")
                        )
                        return
                try:
                    body = json.loads(data)
                except ValueError:
                    self._send(400, _error_body("request body is not JSON", "invalid_request"))
                    return
                with server._lock:
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                reply = server._next(body)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.raw is not None:
                    payload = reply.raw
                elif reply.status != 200:
                    payload = _error_body(
                        reply.error_message or f"scripted {reply.status}", param=reply.error_param
                    )
                else:
                    payload = json.dumps(_completion(body, reply)).encode()
                self._send(reply.status, payload, reply.headers)

            def _send(
                self, status: int, payload: bytes, headers: dict[str, str] | None = None
            ) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test): nothing to answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-openai",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _error_body(message: str, type_: str = "server_error", param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": None}}
    ).encode()


def _completion(request: dict[str, Any], reply: Reply) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": reply.content},
        "finish_reason": reply.finish_reason,
        "logprobs": None,
    }
    if reply.logprobs is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": tok,
                    "logprob": lp,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top
                    ],
                }
                for tok, lp, top in reply.logprobs
            ]
        }
    return {
        "id": f"chatcmpl-fake-{int(time.time() * 1e6)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake"),
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    """A started fake OpenAI server with an empty script (a fresh one per test)."""
    with FakeOpenAIServer() as server:
        yield server
