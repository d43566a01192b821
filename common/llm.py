"""The one OpenAI-compatible chat client of emc (OpenAI, vLLM, Ollama, ... via a base URL).

:class:`LLMClient` wraps the ``openai`` package and adds what the judge, the generator and
the evaluations need:

- retries with exponential backoff and full jitter on transient faults ONLY: HTTP 429,
  5xx, timeouts and connection errors (a ``Retry-After`` header is honoured, capped),
  within a total deadline per call (:class:`common.retry.RetryPolicy`): a hung server
  costs one deadline, not attempts x timeout;
  400/401/403/404/422 fail at once with a message that says what to fix;
- a per-call timeout;
- optional structured outputs (``response_format`` JSON schema) with a fallback to plain
  text, the schema then given as an instruction, when the server rejects the field;
- optional logprobs (``logprobs=True, top_logprobs=20``) returned per generated token;
- :func:`bounded_map` and a per-client concurrency limit for many calls at once.

Configuration comes from settings (``EMC_OPENAI_BASE_URL``, ``EMC_OPENAI_API_KEY``); the
model name comes from the experiment file.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import openai

from common.experiment import LLMCallSpec
from common.retry import RetryPolicy as RetryPolicy  # re-exported: callers build clients with it
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Key sent to servers that need none (vLLM, Ollama) when EMC_OPENAI_API_KEY is unset.
NO_KEY = "EMPTY"
OPENAI_URL = "https://api.openai.com/v1"

Message = Mapping[str, str]


class LLMError(RuntimeError):
    """A chat call failed; the message says what happened and what to do."""


class LLMConfigError(LLMError):
    """The client cannot be built from the settings (e.g. no API key for api.openai.com)."""


class LLMRequestError(LLMError):
    """The server refused the request (4xx other than 429): retrying would not help."""

    def __init__(
        self, message: str, status_code: int | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param  # the request field the server named as the problem, if any


class LLMUnavailable(LLMError):
    """Transient faults (429, 5xx, timeouts, connection errors) outlasted every retry."""


@dataclass(frozen=True)
class JsonSchema:
    """A structured-output schema: ``name`` (letters, digits, _ -) and a JSON schema object."""

    name: str
    schema: Mapping[str, Any]
    strict: bool = True

    def response_format(self) -> dict[str, Any]:
        """The ``response_format`` request field asking for structured output under this schema."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": dict(self.schema), "strict": self.strict},
        }

    def instruction(self) -> str:
        """The schema as a plain-text instruction, for servers without structured outputs."""
        return (
            "Answer with one JSON object only (no prose, no code fence) that matches this "
            f"JSON schema:\n{json.dumps(self.schema, sort_keys=True)}"
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ChatResult:
    """The answer of one chat call."""

    content: str
    model: str
    finish_reason: str | None
    structured: bool = False
    logprobs: tuple[TokenLogprob, ...] | None = None
    attempts: int = 1
    elapsed_s: float = 0.0

    def first_token_top_logprobs(self) -> dict[str, float]:
        """``{token: logprob}`` of the alternatives at the first generated position."""
        if not self.logprobs:
            raise LLMError(
                "the answer carries no logprobs: call chat(..., logprobs=True, top_logprobs=20) "
                "and use a server/model that returns them"
            )
        first = self.logprobs[0]
        return dict(first.top) if first.top else {first.token: first.logprob}


# 408 is a timeout, 429 a rate limit; every other 4xx is the request's fault.
_RETRYABLE_STATUS = frozenset({408, 429})


def _is_transient(err: Exception) -> bool:
    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in _RETRYABLE_STATUS or err.status_code >= 500
    return False


def _retry_after(err: Exception) -> float | None:
    if not isinstance(err, openai.APIStatusError):
        return None
    value = err.response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _server_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        msg = body.get("message") or (body.get("error") or {}).get("message")
        if msg:
            return str(msg)
    return err.message


_HINTS: dict[int, str] = {
    401: "check EMC_OPENAI_API_KEY (wrong or expired key)",
    403: "the key has no access to this model or endpoint: check the key's project/permissions",
    404: "check the model name in the experiment file and that EMC_OPENAI_BASE_URL ends in /v1",
}


class LLMClient:
    """Chat completions against one OpenAI-compatible server and model.

    Thread-safe: share one client between threads; at most ``max_concurrency`` requests
    are in flight at once through it.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 8,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not model:
            raise LLMConfigError(
                "no model name: set judge.model / generator.model in the experiment"
            )
        self.base_url = (base_url or OPENAI_URL).rstrip("/")
        if not api_key:
            if base_url is None or "api.openai.com" in self.base_url:
                raise LLMConfigError(
                    "no API key for api.openai.com: set EMC_OPENAI_API_KEY, or set "
                    "EMC_OPENAI_BASE_URL to a local OpenAI-compatible server (vLLM, Ollama)"
                )
            api_key = NO_KEY
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        # None = not known yet; False once the server rejected response_format.
        self._structured_ok: bool | None = None
        self._unsupported: set[str] = set()  # optional fields this server refused
        self._openai = openai.OpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout_s
        )

    @classmethod
    def from_settings(
        cls,
        model: str,
        settings: Settings | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        max_concurrency: int = 8,
        deadline_s: float | None = None,
    ) -> LLMClient:
        """A client for ``EMC_OPENAI_BASE_URL`` / ``EMC_OPENAI_API_KEY``."""
        settings = settings or get_settings()
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return cls(
            model=model,
            base_url=settings.openai_base_url,
            api_key=key,
            timeout_s=timeout_s,
            retry=RetryPolicy(max_retries=max_retries, deadline_s=deadline_s),
            max_concurrency=max_concurrency,
        )

    @classmethod
    def for_spec(cls, spec: LLMCallSpec, settings: Settings | None = None) -> LLMClient:
        """The client an experiment's judge or generator section describes (model, timeout,
        retries, deadline, concurrency) on ``EMC_OPENAI_BASE_URL`` / ``EMC_OPENAI_API_KEY``."""
        return cls.from_settings(
            spec.model,
            settings,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            max_concurrency=spec.concurrency,
            deadline_s=spec.deadline_s,
        )

    def describe(self) -> str:
        """The model and endpoint, for logs and error messages."""
        return f"{self.model} at {self.base_url}"

    # -- calls ----------------------------------------------------------------------------
    def chat(
        self,
        messages: Sequence[Message],
        *,
        schema: JsonSchema | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """One chat completion, retried on transient faults.

        With ``schema``, structured outputs are requested; a server that rejects them (a
        400/422 naming response_format or the schema) is asked again in plain text with the
        schema appended as an
        instruction, and remembered, so later calls go straight to plain text
        (``ChatResult.structured`` says which way the answer came). Likewise an optional
        field the server refuses (``temperature``, ``seed``, ``logprobs`` for reasoning
        models) is left out, and ``max_tokens`` becomes ``max_completion_tokens``, from
        then on.
        """
        kwargs: dict[str, Any] = {}
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if logprobs:
            kwargs["logprobs"] = True
            if top_logprobs is not None:
                kwargs["top_logprobs"] = top_logprobs
        if seed is not None:
            kwargs["seed"] = seed
        timeout = timeout_s or self.timeout_s
        msgs = [dict(m) for m in messages]
        if schema is not None and self._structured_ok is not False:
            try:
                result = self._call(
                    msgs, {**kwargs, "response_format": schema.response_format()}, timeout
                )
            except LLMRequestError as e:
                if not _refuses_structured(e):
                    raise
                log.warning(
                    "%s rejected structured outputs (%s); asking in plain text with the schema "
                    "as an instruction from now on",
                    self.describe(),
                    e,
                )
                self._structured_ok = False
            else:
                self._structured_ok = True
                return _replace_structured(result, True)
        if schema is not None:
            msgs = _with_instruction(msgs, schema.instruction())
        return self._call(msgs, kwargs, timeout)

    def _call(
        self, messages: list[dict[str, str]], kwargs: dict[str, Any], timeout: float
    ) -> ChatResult:
        """A call with retries; optional fields the server refuses are adapted (remembered)."""
        kwargs = self._adapt(kwargs)
        while True:
            try:
                return self._call_retrying(messages, kwargs, timeout)
            except LLMRequestError as e:
                param = _refused_hint(e, kwargs)
                if param is None:
                    raise
                log.warning(
                    "%s does not accept %r (%s); %s from now on",
                    self.describe(),
                    param,
                    e,
                    f"sending {RENAMES[param]!r} instead" if param in RENAMES else "leaving it out",
                )
                self._unsupported.add(param)
                kwargs = self._adapt(kwargs)

    def _adapt(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Leave out (or rename) the fields this server refused before."""
        out: dict[str, Any] = {}
        for k, v in kwargs.items():
            if k not in self._unsupported:
                out[k] = v
            elif k in RENAMES:
                out[RENAMES[k]] = v
        if "logprobs" in self._unsupported:
            out.pop("top_logprobs", None)  # meaningless without logprobs
        return out

    def _call_retrying(
        self, messages: list[dict[str, str]], kwargs: dict[str, Any], timeout: float
    ) -> ChatResult:
        start = time.monotonic()
        deadline = self.retry.start(start)
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._slots:
                    resp = self._openai.chat.completions.create(
                        model=self.model,
                        messages=messages,  # type: ignore[arg-type]
                        timeout=deadline.cap(timeout),
                        **kwargs,
                    )
            except openai.APIError as e:
                if not _is_transient(e):
                    raise self._fatal(e) from e
                with self._rng_lock:
                    wait = self.retry.delay(attempt - 1, self._rng, _retry_after(e))
                if attempt > self.retry.max_retries or not deadline.allows(wait):
                    raise LLMUnavailable(
                        f"{self.describe()} still failing after {attempt} attempts in "
                        f"{time.monotonic() - start:.0f}s ({_describe_error(e)}): "
                        f"{_transient_hint(e)}"
                    ) from e
                log.info(
                    "%s: %s, retry %d/%d in %.2fs",
                    self.describe(),
                    _describe_error(e),
                    attempt,
                    self.retry.max_retries,
                    wait,
                )
                self._sleep(wait)
                continue
            except ValueError as e:  # a 200 whose body is not JSON
                raise LLMError(
                    f"server at {self.base_url} answered with a body that is not an OpenAI chat "
                    f"completion ({e}): check EMC_OPENAI_BASE_URL points at an OpenAI-compatible "
                    "/v1 endpoint"
                ) from e
            return _to_result(resp, attempt, time.monotonic() - start, self.base_url)

    def probe(self, timeout_s: float | None = None) -> None:
        """One short request, no retries: returns if the server answers at all (any
        HTTP answer but 429/5xx, even a refusal of the request), else raises
        :class:`LLMUnavailable`. The circuit breaker asks this while the endpoint is down."""
        try:
            self._openai.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "Answer with OK."}],
                max_tokens=1,
                timeout=timeout_s or self.timeout_s,
            )
        except openai.APIError as e:
            if _is_transient(e):
                raise LLMUnavailable(f"{self.describe()}: {_describe_error(e)}") from e
        except ValueError:  # answered, with a body that is not a completion: it is up
            return

    def _fatal(self, err: openai.APIError) -> LLMError:
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            hint = _HINTS.get(status, "fix the request or the experiment's model settings")
            return LLMRequestError(
                f"server at {self.base_url} answered {status} for model {self.model!r}: "
                f"{_server_message(err)} — {hint}",
                status,
                err.param,
            )
        return LLMError(f"{self.describe()}: {err}")


