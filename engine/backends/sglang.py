"""SGLang backends: the native HTTP /generate endpoint (token ids in, ids + logprobs out) and
the in-process `sglang.Engine` (lazy import; a clear error when sglang is absent; it reloads
checkpoint dirs only). Written against SGLang 0.5.6-0.5.23 (pyproject's `sglang` extra).

Request (POST {base}/generate, SGLang's GenerateReqInput):
    {"rid": id, "input_ids": [...], "image_data": ["data:image/png;base64,..."],
     "sampling_params": {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                         "skip_special_tokens": false, "sampling_seed"},
     "return_logprob": true}
Response: {"text", "output_ids": [...], "meta_info": {"finish_reason": {"type": "stop"|
"length"|"abort", ...}, "output_token_logprobs": [[logprob, token_id, text|null], ...], ...}}.
`sampling_seed` makes sampling reproducible only on a server started with
--enable-deterministic-inference (SGLang ignores it otherwise). Token ids come from `output_ids`,
else from output_token_logprobs. Logprobs are what the server
returns: SGLang's are temperature-scaled by default (log of the softmax of logits / T, taken
before top-k/top-p/min-p filtering; releases before ~mid-2025 renormalised over top-p), which is
base.py's contract; SGLANG_RETURN_ORIGINAL_LOGPROB=1 (RETURN_ORIGINAL_LOGPROB in 0.5.2-0.5.3) makes
them raw (T = 1), so leave it unset (`spyglass launch` sets it to 0).
abort: cancels the HTTP call and POSTs /abort_request {"rid"}. update_weights: a checkpoint dir
via POST /update_weights_from_disk {"model_path", "weight_version"} (the server answers
{"success", "message"}); state dicts are refused (a path, also in-process). forced_ids: not supported
(BackendError). Images: sent as base64 PNG data URLs in order. A response's
meta_info.weight_version, when the server reports one, is the output's version.

Weight sync over a process group (trainer/weight_sync.py drives it; SGLang's own endpoints):
GET /get_server_info (tp_size: how many workers join), POST /init_weights_update_group
{master_address, master_port, rank_offset, world_size, group_name, backend} (a server with
pp_size or dp_size > 1 is refused: its workers join as rank_offset + tp_rank), then per bucket
POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache and
weight_version (last bucket only: SGLang applies a version whenever one is sent)}, each
answered {"success", "message"} once the server has received the trainer's broadcast; POST
/destroy_weights_update_group {group_name} at the end, and before a reopen for a group a failed
sync left behind (each open has a new name: SGLang refuses one it still holds). SGLang 0.5.21
and later refuse distributed updates outside a weight-update session: each update is wrapped in
POST /begin_weight_update {} and /end_weight_update {} (after the last bucket); a server that
answers 404 to them (older releases) is not asked again, and a session a failed sync left open
is ended before the next group opens.
These calls block on the server until the trainer joins, so they are sent once (no retry)
with the sync's own timeout.
Checked only against a protocol-faithful aiohttp server in tests (sglang needs CUDA torch):
tests/test_weight_sync.py runs one that really joins a gloo group in its own process; the
fields and endpoints were read in SGLang 0.5.6-0.5.23's source (hence pyproject's pin). Not
checked: from 0.5.20 SGLang's cached multimodal path (Qwen3-VL, or --mm-preprocess-cache-size-mb
> 0) may read the already expanded image pads we send as one image each.
"""
from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from spyglass.engine.backends.base import (Backend, BackendError, GenerateOutput, GenerateRequest,
                                           Weights, check_version)
from spyglass.engine.backends.openai import HTTPBackend, HTTPConfig, _finish


@dataclass
class SGLangConfig(HTTPConfig):
    """An SGLang server reached over HTTP."""

    kind: ClassVar[str] = "sglang"
    base_url: str = "http://127.0.0.1:30000"


@dataclass
class SGLangEngineConfig:
    """An in-process sglang.Engine (`engine_kwargs` go to sglang.Engine)."""

    kind: ClassVar[str] = "sglang-engine"
    model_path: str = ""
    name: str = "sglang-engine-0"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path is required for the in-process SGLang engine")


