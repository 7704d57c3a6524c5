"""A protocol-faithful fake SGLang server for the weight-sync tests (and the benchmark, which
loads this file by path): SGLang's HTTP endpoints, its weight-update group built the way SGLang
builds it (rendezvous over tcp://, PrefixStore(group_name), torch's `_new_process_group_helper`,
registered with torch.distributed, so a group name it still holds is refused as torch does),
`torch.distributed.broadcast` per tensor, a weight_version applied whenever one is sent (as
SGLang's /update_weights_from_distributed does), /destroy_weights_update_group freeing the name.

    python tests/fake_sglang.py PORTFILE [--model DIR] [--pp N] [--dp N] [--refuse-updates N] [--sessions]

With --model (a HF checkpoint dir, text or vision-language) it serves /generate over spyglass's
HF backend (`image_data`, base64 data URLs, decoded to the request's images in order) and loads
each bucket into that model; without, it keeps the received tensors' names and sizes only.
--refuse-updates N: the first N /update_weights_from_distributed calls answer success: false
without receiving (the trainer's broadcast is left waiting for this rank). --sessions: as SGLang
0.5.21 and later, /update_weights_from_distributed is refused (without receiving) outside a
session opened by /begin_weight_update and closed by /end_weight_update (each refused when one is
already open / none is); without it those two answer 404, as older releases do (recorded in
calls as begin404 / end404). /generate's
meta_info carries prompt_tokens (the ids received) and weight_version ("default" until one is
set, as SGLang's). It exits with its
parent. GET /get_server_info also reports what it saw: calls, versions (the served version after
each call), groups, received (tensors).
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional


def _sglang_group(b: dict[str, Any]) -> Any:
    """SGLang's init_custom_process_group, as its model runner calls it (no device binding)."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)
    timeout = timedelta(seconds=60)
    store, rank, world = next(rendezvous(f"tcp://{b['master_address']}:{b['master_port']}",
                                         b["rank_offset"], b["world_size"], timeout=timeout))
    store.set_timeout(timeout)
    opts = "backend_options" if "backend_options" in inspect.signature(_new_process_group_helper).parameters \
        else "pg_options"  # SGLang compares version strings here ("2.13" < "2.6"): checked by name instead
    pg, _ = _new_process_group_helper(world, rank, [], Backend(b["backend"]), PrefixStore(b["group_name"], store),
                                      group_name=b["group_name"], timeout=timeout, **{opts: None})
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    return pg


