"""Tiny Qwen-style models built offline, and the chat -> token ids (+ pixels) encoder.

Nothing here downloads anything. `build_tokenizer()` trains a byte-level BPE (~800 tokens, plus
~450 whole-word tokens of the domain's English words: DOMAIN_WORDS) with `tokenizers` on a small
built-in corpus in the agent format (<think>, <tool_call>{json}</tool_call>, <answer>, tool
names) in a few milliseconds, with Qwen's special tokens and a Qwen-style chat
template (system/user/assistant/tool roles; images as <|vision_start|><|image_pad|><|vision_end|>;
tool results wrapped in <tool_response> inside a user turn, as Qwen2.5 does). `build_tiny_vlm()`
makes a seeded, ~0.2M-parameter Qwen2-VL / Qwen2.5-VL / Qwen3-VL from configs in code;
`build_tiny_text_lm()` a text-only Qwen2 causal LM (head_dim 64, as vLLM's CPU kernels need).

The encoder is not tiny-specific: `encode_chat` / `encode_observation` / `image_token_count`
work with any Qwen-VL style (tokenizer, image processor) pair. The chat template puts ONE
<|image_pad|> per image; encoding expands it to `image_token_count(image)` copies, which is
exactly what the model's vision tower produces (grid_t*grid_h*grid_w / merge_size**2).

    from spyglass.engine.offline.tiny import build_tiny_vlm, encode_chat
    vlm = build_tiny_vlm("qwen2_vl", seed=0)
    enc = encode_chat(vlm.tokenizer, vlm.image_processor, [{"role": "user", "content": [
        {"type": "image", "image": img}, {"type": "text", "text": "What is this?"}]}])
    inputs = pixel_inputs(vlm.image_processor, enc.images)  # pixel_values, image_grid_thw
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Agent-format markers are added (non-special) tokens: one id each, kept when decoding.
AGENT_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                "</tool_response>", "<answer>", "</answer>"]
TOOL_NAMES = ["crop", "sharpen", "super_resolution", "perspective_correct", "ocr",
              "text_search", "image_search", "visit", "python"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part.type == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'text' %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% if messages[0].role == 'system' %}{% set sys = render(messages[0].content) %}"
    "{% else %}{% set sys = 'You are a helpful assistant.' %}{% endif %}"
    "<|im_start|>system\n{{ sys }}"
    "{% if tools %}{{ '\\n' }}\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>{% endif %}<|im_end|>\n"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'user' or m.role == 'system' %}"
    "<|im_start|>{{ m.role }}\n{{ render(m.content) }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ render(m.content or '') }}"
    "{% for call in m.tool_calls or [] %}{% set f = call.function or call %}"
    "{% if m.content or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ f.name }}\", \"arguments\": "
    "{{ f.arguments if f.arguments is string else f.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or loop.previtem.role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ render(m.content) }}\n</tool_response>"
    "{% if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}{{ raise_exception('unknown role: ' + m.role) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def domain_words() -> list[str]:
    """DOMAIN_WORDS, their capitalised forms and the world's infobox field names (guest_of_honour
    too), without duplicates, in a fixed order."""
    from .world import FACT_FIELDS  # the fields are the Visit goals and the page lines' keys
    fields = [f for fs in FACT_FIELDS.values() for f in fs]
    words = list(DOMAIN_WORDS) + [w.capitalize() for w in DOMAIN_WORDS] + fields
    return list(dict.fromkeys(words))


def build_tokenizer(vocab_size: int = 800) -> Any:
    """Train the byte-level BPE offline and wrap it as a PreTrainedTokenizerFast with the template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
        tokenizer_object=tok, chat_template=CHAT_TEMPLATE, eos_token="<|im_end|>",
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


@dataclass
class TinyVLM:
    """A tiny VLM with everything needed to encode chats for it."""

    family: str
    model: Any            # *ForConditionalGeneration, eval mode, float32
    tokenizer: Any        # PreTrainedTokenizerFast with the chat template
    processor: Any        # the family's VL processor (video processor None)

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    def save(self, path: str | Path) -> Path:
        return save_tiny(self, path)


