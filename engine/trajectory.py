"""The Trajectory record: the one record every stage of spyglass passes along.

A trajectory is the prompt's token ids (and images) followed by segments, each either
model-generated (token ids, the logprobs they were sampled with, the policy version that
sampled them) or an observation (token ids of the chat template's tool turn, and its images).
The token ids are the truth: generated text is never re-tokenized, observations are appended as
token deltas, so training sees exactly what sampling saw. Text fields are for people only.
Token ids and logprobs are stored as compact arrays (array('I'), array('d')): 4 bytes a token,
and invisible to Python's cyclic GC, so ten thousand live 64K-token trajectories neither fill
memory with int objects nor stall the event loop in garbage collection.

Per-turn records (Turn) hold what the parser and the tools said about each assistant step; the
fatal step (OpenSearch-VL Sec. 4.2) is derived from them: the first step of the first run of K
consecutive error steps (the cascade). Only a cascade is fatal: a run that stopped without an
answer for another reason (max turns, context, timeout, repetition, an engine error) has no
fatal step; it is an anomaly, which the trainer penalises or masks (AlgoConfig.anomalies).
Which steps are error steps (FATAL_ERRORS, EngineConfig.fatal_errors: the engine's cascade and
the fatal step agree): "any" step that is not ok (a tool failed, a call was malformed or
unterminated, or the step neither called nor answered: the paper's count), or only "tool" steps,
where a called tool failed (or a custom environment said the step was not ok); there a step that
failed on its own (a malformed or runaway turn) neither counts nor resets, so the model's own
loops are not cascades: they run on to max_turns or the repetition detector.

    traj.loss_mask()              # [prompt + segments] 1 where the policy sampled the token
    traj.loss_mask(fatal=True)    # ... and the token's step precedes the fatal step
    write_jsonl(path, trajs); read_jsonl(path)   # lossless, images as PNG base64
    traj.messages()               # OpenAI-style chat view for people

The records that lead into a trajectory live here too: the dataset item (Prompt), what the
parser made of a turn (ParsedTurn), what a tool call produced (ToolResult, from the tool through
the runner to the observation; ToolOutcome builds one the engine's former way), and a custom
environment's answer to a turn (EnvStep).
"""
from __future__ import annotations

import base64
import enum
from array import array
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

FORMAT_VERSION = 1
FATAL_ERRORS = ("any", "tool")  # which steps count toward the fatal cascade (module docstring)


class Status(str, enum.Enum):
    """Where a trajectory stands. Only RUNNING is not terminal."""

    RUNNING = "running"
    ANSWERED = "answered"  # gave a final <answer>/<response>
    TRUNCATED = "truncated"  # hit max turns / context / time without answering
    INTERRUPTED = "interrupted"  # stopped by a detector (repetition) or aborted for good
    FATAL = "fatal"  # K consecutive tool/format errors: the cascade
    ERROR = "error"  # the engine could not go on (backend gone, bad prompt)


class SegmentKind(str, enum.Enum):
    GEN = "gen"
    OBS = "obs"


# ----------------------------------------------------------------------------- the records leading in
@dataclass
class Prompt:
    """One dataset item: a question with its images; `meta` travels to the reward."""

    id: str
    question: str
    images: list[Image.Image] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[str] | None = None  # this item's tool names (None: every tool of the engine)
    system: str | None = None  # this item's system prompt (None: the codec's)


@dataclass
class ParsedTurn:
    """What the parser made of one assistant turn."""

    calls: list[dict[str, Any]]  # {"name", "arguments" (canonical JSON)}
    errors: list[dict[str, Any]]  # {"kind", "message", ...}
    answer: str | None


class ErrorKind(str, enum.Enum):
    """How a tool failure is treated (engine/tools/base.py): bad_args -- the call was wrong, the
    model is told; transient -- the world failed, retried; fatal -- the tool could not run."""

    BAD_ARGS = "bad_args"
    TRANSIENT = "transient"
    FATAL = "fatal"


class ToolError(Exception):
    """A classified tool failure; its message is shown to the model as the observation."""

    def __init__(self, kind: ErrorKind | str, message: str, tool: str = "") -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        self.tool = tool

    def __repr__(self) -> str:
        return f"ToolError({self.kind.value}, {self.tool!r}, {self.message!r})"


