"""Chat codecs: how a conversation becomes token ids, and observations become token deltas.

The engine never re-tokenizes what the model generated: it keeps the sampled ids and appends
each observation as the chat template's token delta (the tokens the template would put between
the end of the assistant's turn and the start of the next assistant turn). A Codec owns that.

- ByteCodec: a self-contained Qwen-style template over UTF-8 bytes (ids 0..255) plus special
  tokens; used by the latency-modelled benchmarks and tests where no tokenizer is wanted.
- HFCodec: a checkpoint's own tokenizer and chat template (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
  Qwen2/Qwen3 text; the tiny fixtures carry templates of the same shapes); image tokens expanded
  per image size. Where the template has no tool role or ignores `tools`, the Qwen agent layout
  fills in (HFCodec's docstring).

ByteCodec uses the Qwen2.5-VL agent layout: tool results come back as a user turn wrapping
<tool_response>...</tool_response>, images as <|vision_start|><|image_pad|>*n<|vision_end|>.
The template-level helpers (encode_chat, encode_observation, image_token_count, image_grid,
pixel_inputs) work with any (tokenizer, Qwen-VL image processor) pair.
"""
from __future__ import annotations

import itertools
import json
import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence

from PIL import Image

DEFAULT_SYSTEM = (
    "You are a visual deep-search agent. Think inside <think></think>. Call a tool with "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>; images are named img_1, img_2, "
    "... in order of appearance. Give the final answer inside <answer></answer>.")


