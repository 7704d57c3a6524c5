"""SFT: ShareGPT parsing (tools, images, observations), the assistant-only loss mask, record
errors naming file:line and field, loss going down, and run_sft end to end on teacher data
from the engine (both layouts, exact round trip, checkpoint resume, exported model)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spyglass.engine.chat import HFCodec
from spyglass.engine.env import EnvConfig
from spyglass.engine.loader import load_model
from spyglass.engine.offline.tiny import build_tiny_vlm
from spyglass.engine.trajectory import SegmentKind, Status, iter_jsonl
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.trainer.sft import (RecordError, SFTConfig, SFTDataConfig, SFTUpdater, ShareGPTTags, load_sharegpt,
                                  render_call, run_sft, sharegpt_to_trajectory, trajectory_to_sharegpt)
from spyglass.trainer.update import UpdateConfig

TOOLS = [{"name": "Crop", "description": "crop a box of an image", "parameters": {
    "type": "object", "properties": {"image": {"type": "string"}, "box": {"type": "array"}}, "required": ["image"]}}]


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm("qwen2_vl", seed=0)


@pytest.fixture(scope="module")
def codec(vlm):
    return HFCodec.from_model(vlm)


def record(i: int = 0, sys_msg: bool = False) -> dict:
    conv = [{"from": "human", "value": f"<image>Which colour is sign {i}?"},
            {"from": "function_call", "value": "<think>zoom in</think>" + json.dumps(
                {"name": "Crop", "arguments": {"image": "img_1", "box": [0, 0, 56 + i, 56]}})},
            {"from": "observation", "value": "Cropped. [new images: img_2]<image>"},
            {"from": "gpt", "value": f"<think>it is clear now</think>\n<answer>colour {i}</answer>"}]
    if sys_msg:
        conv.insert(0, {"from": "system", "value": "You answer questions about signs."})
    return {"id": f"r{i}", "conversations": conv, "images": [f"a{i}.png", f"b{i}.png"], "tools": json.dumps(TOOLS)}


@pytest.fixture()
def media(tmp_path):
    for i in range(3):
        Image.new("RGB", (112 + 28 * i, 84), (40 * i, 100, 200)).save(tmp_path / f"a{i}.png")
        Image.new("RGB", (56, 56 + 28 * i), (200, 40 * i, 30)).save(tmp_path / f"b{i}.png")
    return tmp_path


def test_sharegpt_parsing_tools_images_observations(codec, media):
    t = sharegpt_to_trajectory(record(0, sys_msg=True), codec, media_dir=media)
    kinds = [s.kind for s in t.segments]
    assert kinds == [SegmentKind.GEN, SegmentKind.OBS, SegmentKind.GEN]
    assert len(t.prompt_images) == 1 and t.prompt_images[0].size == (112, 84)  # first <image> -> images[0]
    assert len(t.segments[1].images) == 1 and t.segments[1].images[0].size == (56, 56)
    assert t.turns[0].calls[0]["name"] == "Crop" and json.loads(t.turns[0].calls[0]["arguments"])["box"] == [0, 0, 56, 56]
    assert t.status is Status.ANSWERED and t.answer == "colour 0" and t.fatal_step is None
    assert t.segments[1].text == "Cropped. [new images: img_2]"
    decoded = codec.decode(t.prompt_ids)
    assert "You answer questions about signs." in decoded and '"name": "Crop"' in decoded  # system + tools rendered
    pad = codec.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert t.token_ids().count(pad) == sum(codec.image_tokens(im) for im in t.images())
    # the segment-wise ids equal one tokenization of the whole conversation by the chat template
    said = [codec.decode(s.token_ids[:-1]) for s in t.segments if s.kind is SegmentKind.GEN]
    fresh = codec.retokenize("Which colour is sign 0?", t.prompt_images, TOOLS,
                             [(said[0], t.segments[1].text, t.segments[1].images), (said[1], None, [])],
                             system="You answer questions about signs.")
    assert fresh == t.token_ids()


def test_loss_mask_covers_exactly_the_assistant_tokens(codec, media):
    t = sharegpt_to_trajectory(record(1), codec, media_dir=media)
    ids, mask = np.array(t.token_ids()), np.array(t.loss_mask(), bool)
    stop = codec.stop_token_ids[0]
    want = []
    for m in record(1)["conversations"][1::2]:
        text = render_call(m["value"]) if m["from"] == "function_call" else m["value"]
        want += codec.encode_text(text) + [stop]
    assert ids[mask].tolist() == want  # every assistant token with its <|im_end|>, nothing else
    header = codec.encode_text("assistant\n")
    starts = np.flatnonzero(mask & ~np.r_[False, mask[:-1]])
    assert len(starts) == 2
    for s in starts:  # each masked run starts right after the template's "<|im_start|>assistant\n"
        assert ids[s - len(header):s].tolist() == header
    pad = codec.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not (mask & (ids == pad)).any() and (ids == pad).sum() > 0


def test_custom_tags_and_qwen_call_style(codec, media):
    rec = record(2)
    rec["messages"] = [{"role": {"human": "user", "gpt": "assistant", "function_call": "function_call",
                                 "observation": "tool"}[m["from"]], "content": m["value"]}
                       for m in rec.pop("conversations")]
    tags = ShareGPTTags(messages="messages", role_tag="role", content_tag="content", user_tag="user",
                        assistant_tag="assistant", observation_tag="tool")
    t = sharegpt_to_trajectory(rec, codec, media_dir=media, tags=tags, call_style="qwen")
    assert "<tool_call>\n{" in t.segments[0].text and t.turns[0].calls[0]["name"] == "Crop"


BAD = [
    (lambda r: [1, 2], "<record>", "expected a JSON object"),
    (lambda r: {**r, "conversations": []}, "conversations", "non-empty list"),
    (lambda r: {**r, "conversations": r["conversations"][:1] + r["conversations"][2:]}, "conversations[1].from",
     "role 'observation'"),
    (lambda r: {**r, "conversations": [{"from": "robot", "value": "x"}] + r["conversations"][1:]},
     "conversations[0].from", "role 'robot'"),
    (lambda r: {**r, "conversations": r["conversations"][:3]}, "conversations", "the last one must be"),
    (lambda r: {**r, "images": r["images"][:1]}, "images", "1 images but 2 <image> placeholders"),
    (lambda r: {**r, "images": ["a0.png", "nope.png"]}, "images[1]", "does not exist"),
    (lambda r: {**r, "tools": "[{oops"}, "tools", "not a JSON list"),
    (lambda r: {**r, "conversations": [r["conversations"][0], {"from": "function_call", "value": "crop it"}]
                + r["conversations"][2:]}, "conversations[1].value", "function_call must be"),
    (lambda r: {**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": 3}]},
     "conversations[1].value", "expected a string"),
]


@pytest.mark.parametrize("mutate,fld,msg", BAD)
def test_bad_records_name_the_line_and_field(codec, media, mutate, fld, msg):
    path = media / "data.sharegpt.jsonl"
    path.write_text(json.dumps(record(0)) + "\n" + json.dumps(mutate(record(0))) + "\n")
    with pytest.raises(RecordError) as e:
        load_sharegpt(path, codec)
    assert f"{path}:2: field {fld!r}" in str(e.value) and msg in str(e.value)


def test_sft_loss_decreases(vlm, codec, media):
    trajs = [sharegpt_to_trajectory(record(i), codec, media_dir=media) for i in range(2)]
    model = build_tiny_vlm("qwen2_vl", seed=1).model  # a fresh copy: the module's vlm stays untouched
    up = SFTUpdater(model, UpdateConfig(lr=3e-3, micro_batch_tokens=1024), image_processor=vlm.image_processor)
    losses = [up.step(trajs)["loss"] for _ in range(8)]
    assert all(np.isfinite(losses)) and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses
    m = up.step(trajs)
    assert m["loss_tokens"] == sum(sum(t.loss_mask()) for t in trajs) and up.version == 9


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "world-v1"
    ensure_world(root, WorldConfig())
    return root


def _same_images(a, b):
    return len(a) == len(b) and all(x.size == y.size and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_run_sft_teacher_data_round_trip_and_resume(world, codec, tmp_path):
    env = EnvConfig(world_dir=str(world), questions=2, dense_search=False)
    cfg = SFTConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=1, lr=1e-3,
                    data=SFTDataConfig(env=env))
    m = run_sft(cfg)
    assert m["data"]["kept"] == 2 and m["steps"] == 2 and len(m["losses"]) == 2
    assert all(np.isfinite(m["losses"])) and Path(m["checkpoint"]).is_dir()
    # the two layouts hold the same training data, token for token
    data = tmp_path / "run" / "data"
    trajs = list(iter_jsonl(data / "teacher.jsonl"))
    back = load_sharegpt(data / "teacher.sharegpt.jsonl", codec)
    assert [t.id for t in trajs] == [t.id for t in back]
    for a, b in zip(trajs, back):
        assert a.token_ids() == b.token_ids() and a.loss_mask() == b.loss_mask()
        assert _same_images(a.images(), b.images()) and a.answer == b.answer
        assert [tr.calls for tr in a.turns] == [tr.calls for tr in b.turns]
    recs = [json.loads(x) for x in (data / "teacher.sharegpt.jsonl").read_text().splitlines()]
    assert {m["from"] for r in recs for m in r["conversations"]} == {"human", "function_call", "observation", "gpt"}
    from spyglass.engine.env import build_env
    again = trajectory_to_sharegpt(back[0], codec, build_env(env).schemas, tmp_path / "again")
    assert again["conversations"] == recs[0]["conversations"]  # ShareGPT -> Trajectory -> ShareGPT is a fixed point
    # resume: one more step from the saved checkpoint, trained on the ShareGPT file
    cfg2 = SFTConfig(out_dir=str(tmp_path / "run"), steps=3, batch_size=1, lr=1e-3, export=True,
                     data=SFTDataConfig(path=str(data / "teacher.sharegpt.jsonl")))
    m2 = run_sft(cfg2)
    assert m2["resumed_from"] == 2 and m2["steps"] == 3 and m2["data"]["format"] == "sharegpt"
    tuned = load_model(m2["model_dir"])
    assert tuned.family == "qwen2_vl"


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="data.format must be"):
        SFTDataConfig(format="csv")
    with pytest.raises(ValueError, match="'nope.jsonl' is not a file"):
        SFTDataConfig(path="nope.jsonl")


def _ds_losses(media, strategy: str) -> tuple[list[float], float]:
    """Three SFT steps on two ShareGPT records under `strategy`; (losses, parameter sum)."""
    from spyglass.trainer.distributed import DistConfig, full_state_dict
    vlm = build_tiny_vlm("qwen2_vl", seed=0)
    codec = HFCodec.from_model(vlm)
    trajs = [sharegpt_to_trajectory(record(i), codec, media_dir=media) for i in range(2)]
    up = SFTUpdater(vlm.model, UpdateConfig(lr=3e-3, micro_batch_tokens=1024), image_processor=vlm.image_processor,
                    dist=DistConfig(strategy=strategy))
    losses = [up.step(trajs)["loss"] for _ in range(3)]
    sd = full_state_dict(up, rank0_only=True)
    return losses, float(sum(v.double().sum() for v in sd.values())) if sd else 0.0


def test_zero2_on_two_ranks_matches_single_process(media):
    """The SFT step on DeepSpeed ZeRO-2 (2 ranks, gloo) gives the single-process losses and weights."""
    import os
    import socket
    import subprocess
    import sys
    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(Path(__file__).resolve()), str(media)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = json.loads((media / "zero2.json").read_text())
    ref_losses, ref_sum = _ds_losses(media, "plain")
    assert np.allclose(got["losses"], ref_losses, rtol=1e-5, atol=1e-6) and ref_losses[-1] < ref_losses[0]
    assert abs(got["sum"] - ref_sum) <= 1e-4 * max(1.0, abs(ref_sum))


if __name__ == "__main__":  # torchrun worker of test_zero2_on_two_ranks_matches_single_process
    import sys
    _media = Path(sys.argv[1])
    _losses, _sum = _ds_losses(_media, "zero2")
    import torch.distributed as _dist
    if _dist.get_rank() == 0:
        (_media / "zero2.json").write_text(json.dumps({"losses": _losses, "sum": _sum}))