@dataclass
class ToolResult:
    """What one tool call produced, from the tool to the trajectory: text and/or new images, or
    an error.

    A tool returns its images unpublished; the runner that hands results to the engine sets
    `image_refs` to the names it already gave them in `text` (None: the engine names them
    img_N). `error` may be given as a kind (ErrorKind or its value): it becomes a ToolError whose
    message is `text`. What the model is shown is `shown`: the text, or for an error without
    text (a tool's own ToolResult.fail) "Error (<kind>): <message>"."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    error: ToolError | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. which backend ran, cache hit
    image_refs: list[str] | None = None  # names the runner already gave `images` in `text`

    def __post_init__(self) -> None:
        if self.error is not None and not isinstance(self.error, ToolError):
            self.error = ToolError(self.error, self.text)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_kind(self) -> str | None:
        """bad_args | transient | fatal, or None for a result that is not an error."""
        return None if self.error is None else self.error.kind.value

    @property
    def shown(self) -> str:
        """The observation text the model is shown for this call."""
        e = self.error
        if e is None or self.text or not e.message:
            return self.text
        return f"Error ({e.kind.value}): {e.message}"

    @classmethod
    def fail(cls, kind: ErrorKind | str, message: str, tool: str = "") -> "ToolResult":
        return cls(error=ToolError(kind, message, tool))


def ToolOutcome(text: str, images: list[Image.Image] | None = None,  # noqa: N802 - the former record's name
                error_kind: ErrorKind | str | None = None, image_refs: list[str] | None = None) -> ToolResult:
    """A ToolResult built as the engine's former ToolOutcome record was: the observation `text`
    (and images), and with `error_kind` an error of that kind whose message is `text`."""
    return ToolResult(text, images if images is not None else [], error_kind, image_refs=image_refs)


@dataclass
class EnvStep:
    """A custom environment's answer to one assistant turn (Engine(env=...))."""

    observation: str = ""  # the next observation shown to the model (when not done)
    images: list[Image.Image] = field(default_factory=list)  # images of that observation
    done: bool = False  # the episode ends with this turn
    reward: float | None = None  # when done: written to traj.reward["total"]
    answer: str | None = None  # when done: the final answer (None: the turn's own <answer>)
    ok: bool = True  # the step counts as well-formed (r_fmt and the K-error cascade)


def _img_to_json(img: Image.Image) -> dict[str, Any]:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless for every mode PIL can write to PNG
    return {"png_b64": base64.b64encode(buf.getvalue()).decode("ascii"), "mode": img.mode}


def _img_from_json(d: dict[str, Any]) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(d["png_b64"])))
    img.load()
    return img.convert(d["mode"]) if img.mode != d.get("mode", img.mode) else img


@dataclass
class Segment:
    """A run of tokens: generated by the policy (GEN) or appended as an observation (OBS)."""

    kind: SegmentKind
    token_ids: array  # array('I'); any int sequence is converted
    turn: int  # the assistant step this segment belongs to (observations: the step they answer)
    logprobs: array | None = None  # GEN: array('d') of sampled logprobs, one per token
    version: int | None = None  # GEN: policy version that sampled these tokens
    images: list[Image.Image] = field(default_factory=list)  # OBS: images the tool returned
    text: str = ""  # for people: decoded text (GEN) or the observation text (OBS)
    finish_reason: str = ""  # GEN: stop | length | abort

    def __post_init__(self) -> None:
        if type(self.kind) is not SegmentKind:
            self.kind = SegmentKind(self.kind)
        self.token_ids = as_ids(self.token_ids)
        if self.logprobs is not None:
            self.logprobs = array("d", self.logprobs)
        if self.kind is SegmentKind.GEN:
            if self.logprobs is None or len(self.logprobs) != len(self.token_ids):
                n = None if self.logprobs is None else len(self.logprobs)
                raise ValueError(f"GEN segment of {len(self.token_ids)} tokens has {n} logprobs")
            if self.version is None:
                raise ValueError("GEN segment needs the policy version that sampled it")
        elif self.logprobs is not None:
            raise ValueError("OBS segment cannot carry logprobs")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind.value, "token_ids": self.token_ids.tolist(),
                             "turn": self.turn}
        if self.kind is SegmentKind.GEN:
            assert self.logprobs is not None
            d.update(logprobs=self.logprobs.tolist(), version=self.version,
                     finish_reason=self.finish_reason)
        if self.images:
            d["images"] = [_img_to_json(im) for im in self.images]
        d["text"] = self.text
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Segment":
        return cls(kind=SegmentKind(d["kind"]), token_ids=d["token_ids"], turn=d["turn"],
                   logprobs=d.get("logprobs"), version=d.get("version"),
                   images=[_img_from_json(x) for x in d.get("images", [])],
                   text=d.get("text", ""), finish_reason=d.get("finish_reason", ""))