class Codec(Protocol):
    stop_token_ids: list[int]

    def encode_prompt(self, question: str, images: Sequence[Image.Image],
                      tools: Sequence[dict[str, Any]], system: str | None = None) -> list[int]: ...

    def encode_observation(self, text: str, images: Sequence[Image.Image], closed: bool,
                           first_image_index: int) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def image_pad_count(img: Image.Image, patch: int = 14, merge: int = 2,
                    max_pixels: int = 1024 * 28 * 28, min_pixels: int = 4 * 28 * 28) -> int:
    """Image tokens Qwen2-VL's processor gives an image: its smart resize to multiples of
    patch*merge within [min_pixels, max_pixels], then one token per merge x merge patches."""
    w, h = img.size
    f = patch * merge
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return (hb // patch) * (wb // patch) // (merge * merge)


def render_tools(tools: Sequence[dict[str, Any]]) -> str:
    import json
    if not tools:
        return ""
    lines = "\n".join(json.dumps(t, sort_keys=True, ensure_ascii=False) for t in tools)
    return f"\n\n# Tools\n<tools>\n{lines}\n</tools>"


@dataclass
class ByteCodec:
    """Qwen-style template over bytes: ids 0..255 are UTF-8 bytes, 256.. special tokens."""

    image_tokens: Callable[[Image.Image], int] = image_pad_count

    IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, EOS = range(256, 262)
    vocab_size: int = 262
    _NAMES: ClassVar[dict[int, str]] = {
        256: "<|im_start|>", 257: "<|im_end|>", 258: "<|vision_start|>", 259: "<|vision_end|>",
        260: "<|image_pad|>", 261: "<|endoftext|>"}
    _GEN_PROMPT: ClassVar[list[int]] = [256, *b"assistant\n"]
    _OBS_HEAD: ClassVar[list[int]] = [*b"\n", 256, *b"user\n<tool_response>\n"]
    _OBS_TAIL: ClassVar[list[int]] = [*b"\n</tool_response>", 257, *b"\n", 256, *b"assistant\n"]
    _system_turns: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False,
                                                compare=False)  # encoded system turns

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.IM_END, self.EOS]

    def encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _image(self, img: Image.Image) -> list[int]:
        return [self.VISION_START] + [self.IMAGE_PAD] * self.image_tokens(img) + [self.VISION_END]

    def _turn(self, role: str, body: list[int]) -> list[int]:
        return [self.IM_START] + self.encode_text(role + "\n") + body + [self.IM_END] + self.encode_text("\n")

    def encode_prompt(self, question: str, images: Sequence[Image.Image],
                      tools: Sequence[dict[str, Any]], system: str | None = None) -> list[int]:
        system = (system or DEFAULT_SYSTEM) + render_tools(tools)
        head = self._system_turns.get(system)
        if head is None:  # every prompt of a run shares its system turn: encode it once
            if len(self._system_turns) >= 64:
                self._system_turns.clear()
            head = self._system_turns[system] = self._turn("system", self.encode_text(system))
        body: list[int] = []
        for im in images:
            body += self._image(im)
        return head + self._turn("user", body + self.encode_text(question)) + self._GEN_PROMPT

    def encode_observation(self, text: str, images: Sequence[Image.Image], closed: bool,
                           first_image_index: int = 1) -> list[int]:
        # the template's pieces around the text are constant: "\n" <|im_start|>user\n
        # <tool_response>\n TEXT IMAGES \n</tool_response><|im_end|>\n <|im_start|>assistant\n
        ids = self._OBS_HEAD.copy() if closed else [self.IM_END] + self._OBS_HEAD
        ids += text.encode("utf-8")
        for im in images:
            ids += self._image(im)
        ids += self._OBS_TAIL
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if type(ids) is not list and type(ids) is not tuple:  # bytes() of an array reads its raw buffer
            ids = ids.tolist() if isinstance(ids, array) else list(ids)
        end = ""
        if ids and ids[-1] >= 256:  # the usual turn: text, then a stop token
            end = self._NAMES.get(ids[-1]) or f"<|{ids[-1]}|>"
            ids = ids[:-1]
        try:
            return bytes(ids).decode("utf-8", errors="replace") + end  # only byte tokens
        except ValueError:
            pass
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i < 0:
                raise ValueError(f"token id must be >= 0, got {i}")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            out.append(self._NAMES.get(i, f"<|{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out) + end


def _obs_content(text: str, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}] + [{"type": "image", "image": im} for im in images]


# ------------------------------------------------------------------------ template-level encoding
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


def image_grid(image: Image.Image, image_processor: Any) -> tuple[int, int, int]:
    """(t, grid_h, grid_w) the processor gives `image` (its image_grid_thw row), from the size
    alone: no pixels are processed (what a prefix-cache hit needs for the images it reuses)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    w, h = image.size
    patch, merge = image_processor.patch_size, image_processor.merge_size
    rh, rw = smart_resize(h, w, patch * merge, min_pixels=image_processor.size["shortest_edge"],
                          max_pixels=image_processor.size["longest_edge"])
    return 1, rh // patch, rw // patch


def pixel_inputs(image_processor: Any, images: list[Image.Image]) -> dict[str, Any]:
    """pixel_values [n_patches, C*T*P*P] and image_grid_thw [n_images, 3] for the model."""
    if not images:
        return {}
    out = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def _message_images(messages: Sequence[dict[str, Any]]) -> list[Image.Image]:
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


def expand_image_pads(ids: list[int], images: Sequence[Image.Image], tokenizer: Any,
                      image_processor: Any) -> list[int]:
    """Replace each single <|image_pad|> id with image_token_count(image) copies, in order."""
    if not images:
        return ids
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_pads = ids.count(pad)
    if n_pads != len(images):
        raise ValueError(f"text has {n_pads} image placeholders but {len(images)} images were given")
    counts = iter([image_token_count(im, image_processor) for im in images])
    return list(itertools.chain.from_iterable([pad] * next(counts) if t == pad else [t] for t in ids))


def encode_chat(tokenizer: Any, image_processor: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True) -> ChatEncoding:
    """Render `messages` with the tokenizer's chat template and tokenize, expanding image
    placeholders. A content is a string or a list of parts {"type": "text", "text": ...} /
    {"type": "image", "image": PIL.Image}."""
    if not messages:
        raise ValueError("messages is empty")
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    images = _message_images(messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatEncoding(expand_image_pads(ids, images, tokenizer, image_processor), images)


_SENTINEL = "SPYGLASS-ASSISTANT-TURN-7f3a"


def encode_observation(tokenizer: Any, image_processor: Any, messages: list[dict[str, Any]],
                       add_generation_prompt: bool = True, stop: str = "<|im_end|>") -> ChatEncoding:
    """The token delta the template puts after an assistant turn that ended with `stop`, for the
    new (tool/user) `messages`: the rendering of [user, assistant, *messages] after the
    assistant's content and its `stop`. So prompt + generated tokens + delta equals what
    encode_chat gives for the whole conversation (the model's own tokens are never
    re-tokenized), whatever the template does around the assistant turn (Qwen3's think block)."""
    if not messages:
        raise ValueError("messages is empty")
    anchor = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    full = tokenizer.apply_chat_template(anchor + list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    at = full.find(_SENTINEL)
    after = full[at + len(_SENTINEL):] if at >= 0 else ""
    if not after.startswith(stop):
        raise ValueError(f"the chat template does not end an assistant turn with {stop!r} right after its "
                         f"content; cannot compute an observation delta")
    images = _message_images(messages)
    ids = tokenizer(after[len(stop):], add_special_tokens=False)["input_ids"]
    return ChatEncoding(expand_image_pads(ids, images, tokenizer, image_processor), images)


def render_tool_block(tools: Sequence[dict[str, Any]]) -> str:
    """The Qwen agent (Hermes) tool block appended to the system prompt, as Qwen2.5's and
    Qwen3's own templates write it; used for a template that does not render `tools`."""
    lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
            "\"arguments\": <args-json-object>}\n</tool_call>")


def _template_traits(tokenizer: Any) -> tuple[bool, bool]:
    """(renders `tools` itself, renders role "tool" as Qwen's <tool_response> user turn)."""
    probe = {"type": "function", "function": {"name": "spyglass_probe_tool", "parameters": {"type": "object"}}}
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
            {"role": "tool", "content": "spyglass-probe-result"}]
    try:
        with_tools = tokenizer.apply_chat_template(msgs[:1], tools=[probe], tokenize=False)
    except Exception:  # a template that raises on `tools`
        with_tools = ""
    try:
        tool_turn = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # a template that raises on the tool role
        tool_turn = ""
    return "spyglass_probe_tool" in with_tools, "<tool_response>\nspyglass-probe-result" in tool_turn


class HFCodec:
    """A checkpoint's tokenizer and chat template (plus, for a VL model, its image processor,
    which fixes how many pad tokens an image takes). The template decides every token; where it
    lacks a feature the Qwen agent layout fills in: a template that ignores `tools` (Qwen2-VL,
    Qwen2.5-VL) gets the Hermes tool block appended to the system prompt, and one without a
    tool role (the same) gets tool results as a user turn wrapping <tool_response>...
    </tool_response> (what Qwen2.5's and Qwen3's templates render for role "tool"). A text-only
    model (no image processor) takes no images: contents are plain strings."""

    def __init__(self, tokenizer: Any, image_processor: Any = None, system: str | None = None) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.system = system
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        unk = getattr(tokenizer, "unk_token_id", None)
        self.stop_token_ids = list(dict.fromkeys(i for i in ids if i is not None and i != unk))
        if not self.stop_token_ids:
            raise ValueError("tokenizer has no <|im_end|>/<|endoftext|> token to stop turns on")
        self.stop_text = tokenizer.convert_ids_to_tokens(self.stop_token_ids[0])
        self.template_tools, self.template_tool_role = _template_traits(tokenizer)

    @classmethod
    def from_model(cls, loaded: Any, system: str | None = None) -> "HFCodec":
        """From a loader.LoadedModel (its tokenizer and image processor)."""
        return cls(loaded.tokenizer, loaded.image_processor, system)

    @property
    def takes_images(self) -> bool:
        return self.image_processor is not None

    def image_tokens(self, img: Image.Image) -> int:
        return image_token_count(img, self.image_processor) if self.image_processor else 0

    def _content(self, text: str, images: Sequence[Image.Image], images_first: bool) -> Any:
        if not images:
            return text if not self.takes_images else [{"type": "text", "text": text}]
        if not self.takes_images:
            raise ValueError(f"this model is text-only (no image processor) but {len(images)} image(s) were given")
        parts = [{"type": "image", "image": im} for im in images]
        return parts + [{"type": "text", "text": text}] if images_first else \
            [{"type": "text", "text": text}] + parts

    def system_message(self, system: str | None, tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
        text = system or self.system or DEFAULT_SYSTEM
        if tools and not self.template_tools:
            text += render_tool_block(tools)
        return {"role": "system", "content": text}

    def tool_message(self, text: str, images: Sequence[Image.Image]) -> dict[str, Any]:
        """A tool result (text, then its images) as the template wants it (the class docstring)."""
        return self.tool_message_parts([{"type": "text", "text": text}] + [{"type": "image", "image": im} for im in images])

    def tool_message_parts(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """A tool result given as content parts (text and images in any order)."""
        return self._turn("tool", parts)

    def user_message_parts(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return self._turn("user", parts)

    def _turn(self, role: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        images = [p for p in parts if p.get("type") == "image"]
        if images and not self.takes_images:
            raise ValueError(f"this model is text-only (no image processor) but {len(images)} image(s) were given")
        if role == "tool" and not self.template_tool_role:  # the Qwen agent layout
            role, parts = "user", [{"type": "text", "text": "<tool_response>\n"}, *parts,
                                   {"type": "text", "text": "\n</tool_response>"}]
        if not self.takes_images:
            return {"role": role, "content": "".join(p["text"] for p in parts)}
        return {"role": role, "content": parts}

    def _messages(self, question: str, images: Sequence[Image.Image], system: str | None,
                  tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.system_message(system, tools),
                {"role": "user", "content": self._content(question, images, images_first=True)}]

    def _tools_arg(self, tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
        return list(tools) if tools and self.template_tools else None

    def encode_messages(self, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] = (),
                        add_generation_prompt: bool = True) -> ChatEncoding:
        """A whole conversation (messages already in this codec's layout, e.g. from
        system_message / tool_message) through the template."""
        return encode_chat(self.tokenizer, self.image_processor, messages, tools=self._tools_arg(tools),
                           add_generation_prompt=add_generation_prompt)

    def encode_delta(self, messages: list[dict[str, Any]], closed: bool = True) -> ChatEncoding:
        """The token delta after an assistant turn for new messages (see encode_observation);
        `closed=False`: the turn did not end with the turn's end token, which the delta then begins with."""
        enc = encode_observation(self.tokenizer, self.image_processor, messages, stop=self.stop_text)
        if not closed:
            enc.input_ids = [self.stop_token_ids[0], *enc.input_ids]
        return enc

    def encode_prompt(self, question: str, images: Sequence[Image.Image],
                      tools: Sequence[dict[str, Any]], system: str | None = None) -> list[int]:
        return self.encode_messages(self._messages(question, images, system, tools), tools).input_ids

    def encode_observation(self, text: str, images: Sequence[Image.Image], closed: bool,
                           first_image_index: int = 1) -> list[int]:
        return self.encode_delta([self.tool_message(text, images)], closed).input_ids

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def retokenize(self, question: str, images: Sequence[Image.Image], tools: Sequence[dict[str, Any]],
                   turns: Sequence[tuple[str, str | None, Sequence[Image.Image]]],
                   system: str | None = None) -> list[int]:
        """A fresh tokenization of the whole conversation: (assistant text without its stop
        token, observation text or None, observation images) per turn."""
        msgs = self._messages(question, images, system, tools)
        for said, obs, obs_images in turns:
            msgs.append({"role": "assistant", "content": said})
            if obs is not None:
                msgs.append(self.tool_message(obs, obs_images))
        last_is_obs = bool(turns) and turns[-1][1] is not None
        ids = self.encode_messages(msgs, tools, add_generation_prompt=last_is_obs or not turns).input_ids
        if turns and not last_is_obs:  # the run ends on the model's stop token, not the template's "\n"
            while ids and ids[-1] not in self.stop_token_ids:
                ids.pop()
        return ids
