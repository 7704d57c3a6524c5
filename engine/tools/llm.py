"""A minimal client for an OpenAI-compatible chat endpoint (vLLM, SGLang, OpenAI, ...).

Used by TextSearch (query-focused summaries) and Visit (evidence extraction) when an LLM is
configured; both are off by default. One POST to `{base_url}/chat/completions` per call over
aiohttp. Failures are classified for the executor: timeouts, connection errors, 429 and 5xx are
transient; other HTTP errors and malformed replies are fatal.

    cfg = LLMConfig(base_url="http://127.0.0.1:8000/v1", model="Qwen2.5-7B-Instruct",
                    api_key_env=None)          # a local server without auth
    text = await chat(cfg, [{"role": "user", "content": "hi"}])
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from spyglass.engine.tools.base import ErrorKind, ToolError


@dataclass
class LLMConfig:
    """An OpenAI-compatible chat endpoint. api_key_env=None means no Authorization header."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_tokens: int = 1024
    temperature: float = 0.0
    max_input_chars: int = 24_000  # page/result text sent to the model is cut to this

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLMConfig.base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise ValueError("LLMConfig.model must be set, got an empty string")
        if self.timeout_s <= 0 or self.max_tokens < 1 or self.max_input_chars < 1:
            raise ValueError(f"LLMConfig: bad limits timeout_s={self.timeout_s} "
                             f"max_tokens={self.max_tokens} max_input_chars={self.max_input_chars}")

    def headers(self) -> dict[str, str]:
        """Request headers; a named key variable that is unset is an error naming it."""
        return auth_headers(self.base_url, self.api_key_env, "LLM")


def auth_headers(base_url: str, api_key_env: str | None, what: str = "LLM") -> dict[str, str]:
    """JSON headers for an OpenAI-compatible endpoint, with `Bearer $api_key_env` when one is
    named; a named variable that is unset is an error naming it."""
    h = {"Content-Type": "application/json"}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"the {what} endpoint {base_url} needs an API key in the "
                             f"environment variable {api_key_env} (unset), or set "
                             f"api_key_env=None for a server without auth")
        h["Authorization"] = f"Bearer {key}"
    return h


async def chat(cfg: LLMConfig, messages: list[dict[str, str]], *, tool: str = "") -> str:
    """One chat completion; returns the assistant's text or raises a classified ToolError."""
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    body = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature}
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, json=body, headers=cfg.headers()) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise ToolError(ErrorKind.TRANSIENT, f"LLM endpoint {url} answered HTTP "
                                    f"{resp.status}", tool)
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise ToolError(ErrorKind.FATAL, f"LLM endpoint {url} answered HTTP "
                                    f"{resp.status}: {detail}", tool)
                data: Any = await resp.json(content_type=None)
    except (asyncio.TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        raise ToolError(ErrorKind.TRANSIENT, f"LLM endpoint {url} failed: "
                        f"{type(e).__name__}: {e}", tool) from None
    except ValueError as e:  # bad JSON, or the missing-key error from headers()
        raise ToolError(ErrorKind.FATAL, f"LLM endpoint {url}: {e}", tool) from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ToolError(ErrorKind.FATAL, f"LLM endpoint {url} returned no choices[0].message."
                        f"content: {str(data)[:300]}", tool) from None
    if not isinstance(content, str):
        raise ToolError(ErrorKind.FATAL, f"LLM endpoint {url} returned non-text content "
                        f"{type(content).__name__}", tool)
    return content.strip()
