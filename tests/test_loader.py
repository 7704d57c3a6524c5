"""The one loader: each family's checkpoint directory (the tiny fixtures, written in the real
Hugging Face layout) loads through transformers' Auto classes; the checkpoint's own chat
template decides the prompt and every observation's token delta; hub ids resolve in the local
cache only; bad checkpoints and configs fail with one clear line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from spyglass.engine.chat import HFCodec
from spyglass.engine.config import ConfigError
from spyglass.engine.loader import FAMILIES, LoadConfig, load_model, resolve_checkpoint, save_model
from spyglass.engine.offline import tiny

IMG = Image.new("RGB", (200, 120), "white")
TOOLS = [{"type": "function", "function": {"name": "crop", "description": "Crop a box.",
                                           "parameters": {"type": "object", "properties": {"image": {"type": "string"}}}}}]
# what each family's template does with `tools` and role "tool" (Qwen2-VL / Qwen2.5-VL: neither)
TRAITS = {"qwen2_vl": (False, False), "qwen2_5_vl": (False, False), "qwen3_vl": (True, True),
          "qwen2": (True, True), "qwen3": (True, True)}
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: tiny.materialize(f"tiny:{f}", root) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_dir_is_the_hf_layout_and_loads_like_a_download(ckpts, family):
    path = ckpts[family]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert ("preprocessor_config.json" in names) == family.endswith("_vl")
    assert not any("spyglass" in n for n in names)  # nothing but the standard files
    assert json.loads((path / "config.json").read_text())["model_type"] == family
    m = load_model(str(path))
    assert (m.family, type(m.model).__name__, m.path) == (family, CLASSES[family], path)
    assert m.model.dtype == torch.float32 and m.model.device.type == "cpu"  # auto on CPU
    assert m.is_vl == (m.image_processor is not None) == family.endswith("_vl")
    ref = tiny.build_tiny(f"tiny:{family}")  # the same seeded weights as built in memory
    ids = torch.tensor([m.codec().encode_text("the image shows a sign")])
    with torch.no_grad():
        assert torch.allclose(m.model(input_ids=ids).logits, ref.model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_deltas_follow_the_checkpoints_own_template(ckpts, family):
    codec = load_model(str(ckpts[family])).codec()
    assert (codec.template_tools, codec.template_tool_role) == TRAITS[family]
    images = [IMG] if codec.takes_images else []
    said = ("<think>\nlook\n</think>\n\n" if family == "qwen3" else "<think>look</think>\n") + \
        '<tool_call>\n{"name": "crop", "arguments": {"image": "img_1"}}\n</tool_call>'
    prompt = codec.encode_prompt("Which city?", images, TOOLS)
    gen = codec.encode_text(said) + [codec.stop_token_ids[0]]
    obs = codec.encode_observation("cropped", images, closed=True)
    # token-in/token-out: prompt + sampled ids + delta == a fresh rendering of the conversation
    assert prompt + gen + obs == codec.retokenize("Which city?", images, TOOLS, [(said, "cropped", images)])
    text = codec.decode(prompt + gen + obs)
    assert '"name": "crop"' in text.split("<|im_end|>")[0]  # the tool block is in the system turn
    assert "<|im_start|>user\n<tool_response>\ncropped" in text  # Qwen agent layout either way
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    if images:
        n = codec.image_tokens(IMG)
        assert n > 0 and (prompt + obs).count(codec.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 2 * n


def test_qwen2_vl_fixture_tokens_equal_the_agent_template_it_had(ckpts):
    """Qwen2-VL's template knows no tools: the codec's fallback (Hermes block in the system
    prompt, <tool_response> user turns) gives the tokens the Qwen2.5 agent template gives."""
    m = load_model(str(ckpts["qwen2_vl"]))
    qwen25 = HFCodec(tiny.build_tokenizer(family="qwen2"), m.image_processor)  # renders tools and role tool
    codec = m.codec()
    assert qwen25.template_tools and not codec.template_tools
    sys_prompt = "You are an agent."
    assert codec.encode_prompt("Q?", [IMG], TOOLS, sys_prompt) == qwen25.encode_prompt("Q?", [IMG], TOOLS, sys_prompt)


def test_text_model_refuses_images(ckpts):
    codec = load_model(str(ckpts["qwen2"])).codec()
    with pytest.raises(ValueError, match=r"text-only .* 1 image"):
        codec.encode_prompt("Q?", [IMG], [])


def test_hub_id_resolves_in_the_local_cache_only(ckpts, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny-vl" / "snapshots" / ("a" * 40)
    shutil.copytree(ckpts["qwen2_5_vl"], snap)
    (hub / "models--acme--tiny-vl" / "refs").mkdir()
    (hub / "models--acme--tiny-vl" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("acme/tiny-vl") == snap
    assert load_model("acme/tiny-vl").family == "qwen2_5_vl"
    with pytest.raises(FileNotFoundError, match=r"'acme/missing' is not in the local Hugging Face cache .* "
                                                r"HF_HUB_OFFLINE is set"):
        resolve_checkpoint("acme/missing")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # downloads stay off unless allowed
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        resolve_checkpoint("acme/missing")


def test_bad_checkpoints_and_configs_name_the_problem(ckpts, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_checkpoint(str(tmp_path / "empty"))
    llama = tmp_path / "llama"
    shutil.copytree(ckpts["qwen2"], llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        load_model(str(llama))
    with pytest.raises(ConfigError, match="load.dtype must be one of"):
        LoadConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="load.device must be auto|cpu|cuda|cuda:N, got 'tpu'"):
        LoadConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            LoadConfig(device="cuda").resolved_device()
    c = LoadConfig()
    assert (c.resolved_dtype(torch.device("cpu")), c.resolved_dtype(torch.device("cuda"))) == (torch.float32, torch.bfloat16)
    assert c.resolved_attention(torch.device("cpu")) == "sdpa"


def test_save_keeps_template_and_image_cap_and_loads_back(ckpts, tmp_path):
    m = load_model(str(ckpts["qwen3_vl"]), LoadConfig(max_image_tokens=16))
    big = Image.new("RGB", (900, 700))
    assert m.codec().image_tokens(big) <= 16
    sd = {k: v + 1.0 for k, v in m.model.state_dict().items()}
    out = save_model(m, tmp_path / "export", state_dict=sd)
    back = load_model(str(out))
    assert back.tokenizer.chat_template == m.tokenizer.chat_template
    assert back.codec().image_tokens(big) == m.codec().image_tokens(big)
    k = "lm_head.weight"
    assert torch.equal(back.model.state_dict()[k], sd[k])


def test_image_token_cap_wins_over_a_qwen25_preprocessor_config(tmp_path):
    """Qwen2(.5)-VL's preprocessor_config.json carries min_pixels / max_pixels: the cap must
    still apply (a 4000x3000 photo is ~15,000 visual tokens uncapped)."""
    from spyglass.engine.loader import load_image_processor
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    photo = Image.new("RGB", (4000, 3000))
    codec = HFCodec(tiny.build_tokenizer(), load_image_processor(tmp_path))
    assert codec.image_tokens(photo) > 15000
    capped = HFCodec(tiny.build_tokenizer(), load_image_processor(tmp_path, max_image_tokens=256))
    assert 200 <= capped.image_tokens(photo) <= 256


def test_auto_attention_never_picks_flash_attention_for_fp32():
    cuda = torch.device("cuda")
    assert LoadConfig(dtype="float32").resolved_attention(cuda) == "sdpa"
    assert LoadConfig(attn_implementation="eager").resolved_attention(cuda) == "eager"


def test_a_bf16_model_trains_with_fp32_master_weights():
    """Plain (one process) mixed precision: a checkpoint loaded in bf16 is upcast for the
    optimizer and its forwards run under bf16 autocast; the step is finite and moves weights."""
    from spyglass.trainer.update import PolicyUpdater, UpdateConfig
    from spyglass.engine.trajectory import Segment, Trajectory
    lm = tiny.build_tiny_text_lm(seed=0)
    model = lm.model.to(torch.bfloat16)
    up = PolicyUpdater(model, UpdateConfig(lr=1e-2))
    assert up.runtime.autocast is torch.bfloat16 and next(up.model.parameters()).dtype == torch.float32
    codec = HFCodec(lm.tokenizer)
    trajs = []
    for i in range(2):
        gen = codec.encode_text(f"<answer>{i}</answer>") + [codec.stop_token_ids[0]]
        seg = Segment("gen", gen, 0, logprobs=[-1.0] * len(gen), version=0)
        trajs.append(Trajectory(f"t{i}", "g", i, codec.encode_prompt(f"q{i}?", [], []), segments=[seg]))
    before = {k: p.detach().clone() for k, p in up.model.named_parameters()}
    m = up.step(trajs, torch.tensor([1.0, -1.0]), [torch.tensor(t.loss_mask()) for t in trajs])
    assert torch.isfinite(torch.tensor(m["loss"]))
    assert any(not torch.equal(before[k], p) for k, p in up.model.named_parameters())