#: Optional fields a call can do without (reasoning models such as o3 refuse some): without
#: logprobs the answer's ``logprobs`` is None and callers fall back to the text.
DROPPABLE = ("temperature", "seed", "logprobs", "top_logprobs")
#: Fields some models want under another name.
RENAMES = {"max_tokens": "max_completion_tokens"}


def _refused_hint(e: LLMRequestError, kwargs: Mapping[str, Any]) -> str | None:
    """The optional field a 400 refused (named in ``param`` or quoted in the message), if any."""
    if e.status_code not in (400, 422):
        return None
    for name in (*DROPPABLE, *RENAMES):
        if name in kwargs and (e.param == name or f"'{name}'" in str(e)):
            return name
    return None


_STRUCTURED_WORDS = ("response_format", "json_schema", "structured output", "schema")


def _refuses_structured(e: LLMRequestError) -> bool:
    """A 400/422 that names structured outputs (other 400s are the request's own fault)."""
    if e.status_code not in (400, 422):
        return False
    text = str(e).lower()
    return e.param == "response_format" or any(w in text for w in _STRUCTURED_WORDS)


def _describe_error(e: Exception) -> str:
    if isinstance(e, openai.APITimeoutError):
        return "timed out"
    if isinstance(e, openai.APIConnectionError):
        return f"connection failed ({e.__cause__ or e})"
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}: {_server_message(e)}"
    return str(e)


