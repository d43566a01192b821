"""common.llm against the real local OpenAI-compatible test server (loopback HTTP)."""

from __future__ import annotations

import json
import time

import pytest

from common.llm import (
    JsonSchema,
    LLMClient,
    LLMConfigError,
    LLMError,
    LLMRequestError,
    LLMUnavailable,
    RetryPolicy,
    bounded_map,
    parse_json_object,
    raise_first,
)
from common.settings import Settings
from tests.fixtures.openai_server import (
    ConcurrencyProbe,
    FakeOpenAIServer,
    Reply,
    rejects_response_format,
)

FAST = RetryPolicy(max_retries=3, base_delay_s=0.01, max_delay_s=0.05)
SCHEMA = JsonSchema(
    "answer",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    },
)
MSG = [{"role": "user", "content": "hi"}]


def client(server: FakeOpenAIServer, **kw: object) -> LLMClient:
    args: dict[str, object] = {
        "model": "m",
        "base_url": server.base_url,
        "api_key": "k",
        "retry": FAST,
        "timeout_s": 5.0,
    }
    args.update(kw)
    return LLMClient(**args)  # type: ignore[arg-type]


def test_plain_answer_and_request_content(openai_server: FakeOpenAIServer) -> None:
    openai_server.push("hello")
    r = client(openai_server).chat(MSG, temperature=0.5, max_tokens=20)
    assert r.content == "hello" and r.attempts == 1 and not r.structured
    body = openai_server.requests[0]
    assert body["model"] == "m" and body["messages"] == MSG
    assert body["temperature"] == 0.5 and body["max_tokens"] == 20
    assert "response_format" not in body and "logprobs" not in body


