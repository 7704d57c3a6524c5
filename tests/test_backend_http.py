"""HTTP backends (OpenAI-compatible, vLLM-HTTP, SGLang) against protocol-faithful aiohttp servers
on 127.0.0.1: .venv/bin/python -m pytest -q tests/test_backend_http.py"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import pytest
from aiohttp import web
from PIL import Image
from waiting import until

from spyglass.engine.backends import backend_config, make_backend
from spyglass.engine.backends.base import BackendError, GenerateRequest, SamplingParams
from spyglass.engine.backends.openai import OpenAIBackend, OpenAIConfig
from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
from spyglass.engine.backends.vllm import VLLMHTTPBackend, VLLMHTTPConfig

PAD = 151655  # Qwen-VL's <|image_pad|>
# the vLLM 0.32 SamplingParams fields the fake accepts (a typo such as max_new_tokens is a 400)
_SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "max_tokens",
                    "min_tokens", "logprobs", "prompt_logprobs", "detokenize", "skip_special_tokens",
                    "spaces_between_special_tokens", "ignore_eos", "presence_penalty", "frequency_penalty",
                    "repetition_penalty"}
_SCALE_OUT_OFF = ("Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to "
                  "enable them.")


def _continue(prompt: list[int], max_tokens: int, stops: list[int]) -> tuple[list[int], str]:
    """The fake model: counts up from the last prompt token."""
    out = []
    for i in range(max_tokens):
        out.append((prompt[-1] + 1 + i) % 1000)
        if out[-1] in stops:
            return out, "stop"
    return out, "length"


def _expand(ids: list[int], widths: list[int]) -> list[int]:
    """What vLLM 0.32's multimodal processor does to a token prompt with images: for each image
    in order, the next PAD (one token) is replaced by the image's run (here `width` PADs)."""
    out, cursor = list(ids), 0
    for w in widths:
        j = out.index(PAD, cursor)
        out[j:j + 1] = [PAD] * w
        cursor = j + w
    return out