def _transient_hint(e: Exception) -> str:
    if isinstance(e, openai.APITimeoutError):
        return "raise the timeout (judge.timeout_s) or check the server's load"
    if isinstance(e, openai.APIConnectionError):
        return "is the server running? check EMC_OPENAI_BASE_URL"
    if isinstance(e, openai.APIStatusError) and e.status_code == 429:
        return "rate limited: lower the concurrency (judge.concurrency) or wait and retry"
    return "the server is failing: check its logs, or retry later"


def _with_instruction(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{instruction}"
    else:
        out.insert(0, {"role": "system", "content": instruction})
    return out


def _replace_structured(r: ChatResult, structured: bool) -> ChatResult:
    return ChatResult(
        content=r.content,
        model=r.model,
        finish_reason=r.finish_reason,
        structured=structured,
        logprobs=r.logprobs,
        attempts=r.attempts,
        elapsed_s=r.elapsed_s,
    )


def _to_result(resp: Any, attempts: int, elapsed: float, base_url: str) -> ChatResult:
    choices = getattr(resp, "choices", None)
    if not choices:
        raise LLMError(
            f"server at {base_url} answered without choices: check it serves OpenAI chat completions"
        )
    choice = choices[0]
    lps: tuple[TokenLogprob, ...] | None = None
    if choice.logprobs is not None and choice.logprobs.content is not None:
        lps = tuple(
            TokenLogprob(
                token=t.token,
                logprob=float(t.logprob),
                top=tuple((a.token, float(a.logprob)) for a in (t.top_logprobs or [])),
            )
            for t in choice.logprobs.content
        )
    return ChatResult(
        content=choice.message.content or "",
        model=str(getattr(resp, "model", "")),
        finish_reason=choice.finish_reason,
        logprobs=lps,
        attempts=attempts,
        elapsed_s=elapsed,
    )


# ------------------------------------------------------------------------- JSON answers


def parse_json_object(text: str) -> dict[str, Any]:
    """The JSON object in a model's answer (tolerates a code fence or prose around it).

    Raises ``ValueError`` with the reason when there is none.
    """
    s = text.strip()
    if not s:
        raise ValueError("the answer is empty")
    try:
        obj = json.loads(s)
    except ValueError as first:
        start, end = s.find("{"), s.rfind("}")
        if start < 0:
            raise ValueError(f"no JSON object in the answer: {_clip(s)!r}") from None
        if end <= start:  # an object that never closes: cut off, or not JSON at all
            raise ValueError(f"malformed JSON in the answer ({first}): {_clip(s)!r}") from None
        try:
            obj = json.loads(s[start : end + 1])
        except ValueError as e:
            raise ValueError(f"malformed JSON in the answer ({e}): {_clip(s)!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"the answer is JSON but not an object: {_clip(s)!r}")
    return obj


def _clip(s: str, n: int = 160) -> str:
    return s if len(s) <= n else s[:n] + "…"


# -------------------------------------------------------------------------- concurrency


@dataclass
class Outcome(Generic[T]):
    """Result or error of one item of :func:`bounded_map` (``return_exceptions=True``)."""

    value: T | None = None
    error: BaseException | None = field(default=None)

    @property
    def ok(self) -> bool:
        """True if the item produced a value instead of raising."""
        return self.error is None


def bounded_map(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> list[Outcome[R]]:
    """Apply ``fn`` to every item with at most ``concurrency`` calls at once, in input order.

    Every item's outcome is returned (value or error); nothing is dropped or swallowed:
    callers decide whether one failure fails the batch (see :func:`raise_first`).
    """
    items = list(items)
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if not items:
        return []

    def run(item: T) -> Outcome[R]:
        try:
            return Outcome(value=fn(item))
        except Exception as e:
            return Outcome(error=e)

    if concurrency == 1 or len(items) == 1:
        return [run(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
        return list(pool.map(run, items))


def raise_first(outcomes: Sequence[Outcome[R]]) -> list[R]:
    """The values, or the first error (re-raised) if any item failed."""
    for o in outcomes:
        if o.error is not None:
            raise o.error
    return [cast(R, o.value) for o in outcomes]