@dataclass
class Turn:
    """What happened in one assistant step: parsed calls, errors, timings (seconds)."""

    index: int
    calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments"} canonical
    parse_errors: list[dict[str, Any]] = field(default_factory=list)  # {"kind", "message", ...}
    tool_errors: list[dict[str, Any]] = field(default_factory=list)  # {"name", "kind", "message"}
    answered: bool = False
    queue_s: float = 0.0  # waiting for a generation slot
    gen_s: float = 0.0
    tool_s: float = 0.0
    gen_tokens: int = 0
    obs_tokens: int = 0
    env_ok: bool | None = None  # a custom environment's verdict on the step (Engine(env=...)); None: none

    def cascade_flag(self, errors: str = "any") -> bool | None:
        """This step in the cascade's count (FATAL_ERRORS `errors`): True a success (resets the
        count), False an error step, None neither ("tool": not ok, but no called tool failed: a
        malformed or unterminated call, no call and no answer). A custom environment's verdict
        (EnvStep.ok) counts as given under both."""
        if errors not in FATAL_ERRORS:
            raise ValueError(f"errors must be one of {FATAL_ERRORS}, got {errors!r}")
        if errors == "tool" and not self.ok and not self.tool_errors and self.env_ok is None:
            return None
        return self.ok

    @property
    def ok(self) -> bool:
        """Well-formed and every tool ran: 1 in r_fmt; otherwise an error step for the cascade.

        A step with no call and no answer is a format error. Under a custom environment its
        verdict (EnvStep.ok) decides."""
        if self.env_ok is not None:
            return self.env_ok
        if self.parse_errors or self.tool_errors:
            return False
        return bool(self.calls) or self.answered


@dataclass
class Trajectory:
    """One rollout of one prompt; `group_id` ties the n samples of a prompt together."""

    id: str
    group_id: str
    sample_index: int
    prompt_ids: array  # array('I'); any int sequence is converted
    prompt_images: list[Image.Image] = field(default_factory=list)
    prompt_messages: list[dict[str, Any]] = field(default_factory=list)  # the chat, for people
    segments: list[Segment] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    status: Status = Status.RUNNING
    stop_reason: str = ""  # e.g. "answer", "max_turns", "max_context", "timeout", "repetition"
    fatal_step: int | None = None
    answer: str | None = None
    reward: dict[str, Any] = field(default_factory=dict)  # components: fmt, acc, query, total, judge
    meta: dict[str, Any] = field(default_factory=dict)  # dataset fields: question, answers, ...
    started_at: float = 0.0
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        if type(self.status) is not Status:
            self.status = Status(self.status)
        self.prompt_ids = as_ids(self.prompt_ids)

    # -- token views ---------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(s.token_ids) for s in self.segments)

    def token_ids(self) -> list[int]:
        """The whole context, prompt then every segment, exactly as the backend saw it."""
        return self.token_array().tolist()

    def token_array(self) -> array:
        """token_ids() as one array('I'): what the engine hands backends (no list of ints)."""
        out = array("I", self.prompt_ids)
        for s in self.segments:
            out.extend(s.token_ids)
        return out

    def images(self) -> list[Image.Image]:
        """The active visual context in order: img_1 (prompt) .. img_N."""
        out = list(self.prompt_images)
        for s in self.segments:
            out.extend(s.images)
        return out

    def loss_mask(self, fatal: bool = False) -> list[int]:
        """1 for tokens the policy sampled; with fatal=True also only before the fatal step."""
        cut = self.fatal_step if (fatal and self.fatal_step is not None) else None
        out = [0] * len(self.prompt_ids)
        for s in self.segments:
            on = s.kind is SegmentKind.GEN and (cut is None or s.turn < cut)
            out.extend([1 if on else 0] * len(s.token_ids))
        return out

    def logprobs(self) -> list[float]:
        """Sampled logprobs aligned with token_ids(); 0.0 where the policy did not sample."""
        out = [0.0] * len(self.prompt_ids)
        for s in self.segments:
            out.extend(s.logprobs.tolist() if s.logprobs is not None else [0.0] * len(s.token_ids))
        return out

    def versions(self) -> list[int]:
        return [s.version for s in self.segments if s.kind is SegmentKind.GEN]

    # -- the fatal step ------------------------------------------------------------------
    def compute_fatal_step(self, k: int = 3, errors: str = "any") -> int | None:
        """First step of the first run of k consecutive error steps (a success resets the
        count; `errors`, one of FATAL_ERRORS, says which steps are error steps), or None: only a
        cascade is fatal (see the module docstring)."""
        if errors not in FATAL_ERRORS:
            raise ValueError(f"errors must be one of {FATAL_ERRORS}, got {errors!r}")
        return fatal_step_of([t.cascade_flag(errors) for t in self.turns], k=k)

    def is_done(self) -> bool:
        return self.status is not Status.RUNNING

    # -- people's view -------------------------------------------------------------------
    def messages(self) -> list[dict[str, Any]]:
        """OpenAI-style chat: the prompt messages, then assistant / tool turns as text."""
        msgs = [dict(m) for m in self.prompt_messages]
        n_img = len(self.prompt_images)
        for s in self.segments:
            if s.kind is SegmentKind.GEN:
                msgs.append({"role": "assistant", "content": s.text})
            else:
                names = [f"img_{n_img + i + 1}" for i in range(len(s.images))]
                n_img += len(s.images)
                m: dict[str, Any] = {"role": "tool", "content": s.text}
                if names:
                    m["images"] = names
                msgs.append(m)
        return msgs

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "id": self.id, "group_id": self.group_id,
            "sample_index": self.sample_index, "prompt_ids": self.prompt_ids.tolist(),
            "prompt_images": [_img_to_json(im) for im in self.prompt_images],
            "prompt_messages": self.prompt_messages,
            "segments": [s.to_json() for s in self.segments],
            "turns": [asdict(t) for t in self.turns],
            "status": self.status.value, "stop_reason": self.stop_reason,
            "fatal_step": self.fatal_step, "answer": self.answer, "reward": self.reward,
            "meta": self.meta, "started_at": self.started_at, "finished_at": self.finished_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Trajectory":
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"trajectory format {d.get('format')!r} is not {FORMAT_VERSION}")
        return cls(
            id=d["id"], group_id=d["group_id"], sample_index=d["sample_index"],
            prompt_ids=d["prompt_ids"],
            prompt_images=[_img_from_json(x) for x in d["prompt_images"]],
            prompt_messages=d["prompt_messages"],
            segments=[Segment.from_json(s) for s in d["segments"]],
            turns=[Turn(**t) for t in d["turns"]], status=Status(d["status"]),
            stop_reason=d["stop_reason"], fatal_step=d["fatal_step"], answer=d["answer"],
            reward=d["reward"], meta=d["meta"], started_at=d["started_at"],
            finished_at=d["finished_at"])