def test_structured_output_sends_schema(openai_server: FakeOpenAIServer) -> None:
    openai_server.push('{"a": 1}')
    r = client(openai_server).chat(MSG, schema=SCHEMA)
    assert r.structured and parse_json_object(r.content) == {"a": 1}
    rf = openai_server.requests[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "answer"
    assert rf["json_schema"]["schema"]["required"] == ["a"]


def test_structured_output_falls_back_to_plain_text(openai_server: FakeOpenAIServer) -> None:
    openai_server.default = rejects_response_format(lambda body: '{"a": 2}')
    c = client(openai_server)
    r = c.chat([{"role": "system", "content": "be brief"}, *MSG], schema=SCHEMA)
    assert not r.structured and parse_json_object(r.content) == {"a": 2}
    first, second = openai_server.requests
    assert "response_format" in first and "response_format" not in second
    assert second["messages"][0]["content"].startswith("be brief")
    assert "JSON schema" in second["messages"][0]["content"]
    # remembered: the next call goes straight to plain text (one request, not two)
    c.chat(MSG, schema=SCHEMA)
    assert len(openai_server.requests) == 3
    assert "response_format" not in openai_server.requests[2]
    assert openai_server.requests[2]["messages"][0]["role"] == "system"


def test_refused_sampling_hint_is_dropped_and_remembered(openai_server: FakeOpenAIServer) -> None:
    def respond(body: dict[str, object]) -> Reply | str:
        if "temperature" in body:
            return Reply(
                status=400,
                error_message="Unsupported value: 'temperature' does not support 0 with this model.",
                error_param="temperature",
            )
        return '{"a": 3}'

    openai_server.default = respond
    c = client(openai_server)
    r = c.chat(MSG, schema=SCHEMA, temperature=0)
    assert r.structured and parse_json_object(r.content) == {"a": 3}
    first, second = openai_server.requests
    assert "temperature" in first and "temperature" not in second
    assert "response_format" in second  # the refusal was not blamed on structured outputs
    c.chat(MSG, temperature=0)
    assert len(openai_server.requests) == 3 and "temperature" not in openai_server.requests[2]


def test_reasoning_model_refusals_are_adapted(openai_server: FakeOpenAIServer) -> None:
    def respond(body: dict[str, object]) -> Reply | str:
        for field in ("max_tokens", "logprobs"):
            if field in body:
                return Reply(
                    status=400,
                    error_message=f"Unsupported parameter: '{field}' is not supported with this model.",
                    error_param=field,
                )
        return "42"

    openai_server.default = respond
    c = client(openai_server)
    r = c.chat(MSG, max_tokens=5, logprobs=True, top_logprobs=20)
    assert r.content == "42" and r.logprobs is None
    last = openai_server.requests[-1]
    assert last["max_completion_tokens"] == 5
    assert not {"max_tokens", "logprobs", "top_logprobs"} & set(last)
    n = len(openai_server.requests)
    c.chat(MSG, max_tokens=5, logprobs=True, top_logprobs=20)
    assert len(openai_server.requests) == n + 1  # remembered: no refusals the second time


def test_other_bad_request_is_not_blamed_on_hints(openai_server: FakeOpenAIServer) -> None:
    openai_server.default = lambda body: Reply(status=400, error_message="messages too long")
    with pytest.raises(LLMRequestError, match="messages too long"):
        client(openai_server).chat(MSG, temperature=0, schema=SCHEMA)
    assert len(openai_server.requests) == 1  # neither the hint nor structured outputs blamed


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_transient_status_is_retried(openai_server: FakeOpenAIServer, status: int) -> None:
    openai_server.push(Reply(status=status), Reply(status=status), "ok")
    slept: list[float] = []
    r = client(openai_server, sleep=slept.append).chat(MSG)
    assert r.content == "ok" and r.attempts == 3
    assert len(openai_server.requests) == 3
    assert len(slept) == 2 and all(0 <= s <= FAST.max_delay_s for s in slept)


def test_retry_after_header_is_honoured_within_cap(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(Reply(status=429, headers={"Retry-After": "0.04"}), "ok")
    slept: list[float] = []
    client(openai_server, sleep=slept.append).chat(MSG)
    assert slept and slept[0] >= 0.04


@pytest.mark.parametrize(
    ("status", "hint"),
    [(400, "fix the request"), (401, "EMC_OPENAI_API_KEY"), (404, "model name"), (422, "fix")],
)
def test_client_errors_are_not_retried(
    openai_server: FakeOpenAIServer, status: int, hint: str
) -> None:
    openai_server.push(Reply(status=status, error_message="nope"), "never reached")
    with pytest.raises(LLMRequestError) as e:
        client(openai_server).chat(MSG)
    assert len(openai_server.requests) == 1
    assert e.value.status_code == status
    msg = str(e.value)
    assert f"answered {status}" in msg and openai_server.base_url in msg and hint in msg


def test_wrong_key_gets_401_with_hint() -> None:
    with FakeOpenAIServer(default=lambda b: "x", api_key="right") as server:
        with pytest.raises(LLMRequestError, match=r"401.*check EMC_OPENAI_API_KEY"):
            client(server, api_key="wrong").chat(MSG)
        assert client(server, api_key="right").chat(MSG).content == "x"


def test_retries_exhausted_says_what_to_do(openai_server: FakeOpenAIServer) -> None:
    openai_server.default = lambda body: Reply(status=429)
    with pytest.raises(LLMUnavailable, match=r"after 4 attempts.*lower the concurrency"):
        client(openai_server).chat(MSG)
    assert len(openai_server.requests) == 4  # 1 + max_retries


def test_timeout_is_retried(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(Reply(content="late", delay_s=1.0), "fast")
    t0 = time.monotonic()
    r = client(openai_server, timeout_s=0.2).chat(MSG)
    assert r.content == "fast" and r.attempts == 2
    assert time.monotonic() - t0 < 1.0


def test_connection_refused_is_retried_then_explained() -> None:
    server = FakeOpenAIServer().start()
    url = server.base_url
    server.stop()  # nothing listens on that port any more
    c = LLMClient(model="m", base_url=url, api_key="k", retry=FAST, timeout_s=2)
    with pytest.raises(LLMUnavailable, match="is the server running"):
        c.chat(MSG)


def test_malformed_http_body_is_a_clear_error(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(Reply(raw=b"{not json"))
    with pytest.raises(LLMError, match="not an OpenAI chat completion"):
        client(openai_server).chat(MSG)
    assert len(openai_server.requests) == 1


def test_logprobs_are_returned(openai_server: FakeOpenAIServer) -> None:
    top = [(" yes", -0.1), (" no", -2.5), (" maybe", -4.0)]
    openai_server.push(Reply(content=" yes", logprobs=[(" yes", -0.1, top)]))
    r = client(openai_server).chat(MSG, logprobs=True, top_logprobs=20, max_tokens=1)
    body = openai_server.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert r.first_token_top_logprobs() == dict(top)
    assert r.logprobs is not None and r.logprobs[0].token == " yes"


def test_missing_logprobs_is_an_error(openai_server: FakeOpenAIServer) -> None:
    openai_server.push("x")
    with pytest.raises(LLMError, match="logprobs=True"):
        client(openai_server).chat(MSG).first_token_top_logprobs()


def test_from_settings_and_missing_key() -> None:
    with pytest.raises(LLMConfigError, match="set EMC_OPENAI_API_KEY"):
        LLMClient.from_settings("o3", Settings(openai_api_key=None, openai_base_url=None))
    with FakeOpenAIServer(default=lambda b: "local") as server:
        # a local server (vLLM, Ollama) needs no key
        s = Settings(openai_api_key=None, openai_base_url=server.base_url)
        assert LLMClient.from_settings("llama", s).chat(MSG).content == "local"
        assert server.headers[0]["authorization"] == "Bearer EMPTY"


def test_concurrency_is_bounded(openai_server: FakeOpenAIServer) -> None:
    probe = ConcurrencyProbe(lambda body: json.dumps(body["messages"]))
    openai_server.default = probe
    c = client(openai_server, max_concurrency=2)
    outs = bounded_map(
        lambda i: c.chat([{"role": "user", "content": str(i)}]).content, range(8), concurrency=4
    )
    values = raise_first(outs)
    assert [json.loads(v)[0]["content"] for v in values] == [str(i) for i in range(8)]
    assert probe.peak == 2  # the client's limit wins over the pool's 4


def test_bounded_map_keeps_errors() -> None:
    def f(i: int) -> int:
        if i == 2:
            raise ValueError("two")
        return i * 10

    outs = bounded_map(f, range(4), concurrency=3)
    assert [o.value for o in outs] == [0, 10, None, 30]
    assert isinstance(outs[2].error, ValueError)
    with pytest.raises(ValueError, match="two"):
        raise_first(outs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('Sure! {"a": 1} done', {"a": 1}),
    ],
)
def test_parse_json_object(text: str, expected: dict[str, int]) -> None:
    assert parse_json_object(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("no json here", "no JSON object"),
        ("{a: 1}", "malformed"),
        ("[1]", "not an object"),
    ],
)
def test_parse_json_object_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_json_object(text)


def test_hung_server_costs_one_deadline_not_attempts_times_timeout(
    openai_server: FakeOpenAIServer,
) -> None:
    """Every answer comes after 2 s; attempts time out after 0.5 s; the chain gives up
    after 1.2 s in all, although 5 retries would be allowed."""
    openai_server.default = lambda body: Reply(content="late", delay_s=2.0)
    policy = RetryPolicy(max_retries=5, base_delay_s=0.01, max_delay_s=0.02, deadline_s=1.2)
    c = client(openai_server, timeout_s=0.5, retry=policy)
    t0 = time.monotonic()
    with pytest.raises(LLMUnavailable, match=r"still failing after \d attempts in 1s"):
        c.chat(MSG)
    elapsed = time.monotonic() - t0
    assert 1.0 < elapsed < 1.8, elapsed
    assert len(openai_server.requests) == 3  # 0.5 + 0.5 + the 0.2 s left


def test_probe_is_one_short_request(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(Reply(status=503), Reply(status=400, error_message="max_tokens?"))
    c = client(openai_server)
    with pytest.raises(LLMUnavailable, match="HTTP 503"):
        c.probe()
    c.probe()  # a refusal is an answer: the server is up
    assert len(openai_server.requests) == 2
    assert openai_server.requests[0]["max_tokens"] == 1
