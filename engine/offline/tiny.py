"""The tiny checkpoints: seeded random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL and text
Qwen2 / Qwen3 models, written as standard Hugging Face checkpoint directories (config.json,
model.safetensors, tokenizer.json with the family's chat template, preprocessor_config.json)
and loaded by the product's loader (`spyglass.engine.loader.load_model`) like any download.

Nothing here downloads anything. `build_tokenizer()` trains a byte-level BPE (~800 tokens, plus
~450 whole-word tokens of the domain's English words: DOMAIN_WORDS) with `tokenizers` on a small
built-in corpus in the agent format in a few milliseconds, with Qwen's special tokens and the
family's chat template (engine/offline/templates.py: the real checkpoints' shapes).
`build_tiny_vlm()` makes a seeded, ~0.2M-parameter VLM in memory (a LoadedModel);
`materialize("tiny:qwen2_vl[:<hidden>x<layers>[:<image tokens>]]", cache_dir)` writes one as a
checkpoint directory once (atomically) and returns its path; `--model tiny:...` goes there.

    from spyglass.engine.loader import load_model
    m = load_model("tiny:qwen3_vl")                   # materialised, then loaded from disk
    vlm = build_tiny_vlm("qwen2_vl", seed=0)          # in memory (tests)
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..loader import LoadedModel, load_tokenizer  # noqa: F401  (load_tokenizer: tests)
from .templates import TEMPLATES

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Agent-format markers are added (non-special) tokens: one id each, kept when decoding.
AGENT_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                "</tool_response>", "<answer>", "</answer>"]
TOOL_NAMES = ["crop", "sharpen", "super_resolution", "perspective_correct", "ocr",
              "text_search", "image_search", "visit", "python"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"



def _corpus() -> list[str]:
    """A deterministic built-in training corpus in the agent format (a few hundred lines)."""
    words = ("the image shows a sign with small text near the top left corner of the photo "
             "I need to crop zoom read search find answer question where which what who year "
             "building city street name price number date color red blue green white black "
             "this looks like a restaurant menu the result says page title source").split()
    lines = []
    for i, tool in enumerate(TOOL_NAMES * 6):
        w = [words[(i * 7 + k * 3) % len(words)] for k in range(12)]
        args = {"image": f"img_{i % 4 + 1}", "box": [i % 50, 10 + i % 30, 200 + i, 120 + i % 9]}
        if tool in ("text_search", "image_search", "visit"):
            args = {"query": " ".join(w[:5])} if tool != "visit" else {"url": f"https://example.org/{w[0]}"}
        if tool == "python":
            args = {"code": f"print({i} * {i + 3})"}
        call = json.dumps({"name": tool, "arguments": args})
        lines.append(f"<think>{' '.join(w)}.</think>\n<tool_call>\n{call}\n</tool_call>")
        lines.append(f"<tool_response>\n{' '.join(w[3:])} {i} results\n</tool_response>")
        lines.append(f"<think>{' '.join(w[4:])}.</think>\n<answer>{' '.join(w[:3])} {1900 + i}</answer>")
    lines += [f"You are a helpful assistant. {' '.join(words[k:k + 15])}." for k in range(0, 60, 5)]
    lines += ['{"type": "function", "function": {"name": "%s", "parameters": {"type": "object", '
              '"properties": {"image": {"type": "string"}}, "required": ["image"]}}}' % t
              for t in TOOL_NAMES]
    lines.append("0123456789 ,.;:!?()[]{}<>\"'-_=+*/\\ ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return lines


# Common English words of the agent's domain (the bundled world's pages, questions and tool
# observations) are whole-word tokens, as a real tokenizer has such words as one or two tokens
# (the plain tiny BPE spelt "occupation" in 7 byte pieces). Added as whole words, not BPE merges:
# each is ONE id in every context (after a space in a question or a page line, after a quote in a
# Visit goal), and made-up names keep the plain BPE pieces wherever they appear (merges that glue
# a space to word starts split a name differently after a space and after a quote, and the
# warm-up's recall fell from 67% to 17% exact with them). Measured in the proof
# (benchmarks/README.md): 20% fewer tokens, a 24% faster run, fewer fatal trajectories; it did
# NOT make the tiny student pick the field a question asks for more often.
DOMAIN_WORDS = (
    "what which who whose where when how is are was were the a an of in on at to for from by with "
    "and or as that it its their has have had this these no not also about between most first "
    "image images shown picture photo sign board emblem logo page text line lines block blocks "
    "reading order box boxes pixels region regions crop cropped corners quadrilateral upright "
    "rectangle perspective corrected warped sharpened sharpening unsharp mask amount sigma "
    "upscaled resolution classical edge aware current match matches best entity score feature "
    "inliers results result query goal passage passages relevant matched begins title missing "
    "required argument unexpected unterminated error found character answer question step need "
    "will use think leftmost rightmost middle left right top bottom person place organisation "
    "organization product event year born birth birthplace occupation employer kind region founded "
    "founding founder population mayor headquarters industry maker released release designer "
    "designed category location organiser organised guest honour city town village harbour "
    "municipality township known joined early career became public lectures local newspapers "
    "covered length little else recorded archives mentioned regional guidebooks letters survive "
    "private collections keeps small museum work took made first engineer painter botanist "
    "architect cartographer violinist astronomer chemist economist glassblower shipwright optics "
    "shipping textiles publishing clockmaking aviation telegraphy ceramics brewing instruments "
    "dynamics sons institute works trading company lantern kettle camera bicycle radio typewriter "
    "compass barometer telescope loom festival marathon chess open film week regatta fair book "
    "port upper new saint lake").split()


# The bundled world's infobox field names (the Visit goals and the page lines' keys), frozen here
# so that the tokenizer reads no dataset (tests/test_tiny.py checks they cover world.FACT_FIELDS).
FIELD_WORDS = ("born", "birthplace", "occupation", "employer", "kind", "region", "founded", "population", "mayor",
               "founder", "headquarters", "industry", "maker", "released", "designer", "category", "year",
               "location", "organiser", "guest_of_honour")


def domain_words() -> list[str]:
    """DOMAIN_WORDS, their capitalised forms and FIELD_WORDS, without duplicates, in a fixed order."""
    words = list(DOMAIN_WORDS) + [w.capitalize() for w in DOMAIN_WORDS] + list(FIELD_WORDS)
    return list(dict.fromkeys(words))


def build_tokenizer(vocab_size: int = 800, family: str = "qwen2_vl") -> Any:
    """Train the byte-level BPE offline and wrap it as a PreTrainedTokenizerFast with `family`'s
    chat template (templates.TEMPLATES)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in TEMPLATES:
        raise ValueError(f"family must be one of {list(TEMPLATES)}, got {family!r}")
    if not 300 <= vocab_size <= 4096:
        raise ValueError(f"vocab_size must be in [300, 4096], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in AGENT_TOKENS])
    tok.add_tokens([AddedToken(w, special=False, normalized=False, single_word=True) for w in domain_words()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=TEMPLATES[family], eos_token="<|im_end|>",
        pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=65536)
    return fast


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the Qwen special tokens in `tokenizer` (raises naming a missing one)."""
    out = {}
    for t in SPECIAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no special token {t!r}")
        out[t] = int(i)
    return out


# ---------------------------------------------------------------------------------- models
def _vl_config(family: str, vocab: int, ids: dict[str, int], hidden: int = 64, layers: int = 2) -> Any:
    heads = hidden // 32  # head_dim 32 (the mrope sections below sum to 16)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=65536,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=14, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig
        text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [6, 5, 5], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=16, num_position_embeddings=256, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _model_class(family: str) -> type:
    import transformers as tf
    classes = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration"}
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return getattr(tf, classes[family])


def build_image_processor(family: str, max_image_tokens: int = 256) -> Any:
    """Qwen2VLImageProcessorPil (the torchvision one cannot load here); patch 16 for Qwen3-VL."""
    from transformers import Qwen2VLImageProcessorPil
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    patch = 16 if family == "qwen3_vl" else 14
    unit = (patch * 2) ** 2  # pixels per merged visual token
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                    min_pixels=4 * unit, max_pixels=max_image_tokens * unit)


def build_processor(family: str, tokenizer: Any, image_processor: Any) -> Any:
    """The family's VL processor with video processor None (its check needs torchvision)."""
    import transformers as tf
    base = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
            "qwen3_vl": tf.Qwen3VLProcessor}[family]

    class _NoVideoProcessor(base):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                     chat_template: str | None = None, **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    _NoVideoProcessor.__name__ = base.__name__
    return _NoVideoProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             chat_template=tokenizer.chat_template)