class FakeServer:
    """vLLM-style /v1/completions + chat + dev endpoints + the scale-out /inference/v1/generate
    (`scale_out` False: 403 as `vllm serve` without --enable-scale-out), and SGLang-style /generate."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, Any]] = []
        self.scale_out = True       # serve /inference/v1/generate (False: vLLM's 403)
        self.weight_version = "default"  # vLLM's weight label, reported in weight_versions
        self.image_widths: list[list[int]] = []  # per generate request: its decoded images' widths, in order
        self.fail_next = 0          # answer this many requests with HTTP 503
        self.expand_images = 0      # SGLang /generate: prompt_tokens grows by this per image (a re-tokenizing server)
        self.slow = asyncio.Event()  # requests with max tokens >= 1000 wait on this
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "FakeServer":
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/inference/v1/generate", self.tokens)
        app.router.add_post("/tokenize", self.tokenize)
        for path in ("/abort_requests", "/abort_request", "/collective_rpc", "/reset_prefix_cache",
                     "/update_weights_from_disk", "/inference/v1/abort_requests"):
            app.router.add_post(path, self.record)
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _body(self, request: web.Request) -> Any:
        body = await request.json() if request.can_read_body else None
        self.bodies.append((request.path, body))
        if self.fail_next > 0:
            self.fail_next -= 1
            raise web.HTTPServiceUnavailable(text="overloaded")
        return body

    async def record(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if request.path == "/update_weights_from_disk":
            ok = not str(body.get("model_path", "")).endswith("missing")
            return web.json_response({"success": ok, "message": "ok" if ok else "no such dir"})
        return web.json_response({"status": "ok"})

    async def completions(self, request: web.Request) -> web.Response:
        b = await self._body(request)
        if b["max_tokens"] >= 1000:
            await self.slow.wait()
        prompt = b["prompt"]
        if b.get("prompt_logprobs") is not None:  # replay: logprobs of the prompt tokens
            plp = [None] + [{str(t): {"logprob": -0.01 * t, "rank": 1}} for t in prompt[1:]]
            return web.json_response({"choices": [{"index": 0, "text": "", "token_ids": [1],
                                                   "prompt_logprobs": plp, "finish_reason": "length"}]})
        ids, finish = _continue(prompt, b["max_tokens"], b.get("stop_token_ids") or [])
        choice: dict[str, Any] = {"index": 0, "text": "x" * len(ids), "finish_reason": finish,
                                  "logprobs": {"tokens": [f"t{i}" for i in ids],
                                               "token_logprobs": [-0.5] * len(ids)}}
        if b.get("return_token_ids"):
            choice["token_ids"] = ids
        return web.json_response({"id": "c", "object": "text_completion", "choices": [choice]})

    async def tokenize(self, request: web.Request) -> web.Response:
        b = await self._body(request)
        toks = [PAD] if b["prompt"] == "<|image_pad|>" else [ord(c) for c in b["prompt"]]
        return web.json_response({"count": len(toks), "max_model_len": 512, "tokens": toks})

    async def tokens(self, request: web.Request) -> web.Response:
        """vLLM's tokens-in/tokens-out route (scale_out/token_in_token_out, output_mode tokens)."""
        if not self.scale_out:
            err = {"message": _SCALE_OUT_OFF, "type": "PermissionDeniedError", "param": None, "code": 403}
            return web.json_response({"error": err}, status=403)
        b = await self._body(request)
        ids, sp = b["token_ids"], b["sampling_params"]
        if not ids or any(not isinstance(t, int) or t < 0 for t in ids) or set(sp) - _SAMPLING_FIELDS:
            raise web.HTTPBadRequest(text=f"bad token_ids or sampling_params fields {set(sp) - _SAMPLING_FIELDS}")
        if b.get("output_mode", "tokens") != "tokens" and not sp.get("detokenize", True):
            raise web.HTTPBadRequest(text="output_mode='text' requires sampling_params.detokenize to be true")
        widths = []
        for part in b.get("content_parts") or []:
            head, data = part["url"].split(",", 1)
            if part["type"] != "image_url" or head != "data:image/png;base64":
                raise web.HTTPBadRequest(text=f"unsupported content part {part['type']} {head}")
            widths.append(Image.open(io.BytesIO(base64.b64decode(data))).size[0])
        self.image_widths.append(widths)
        prompt = _expand(ids, widths)
        max_tokens = sp.get("max_tokens", 16)
        if max_tokens >= 1000:
            await self.slow.wait()
        resp: dict[str, Any] = {"request_id": f"generate-tokens-{b.get('request_id')}", "output_mode": "tokens"}
        if sp.get("prompt_logprobs") is not None:  # replay: logprobs of the prompt tokens
            resp["prompt_logprobs"] = [None] + [{str(t): {"logprob": -0.01 * t, "rank": 1, "decoded_token": None}}
                                                for t in prompt[1:]]
            out, finish = [1], "length"
        else:
            out, finish = _continue(prompt, max_tokens, sp.get("stop_token_ids") or [])
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": out,
                                  "stop_reason": out[-1] if finish == "stop" else None,
                                  "weight_versions": [{"version": self.weight_version, "start": 0, "end": len(out)}]}
        if sp.get("logprobs") is not None:
            choice["logprobs"] = {"content": [{"token_id": t, "logprob": -0.125, "rank": 1, "top_logprobs": []}
                                              for t in out]}
        if b.get("return_token_ids"):
            resp["prompt_token_ids"] = prompt
        return web.json_response(resp | {"choices": [choice]})

    async def chat(self, request: web.Request) -> web.Response:
        b = await self._body(request)
        last = b["messages"][-1]["content"]
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": f"echo: {last}"}}]})

    async def generate(self, request: web.Request) -> web.Response:
        b = await self._body(request)
        sp = b["sampling_params"]
        if sp["max_new_tokens"] >= 1000:
            await self.slow.wait()
        ids, finish = _continue(b["input_ids"], sp["max_new_tokens"], sp.get("stop_token_ids") or [])
        used = len(b["input_ids"]) + self.expand_images * len(b.get("image_data") or [])
        meta = {"id": b["rid"], "finish_reason": {"type": finish}, "prompt_tokens": used,
                "completion_tokens": len(ids),
                "output_token_logprobs": [[-0.25, t, None] for t in ids] if b.get("return_logprob") else []}
        return web.json_response({"text": "", "output_ids": ids, "meta_info": meta})