def as_ids(ids: Any) -> array:
    """Token ids as array('I') (copied; one C-level pass that rejects non-ints and negatives)."""
    try:
        return array("I", ids)
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be ints in [0, 2**32): {e}") from None


def fatal_step_of(step_ok: list[bool | None], k: int = 3) -> int | None:
    """The fatal step from per-step flags (see Trajectory.compute_fatal_step): True a success,
    False an error step, None a step that neither counts nor resets (the run's first error step
    is then the fatal step)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    run, first = 0, 0
    for i, ok in enumerate(step_ok):
        if ok is None:
            continue
        if ok:
            run = 0
            continue
        first = i if run == 0 else first
        run += 1
        if run == k:
            return first
    return None


def write_jsonl(path: str | Path, trajs: Iterable[Trajectory], append: bool = True) -> int:
    """Append trajectories to a JSONL file, flushed and fsynced; returns how many were written."""
    lines = [json.dumps(t.to_json(), ensure_ascii=False, allow_nan=False) + "\n" for t in trajs]
    n = len(lines)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.write("".join(lines))  # one write: a crash leaves at most one torn tail, cut on resume
        f.flush()
        os.fsync(f.fileno())
    return n


def iter_jsonl(path: str | Path, skip_partial_tail: bool = True) -> Iterator[Trajectory]:
    """Read trajectories back. A torn last line (a crash mid-write) is skipped when allowed;
    a bad line anywhere else is an error naming its line number."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield Trajectory.from_json(json.loads(line))
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            if skip_partial_tail and i == len(lines) - 1 and not line.endswith("\n"):
                return
            raise ValueError(f"{path}:{i + 1}: not a trajectory record: {e}") from e


def truncate_torn_tail(path: str | Path) -> int:
    """Cut a last line that a crash left unfinished (no newline), so appends start clean;
    returns the number of bytes removed."""
    p = Path(path)
    if not p.exists():
        return 0
    with open(p, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        block, pos = 1 << 16, size
        while pos > 0:  # scan back for the last newline
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return size - (start + i + 1)
            pos = start
        f.truncate(0)
        return size


def read_jsonl(path: str | Path) -> list[Trajectory]:
    return list(iter_jsonl(path))