TinyVLM = LoadedModel  # what the builders return: the product's loaded-model record
TEXT_FAMILIES = ("qwen2", "qwen3")
SPEC = "tiny:<family>[:<hidden>x<layers>[:<image tokens>]]"
FIXTURE_VERSION = 2  # bump when the files materialize() writes change


def _seeded(seed: int, fn: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def build_tiny_vlm(family: str = "qwen2_vl", seed: int = 0, hidden: int = 64, layers: int = 2,
                   max_image_tokens: int = 256) -> LoadedModel:
    """A seeded tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (text: `hidden` wide, head_dim 32,
    `layers` deep; default 64 x 2, ~0.2M parameters; a tiny vision tower; images resized to at
    most `max_image_tokens` visual tokens, 4 patches each), in memory."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if hidden % 32 or not 32 <= hidden <= 1024:
        raise ValueError(f"hidden must be a multiple of 32 in [32, 1024], got {hidden!r}")
    if not 1 <= layers <= 48:
        raise ValueError(f"layers must be in [1, 48], got {layers!r}")
    if not 4 <= max_image_tokens <= 16384:
        raise ValueError(f"max_image_tokens must be in [4, 16384], got {max_image_tokens!r}")
    tok = build_tokenizer(family=family)
    config = _vl_config(family, len(tok), special_ids(tok), hidden, layers)
    model = _seeded(seed, lambda: _model_class(family)(config)).float().eval()
    return LoadedModel(family, model, tok, build_image_processor(family, max_image_tokens))


def build_tiny_text_lm(seed: int = 0, family: str = "qwen2") -> LoadedModel:
    """A seeded tiny text-only Qwen2 / Qwen3 causal LM (hidden 128, 2 heads of head_dim 64, 2
    layers: head_dim 64 is what vLLM's CPU kernels need)."""
    import transformers as tf
    if family not in TEXT_FAMILIES:
        raise ValueError(f"family must be one of {TEXT_FAMILIES}, got {family!r}")
    tok = build_tokenizer(family=family)
    ids = special_ids(tok)
    cls, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[family]
    config = cls(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                 tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                 pad_token_id=ids["<|endoftext|>"])
    model = _seeded(seed, lambda: model_cls(config)).float().eval()
    return LoadedModel(family, model, tok, None)


def parse_tiny_spec(spec: str) -> tuple[str, int, int, int]:
    """"tiny:<family>[:<hidden>x<layers>[:<max image tokens>]]" -> (family, hidden, layers,
    max_image_tokens); e.g. tiny:qwen2_vl:128x2:64. Defaults 64 x 2, 256 image tokens. Text
    families (qwen2, qwen3) take no size."""
    parts = spec.split(":")
    families = FAMILIES + TEXT_FAMILIES
    if parts[0] != "tiny" or len(parts) not in (2, 3, 4) or parts[1] not in families \
            or (parts[1] in TEXT_FAMILIES and len(parts) != 2):
        raise ValueError(f"model spec must be {SPEC} with family in {families} (text families take no size), "
                         f"got {spec!r}")
    if len(parts) == 2:
        return parts[1], 64, 2, 256
    size = parts[2].split("x")
    if len(size) != 2 or not all(x.isdigit() for x in size):
        raise ValueError(f"model spec size must be <hidden>x<layers> (e.g. 128x4), got {parts[2]!r} in {spec!r}")
    if len(parts) == 4 and not parts[3].isdigit():
        raise ValueError(f"model spec image tokens must be an int, got {parts[3]!r} in {spec!r}")
    return parts[1], int(size[0]), int(size[1]), int(parts[3]) if len(parts) == 4 else 256


def build_tiny(spec: str, seed: int = 0) -> LoadedModel:
    """The in-memory model a tiny spec names (what materialize() writes)."""
    family, hidden, layers, image_tokens = parse_tiny_spec(spec)
    if family in TEXT_FAMILIES:
        return build_tiny_text_lm(seed, family)
    return build_tiny_vlm(family, seed=seed, hidden=hidden, layers=layers, max_image_tokens=image_tokens)


def materialize(spec: str, cache_dir: str | Path, seed: int = 0) -> Path:
    """The checkpoint directory of tiny `spec` under `cache_dir`, written once (atomically:
    built in a temporary directory, then renamed) and reused after."""
    family, hidden, layers, image_tokens = parse_tiny_spec(spec)
    out = Path(cache_dir) / f"tiny-{family}-{hidden}x{layers}-{image_tokens}-seed{seed}-v{FIXTURE_VERSION}"
    if (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..loader import save_model  # noqa: PLC0415
    tmp = save_model(build_tiny(spec, seed), out.parent / f".{out.name}.{os.getpid()}.tmp")
    try:
        os.replace(tmp, out)
    except OSError:  # another process materialised it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_tiny_text_lm(path: str | Path, seed: int = 0, family: str = "qwen2") -> Path:
    """Build the tiny text LM and save it as a checkpoint directory (one vLLM can load)."""
    from ..loader import save_model  # noqa: PLC0415
    return save_model(build_tiny_text_lm(seed, family), path)


# ------------------------------------------------------------------ encoding (the product's, re-exported)
from ..chat import (ChatEncoding, encode_chat, encode_observation, expand_image_pads,  # noqa: E402,F401
                    image_grid, image_token_count, pixel_inputs)