@contextlib.contextmanager
def in_thread(*fakes: FakeServer) -> Iterator[list[FakeServer]]:
    """The fake servers started on an event loop of their own in a background thread (for code
    under test that runs its own loop, as a trainer does); stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for f in fakes:
            asyncio.run_coroutine_threadsafe(f.start(), loop).result(10)
        yield list(fakes)
    finally:
        for f in fakes:
            if f.runner is not None:
                asyncio.run_coroutine_threadsafe(f.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _req(rid: str, max_tokens: int = 5, **kw: Any) -> GenerateRequest:
    return GenerateRequest(rid, [1, 2, 41], SamplingParams(max_tokens=max_tokens, temperature=0.5, **kw))


async def _arrived(s: "FakeServer", rid: str) -> None:
    """Wait (bounded) until the server has read request `rid`'s body: a fixed sleep let a loaded
    machine send the abort (or stop the server) before the request it was meant for."""
    await until(lambda: any(isinstance(b, dict) and rid in (b.get("request_id"), b.get("rid")) for _, b in s.bodies),
                lambda: f"request {rid!r} did not reach the fake server: {s.bodies}")


def _run(fn):
    async def go():
        server = await FakeServer().start()
        try:
            return await fn(server)
        finally:
            server.slow.set()
            await server.stop()
    return asyncio.run(go())


def test_openai_completions_token_in_token_out_with_retries():
    async def go(s: FakeServer):
        be = make_backend(backend_config("openai", base_url=s.url + "/v1", model="m", backoff_s=0.01))
        try:
            out = await be.generate(_req("a", stop_token_ids=[44]))
            s.fail_next = 2  # two 503s, then success: retried
            again = await be.generate(_req("b", seed=3))
            s.fail_next = 5
            with pytest.raises(BackendError, match="503"):
                await be.generate(_req("c"))
            return out, again, s.bodies, await be.health()
        finally:
            await be.close()
    out, again, bodies, healthy = _run(go)
    assert out.token_ids == [42, 43, 44] and out.finish_reason == "stop" and out.logprobs == [-0.5] * 3
    assert again.token_ids == [42, 43, 44, 45, 46] and again.finish_reason == "length"
    body = bodies[0][1]
    assert body["prompt"] == [1, 2, 41] and body["logprobs"] == 0 and body["return_token_ids"] is True
    assert body["stop_token_ids"] == [44] and bodies[3][1]["seed"] == 3 and healthy
    assert sum(1 for p, _ in bodies if p == "/v1/completions") == 1 + 3 + 3  # 503s were retried


def test_openai_chat_mode_is_flagged_not_token_in_token_out():
    async def go(s: FakeServer):
        be = OpenAIBackend(OpenAIConfig(base_url=s.url, model="m", mode="chat"), encode=lambda t: [ord(c) for c in t])
        try:
            assert be.token_in_token_out is False
            with pytest.raises(ValueError, match="messages"):
                await be.generate(_req("a"))
            msgs = [{"role": "user", "content": "hi"}]
            out = await be.generate(GenerateRequest("b", [], SamplingParams(max_tokens=8), messages=msgs))
            with pytest.raises(BackendError, match="cannot update weights"):
                await be.update_weights("/x", 1)
            return out
        finally:
            await be.close()
    out = _run(go)
    assert out.text == "echo: hi" and out.token_ids == [ord(c) for c in "echo: hi"] and out.logprobs == []


def test_vllm_http_abort_forced_and_weight_reload():
    async def go(s: FakeServer):
        be = VLLMHTTPBackend(VLLMHTTPConfig(base_url=s.url, model="m", dev_mode=True))
        try:
            slow = asyncio.ensure_future(be.generate(_req("slow", max_tokens=2000)))
            await _arrived(s, "slow")
            await be.abort("slow")
            aborted = await slow
            forced = await be.generate(GenerateRequest("f", [1, 2, 3], SamplingParams(temperature=1.0),
                                                       forced_ids=[7, 8]))
            with pytest.raises(BackendError, match="temperature"):
                await be.generate(GenerateRequest("g", [1], SamplingParams(temperature=0.7), forced_ids=[7]))
            await be.update_weights("/ckpt/step-3", version=3)
            with pytest.raises(BackendError, match="state dict"):
                await be.update_weights({}, version=4)
            return aborted, forced, be.version, s.bodies
        finally:
            await be.close()
    aborted, forced, version, bodies = _run(go)
    assert aborted.finish_reason == "abort" and aborted.token_ids == []
    paths = [p for p, _ in bodies]
    assert ("/abort_requests", {"request_ids": ["cmpl-slow-0"]}) in bodies  # vLLM's id for it
    assert forced.token_ids == [7, 8] and forced.logprobs == pytest.approx([-0.07, -0.08])
    assert ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": "/ckpt/step-3"}}) in bodies
    assert paths[-1] == "/reset_prefix_cache" and version == 3
    assert bodies[0][1]["request_id"] == "slow"


def _pads(w: int) -> list[int]:
    return [PAD] * w


def test_vllm_http_generate_sends_token_ids_and_images_in_order():
    wide, narrow = Image.new("RGB", (5, 2), (9, 8, 7)), Image.new("RGB", (3, 2), (1, 2, 3))
    prompt = [1, 2] + _pads(5) + [7] + _pads(3) + [8]  # already expanded, as the engine builds contexts
    sampling = SamplingParams(max_tokens=4, temperature=0.5, top_p=0.9, top_k=5, seed=2, stop_token_ids=[99])

    async def go(s: FakeServer):
        be = VLLMHTTPBackend(VLLMHTTPConfig(base_url=s.url, model="m"))  # api "auto"
        try:
            assert be.supports_images
            text = await be.generate(_req("t"))  # no images: /v1/completions
            out = await be.generate(GenerateRequest("img", prompt, sampling, images=[wide, narrow]))
            s.weight_version = "3"
            again = await be.generate(GenerateRequest("img2", prompt, SamplingParams(max_tokens=2, logprobs=False),
                                                      images=[wide, narrow]))
            with pytest.raises(BackendError, match=r"expanded the image placeholders into another prompt \(12 tokens, "
                                                   r"ours 13, first difference at 7\)"):
                await be.generate(GenerateRequest("off", [1, 2] + _pads(6) + [7] + _pads(3) + [8], sampling,
                                                  images=[wide, narrow]))
            with pytest.raises(ValueError, match="1 runs of image placeholder 151655 for 2 images"):
                await be.generate(GenerateRequest("runs", [1] + _pads(8) + [8], images=[wide, narrow]))
            return text, out, again, s.bodies, s.image_widths
        finally:
            await be.close()
    text, out, again, bodies, widths = _run(go)
    assert bodies[0][0] == "/v1/completions" and text.token_ids == [42, 43, 44, 45, 46]
    assert [p for p, _ in bodies].count("/tokenize") == 1  # the placeholder id is asked once
    gen = [b for p, b in bodies if p == "/inference/v1/generate"]
    body = gen[0]
    assert body["token_ids"] == [1, 2, PAD, 7, PAD, 8]  # one placeholder per image: vLLM expands it
    assert body["request_id"] == "img" and body["output_mode"] == "tokens" and body["return_token_ids"] is True
    assert body["sampling_params"] == {"max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "stop_token_ids": [99],
                                       "skip_special_tokens": False, "detokenize": False, "logprobs": 0,
                                       "top_k": 5, "seed": 2}
    assert [p["type"] for p in body["content_parts"]] == ["image_url"] * 2
    assert all(p["url"].startswith("data:image/png;base64,") for p in body["content_parts"])
    assert widths[0] == [5, 3]  # in order
    assert out.token_ids == [9, 10, 11, 12] and out.logprobs == [-0.125] * 4 and out.finish_reason == "length"
    assert out.version == 0 and again.version == 3 and again.version_start == 3 and again.logprobs == []
    assert "logprobs" not in gen[1]["sampling_params"] and gen[1]["sampling_params"]["max_tokens"] == 2


def test_vllm_http_generate_mode_text_replay_abort_and_the_403():
    async def go(s: FakeServer):
        be = VLLMHTTPBackend(VLLMHTTPConfig(base_url=s.url, model="m", api="generate", image_token_id=PAD))
        try:
            stop = await be.generate(_req("st", stop_token_ids=[44]))
            rep = await be.generate(GenerateRequest("f", [1, 2, 3], SamplingParams(temperature=1.0, max_tokens=2),
                                                    forced_ids=[7, 8, 9]))
            with pytest.raises(BackendError, match="temperature"):
                await be.generate(GenerateRequest("g", [1], SamplingParams(temperature=0.7), forced_ids=[7]))
            slow = asyncio.ensure_future(be.generate(_req("slow", max_tokens=2000)))
            await _arrived(s, "slow")
            await be.abort("slow")
            aborted = await slow
            s.scale_out = False
            with pytest.raises(BackendError, match=r"HTTP 403.*--enable-scale-out") as off:
                await be.generate(_req("off"))
            return stop, rep, aborted, off.value, s.bodies, be._routes
        finally:
            await be.close()
    stop, rep, aborted, off, bodies, routes = _run(go)
    assert stop.token_ids == [42, 43, 44] and stop.finish_reason == "stop" and stop.logprobs == [-0.125] * 3
    assert all(p != "/v1/completions" and p != "/tokenize" for p, _ in bodies)
    replay = [b for p, b in bodies if p == "/inference/v1/generate" and b["request_id"] == "f"][0]
    assert replay["token_ids"] == [1, 2, 3, 7, 8] and replay["sampling_params"] == {
        "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False}
    assert rep.token_ids == [7, 8] and rep.finish_reason == "length" and rep.logprobs == pytest.approx([-0.07, -0.08])
    assert aborted.finish_reason == "abort"
    assert ("/inference/v1/abort_requests", {"request_ids": ["generate-tokens-slow"]}) in bodies
    assert "api='completions'" in str(off)
    assert routes == {}  # nothing left behind


def test_vllm_http_completions_api_refuses_images_and_configs_validate():
    with pytest.raises(ValueError, match="'rpc'"):
        VLLMHTTPConfig(api="rpc")
    with pytest.raises(ValueError, match="-1"):
        VLLMHTTPConfig(image_token_id=-1)
    be = VLLMHTTPBackend(VLLMHTTPConfig(api="completions"))
    assert not be.supports_images
    with pytest.raises(ValueError, match="does not take images"):
        be.check_request(GenerateRequest("i", [1, PAD, 2], images=[Image.new("RGB", (2, 2))]))


def test_sglang_generate_images_abort_and_update():
    img = Image.new("RGB", (8, 6), (1, 2, 3))

    async def go(s: FakeServer):
        be = SGLangBackend(SGLangConfig(base_url=s.url))
        try:
            out = await be.generate(GenerateRequest("a", [5, 6, 9], SamplingParams(max_tokens=4, top_k=5, seed=2),
                                                    images=[img]))
            slow = asyncio.ensure_future(be.generate(_req("slow", max_tokens=1000)))
            await _arrived(s, "slow")
            await be.abort("slow")
            aborted = await slow
            await be.update_weights("/ckpt/1", version=1)
            with pytest.raises(BackendError, match="no such dir"):
                await be.update_weights("/ckpt/missing", version=2)
            with pytest.raises(BackendError, match="forced_ids"):
                await be.generate(GenerateRequest("f", [1], forced_ids=[2]))
            s.expand_images = 3  # the server expanded the image into 3 more tokens than we sent
            with pytest.raises(BackendError, match="the server's prompt has 6 tokens, the trajectory's 3"):
                await be.generate(GenerateRequest("x", [5, 6, 9], SamplingParams(max_tokens=2), images=[img]))
            return out, aborted, be.version, s.bodies
        finally:
            await be.close()
    out, aborted, version, bodies = _run(go)
    assert out.token_ids == [10, 11, 12, 13] and out.logprobs == [-0.25] * 4 and out.finish_reason == "length"
    body = bodies[0][1]
    assert body["input_ids"] == [5, 6, 9] and body["rid"] == "a" and body["return_logprob"] is True
    assert body["sampling_params"] == {"max_new_tokens": 4, "temperature": 0.7, "top_p": 1.0, "top_k": 5,
                                       "stop_token_ids": [], "skip_special_tokens": False, "sampling_seed": 2}
    assert body["image_data"][0].startswith("data:image/png;base64,")
    assert aborted.finish_reason == "abort" and ("/abort_request", {"rid": "slow"}) in bodies
    assert version == 1 and ("/update_weights_from_disk", {"model_path": "/ckpt/1", "weight_version": "1"}) in bodies


def test_sglang_engine_reloads_checkpoint_dirs_on_the_running_loop(monkeypatch, tmp_path):
    """The in-process SGLang engine, over a stand-in `sglang` package with SGLang 0.5's surface
    (Engine, tokenizer_manager.update_weights_from_disk(obj, request) -> (success, message,
    paused)): the reload is awaited on the caller's loop with the version as weight_version; a
    refusal names SGLang's message; a state dict is refused; the trainer's sync hands it a
    checkpoint dir, as to the HTTP servers."""
    import sys
    import types
    from dataclasses import dataclass
    from pathlib import Path

    import torch

    from spyglass.engine.backends.sglang import SGLangEngineBackend, SGLangEngineConfig
    from spyglass.trainer.distributed import sync_weights

    @dataclass
    class UpdateWeightFromDiskReqInput:
        model_path: str
        weight_version: str | None = None

    seen: list = []

    class TokenizerManager:
        async def update_weights_from_disk(self, obj, request):
            seen.append((obj, request, asyncio.get_running_loop()))
            return (not obj.model_path.endswith("bad"), "no such dir" if obj.model_path.endswith("bad") else "ok", 0)

    class Engine:
        def __init__(self, model_path: str, **kw):
            self.model_path, self.kw, self.tokenizer_manager = model_path, kw, TokenizerManager()

    mods = {"sglang": types.ModuleType("sglang"), "sglang.srt": types.ModuleType("sglang.srt"),
            "sglang.srt.managers": types.ModuleType("sglang.srt.managers"),
            "sglang.srt.managers.io_struct": types.ModuleType("sglang.srt.managers.io_struct")}
    mods["sglang"].Engine = Engine
    mods["sglang.srt.managers.io_struct"].UpdateWeightFromDiskReqInput = UpdateWeightFromDiskReqInput
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)

    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path, state_dict: (Path(path).mkdir(parents=True),  # what export_hf calls
                                                      torch.save(state_dict, Path(path) / "w.pt"))

    async def go():
        be = SGLangEngineBackend(SGLangEngineConfig(model_path="/m", engine_kwargs={"tp_size": 1}))
        await be.update_weights("/ckpt/1", 1)
        with pytest.raises(BackendError, match=r"update_weights_from_disk failed: no such dir"):
            await be.update_weights("/ckpt/bad", 2)
        with pytest.raises(BackendError, match="reloads a checkpoint dir; pass a path"):
            await be.update_weights({"weight": torch.zeros(2, 2)}, 2)
        path = await sync_weights([be], model.state_dict(), 3, model=model, export_dir=tmp_path)
        return be, asyncio.get_running_loop(), path

    be, loop, path = asyncio.run(go())
    assert be.engine.kw == {"tp_size": 1} and be.version == 3 and path == tmp_path / "v00000003"
    assert [(o.model_path, o.weight_version) for o, _, _ in seen] == [("/ckpt/1", "1"), ("/ckpt/bad", "2"),
                                                                      (str(path), "3")]
    assert all(r is None and lp is loop for _, r, lp in seen)


def test_server_dying_mid_test_raises_backend_error():
    async def go():
        s = await FakeServer().start()
        be = make_backend(SGLangConfig(base_url=s.url, name="sg-1", retries=1, backoff_s=0.01))
        try:
            ok = await be.generate(_req("ok"))
            inflight = asyncio.ensure_future(be.generate(_req("hang", max_tokens=1000)))
            await _arrived(s, "hang")
            await s.stop()  # the server dies with a request in flight
            with pytest.raises(BackendError) as died:
                await inflight
            with pytest.raises(BackendError, match="failed after 2 tries") as refused:
                await be.generate(_req("after"))
            return ok, died.value, refused.value, await be.health()
        finally:
            await be.close()
    ok, died, refused, healthy = asyncio.run(go())
    assert ok.finish_reason == "length" and died.server == "sg-1" and refused.server == "sg-1" and not healthy


def test_configs_and_factory_validate():
    with pytest.raises(ValueError, match="ftp://x"):
        OpenAIConfig(base_url="ftp://x")
    with pytest.raises(ValueError, match="'rpc'"):
        OpenAIConfig(mode="rpc")
    with pytest.raises(ValueError, match="unknown backend kind 'tgi'"):
        backend_config("tgi")
    with pytest.raises(TypeError, match="config dataclass"):
        make_backend({"kind": "hf"})
    assert OpenAIConfig(base_url="http://h:1/v1/").base_url == "http://h:1"
    sim = make_backend(backend_config("simulated", name="s0", time_scale=0.5))
    assert sim.name == "s0"


_SERVE = """
import asyncio, sys
from test_backend_http import FakeServer
async def main():
    s = await FakeServer().start()
    print(s.url, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture
def server_process() -> Iterator[tuple[Any, str]]:
    """A fake vLLM server in a process of its own (so the test can SIGSTOP it); killed on exit."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVE], cwd=os.path.dirname(__file__),
                            stdout=subprocess.PIPE, text=True)
    try:
        url = ""
        deadline = time.monotonic() + 30
        while not url.startswith("http") and time.monotonic() < deadline and proc.poll() is None:
            url = proc.stdout.readline().strip()
        assert url.startswith("http"), f"the fake server did not start (exit {proc.poll()})"
        yield proc, url
    finally:
        proc.kill()
        proc.wait(10)


def test_a_stopped_server_fails_its_requests_in_seconds_and_a_slow_one_does_not(server_process: Any) -> None:
    proc, url = server_process

    async def go() -> tuple[float, str, str, list[int]]:
        be = make_backend(backend_config("vllm-http", base_url=url, timeout_s=120,
                                         stall_timeout_s=0.6, stall_probe_s=0.1))
        try:
            # alive but slow (a long generation): probes are answered, nothing is failed
            slow = asyncio.ensure_future(be.generate(_req("long", max_tokens=2000)))
            await asyncio.sleep(1.5)
            assert not slow.done(), slow
            await be.abort("long")
            alive = (await slow).finish_reason
            # hung (SIGSTOP): the in-flight request fails after ~stall_timeout_s, not timeout_s
            stuck = asyncio.ensure_future(be.generate(_req("stuck", max_tokens=2000)))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGSTOP)
            t0 = time.perf_counter()
            with pytest.raises(BackendError) as err:
                await asyncio.wait_for(stuck, 30)
            took = time.perf_counter() - t0
            proc.send_signal(signal.SIGCONT)  # back: the same backend serves again
            back = await be.generate(_req("back"))
            return took, alive, str(err.value), back.token_ids
        finally:
            proc.send_signal(signal.SIGCONT)
            await be.close()

    took, alive, why, back = asyncio.run(go())
    assert alive == "abort"
    assert "stalled" in why and "stall_timeout_s" in why and url in why, why
    assert took < 5, took
    assert back == [42, 43, 44, 45, 46]


def test_stall_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="stall_timeout_s"):
        VLLMHTTPConfig(stall_timeout_s=-1)
    with pytest.raises(ValueError, match="stall_probe_s"):
        VLLMHTTPConfig(stall_timeout_s=1, stall_probe_s=2)
    VLLMHTTPConfig(stall_timeout_s=0)  # off
