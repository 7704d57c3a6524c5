"""Observation assembly: a turn's tool results -> the text and images the model sees next.

Results keep their order. Images are kept within two budgets: max_images_per_obs per
observation and max_image_tokens in the whole context; an image the model's processor cannot
size (a 1-pixel-high crop) is omitted, and once one image is omitted every later one is too, so
names stay in order. Kept images the runner did not name are named img_N after the context's
images; every omission is said in the text. Then the observation hooks run in order, each
`hook(traj, text) -> text` (recitation is one: `recite_question`), and the codec encodes the
text and images as the chat template's tool turn.

    obs = ObservationBuilder(codec, image_tokens, max_images=4, max_image_tokens=32768,
                             hooks=[recite_question])
    o = obs.build(results, traj, n_images=lv.n_images, image_tokens=lv.image_tokens)
    o.text, o.images, o.token_ids, o.image_tokens   # image_tokens: the context's, after it
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from PIL import Image

from ..trajectory import ToolResult, Trajectory, Turn

ObservationHook = Callable[[Trajectory, str], str]


def recite_question(traj: Trajectory, text: str) -> str:
    """Recitation: the observation ends with "Question: <the prompt's question>", so the task
    stays in the recent context (for a small model the question is hundreds of tokens back by
    the last tool call). A model must be trained and evaluated the same way."""
    return f"{text}\nQuestion: {traj.prompt_messages[0]['content']}"


def unparsed_call_results(turn: Turn) -> list[ToolResult]:
    """A bad-arguments result for each call of `turn` that did not parse (answered after the
    calls that ran)."""
    return [ToolResult(f"Error in tool call {e.get('index', '?')}: {e.get('message', e.get('kind'))}",
                       error="bad_args") for e in turn.parse_errors]


def format_error_result(errors: list[dict[str, Any]]) -> ToolResult:
    """The observation of a turn with no call and no answer: the parser's errors, or the rule."""
    msg = "; ".join(e.get("message", e.get("kind", "")) for e in errors) or (
        "no <tool_call> and no <answer> in this turn")
    return ToolResult(f"Error: {msg}", error="bad_args")


@dataclass(slots=True)
class Observation:
    text: str
    images: list[Image.Image]
    token_ids: Any  # the codec's ids of the tool turn (the segment converts them)
    image_tokens: int  # image tokens in the context after this observation


class ObservationBuilder:
    """Builds observations (see the module docstring)."""

    def __init__(self, codec: Any, image_tokens: Callable[[Image.Image], int], max_images: int,
                 max_image_tokens: int, hooks: Sequence[ObservationHook] = ()) -> None:
        self.codec, self.image_tokens = codec, image_tokens
        self.max_images, self.max_image_tokens = max_images, max_image_tokens
        self.hooks = list(hooks)
        self._end_id = codec.stop_token_ids[0]  # the turn's own end token

    def build(self, results: Sequence[ToolResult], traj: Trajectory, n_images: int,
              image_tokens: int) -> Observation:
        """The observation of `results` after `traj`'s last turn, whose context holds `n_images`
        images worth `image_tokens` tokens."""
        texts, images = [], []
        spent = False  # once an image is dropped, every later one is too: names stay in order
        for o in results:
            if not o.images:  # the usual observation: its text as it is
                texts.append(o.shown)
                continue
            keep, dropped, unusable = [], [], []
            for k, im in enumerate(o.images):
                ref = o.image_refs[k] if o.image_refs else "an image"
                try:
                    cost = self.image_tokens(im)
                except ValueError as e:  # the model's processor cannot take it
                    unusable.append(f"{ref} ({im.width}x{im.height}: {e})")
                    spent = True
                    continue
                if spent or len(images) + len(keep) >= self.max_images or \
                        image_tokens + cost > self.max_image_tokens:
                    dropped.append(ref)
                    spent = True
                    continue
                image_tokens += cost
                keep.append(im)
            text = o.shown
            if keep and o.image_refs is None:  # the runner left naming to the engine
                names = ", ".join(f"img_{n_images + len(images) + i + 1}" for i in range(len(keep)))
                text += f" [new images: {names}]"
            if unusable:
                text += f" ({'; '.join(unusable)} omitted: the model cannot take it)"
            if dropped:
                text += (f" ({', '.join(dropped)} omitted: the image budget is spent or an earlier"
                         " image was omitted; omitted images cannot be referenced)")
            images += keep
            texts.append(text)
        text = "\n".join(texts)
        for hook in self.hooks:
            text = hook(traj, text)
        last = traj.segments[-1].token_ids
        closed = bool(last) and last[-1] == self._end_id  # ended by the turn's own end token
        #   (a turn ended by another stop, e.g. <|endoftext|>, keeps it and gets <|im_end|> after it)
        ids = self.codec.encode_observation(text, images, closed, n_images + 1)
        return Observation(text, images, ids, image_tokens)
