"""Any OpenAI-compatible server over HTTP (aiohttp), plus the HTTP plumbing shared by the
vLLM-HTTP and SGLang backends (retries, timeouts, abort, health).

Two modes:
- "completions" (token-in/token-out): POST {base}/v1/completions with `prompt` = the token id
  list, `logprobs: 0` and `return_token_ids: true` (vLLM's extension; servers that ignore it
  must put token ids in `logprobs.tokens` as "token_id:N" strings, which vLLM does with
  `return_tokens_as_token_ids`). If neither comes back, BackendError: the server is not
  token-in/token-out and should be used in chat mode.
- "chat": POST {base}/v1/chat/completions with `GenerateRequest.messages` (OpenAI message
  format). The server tokenizes and returns TEXT: `token_in_token_out` is False, the output
  carries `text`, token_ids are `encode(text)` when an encoder is given (else empty) and
  logprobs are empty. Such trajectories are for evaluation, not for exact RL training.

Retries: connection errors, HTTP 429 and 5xx are retried `retries` times with exponential
backoff; then (or on any other failure) BackendError with the server's name. A generation
longer than `timeout_s` raises BackendError (not retried). Stalls: while requests are in flight
the backend probes `health_path` every `stall_probe_s` on a connection pool of its own; a server
that answers nothing at all (a hung or SIGSTOPped process: any HTTP status counts as an answer)
for `stall_timeout_s` fails its in-flight requests with BackendError, so the engine moves them to
another server in seconds instead of waiting out `timeout_s`. abort() cancels the in-flight HTTP
request (vLLM and SGLang abort a request whose connection closes) and the call returns
finish_reason "abort" with no tokens: partial tokens are not recoverable over non-streaming
HTTP. update_weights is not part of the OpenAI API and raises BackendError.

    backend = OpenAIBackend(OpenAIConfig(base_url="http://127.0.0.1:8000", model="m"))
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import aiohttp

from spyglass.engine.backends.base import (Backend, BackendError, GenerateOutput, GenerateRequest,
                                           Weights)

MODES = ("completions", "chat")
_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class HTTPConfig:
    """Connection settings shared by every HTTP backend."""

    base_url: str = "http://127.0.0.1:8000"
    name: str = ""                     # defaults to base_url
    timeout_s: float = 600.0           # one generation, end to end
    connect_timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.25
    max_connections: int = 1024
    api_key_env: str = "OPENAI_API_KEY"  # bearer token read from this env var, if set
    health_path: str = "/health"
    stall_timeout_s: float = 20.0      # in-flight requests fail when the server answers no probe
    #                                    for this long (a hung process); 0 = off (timeout_s only)
    stall_probe_s: float = 2.0         # seconds between health probes while requests are in flight

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.name = self.name or self.base_url
        for k in ("timeout_s", "connect_timeout_s"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if not self.stall_timeout_s >= 0:
            raise ValueError(f"stall_timeout_s must be >= 0 (0 = off), got {self.stall_timeout_s!r}")
        if not self.stall_probe_s > 0:
            raise ValueError(f"stall_probe_s must be > 0, got {self.stall_probe_s!r}")
        if self.stall_timeout_s and self.stall_probe_s > self.stall_timeout_s:
            raise ValueError(f"stall_probe_s ({self.stall_probe_s}) must not exceed stall_timeout_s "
                             f"({self.stall_timeout_s})")
        if self.backoff_s < 0 or self.max_connections < 1:
            raise ValueError(f"bad backoff_s={self.backoff_s!r} / max_connections={self.max_connections!r}")


@dataclass
class OpenAIConfig(HTTPConfig):
    """An OpenAI-compatible server; `mode` completions (token ids) or chat (text)."""

    kind: ClassVar[str] = "openai"
    model: str = ""
    mode: str = "completions"
    return_token_ids: bool = True      # vLLM extension: choices[].token_ids
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


class HTTPBackend(Backend):
    """Shared HTTP client: session, retries, abort-by-cancel, health."""

    def __init__(self, cfg: HTTPConfig) -> None:
        self.http = cfg
        self.name = cfg.name
        self.version = 0
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task] = {}
        self._aborted: set[str] = set()
        self._stalled: dict[str, str] = {}  # request id -> why the watchdog failed it
        self._probe: aiohttp.ClientSession | None = None
        self._watchdog: asyncio.Task | None = None
        self._closed = False

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.http.api_key_env, "") if self.http.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise BackendError(self.name, "backend is closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.http.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.http.timeout_s,
                                              sock_connect=self.http.connect_timeout_s),
                headers=self._headers())
        return self._session

    async def request_json(self, method: str, path: str, payload: Any = None, *, retry: bool = True,
                           timeout_s: float | None = None) -> Any:
        """One JSON call (None for an empty body); BackendError when the server cannot answer.
        Retried on connection errors, 429 and 5xx unless `retry` is False (a call that blocks on
        the server until a collective completes must not be sent twice); `timeout_s` replaces the
        session's `timeout_s` for this call."""
        url = self.http.base_url + path
        tries = self.http.retries + 1 if retry else 1
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        for attempt in range(tries):
            retry_why = ""
            try:
                async with self._client().request(method, url, json=payload, timeout=timeout) as resp:
                    body = await resp.text()
                    if resp.status in _RETRY_STATUS and retry:
                        retry_why = f"HTTP {resp.status}: {body[:200]}"
                    elif resp.status >= 400:
                        raise BackendError(self.name, f"{method} {path} -> HTTP {resp.status}: {body[:500]}")
                    else:
                        return _loads(self.name, path, body) if body else None
            except asyncio.TimeoutError as e:
                raise BackendError(self.name, f"{method} {path} timed out after "
                                              f"{timeout_s or self.http.timeout_s}s") from e
            except aiohttp.ClientError as e:
                retry_why = f"{type(e).__name__}: {e}"
            if attempt < tries - 1:
                await asyncio.sleep(self.http.backoff_s * 2 ** attempt)
        raise BackendError(self.name, f"{method} {path} failed after {tries} tries: {retry_why}")

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        self.check_request(req)
        if req.request_id in self._inflight:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        t0 = time.perf_counter()
        task = asyncio.ensure_future(self._generate(req))
        self._inflight[req.request_id] = task
        if self.http.stall_timeout_s > 0 and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.ensure_future(self._watch_stalls())
        try:
            out = await task
        except asyncio.CancelledError:
            if req.request_id in self._stalled and req.request_id not in self._aborted:
                raise BackendError(self.name, self._stalled[req.request_id]) from None
            if req.request_id not in self._aborted:
                task.cancel()
                raise
            out = GenerateOutput(req.request_id, [], [], "abort", self.version, self.name)
        finally:
            self._inflight.pop(req.request_id, None)
            self._aborted.discard(req.request_id)
            self._stalled.pop(req.request_id, None)
        out.gen_s = time.perf_counter() - t0
        return out

    async def _generate(self, req: GenerateRequest) -> GenerateOutput:
        raise NotImplementedError

    def _prober(self) -> aiohttp.ClientSession:
        """A small pool of its own: probes never queue behind a full pool of generations."""
        if self._probe is None or self._probe.closed:
            self._probe = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2),
                                                headers=self._headers())
        return self._probe

    async def _answers(self, timeout_s: float) -> bool:
        """Whether the server sends any HTTP response to a health probe within `timeout_s`."""
        try:
            async with self._prober().get(self.http.base_url + self.http.health_path,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                await resp.read()
                return True
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _watch_stalls(self) -> None:
        """While requests are in flight, probe the server; after `stall_timeout_s` with no
        answer, fail every in-flight request (generate raises BackendError naming the stall)."""
        limit, every = self.http.stall_timeout_s, self.http.stall_probe_s
        alive = time.monotonic()
        while self._inflight and not self._closed:
            left = limit - (time.monotonic() - alive)
            if left <= 0:
                why = (f"stalled: no answer to {self.http.health_path} for {limit:g} s with "
                       f"{len(self._inflight)} requests in flight (stall_timeout_s)")
                for rid, task in list(self._inflight.items()):
                    if rid not in self._aborted:  # an abort already under way stays an abort
                        self._stalled[rid] = why
                        task.cancel()
                return
            t = time.monotonic()
            if await self._answers(left):
                alive = time.monotonic()
            await asyncio.sleep(max(0.0, every - (time.monotonic() - t)))

    async def _server_abort(self, request_id: str) -> None:
        """Server-side abort hook (closing the connection already aborts on vLLM/SGLang)."""

    async def abort(self, request_id: str) -> None:
        task = self._inflight.get(request_id)
        if task is None or task.done():
            return
        self._aborted.add(request_id)
        task.cancel()
        try:
            await self._server_abort(request_id)
        except BackendError:
            pass

    async def update_weights(self, weights: Weights, version: int) -> None:
        raise BackendError(self.name, f"{type(self).__name__} cannot update weights "
                                      "(not part of the OpenAI API)")

    async def health(self) -> bool:
        if self._closed:
            return False
        try:
            async with self._prober().get(self.http.base_url + self.http.health_path,
                                          timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        self._closed = True
        for rid, task in list(self._inflight.items()):
            self._aborted.add(rid)
            task.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for s in (self._session, self._probe):
            if s is not None:
                await s.close()


def _loads(server: str, path: str, body: str) -> Any:
    import json
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise BackendError(server, f"{path} returned non-JSON: {body[:200]!r}") from e


def _finish(server: str, reason: Any) -> str:
    if isinstance(reason, dict):  # SGLang: {"type": "stop", "matched": ...}
        reason = reason.get("type")
    if reason in ("stop", "length", "abort"):
        return reason
    if reason in (None, "eos", "stop_token"):
        return "stop"
    raise BackendError(server, f"unknown finish_reason {reason!r}")


def completion_payload(req: GenerateRequest, model: str) -> dict[str, Any]:
    """The /v1/completions body for a token-id prompt (OpenAI fields + vLLM extensions)."""
    sp = req.sampling
    body: dict[str, Any] = {"model": model, "prompt": req.prompt_ids.tolist(), "max_tokens": sp.max_tokens,
                            "temperature": sp.temperature, "top_p": sp.top_p,
                            "stop_token_ids": sp.stop_token_ids, "skip_special_tokens": False,
                            "logprobs": 0 if sp.logprobs else None}
    if sp.top_k > 0:
        body["top_k"] = sp.top_k
    if sp.seed is not None:
        body["seed"] = sp.seed
    return {k: v for k, v in body.items() if v is not None}


def parse_completion(server: str, data: dict[str, Any], want_logprobs: bool) -> tuple[list[int], list[float], str]:
    """token ids, logprobs and finish reason from a /v1/completions response."""
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise BackendError(server, f"completion response has no choices: {str(data)[:200]}") from e
    lp = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None:  # vLLM --return-tokens-as-token-ids style "token_id:123"
        toks = lp.get("tokens") or []
        if not toks or not all(isinstance(t, str) and t.startswith("token_id:") for t in toks):
            raise BackendError(server, "response carries no token ids (needs return_token_ids or "
                                       "return_tokens_as_token_ids): use chat mode for this server")
        ids = [int(t.split(":", 1)[1]) for t in toks]
    logprobs = [float(x) for x in (lp.get("token_logprobs") or [])] if want_logprobs else []
    if want_logprobs and len(logprobs) != len(ids):
        raise BackendError(server, f"{len(logprobs)} logprobs for {len(ids)} tokens")
    return [int(i) for i in ids], logprobs, _finish(server, choice.get("finish_reason"))


class OpenAIBackend(HTTPBackend):
    """OpenAI-compatible server (see the module docstring)."""

    def __init__(self, cfg: OpenAIConfig, encode: Callable[[str], list[int]] | None = None) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.encode = encode
        self.token_in_token_out = cfg.mode == "completions"

    @classmethod
    def from_config(cls, cfg: OpenAIConfig) -> "OpenAIBackend":
        return cls(cfg)

    async def _generate(self, req: GenerateRequest) -> GenerateOutput:
        if self.cfg.mode == "chat":
            return await self._chat(req)
        body = completion_payload(req, self.cfg.model) | self._extra_fields(req) | self.cfg.extra_body
        if self.cfg.return_token_ids:
            body["return_token_ids"] = True
        data = await self.request_json("POST", "/v1/completions", body)
        ids, lps, finish = parse_completion(self.name, data, req.sampling.logprobs)
        return GenerateOutput(req.request_id, ids, lps, finish, self.version, self.name)

    def _extra_fields(self, req: GenerateRequest) -> dict[str, Any]:
        """Server-specific fields added to each completion body (none for plain OpenAI)."""
        return {}

    async def _chat(self, req: GenerateRequest) -> GenerateOutput:
        if not req.messages:
            raise ValueError(f"chat mode needs GenerateRequest.messages (request {req.request_id!r})")
        sp = req.sampling
        body = {"model": self.cfg.model, "messages": req.messages, "max_tokens": sp.max_tokens,
                "temperature": sp.temperature, "top_p": sp.top_p} | self.cfg.extra_body
        if sp.seed is not None:
            body["seed"] = sp.seed
        data = await self.request_json("POST", "/v1/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(self.name, f"chat response has no message: {str(data)[:200]}") from e
        ids = self.encode(text) if self.encode is not None else []
        return GenerateOutput(req.request_id, ids, [], _finish(self.name, choice.get("finish_reason")),
                              self.version, self.name, text=text)
