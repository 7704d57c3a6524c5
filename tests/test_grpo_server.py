"""GRPO with a generation server over HTTP (a fake vLLM server speaking the real endpoints):
each step's weights reach the server as a checkpoint dir it reloads (the disk path), the
newest one kept; no crash at the first sync."""
import asyncio
import json
import threading
from pathlib import Path

import pytest
from test_backend_http import FakeServer

from spyglass.engine.config import from_dict
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.engine.trajectory import read_jsonl
from spyglass.trainer.grpo import GRPOConfig, run_grpo


@pytest.fixture
def server():
    loop = asyncio.new_event_loop()
    fake = FakeServer()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    yield fake
    asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_grpo_steps_reload_a_vllm_server_from_disk(server, tmp_path):
    world = tmp_path / "world"
    ensure_world(world, WorldConfig())
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n"
                            for i in range(2)))
    cfg = from_dict(GRPOConfig, {
        "steps": 2, "ckpt_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "log"),
        "rollout": {"model": "tiny:qwen2", "policy": "sample", "out": str(tmp_path / "r.jsonl"), "backend": "vllm-http",
                    "backend_options": {"base_url": server.url, "model": "m", "dev_mode": True},
                    "env": {"world_dir": str(world), "dense_search": False, "tools": ["TextSearch", "Visit"],
                            "data": {"path": str(data)}},
                    "engine": {"n_samples": 2, "groups_per_step": 1, "max_turns": 2, "max_tokens_per_turn": 8,
                               "temperature": 1.0}},
        "update": {"lr": 1e-3, "temperature": 1.0}})
    m = run_grpo(cfg)
    assert m["version"] == 2 and len(read_jsonl(tmp_path / "r.jsonl")) == 4
    reloads = [b["kwargs"]["weights_path"] for p, b in server.bodies if p == "/collective_rpc"]
    assert [Path(p).name for p in reloads] == ["v00000001", "v00000002"]
    assert [p.name for p in (tmp_path / "log" / "weights").iterdir()] == ["v00000002"]  # the newest only
    assert (Path(reloads[-1]) / "config.json").is_file() and any(Path(reloads[-1]).glob("*.safetensors"))
    assert sum(p == "/reset_prefix_cache" for p, _ in server.bodies) == 2