def serve(port_file: str, model_dir: Optional[str] = None, pp: int = 1, dp: int = 1, refuse_updates: int = 0,
          load: Any = None, sessions: bool = False) -> None:
    """Serve until the parent exits; `load(named)` (optional) takes each received bucket."""
    import torch
    import torch.distributed as tdist
    from aiohttp import web

    hf = None
    if model_dir:
        from spyglass.engine.backends.hf import HFBackend
        from spyglass.engine.loader import load_model
        hf = HFBackend.from_model(load_model(model_dir), name="fake-sglang")
        from transformers.core_model_loading import revert_weight_conversion
        named = dict(hf.model.named_parameters()) | dict(hf.model.named_buffers())
        # the trainer sends checkpoint names (what SGLang's load_weights takes): back to the model's
        model_name = {next(iter(dict(revert_weight_conversion(hf.model, {k: t})))): k for k, t in named.items()}
    groups: dict[str, Any] = {}
    state: dict[str, Any] = {"calls": [], "versions": [], "received": 0, "version": None, "refuse": refuse_updates,
                             "session": False}

    async def run(fn: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    def answer(ok: bool, message: str = "") -> web.Response:
        return web.json_response({"success": ok, "message": message}, status=200 if ok else 400)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def info(_: web.Request) -> web.Response:
        return web.json_response({"tp_size": 1, "pp_size": pp, "dp_size": dp, "calls": state["calls"],
                                  "versions": state["versions"], "received": state["received"],
                                  "groups": sorted(groups), "weight_version": state["version"]})

    def image(url: str) -> Any:
        from spyglass.engine.gateway import RequestError, _image_from_url  # the gateway's data-URL decoder
        try:
            return _image_from_url(url, "image_data", 1 << 40)
        except RequestError as e:
            raise web.HTTPBadRequest(text=str(e)) from None

    async def generate(request: web.Request) -> web.Response:
        from spyglass.engine.backends.base import GenerateRequest, SamplingParams
        body = await request.json()
        sp = body["sampling_params"]
        images = [image(u) for u in body.get("image_data") or []]
        out = await hf.generate(GenerateRequest(body["rid"], body["input_ids"], SamplingParams(
            max_tokens=sp["max_new_tokens"], temperature=sp["temperature"], top_p=sp["top_p"], top_k=sp["top_k"],
            stop_token_ids=sp["stop_token_ids"], seed=sp.get("sampling_seed")), images=images))
        return web.json_response({"text": "", "output_ids": out.token_ids, "meta_info": {
            "finish_reason": {"type": out.finish_reason}, "completion_tokens": len(out.token_ids),
            "prompt_tokens": len(body["input_ids"]),
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(out.logprobs, out.token_ids)],
            "weight_version": state["version"] or "default"}})

    async def init_group(request: web.Request) -> web.Response:
        b = await request.json()
        state["calls"].append("init")
        try:
            groups[b["group_name"]] = await run(lambda: _sglang_group(b))
        except Exception as e:  # SGLang answers the error (a reused name, a timeout)
            return answer(False, f"Failed to initialize custom process group: {e}.")
        return answer(True, "joined")

    def receive(b: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        got = []
        for name, dt, shape in zip(b["names"], b["dtypes"], b["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dt))
            tdist.broadcast(t, src=0, group=groups[b["group_name"]])
            got.append((name, t))
        return got

    async def update(request: web.Request) -> web.Response:
        b = await request.json()
        state["calls"].append("update")
        if state["refuse"] > 0:
            state["refuse"] -= 1
            state["versions"].append(state["version"])
            return answer(False, "refused (test)")
        if sessions and not state["session"]:
            state["versions"].append(state["version"])
            return answer(False, "update_weights_from_distributed must run between begin_weight_update() "
                                 "and end_weight_update()")
        try:
            got = await run(lambda: receive(b))
        except Exception as e:
            return answer(False, f"Failed to update parameter online: {e}.")
        state["received"] += len(got)
        if hf is not None and got:
            await hf.update_weights({model_name.get(k, k): t for k, t in got}, hf.version)
        if load is not None:
            await run(lambda: load(got))
        if b.get("weight_version") is not None:  # SGLang: whenever one is sent with a success
            state["version"] = b["weight_version"]
        state["versions"].append(state["version"])
        return answer(True, f"{len(got)} tensors")

    async def begin(_: web.Request) -> web.Response:
        state["calls"].append("begin")
        if state["session"]:
            return answer(False, "a weight-update session is already open; call end_weight_update() first")
        state["session"] = True
        return answer(True, "Success")

    async def end(_: web.Request) -> web.Response:
        state["calls"].append("end")
        if not state["session"]:
            return answer(False, "no weight-update session is open; call begin_weight_update() first")
        state["session"] = False
        return answer(True, "Success")

    def not_found(verb: str) -> Any:
        async def handler(_: web.Request) -> web.Response:
            state["calls"].append(f"{verb}404")
            return web.json_response({"detail": "Not Found"}, status=404)
        return handler

    async def destroy(request: web.Request) -> web.Response:
        b = await request.json()
        state["calls"].append("destroy")
        group = groups.pop(b["group_name"], None)
        if group is None:
            return answer(False, f"group {b['group_name']!r} not found")
        tdist.destroy_process_group(group)
        return answer(True)

    async def from_disk(request: web.Request) -> web.Response:
        from safetensors.torch import load_file
        b = await request.json()
        for f in sorted(Path(b["model_path"]).glob("*.safetensors")):
            named = list(load_file(str(f)).items())
            if load is not None:
                await run(lambda: load(named))
        if b.get("weight_version") is not None:
            state["version"] = b["weight_version"]
        return answer(True)

    async def main() -> None:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_get("/health", health)
        app.router.add_get("/get_server_info", info)
        if hf is not None:
            app.router.add_post("/generate", generate)
        app.router.add_post("/init_weights_update_group", init_group)
        app.router.add_post("/update_weights_from_distributed", update)
        app.router.add_post("/destroy_weights_update_group", destroy)
        app.router.add_post("/update_weights_from_disk", from_disk)
        if sessions:
            app.router.add_post("/begin_weight_update", begin)
            app.router.add_post("/end_weight_update", end)
        else:  # an older release: no such routes (the 404 recorded, so a test can count the asks)
            for verb in ("begin", "end"):
                app.router.add_post(f"/{verb}_weight_update", not_found(verb))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        Path(port_file + ".tmp").write_text(str(site._server.sockets[0].getsockname()[1]))
        os.replace(port_file + ".tmp", port_file)
        while os.getppid() != 1:  # ends with its parent
            await asyncio.sleep(0.5)

    asyncio.run(main())


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="a fake SGLang server (weight endpoints, optional /generate)")
    p.add_argument("port_file")
    p.add_argument("--model", default="")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--refuse-updates", type=int, default=0)
    p.add_argument("--sessions", action="store_true")
    a = p.parse_args(argv)
    serve(a.port_file, a.model or None, a.pp, a.dp, a.refuse_updates, sessions=a.sessions)


if __name__ == "__main__":
    sys.exit(main())
