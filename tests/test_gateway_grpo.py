"""An unmodified OpenAI-client agent (examples/openai_agent.py) trained through the gateway:
`spyglass grpo` with `serve` takes the agent's rewarded sessions as its groups, 2 steps on CPU."""
import importlib.util
import socket
import threading
from pathlib import Path

import torch

from spyglass.engine.config import from_dict
from spyglass.engine.trajectory import read_jsonl
from spyglass.trainer.grpo import GRPOConfig, run_grpo

AGENT = Path(__file__).resolve().parents[1] / "examples" / "openai_agent.py"


def test_the_example_agent_trains_two_grpo_steps_through_the_gateway(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = from_dict(GRPOConfig, {
        "steps": 2, "ckpt_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path),
        "rollout": {"model": "tiny:qwen2", "policy": "sample", "out": str(tmp_path / "rollouts.jsonl"),
                    "engine": {"n_samples": 2, "groups_per_step": 1, "max_tokens_per_turn": 16, "temperature": 1.0}},
        "serve": {"port": port, "out": str(tmp_path / "gateway.jsonl"), "wait_s": 120},
        "update": {"lr": 1e-3, "temperature": 1.0}})
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(run_grpo(cfg)), daemon=True)
    trainer.start()
    spec = importlib.util.spec_from_file_location("openai_agent", AGENT)
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    for _ in range(100):  # the trainer loads the model, then listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            trainer.join(0.2)
    assert agent.main(["--base-url", f"http://127.0.0.1:{port}/v1", "--episodes", "4", "--group-size", "2"]) == 0
    trainer.join(120)
    assert not trainer.is_alive() and result["step"] == 2 and result["version"] == 2
    assert torch.isfinite(torch.tensor(result["loss"]))
    trained = read_jsonl(tmp_path / "rollouts.jsonl")
    assert sorted(t.id for t in trained) == ["ep-0", "ep-1", "ep-2", "ep-3"]
    assert {t.group_id for t in trained} == {"q-0", "q-1"} and all("total" in t.reward for t in trained)
    versions = {t.group_id: {s.version for s in t.segments if s.kind.value == "gen"} for t in trained}
    assert versions["q-0"] == {0} and versions["q-1"] == {1}  # step 2 sampled with the weights of step 1
    gens = [s for t in trained for s in t.segments if s.kind.value == "gen"]
    # each turn is one generate under one version: no aborted partial is ever recorded
    assert all(s.finish_reason != "abort" and len(s.logprobs) == len(s.token_ids) for s in gens)
    assert len(read_jsonl(tmp_path / "gateway.jsonl")) == 4
