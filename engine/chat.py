"""Chat codecs: how a conversation becomes token ids, and observations become token deltas.

The engine never re-tokenizes what the model generated: it keeps the sampled ids and appends
each observation as the chat template's token delta (the tokens the template would put between
the end of the assistant's turn and the start of the next assistant turn). A Codec owns that.

- ByteCodec: a self-contained Qwen-style template over UTF-8 bytes (ids 0..255) plus special
  tokens; used by the latency-modelled benchmarks and tests where no tokenizer is wanted.
- HFCodec: any Hugging Face tokenizer with a Qwen-style chat template (the tiny VLMs in
  engine/offline/tiny.py, or a real Qwen2.5-VL tokenizer); image tokens expanded per image size.

Both use the Qwen2.5-VL agent layout: tool results come back as a user turn wrapping
<tool_response>...</tool_response>, images as <|vision_start|><|image_pad|>*n<|vision_end|>.
"""
from __future__ import annotations

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


class HFCodec:
    """A Hugging Face tokenizer with a Qwen-style chat template (engine/offline/tiny.py's or a real
    Qwen2.5-VL one) plus its image processor, which fixes how many pad tokens an image takes."""

    def __init__(self, tokenizer: Any, image_processor: Any = None, system: str | None = None) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.system = system
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        unk = getattr(tokenizer, "unk_token_id", None)
        self.stop_token_ids = [i for i in ids if i is not None and i != unk]
        if not self.stop_token_ids:
            raise ValueError("tokenizer has no <|im_end|>/<|endoftext|> token to stop turns on")

    @classmethod
    def from_tiny(cls, vlm: Any, system: str | None = None) -> "HFCodec":
        return cls(vlm.tokenizer, vlm.image_processor, system)

    def image_tokens(self, img: Image.Image) -> int:
        from .offline.tiny import image_token_count  # noqa: PLC0415
        return image_token_count(img, self.image_processor) if self.image_processor else 0

    def _messages(self, question: str, images: Sequence[Image.Image],
                  system: str | None) -> list[dict[str, Any]]:
        user = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": question}]
        return [{"role": "system", "content": system or self.system or DEFAULT_SYSTEM},
                {"role": "user", "content": user}]

    def encode_prompt(self, question: str, images: Sequence[Image.Image],
                      tools: Sequence[dict[str, Any]], system: str | None = None) -> list[int]:
        from .offline.tiny import encode_chat  # noqa: PLC0415
        return encode_chat(self.tokenizer, self.image_processor, self._messages(question, images, system),
                           tools=list(tools) or None).input_ids

    def encode_observation(self, text: str, images: Sequence[Image.Image], closed: bool,
                           first_image_index: int = 1) -> list[int]:
        from .offline.tiny import encode_observation  # noqa: PLC0415
        ids = encode_observation(self.tokenizer, self.image_processor,
                                 [{"role": "tool", "content": _obs_content(text, images)}]).input_ids
        return ids if closed else [self.stop_token_ids[0]] + ids

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def retokenize(self, question: str, images: Sequence[Image.Image], tools: Sequence[dict[str, Any]],
                   turns: Sequence[tuple[str, str | None, Sequence[Image.Image]]],
                   system: str | None = None) -> list[int]:
        """A fresh tokenization of the whole conversation: (assistant text without its stop
        token, observation text or None, observation images) per turn."""
        from .offline.tiny import encode_chat  # noqa: PLC0415
        msgs = self._messages(question, images, system)
        for said, obs, obs_images in turns:
            msgs.append({"role": "assistant", "content": said})
            if obs is not None:
                msgs.append({"role": "tool", "content": _obs_content(obs, obs_images)})
        last_is_obs = bool(turns) and turns[-1][1] is not None
        ids = encode_chat(self.tokenizer, self.image_processor, msgs, tools=list(tools) or None,
                          add_generation_prompt=last_is_obs or not turns).input_ids
        if turns and not last_is_obs:  # the run ends on the model's stop token, not the template's "\n"
            while ids and ids[-1] not in self.stop_token_ids:
                ids.pop()
        return ids