def _seeded(seed: int, fn: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def build_tiny_vlm(family: str = "qwen2_vl", seed: int = 0, hidden: int = 64, layers: int = 2,
                   max_image_tokens: int = 256) -> TinyVLM:
    """A seeded tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (text: `hidden` wide, head_dim 32,
    `layers` deep; default 64 x 2, ~0.2M parameters; a tiny vision tower; images resized to at
    most `max_image_tokens` visual tokens, 4 patches each)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if hidden % 32 or not 32 <= hidden <= 1024:
        raise ValueError(f"hidden must be a multiple of 32 in [32, 1024], got {hidden!r}")
    if not 1 <= layers <= 48:
        raise ValueError(f"layers must be in [1, 48], got {layers!r}")
    if not 4 <= max_image_tokens <= 16384:
        raise ValueError(f"max_image_tokens must be in [4, 16384], got {max_image_tokens!r}")
    tok = build_tokenizer()
    config = _vl_config(family, len(tok), special_ids(tok), hidden, layers)
    model = _seeded(seed, lambda: _model_class(family)(config)).float().eval()
    improc = build_image_processor(family, max_image_tokens)
    return TinyVLM(family, model, tok, build_processor(family, tok, improc))


def parse_tiny_spec(spec: str) -> tuple[str, int, int, int]:
    """"tiny:<family>[:<hidden>x<layers>[:<max image tokens>]]" -> (family, hidden, layers,
    max_image_tokens); e.g. tiny:qwen2_vl:128x2:64. Defaults 64 x 2, 256 image tokens."""
    parts = spec.split(":")
    if parts[0] != "tiny" or len(parts) not in (2, 3, 4) or parts[1] not in FAMILIES:
        raise ValueError(f"model spec must be tiny:<family>[:<hidden>x<layers>[:<image tokens>]] with family "
                         f"in {FAMILIES}, got {spec!r}")
    if len(parts) == 2:
        return parts[1], 64, 2, 256
    size = parts[2].split("x")
    if len(size) != 2 or not all(x.isdigit() for x in size):
        raise ValueError(f"model spec size must be <hidden>x<layers> (e.g. 128x4), got {parts[2]!r} in {spec!r}")
    if len(parts) == 4 and not parts[3].isdigit():
        raise ValueError(f"model spec image tokens must be an int, got {parts[3]!r} in {spec!r}")
    return parts[1], int(size[0]), int(size[1]), int(parts[3]) if len(parts) == 4 else 256


def load_model(spec: str, seed: int = 0) -> TinyVLM:
    """A TinyVLM from a spec: "tiny:<family>[:<hidden>x<layers>[:<image tokens>]]" builds one in code (seeded);
    anything else is a save_tiny() directory."""
    if spec.startswith("tiny:"):
        family, hidden, layers, image_tokens = parse_tiny_spec(spec)
        return build_tiny_vlm(family, seed=seed, hidden=hidden, layers=layers, max_image_tokens=image_tokens)
    return load_tiny(spec)


MODEL_SPEC = "tiny:<family>[:<hidden>x<layers>[:<image tokens>]]"


def check_model_spec(spec: str, what: str = "model") -> None:
    """Config validation: ConfigError naming `what` unless `spec` is a valid tiny spec or an
    existing directory."""
    from ..config import check  # noqa: PLC0415
    check(is_model_spec(spec), f"{what} must be {MODEL_SPEC} or an existing directory, got {spec!r}")


def is_model_spec(spec: str) -> bool:
    """True for a valid tiny spec or an existing directory (config validation)."""
    if spec.startswith("tiny:"):
        try:
            parse_tiny_spec(spec)
        except ValueError:
            return False
        return True
    return Path(spec).is_dir()


def save_tiny(vlm: TinyVLM, path: str | Path) -> Path:
    """Save model, tokenizer (with template) and image processor to `path`; see load_tiny."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vlm.model.save_pretrained(path)
    vlm.tokenizer.save_pretrained(path)
    vlm.image_processor.save_pretrained(path)
    (path / "spyglass_tiny.json").write_text(json.dumps({"family": vlm.family}))
    return path


def load_tiny(path: str | Path) -> TinyVLM:
    """Load what save_tiny wrote (no network)."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
    path = Path(path)
    meta = path / "spyglass_tiny.json"
    if not meta.exists():
        raise FileNotFoundError(f"{path} is not a save_tiny directory (no spyglass_tiny.json)")
    family = json.loads(meta.read_text())["family"]
    model = _model_class(family).from_pretrained(path, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    improc = Qwen2VLImageProcessorPil.from_pretrained(path)
    return TinyVLM(family, model, tok, build_processor(family, tok, improc))


def build_tiny_text_lm(seed: int = 0) -> tuple[Any, Any]:
    """A seeded tiny text-only Qwen2ForCausalLM (hidden 128, 2 heads of head_dim 64, 2 layers)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = build_tokenizer()
    ids = special_ids(tok)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])
    model = _seeded(seed, lambda: Qwen2ForCausalLM(config)).float().eval()
    return model, tok