def image_data_url(image: Image.Image) -> str:
    """A PIL image as a base64 PNG data URL (what SGLang's image_data accepts)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def generate_payload(req: GenerateRequest) -> dict[str, Any]:
    """The /generate body for one request."""
    sp = req.sampling
    params: dict[str, Any] = {"max_new_tokens": sp.max_tokens, "temperature": sp.temperature,
                              "top_p": sp.top_p, "top_k": sp.top_k,
                              "stop_token_ids": sp.stop_token_ids, "skip_special_tokens": False}
    if sp.seed is not None:
        params["sampling_seed"] = sp.seed
    body: dict[str, Any] = {"rid": req.request_id, "input_ids": req.prompt_ids.tolist(),
                            "sampling_params": params, "return_logprob": bool(sp.logprobs)}
    if req.images:
        body["image_data"] = [image_data_url(im) for im in req.images]
    return body


def parse_generate(server: str, data: Any, want_logprobs: bool,
                   prompt_len: int | None = None) -> tuple[list[int], list[float], str]:
    """token ids, logprobs and finish reason from a /generate (or Engine) response. `prompt_len`:
    the ids sent; a meta_info.prompt_tokens that differs means the server sampled from another
    prompt (it decoded the ids and re-tokenized the text, as its multimodal processors may)."""
    if isinstance(data, list):
        data = data[0] if data else {}
    meta = data.get("meta_info") if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        raise BackendError(server, f"/generate response has no meta_info: {str(data)[:200]}")
    used = meta.get("prompt_tokens")
    if prompt_len is not None and isinstance(used, int) and used != prompt_len:
        raise BackendError(server, f"the server's prompt has {used} tokens, the trajectory's {prompt_len}: it "
                                   "re-tokenized the prompt (with images: its processor expands the image "
                                   "placeholders differently), so its samples would not be the trajectory's")
    triples = meta.get("output_token_logprobs") or []
    ids = data.get("output_ids")
    if ids is None:
        if not triples and meta.get("completion_tokens", 0):
            raise BackendError(server, "/generate returned neither output_ids nor output_token_logprobs")
        ids = [int(t[1]) for t in triples]
    logprobs = [float(t[0]) for t in triples] if want_logprobs else []
    if want_logprobs and len(logprobs) != len(ids):
        raise BackendError(server, f"{len(logprobs)} logprobs for {len(ids)} tokens")
    return [int(i) for i in ids], logprobs, _finish(server, meta.get("finish_reason"))


class SGLangBackend(HTTPBackend):
    """SGLang's native /generate over HTTP."""

    supports_images = True

    def __init__(self, cfg: SGLangConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        # SGLang >= 0.5.21 loads distributed buckets only inside a weight-update session
        # (/begin_weight_update ... /end_weight_update); older servers answer 404 and are not asked again.
        self._sessions: bool | None = None  # the server has sessions; None: not known yet
        self._in_session = False  # a session this client began is open

    @classmethod
    def from_config(cls, cfg: SGLangConfig) -> "SGLangBackend":
        return cls(cfg)

    async def _generate(self, req: GenerateRequest) -> GenerateOutput:
        data = await self.request_json("POST", "/generate", generate_payload(req))
        ids, lps, finish = parse_generate(self.name, data, req.sampling.logprobs, len(req.prompt_ids))
        return GenerateOutput(req.request_id, ids, lps, finish, _served_version(data, self.version), self.name)

    async def _server_abort(self, request_id: str) -> None:
        await self.request_json("POST", "/abort_request", {"rid": request_id})

    async def update_weights(self, weights: Weights, version: int) -> None:
        check_version(self, version)
        if not isinstance(weights, str):
            raise BackendError(self.name, "over HTTP SGLang updates weights from a checkpoint dir "
                                          "(/update_weights_from_disk); pass a path, not a state dict")
        data = await self.request_json("POST", "/update_weights_from_disk",
                                       {"model_path": weights, "weight_version": str(version)})
        if not isinstance(data, dict) or not data.get("success", False):
            raise BackendError(self.name, f"update_weights_from_disk failed: {str(data)[:300]}")
        self.version = version

    # -- weight sync over a process group (trainer/weight_sync.py) ---------------------------
    async def weight_group_size(self) -> int:
        info = await self.request_json("GET", "/get_server_info")
        tp = info.get("tp_size") if isinstance(info, dict) else None
        if not isinstance(tp, int) or tp < 1:
            raise BackendError(self.name, f"/get_server_info gives no tp_size: {str(info)[:200]}")
        for key in ("pp_size", "dp_size"):  # SGLang joins as rank_offset + tp_rank: one rank per TP worker
            if info.get(key, 1) not in (1, None):
                raise BackendError(self.name, f"{key}={info[key]!r}: SGLang's weight-update group takes "
                                              "tensor parallelism only (its workers join as rank_offset + tp_rank)")
        return tp

    async def open_weight_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int,
                                group_name: str, backend: str, timeout_s: float) -> None:
        await self._end_stale_session()
        body = {"master_address": master_addr, "master_port": master_port, "rank_offset": rank_offset,
                "world_size": world_size, "group_name": group_name, "backend": backend}
        await self._succeeds("/init_weights_update_group", body, timeout_s)

    async def receive_weights(self, meta: dict[str, Any], group_name: str, version: int, last: bool,
                              timeout_s: float = 600.0) -> None:
        check_version(self, version)
        if not self._in_session:
            await self._weight_session("begin", timeout_s)
        body = {**meta, "group_name": group_name, "flush_cache": last}
        if last:  # SGLang labels outputs with a weight_version as soon as one is sent: only once all are in
            body["weight_version"] = str(version)
        await self._succeeds("/update_weights_from_distributed", body, timeout_s)
        if last:
            await self._weight_session("end", timeout_s)
            self.version = version

    async def _weight_session(self, verb: str, timeout_s: float) -> None:
        if self._sessions is False:
            return
        try:
            await self._succeeds(f"/{verb}_weight_update", {}, timeout_s)
        except BackendError as e:
            if self._sessions is None and "-> HTTP 404" in e.message:
                self._sessions = False
                return
            raise
        self._sessions, self._in_session = True, verb == "begin"

    async def _end_stale_session(self) -> None:
        """Before a group opens: end a session a failed sync (or an earlier trainer) left open;
        best effort (a server with none open refuses, one without sessions answers 404)."""
        try:
            await self._weight_session("end", 30.0)
        except BackendError:  # none open: refused
            pass
        self._in_session = False

    async def close_weight_group(self, group_name: str) -> None:
        await self._succeeds("/destroy_weights_update_group", {"group_name": group_name}, 30.0)

    async def _succeeds(self, path: str, body: dict[str, Any], timeout_s: float) -> None:
        data = await self.request_json("POST", path, body, retry=False, timeout_s=timeout_s)
        if not isinstance(data, dict) or not data.get("success", False):
            raise BackendError(self.name, f"{path} failed: {str(data)[:300]}")


