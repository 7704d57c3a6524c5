"""Tiny offline tokenizer/VLMs and the chat encoder: .venv/bin/python -m pytest -q tests/test_tiny.py"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from spyglass.engine.loader import LoadConfig
from spyglass.engine.offline import tiny

IMG = Image.new("RGB", (200, 120), (10, 200, 30))


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def vlm(request):
    return tiny.build_tiny_vlm(request.param, seed=0)


def test_tokenizer_knows_the_worlds_field_names_as_words(tok):
    # a goal is written after a quote, a page line and a question have it after a space: the
    # field must be the same single id in every context, or the student has to learn to map
    # between spellings (see DOMAIN_WORDS); made-up names keep their BPE pieces in any context
    from spyglass.engine.offline.world import FACT_FIELDS

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]
    fields = {f for fs in FACT_FIELDS.values() for f in fs}
    assert fields <= set(tiny.FIELD_WORDS)  # the tokenizer's frozen list covers the world's fields
    for f in sorted(fields):
        (fid,) = enc(f)
        assert enc(f' "goal": "{f}"')[-2] == fid and fid in enc(f"- {f}: 1952") and fid in enc(f"the {f} of"), f
    assert enc("Velzosk Stepford") == enc("Velzosk") + enc(" Stepford")  # no whole word inside a name
    assert enc(" Stepford") == enc(" ") + enc("Stepford") and "Step" not in tok.convert_ids_to_tokens(enc("Stepford"))
    q = "What is the founding year of the organisation shown in the image?"
    assert tok.decode(enc(q)) == q and len(enc(q)) < 30


def test_tokenizer_is_deterministic_and_has_single_id_markers(tok):
    assert tok.get_vocab() == tiny.build_tokenizer().get_vocab()
    assert 900 <= len(tok) <= 1400
    ids = tiny.special_ids(tok)
    assert len(set(ids.values())) == len(tiny.SPECIAL_TOKENS)
    for t in tiny.AGENT_TOKENS + tiny.SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    text = '<think>crop it</think>\n<tool_call>\n{"name": "crop", "arguments": {"box": [1, 2]}}\n</tool_call>'
    assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="vocab_size"):
        tiny.build_tokenizer(vocab_size=10)


def test_chat_templates_have_the_real_shapes():
    """Qwen3-VL's shape renders tools and the tool role; Qwen2-VL's ignores both (the codec fills
    in the Qwen agent layout: tests/test_loader.py)."""
    tok = tiny.build_tokenizer(family="qwen3_vl")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [
        {"type": "image", "image": IMG}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": "<think>a</think>",
         "tool_calls": [{"function": {"name": "crop", "arguments": {"box": [1, 2]}}}]},
        {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>\n<|im_start|>assistant\n"
        "<think>a</think>\n<tool_call>\n{\"name\": \"crop\", \"arguments\": {\"box\": [1, 2]}}\n"
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n"
        "<tool_response>\nr2\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                    tools=[{"type": "function", "function": {"name": "ocr"}}])
    assert plain.startswith("<|im_start|>system\n# Tools\n")  # Qwen3: no default system prompt
    assert '<tools>\n{"type": "function", "function": {"name": "ocr"}}\n</tools>' in plain
    q2 = tiny.build_tokenizer(family="qwen2_vl")
    assert q2.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "tool", "content": "r"}], tokenize=False,
                                  tools=[{"type": "function", "function": {"name": "ocr"}}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>tool\nr<|im_end|>\n")


def test_encode_chat_matches_the_processor(vlm):
    msgs = [{"role": "user", "content": [{"type": "image", "image": IMG},
                                         {"type": "text", "text": "What is this?"}]}]
    enc = tiny.encode_chat(vlm.tokenizer, vlm.image_processor, msgs)
    text = vlm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    proc = tiny.build_processor(vlm.family, vlm.tokenizer, vlm.image_processor)  # the family's VL processor
    ref = proc(text=[text], images=[IMG], return_tensors="pt")
    assert enc.input_ids == ref["input_ids"][0].tolist()
    assert enc.images == [IMG]
    n = tiny.image_token_count(IMG, vlm.image_processor)
    assert n == int(ref["image_grid_thw"][0].prod()) // 4
    assert enc.input_ids.count(vlm.model.config.image_token_id) == n
    px = tiny.pixel_inputs(vlm.image_processor, enc.images)
    assert torch.equal(px["image_grid_thw"], ref["image_grid_thw"])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_image_grid_from_the_size_matches_the_processor(family):
    proc = tiny.build_tiny_vlm(family).image_processor
    ims = [Image.new("RGB", wh) for wh in ((640, 420), (37, 900), (1200, 30), (56, 56), (333, 217))]
    assert [list(tiny.image_grid(im, proc)) for im in ims] == tiny.pixel_inputs(proc, ims)["image_grid_thw"].tolist()


def test_observation_delta_equals_full_encoding():
    tok = tiny.build_tokenizer(family="qwen3_vl")  # a template with the tool role
    improc = tiny.build_image_processor("qwen2_vl")
    user = [{"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "Where?"}]}]
    reply = '<think>zoom</think>\n<tool_call>\n{"name": "crop", "arguments": {"image": "img_1"}}\n</tool_call>'
    obs = [{"role": "tool", "content": [{"type": "image", "image": IMG.crop((0, 0, 80, 60))},
                                        {"type": "text", "text": "cropped img_2"}]}]
    prompt = tiny.encode_chat(tok, improc, user)
    generated = tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    delta = tiny.encode_observation(tok, improc, obs)
    full = tiny.encode_chat(tok, improc, user + [{"role": "assistant", "content": reply}] + obs)
    assert prompt.input_ids + generated + delta.input_ids == full.input_ids
    assert prompt.images + delta.images == full.images
    assert tok.decode(delta.input_ids).startswith("\n<|im_start|>user\n<tool_response>\n<|vision_start|>")


def test_encoding_errors_name_the_problem(tok):
    improc = tiny.build_image_processor("qwen2_vl")
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        tiny.expand_image_pads(tok("<|image_pad|><|image_pad|>")["input_ids"], [IMG], tok, improc)
    with pytest.raises(TypeError, match="PIL image"):
        tiny.encode_chat(tok, improc, [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}])
    with pytest.raises(ValueError, match="family"):
        tiny.build_tiny_vlm("llava")
    with pytest.raises(TypeError, match="PIL"):
        tiny.image_token_count("img", improc)


def test_model_spec_sets_size_and_image_token_cap(tmp_path):
    assert tiny.parse_tiny_spec("tiny:qwen2_vl") == ("qwen2_vl", 64, 2, 256)
    assert tiny.parse_tiny_spec("tiny:qwen3_vl:128x4") == ("qwen3_vl", 128, 4, 256)
    assert tiny.parse_tiny_spec("tiny:qwen2_vl:96x3:64") == ("qwen2_vl", 96, 3, 64)
    for bad in ("tiny:llava", "tiny:qwen2_vl:128", "tiny:qwen2_vl:128x2:many", "tiny:qwen2_vl:1x2:3:4"):
        with pytest.raises(ValueError, match="model spec"):
            tiny.parse_tiny_spec(bad)
    big = Image.new("RGB", (640, 480), (1, 2, 3))
    from spyglass.engine.loader import is_model_spec, load_model
    assert not any(is_model_spec(b) for b in ("tiny:llava", "tiny:qwen2:64x2"))
    small = load_model("tiny:qwen2_vl:64x2:16", LoadConfig(cache_dir=str(tmp_path / "cache")))
    assert small.model.config.text_config.num_hidden_layers == 2
    n_small = tiny.image_token_count(big, small.image_processor)
    assert 4 <= n_small <= 16
    assert tiny.image_token_count(big, tiny.build_tiny_vlm("qwen2_vl").image_processor) > n_small
    # the cap survives save/load (the image processor carries it)
    loaded = load_model(str(small.save(tmp_path / "m")))
    assert tiny.image_token_count(big, loaded.image_processor) == n_small
    with pytest.raises(ValueError, match="max_image_tokens"):
        tiny.build_tiny_vlm("qwen2_vl", max_image_tokens=2)


def test_seeded_init_and_save_load_round_trip(tmp_path):
    a, b = tiny.build_tiny_vlm("qwen2_vl", seed=0), tiny.build_tiny_vlm("qwen2_vl", seed=0)
    c = tiny.build_tiny_vlm("qwen2_vl", seed=1)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in sa.items())
    assert not all(torch.equal(v, sc[k]) for k, v in sa.items())
    assert 100_000 < sum(p.numel() for p in a.model.parameters()) < 1_000_000
    from spyglass.engine.loader import load_model
    loaded = load_model(str(a.save(tmp_path / "m")))
    msgs = [{"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "hi"}]}]
    enc = tiny.encode_chat(loaded.tokenizer, loaded.image_processor, msgs)
    assert enc.input_ids == tiny.encode_chat(a.tokenizer, a.image_processor, msgs).input_ids
    ids = torch.tensor([enc.input_ids])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
              mm_token_type_ids=(ids == a.model.config.image_token_id).int(),
              **tiny.pixel_inputs(a.image_processor, enc.images))
    assert torch.equal(a.model.generate(**kw), loaded.model.generate(**kw))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty-dir"))


def test_tiny_text_lm_for_vllm(tmp_path):
    lm = tiny.build_tiny_text_lm(seed=0)
    model, tok = lm.model, lm.tokenizer
    assert model.config.head_dim == 64 and model.config.vocab_size == len(tok)
    path = tiny.save_tiny_text_lm(tmp_path / "lm")
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    ids = torch.tensor([tok("hello")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
