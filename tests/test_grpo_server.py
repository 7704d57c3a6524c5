"""GRPO with generation servers over HTTP: a fake vLLM server speaking the real endpoints takes
each step's weights as a checkpoint dir it reloads (the disk path, the newest one kept); a fake
SGLang server in its own process (tests/test_weight_sync.py) takes them over a gloo
weight-update group and samples the second step with version 1 weights."""
import asyncio
import json
from pathlib import Path

import pytest
import torch
from test_backend_http import FakeServer, in_thread
from test_weight_sync import fake_sglang

from spyglass.engine.config import from_dict
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.engine.trajectory import read_jsonl
from spyglass.trainer.grpo import GRPOConfig, run_grpo


@pytest.fixture
def server():
    with in_thread(FakeServer()) as (fake,):
        yield fake


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
    assert m["version"] == 2 and len(read_jsonl(tmp_path / "r.jsonl")) == 4 and m["sync/disk_s"] > 0
    rpcs = [b for p, b in server.bodies if p == "/collective_rpc"]
    # sync.transport auto: the probe for the worker extension finds none, so the disk path runs
    assert [b["method"] for b in rpcs] == ["spyglass_weight_group_size"] + ["reload_weights"] * 2
    reloads = [b["kwargs"]["weights_path"] for b in rpcs[1:]]
    assert [Path(p).name for p in reloads] == ["v00000001", "v00000002"]
    assert [p.name for p in (tmp_path / "log" / "weights").iterdir()] == ["v00000002"]  # the newest only
    assert (Path(reloads[-1]) / "config.json").is_file() and any(Path(reloads[-1]).glob("*.safetensors"))
    assert sum(p == "/reset_prefix_cache" for p, _ in server.bodies) == 2


def test_grpo_transport_group_without_the_extension_fails_before_any_rollout(server, tmp_path):
    """sync.transport group with a vLLM server that has no worker extension: one config error
    at start-up, naming the server, before any rollout is sampled."""
    from spyglass.engine.config import ConfigError
    world = tmp_path / "world"
    ensure_world(world, WorldConfig())
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": 0, "question": "What is 1 + 1?", "answer": 2}) + "\n")
    cfg = from_dict(GRPOConfig, {
        "steps": 1, "ckpt_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "log"),
        "sync": {"transport": "group"},
        "rollout": {"model": "tiny:qwen2", "policy": "sample", "out": str(tmp_path / "r.jsonl"), "backend": "vllm-http",
                    "backend_options": {"base_url": server.url, "model": "m", "dev_mode": True},
                    "env": {"world_dir": str(world), "dense_search": False, "tools": ["Visit"],
                            "data": {"path": str(data)}},
                    "engine": {"n_samples": 2, "groups_per_step": 1, "max_turns": 1, "max_tokens_per_turn": 4,
                               "temperature": 1.0}},
        "update": {"lr": 1e-3, "temperature": 1.0}})
    with pytest.raises(ConfigError, match="sync.transport 'group': server 'vllm-http-0' cannot join"):
        run_grpo(cfg)
    assert not any(p == "/v1/completions" for p, _ in server.bodies)  # no rollout ran
    assert not (tmp_path / "r.jsonl").exists()


@pytest.fixture
def servers():
    with in_thread(FakeServer(), FakeServer()) as fakes:
        yield fakes


def test_a_fleet_of_named_servers_is_health_checked_and_shared(servers, tmp_path):
    from spyglass.engine.config import ConfigError
    from spyglass.engine.rollout import RolloutConfig, run_rollout
    world = tmp_path / "world"
    ensure_world(world, WorldConfig())
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"{i}?", "answer": "a"}) + "\n" for i in range(4)))

    def cfg(urls: str, out: str) -> RolloutConfig:
        return from_dict(RolloutConfig, {
            "model": "tiny:qwen2", "policy": "sample", "out": str(tmp_path / out), "progress": False,
            "backend": "vllm-http", "backend_options": {"model": "m"}, "server_urls": urls,
            "env": {"world_dir": str(world), "dense_search": False, "tools": ["Visit"], "data": {"path": str(data)}},
            "engine": {"n_samples": 2, "max_turns": 1, "max_tokens_per_turn": 4}})
    urls = f"{servers[0].url},{servers[1].url}"
    run_rollout(cfg(urls, "a.jsonl"))
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 8
    assert all(any(p == "/v1/completions" for p, _ in s.bodies) for s in servers)  # both served
    listed = tmp_path / "fleet.txt"
    listed.write_text(f"# the fleet\n{servers[0].url}\nhttp://127.0.0.1:9\n")
    with pytest.raises(ConfigError, match=r"not answering their health check: \['http://127.0.0.1:9'\] \(of 2\)"):
        run_rollout(cfg(f"@{listed}", "b.jsonl"))
    assert not (tmp_path / "b.jsonl").exists() or not read_jsonl(tmp_path / "b.jsonl")
    with pytest.raises(ConfigError, match="server_urls needs a server backend"):
        RolloutConfig(server_urls=urls)


