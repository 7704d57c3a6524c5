"""The user's path end to end: a checkpoint directory in the Hugging Face layout (each family's
tiny fixture, copied where a download would be) and a JSONL of the user's own questions (with
bad rows) through rollout, one GRPO step, SFT and eval, exactly as a user runs them."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from spyglass.engine.config import ConfigError
from spyglass.engine.data import DataConfig
from spyglass.engine.env import EnvConfig
from spyglass.engine.loader import load_model
from spyglass.engine.offline import tiny
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.engine.rollout import RolloutConfig, run_rollout
from spyglass.engine.scheduler import EngineConfig
from spyglass.engine.trajectory import read_jsonl

TEXT_TOOLS = ["TextSearch", "Visit", "Python"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    ensure_world(root, WorldConfig())
    return root


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint directories as a user has them (copied out of the fixture cache)."""
    root = tmp_path_factory.mktemp("models")
    return {f: Path(shutil.copytree(tiny.materialize(f"tiny:{f}", root / "cache"), root / f"Tiny-{f}"))
            for f in ("qwen2_5_vl", "qwen3_vl", "qwen2", "qwen3")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 good questions with images (relative paths), a corrupt image, an invalid line."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    for i, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (96 + 8 * i, 64), color).save(root / "img" / f"{i}.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [json.dumps({"id": f"q{i}", "question": f"What color is image {i}?", "images": [f"img/{i}.png"],
                        "answer": c, "aliases": [c.upper()], "source": "mine"})
            for i, c in enumerate(("red", "green", "blue"))]
    rows.insert(1, json.dumps({"id": "bad-image", "question": "?", "images": ["img/broken.png"], "answer": "x"}))
    rows.insert(3, "{not json")
    (root / "questions.jsonl").write_text("\n".join(rows) + "\n")
    return root / "questions.jsonl"


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tdata")
    rows = [{"id": 1, "question": "Who founded the lantern works?", "answer": "nobody"},
            {"id": 2, "question": "What is 6 times 7?", "answer": 42, "tools": ["Python"]},
            {"id": 3, "question": "no answer here"}]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "q.jsonl"


def _rollout(model: Path, world: Path, data: Path, out: Path, tools: list[str] | None = None, **kw) -> RolloutConfig:
    env = EnvConfig(world_dir=str(world), dense_search=False, data=DataConfig(path=str(data)),
                    **({"tools": tools} if tools else {}))
    return RolloutConfig(model=str(model), policy="sample", env=env, out=str(out), progress=False,
                         engine=EngineConfig(n_samples=2, max_live=8, max_turns=2, max_tokens_per_turn=12,
                                             temperature=1.0, check_tokens=True), **kw)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_rollout_from_a_vl_checkpoint_dir_and_own_data(world, downloads, data, tmp_path, family):
    out = tmp_path / "r.jsonl"
    summary = run_rollout(_rollout(downloads[family], world, data, out))
    assert summary["bad_records"] == 2 and summary["groups"] == 3  # the run went on past the bad rows
    trajs = read_jsonl(out)
    assert sorted({t.group_id for t in trajs}) == ["q0", "q1", "q2"] and len(trajs) == 6
    t = next(t for t in trajs if t.group_id == "q2")
    assert (t.meta["answer"], t.meta["aliases"], t.meta["source"]) == ("blue", ["BLUE"], "mine")
    assert len(t.prompt_images) == 1 and t.prompt_images[0].size == (112, 64)
    assert all(s.logprobs is not None and len(s.logprobs) == len(s.token_ids)
               for t in trajs for s in t.segments if s.kind.value == "gen")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_rollout_from_a_text_checkpoint_with_text_tools(world, downloads, text_data, tmp_path, family):
    out = tmp_path / "r.jsonl"
    summary = run_rollout(_rollout(downloads[family], world, text_data, out, tools=TEXT_TOOLS))
    assert (summary["bad_records"], summary["groups"]) == (1, 2)
    trajs = {t.id: t for t in read_jsonl(out)}
    assert trajs["2#0"].meta["answer"] == "42" and trajs["2#0"].meta["tools"] == ["Python"]
    prompt = load_model(str(downloads[family])).codec().decode(trajs["2#0"].prompt_ids)
    assert '"name": "Python"' in prompt and '"name": "Visit"' not in prompt  # the record's own tools
    assert '"name": "Visit"' in load_model(str(downloads[family])).codec().decode(trajs["1#0"].prompt_ids)


def test_text_model_with_image_tools_or_images_is_a_config_error(world, downloads, data, text_data, tmp_path):
    with pytest.raises(ConfigError, match=r"is text-only: tools \['Crop'"):
        run_rollout(_rollout(downloads["qwen2"], world, text_data, tmp_path / "a.jsonl"))
    with pytest.raises(ConfigError, match=r"text-only but 3 question\(s\) have images"):
        run_rollout(_rollout(downloads["qwen2"], world, data, tmp_path / "b.jsonl", tools=TEXT_TOOLS))


def test_replay_on_user_data_says_to_sample(world, downloads, data, tmp_path):
    cfg = _rollout(downloads["qwen2_5_vl"], world, data, tmp_path / "r.jsonl")
    cfg.policy = "replay"
    with pytest.raises(ConfigError, match=r"only the bundled world's questions have; 3 question\(s\).*--policy sample"):
        run_rollout(cfg)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3"])
def test_one_grpo_step_from_a_checkpoint_dir_exports_a_loadable_dir(world, downloads, data, text_data, tmp_path,
                                                                   family):
    from spyglass.trainer.grpo import GRPOConfig, run_grpo
    src, text = downloads[family], not family.endswith("_vl")
    rollout = _rollout(src, world, text_data if text else data, tmp_path / "r.jsonl",
                       tools=TEXT_TOOLS if text else None)
    rollout.engine.groups_per_step = 2
    cfg = GRPOConfig(rollout=rollout, steps=1,
                     ckpt_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path), export_dir=str(tmp_path / "export"))
    m = run_grpo(cfg)
    assert m["step"] == 1 and m["version"] == 1 and torch.isfinite(torch.tensor(m["loss"]))
    before, after = load_model(str(src)), load_model(str(tmp_path / "export"))
    assert after.family == family and after.tokenizer.chat_template == before.tokenizer.chat_template
    # the export holds the trained weights (a random model's rewards are all 0 here: flat groups, so
    # the step may not move them; test_grpo checks that a step with signal does)
    trained = torch.load(tmp_path / "ckpt" / "step_00000001" / "model.pt", map_location="cpu", weights_only=True)
    trained = trained.get("module", trained)
    sd1 = after.model.state_dict()
    assert sd1.keys() == before.model.state_dict().keys()
    assert all(torch.equal(sd1[k], trained[k]) for k in trained)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_sft_from_a_checkpoint_dir(world, downloads, tmp_path, family):
    from spyglass.trainer.sft import SFTConfig, SFTDataConfig, run_sft
    cfg = SFTConfig(model=str(downloads[family]), steps=1, batch_size=2, out_dir=str(tmp_path),
                    data=SFTDataConfig(env=EnvConfig(world_dir=str(world), questions=2, dense_search=False)))
    m = run_sft(cfg)
    assert m["steps"] == 1 and m["data"]["examples"] >= 1
    assert load_model(m["model_dir"]).family == family


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2"])
def test_eval_from_a_checkpoint_dir_on_own_data(world, downloads, data, text_data, tmp_path, family):
    from spyglass.trainer.eval import EvalConfig, run_eval
    text = not family.endswith("_vl")
    rollout = _rollout(downloads[family], world, text_data if text else data, tmp_path / "unused.jsonl",
                       tools=TEXT_TOOLS if text else None)
    rollout.engine = EngineConfig(n_samples=1, max_turns=2, max_tokens_per_turn=12, temperature=0.0)
    rep = run_eval(EvalConfig(rollout=rollout, direct_max_tokens=8, out_dir=str(tmp_path / "eval")))
    assert rep["benchmarks"] == [("q" if text else "questions")] and rep["model"] == str(downloads[family])
    for mode in ("agentic", "direct"):
        assert rep["modes"][mode]["overall"]["n"] == (2 if text else 3)  # one sample per good record


def test_cli_takes_a_checkpoint_dir_and_a_data_file(world, downloads, data, tmp_path, capsys):
    from spyglass.trainer.cli import main
    out = tmp_path / "cli.jsonl"
    argv = ["rollout", "--model", str(downloads["qwen3_vl"]), "--data", str(data), "--policy", "sample",
            "--env.world_dir", str(world), "--env.dense_search", "false", "--engine.n_samples", "1",
            "--engine.max_turns", "1", "--engine.max_tokens_per_turn", "8", "--out", str(out), "--progress", "false"]
    assert main(argv) == 0
    assert len(read_jsonl(out)) == 3 and '"bad_records": 2' in capsys.readouterr().out
    # a bad value: one line naming it, exit 2
    with pytest.raises(SystemExit) as e:  # argparse refuses a value outside the choices
        main(argv + ["--load.dtype", "fp8"])
    assert e.value.code == 2
    assert "load.dtype" in capsys.readouterr().err


def test_replay_with_data_fails_before_anything_loads(data):
    with pytest.raises(ConfigError, match=r"policy 'mixed' replays .* use --policy sample"):
        RolloutConfig(policy="mixed", env=EnvConfig(data=DataConfig(path=str(data))))