def save_tiny_text_lm(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny text Qwen2 and save it with its tokenizer (a directory vLLM can load)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, tok = build_tiny_text_lm(seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------- encoding
@dataclass
class ChatEncoding:
    """Prompt token ids with every image already expanded to its visual tokens."""

    input_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)  # in order of appearance


def image_token_count(image: Image.Image, image_processor: Any) -> int:
    """How many <|image_pad|> tokens `image` occupies: grid_h*grid_w / merge_size**2 (t = 1)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    w, h = image.size
    patches = image_processor.get_number_of_image_patches(h, w, {})
    return int(patches // image_processor.merge_size ** 2)


def _message_images(messages: list[dict[str, Any]]) -> list[Image.Image]:
    images = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image" or "image" in part:
                    img = part.get("image")
                    if not isinstance(img, Image.Image):
                        raise TypeError(f"image part must carry a PIL image under 'image', got "
                                        f"{type(img).__name__} in message role={m.get('role')!r}")
                    images.append(img)
    return images


def expand_image_pads(ids: list[int], images: list[Image.Image], tokenizer: Any,
                      image_processor: Any) -> list[int]:
    """Replace each single <|image_pad|> id with image_token_count(image) copies, in order."""
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_pads = ids.count(pad)
    if n_pads != len(images):
        raise ValueError(f"text has {n_pads} image placeholders but {len(images)} images were given")
    counts = iter([image_token_count(im, image_processor) for im in images])
    return list(itertools.chain.from_iterable([pad] * next(counts) if t == pad else [t] for t in ids))


def encode_chat(tokenizer: Any, image_processor: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True) -> ChatEncoding:
    """Render `messages` with the chat template and tokenize, expanding image placeholders.

    A message's content is a string or a list of parts {"type": "text", "text": ...} /
    {"type": "image", "image": PIL.Image}. Roles: system, user, assistant (optional
    `tool_calls`), tool."""
    if not messages:
        raise ValueError("messages is empty")
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    images = _message_images(messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatEncoding(expand_image_pads(ids, images, tokenizer, image_processor), images)


def encode_observation(tokenizer: Any, image_processor: Any, messages: list[dict[str, Any]],
                       add_generation_prompt: bool = True) -> ChatEncoding:
    """The token delta appended after a generated assistant turn that ended with <|im_end|>.

    `messages` are the new tool/user messages. The delta is the template's rendering of
    [..., assistant, *messages] minus its rendering up to the assistant turn, so prompt +
    generated tokens + delta equals what encode_chat would give for the whole conversation
    (the model's own tokens are never re-tokenized)."""
    if not messages:
        raise ValueError("messages is empty")
    anchor = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    head = tokenizer.apply_chat_template(anchor, tokenize=False, add_generation_prompt=False)
    full = tokenizer.apply_chat_template(anchor + list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if not full.startswith(head):
        raise ValueError("chat template is not prefix-stable; cannot compute an observation delta")
    # the generated turn already ends with <|im_end|>; the template adds "<|im_end|>\n" after it
    delta = full[len(head) - 1:] if head.endswith("\n") else full[len(head):]
    images = _message_images(messages)
    ids = tokenizer(delta, add_special_tokens=False)["input_ids"]
    return ChatEncoding(expand_image_pads(ids, images, tokenizer, image_processor), images)


def image_grid(image: Image.Image, image_processor: Any) -> tuple[int, int, int]:
    """(t, grid_h, grid_w) the processor gives `image` (its image_grid_thw row), from the size
    alone: no pixels are processed (what a prefix-cache hit needs for the images it reuses)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    w, h = image.size
    patch, merge = image_processor.patch_size, image_processor.merge_size
    rh, rw = smart_resize(h, w, patch * merge, min_pixels=image_processor.size["shortest_edge"],
                          max_pixels=image_processor.size["longest_edge"])
    return 1, rh // patch, rw // patch


def pixel_inputs(image_processor: Any, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """pixel_values [n_patches, C*T*P*P] and image_grid_thw [n_images, 3] for the model."""
    if not images:
        return {}
    out = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