def test_grpo_syncs_an_sglang_server_over_a_weight_update_group(tmp_path):
    """Two GRPO steps against a fake SGLang server (HF weights behind SGLang's endpoints, in its
    own process): every sync goes over the group (fp32 on the wire), none through disk, and
    the second step's rollouts were sampled by version 1: their logprobs are the trainer's
    recomputation with the step-1 checkpoint's weights."""
    from spyglass.engine.loader import load_model
    from spyglass.engine.offline import tiny
    from spyglass.engine.trajectory import SegmentKind
    from spyglass.trainer.checkpoint import list_checkpoints

    world, model = tmp_path / "world", tiny.save_tiny_text_lm(tmp_path / "lm", seed=0)
    ensure_world(world, WorldConfig())
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n"
                            for i in range(2)))
    with fake_sglang(model, tmp_path) as url:
        cfg = from_dict(GRPOConfig, {
            "steps": 2, "ckpt_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "log"),
            "sync": {"transport": "group", "dtype": "fp32", "bucket_mb": 1, "timeout_s": 120},
            "rollout": {"model": str(model), "policy": "sample", "out": str(tmp_path / "r.jsonl"), "backend": "sglang",
                        "server_urls": url, "env": {"world_dir": str(world), "dense_search": False,
                                                    "tools": ["TextSearch", "Visit"], "data": {"path": str(data)}},
                        "engine": {"n_samples": 2, "groups_per_step": 1, "max_turns": 2, "max_tokens_per_turn": 8,
                                   "temperature": 1.0}},
            # rewards are all 0 with a random model: weight decay is what moves the weights (2% a step)
            "update": {"lr": 1e-2, "weight_decay": 2.0, "temperature": 1.0}})
        m = run_grpo(cfg)
    assert m["version"] == 2 and m["sync/group_s"] > 0 and "sync/disk_s" not in m
    assert not (tmp_path / "log" / "weights").exists()
    logged = [json.loads(x) for x in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [("sync/group_s" in x, "sync/disk_s" in x, x["sync/nccl"]) for x in logged] == [(True, False, 0.0)] * 2
    assert all(x["time/rollout_s"] > 0 and x["time/update_s"] > 0 and x["time/sync_s"] >= x["sync/group_s"]
               for x in logged)  # the step's time split, the sync's share named by its transport
    trajs = read_jsonl(tmp_path / "r.jsonl")
    v0, v1 = load_model(str(model)).model, load_model(str(model)).model
    v1.load_state_dict(torch.load(list_checkpoints(tmp_path / "ckpt")[0] / "model.pt"))
    checked, moved = 0, 0.0
    for t in trajs[2:]:
        ctx = t.prompt_ids.tolist()
        for seg in t.segments:
            if seg.kind is SegmentKind.GEN:
                assert seg.version == 1
                ids = seg.token_ids.tolist()
                with torch.no_grad():
                    lp = torch.log_softmax(v1(torch.tensor([ctx + ids])).logits[0, len(ctx) - 1:-1], -1)
                    lp0 = torch.log_softmax(v0(torch.tensor([ctx + ids])).logits[0, len(ctx) - 1:-1], -1)
                want = lp.gather(1, torch.tensor(ids)[:, None]).squeeze(1)
                assert torch.allclose(torch.tensor(seg.logprobs), want, atol=1e-4), (seg.logprobs, want)
                moved = max(moved, float((lp0.gather(1, torch.tensor(ids)[:, None]).squeeze(1) - want).abs().max()))
                checked += len(ids)
            ctx += seg.token_ids.tolist()
    assert checked > 0 and moved > 1e-2  # version 1 is not the initial policy


def test_grpo_vl_rollouts_with_images_through_an_sglang_server_sampled_by_version_1(tmp_path):
    """The multimodal path end to end: a tiny Qwen2-VL checkpoint behind the fake SGLang server
    (images sent as SGLang's image_data, decoded by the server), the world's image questions,
    two GRPO steps with the weights over the group. Before each update the trainer recomputes
    every sampled token's logprob with its own weights and its own image processing: the ratio
    is 1 within 1e-3 in both steps, so step 2 was sampled by version 1 on the same pixels (the
    sync moves the logprobs by more than that: the text test above measures it)."""
    from spyglass.engine.offline import tiny

    world, model = tmp_path / "world", tiny.materialize("tiny:qwen2_vl", tmp_path / "ckpt-cache")
    ensure_world(world, WorldConfig())
    with fake_sglang(model, tmp_path) as url:
        cfg = from_dict(GRPOConfig, {
            "steps": 2, "ckpt_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "log"),
            "sync": {"transport": "group", "dtype": "fp32", "bucket_mb": 1, "timeout_s": 120},
            "rollout": {"model": str(model), "policy": "sample", "out": str(tmp_path / "r.jsonl"), "backend": "sglang",
                        "server_urls": url, "env": {"world_dir": str(world), "dense_search": False},
                        "engine": {"n_samples": 2, "groups_per_step": 1, "max_turns": 2, "max_tokens_per_turn": 8,
                                   "temperature": 1.0}},
            "update": {"lr": 1e-2, "weight_decay": 2.0, "temperature": 1.0}})
        m = run_grpo(cfg)
    assert m["version"] == 2 and m["sync/group_s"] > 0 and m["sync/nccl"] == 0.0
    trajs = read_jsonl(tmp_path / "r.jsonl")
    assert len(trajs) == 4 and all(t.prompt_images for t in trajs), [len(t.prompt_images) for t in trajs]
    assert [sorted({s.version for s in t.segments if s.version is not None}) for t in trajs[2:]] == [[1], [1]]
    logged = [json.loads(x) for x in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    for row in logged:
        assert abs(row["ratio_min"] - 1) < 1e-3 and abs(row["ratio_max"] - 1) < 1e-3, row


@pytest.mark.slow
def test_grpo_two_ranks_zero3_stream_buckets_to_an_sglang_server(tmp_path):
    """torchrun, 2 ranks, ZeRO-3 (every parameter partitioned): each sync gathers bucket by
    bucket on both ranks and rank 0 streams them to the fake SGLang server over the group. The
    server ends up with the exported final weights: its logprobs equal their recomputation."""
    import os
    import subprocess
    import sys

    from spyglass.engine.backends.base import GenerateRequest, SamplingParams
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.engine.loader import load_model
    from spyglass.engine.offline import tiny

    world, model = tmp_path / "world", tiny.save_tiny_text_lm(tmp_path / "lm", seed=0)
    ensure_world(world, WorldConfig())
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"{i} + {i}?", "answer": 2 * i}) + "\n" for i in range(2)))
    with fake_sglang(model, tmp_path) as url:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "spyglass.trainer.cli", "grpo", "--steps", "2", "--groups_per_step", "1", "--model", str(model),
               "--dist.strategy", "zero3", "--dist.ds_overrides", '{"stage3_param_persistence_threshold": 0}',
               "--sync.transport", "group", "--sync.dtype", "fp32", "--sync.bucket_mb", "1", "--sync.timeout_s", "120",
               "--rollout.backend", "sglang", "--rollout.server_urls", url, "--rollout.policy", "sample",
               "--rollout.env.world_dir", str(world), "--rollout.env.data.path", str(data),
               "--rollout.env.tools", "TextSearch,Visit", "--rollout.env.dense_search", "false",
               "--rollout.engine.n_samples", "2", "--rollout.engine.max_turns", "2",
               "--rollout.engine.max_tokens_per_turn", "8", "--update.lr", "1e-2", "--update.weight_decay", "2.0",
               "--dist.timeout_s", "120",
               "--ckpt_every", "0", "--log_dir", str(tmp_path / "log"), "--export_dir", str(tmp_path / "final"),
               "--rollout.out", str(tmp_path / "r.jsonl")]
        # faulthandler: a rank that ends in std::terminate (seen once at exit under load) logs its threads' stacks
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"}
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # a timeout ends torchrun and both ranks
        try:
            log, _ = p.communicate(timeout=400)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(30)
        assert p.returncode == 0, log[-6000:]
        prompt = [5, 17, 33, 2, 9]
        be = SGLangBackend(SGLangConfig(base_url=url))
        out = asyncio.run(_generate_and_close(be, GenerateRequest("x", prompt, SamplingParams(max_tokens=6, temperature=0))))
    rows = [json.loads(x) for x in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [("sync/group_s" in r, "sync/disk_s" in r, r["version"]) for r in rows] == [(True, False, 1), (True, False, 2)]
    assert {s.version for t in read_jsonl(tmp_path / "r.jsonl")[2:] for s in t.segments if s.version is not None} == {1}
    final = load_model(str(tmp_path / "final")).model
    with torch.no_grad():
        lp = torch.log_softmax(final(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1], -1)
    want = lp.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    assert out.version == 2 and torch.allclose(torch.tensor(out.logprobs), want, atol=1e-4), (out.logprobs, want)
    with torch.no_grad():
        lp0 = torch.log_softmax(load_model(str(model)).model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1], -1)
    assert float((lp0.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1) - want).abs().max()) > 1e-2


async def _generate_and_close(be, req):
    try:
        return await be.generate(req)
    finally:
        await be.close()