def _served_version(data: Any, default: int) -> int:
    """meta_info.weight_version when the server reports an integer one, else `default`."""
    data = data[0] if isinstance(data, list) else data
    try:
        return int(data["meta_info"]["weight_version"])
    except (KeyError, TypeError, ValueError):
        return default


class SGLangEngineBackend(Backend):
    """In-process sglang.Engine (needs the `sglang` package and, in practice, a CUDA GPU).

    Weights reach it as a checkpoint dir (`takes_path`: the trainer's sync writes one, as for the
    HTTP servers), reloaded by the engine's tokenizer manager on this event loop, as SGLang's own
    /update_weights_from_disk route does (`Engine.update_weights_from_disk` runs a loop of its own,
    which cannot be the running one); the version goes with it as SGLang's weight_version."""

    supports_images = True
    takes_path = True

    def __init__(self, cfg: SGLangEngineConfig) -> None:
        try:
            import sglang  # noqa: PLC0415 - optional dependency, imported lazily
        except ImportError as e:
            raise BackendError(cfg.name, "the in-process SGLang engine needs `pip install sglang` "
                                         "(GPU build); use SGLangBackend over HTTP instead") from e
        self.cfg, self.name, self.version = cfg, cfg.name, 0
        self.engine = sglang.Engine(model_path=cfg.model_path, **cfg.engine_kwargs)

    @classmethod
    def from_config(cls, cfg: SGLangEngineConfig) -> "SGLangEngineBackend":
        return cls(cfg)

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        self.check_request(req)
        body = generate_payload(req)
        try:
            data = await self.engine.async_generate(
                input_ids=body["input_ids"], sampling_params=body["sampling_params"],
                return_logprob=body["return_logprob"], image_data=body.get("image_data"), rid=req.request_id)
        except Exception as e:  # the engine died or rejected the request
            raise BackendError(self.name, f"sglang engine failed: {e!r}") from e
        ids, lps, finish = parse_generate(self.name, data, req.sampling.logprobs, len(req.prompt_ids))
        return GenerateOutput(req.request_id, ids, lps, finish, self.version, self.name)

    async def abort(self, request_id: str) -> None:
        self.engine.tokenizer_manager.abort_request(rid=request_id)

    async def update_weights(self, weights: Weights, version: int) -> None:
        check_version(self, version)
        if not isinstance(weights, str):
            raise BackendError(self.name, "the in-process SGLang engine reloads a checkpoint dir; pass a path, "
                                          "not a state dict (the trainer's sync writes one for it)")
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput  # noqa: PLC0415
        obj = UpdateWeightFromDiskReqInput(model_path=weights, weight_version=str(version))
        try:
            result = await self.engine.tokenizer_manager.update_weights_from_disk(obj, None)
        except Exception as e:
            raise BackendError(self.name, f"update_weights_from_disk failed: {e!r}") from e
        ok, message = result[:2] if isinstance(result, (tuple, list)) and len(result) >= 2 else (False, result)
        if not ok:  # (success, message, paused requests) in SGLang 0.5.x
            raise BackendError(self.name, f"update_weights_from_disk failed: {str(message)[:300]}")
        self.version = version

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        self.engine.shutdown()
