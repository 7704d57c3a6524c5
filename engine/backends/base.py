"""The generation-backend contract: token ids (+ images) in, token ids + logprobs out.

Every backend (HF transformers, simulated, vLLM in-process or HTTP, SGLang, OpenAI-compatible)
implements `Backend`. The scheduler only ever talks to this interface:

    out = await backend.generate(GenerateRequest("traj-3/turn-2", prompt_ids, images=imgs,
                                                 sampling=SamplingParams(max_tokens=512, seed=7)))
    out.token_ids, out.logprobs, out.finish_reason, out.version

Semantics shared by all backends:
- `prompt_ids` is the whole context, already containing every image's <|image_pad|> tokens;
  `images` are all images of the context, in order. Generated tokens are returned as ids and
  are never re-tokenized.
- Stopping: a sampled token in `stop_token_ids` (or the model's EOS, as vLLM does) ends the
  request with "stop" and IS included in `token_ids`; `max_tokens` reached gives "length".
- Logprobs: log-probability of each emitted token under softmax(logits / temperature) over the
  full vocabulary (before top-k/top-p truncation), i.e. what a trainer recomputes with the
  same temperature; with temperature 0 (greedy) under softmax(logits).
- `forced_ids` (replay / teacher forcing): the backend runs real forward passes but emits these
  tokens with their real logprobs, up to `max_tokens`; finish "stop" when all were emitted,
  "length" if max_tokens cut them. Backends that cannot force raise BackendError.
- `abort(request_id)`: the pending or in-flight request returns finish_reason "abort" with the
  tokens generated so far; aborting an unknown/finished id is a no-op.
- `version`: the weights version when the request finished; `version_start` the version when
  it was admitted (they differ only if update_weights ran while it was decoding).
- A dead or unreachable server raises BackendError (with `.server`), so the scheduler can move
  the trajectory to another server.
- Chat-mode OpenAI servers (`token_in_token_out` False) take `GenerateRequest.messages` and
  return `GenerateOutput.text`; every other backend ignores both.
"""
from __future__ import annotations

import abc
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

FINISH_REASONS = ("stop", "length", "abort")


class BackendError(Exception):
    """A backend/server failure (dead, unreachable, protocol error); `server` names it."""

    def __init__(self, server: str, message: str) -> None:
        super().__init__(f"[{server}] {message}")
        self.server = server
        self.message = message


def _check_ids(name: str, ids: Any, allow_empty: bool) -> None:
    if not isinstance(ids, list):
        raise TypeError(f"{name} must be a list of ints, got {type(ids).__name__}")
    if not ids:
        if not allow_empty:
            raise ValueError(f"{name} is empty")
        return
    # fast path (this runs on every turn over the whole context): one C-level pass; the
    # elements' types are sampled (ends), the engine's own ids are ints by construction
    try:
        if type(ids[0]) is int and type(ids[-1]) is int and min(ids) >= 0:
            return
    except TypeError:
        pass
    for i, t in enumerate(ids):  # slow path: find and name the offending element
        if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= 2**63:
            raise ValueError(f"{name}[{i}] must be a non-negative int, got {t!r}")


def _as_id_array(ids: Any, allow_empty: bool) -> array:
    """Token ids as array('I'): one C-level pass converts and rejects non-ints and negatives.
    Requests carry the whole context; as an array it costs 4 bytes a token and the cyclic GC
    never walks it (a list of ints in every in-flight request stalls full collections)."""
    if isinstance(ids, array) and ids.typecode == "I":
        arr = ids
    else:
        if not isinstance(ids, (list, tuple, array)):
            raise TypeError(f"prompt_ids must be a list of ints, got {type(ids).__name__}")
        try:
            arr = array("I", ids)
        except (TypeError, OverflowError):
            _check_ids("prompt_ids", list(ids), allow_empty)  # names the offending element
            raise ValueError(f"prompt_ids must be ints in [0, 2**32)") from None
    if not arr and not allow_empty:
        raise ValueError("prompt_ids is empty")
    return arr


@dataclass
class SamplingParams:
    """How to sample one turn. Validated on construction."""

    max_tokens: int = 4096
    temperature: float = 0.7         # 0 = greedy
    top_p: float = 1.0               # in (0, 1]
    top_k: int = -1                  # -1 = off, else >= 1
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None          # per-request seed: same seed + same logits -> same tokens
    logprobs: bool = True            # return the emitted tokens' logprobs

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 or >= 1, got {self.top_k!r}")
        _check_ids("stop_token_ids", self.stop_token_ids, allow_empty=True)
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")

    def for_turn(self, max_tokens: int, seed: int | None) -> "SamplingParams":
        """A copy with one turn's max_tokens and seed. The other fields were validated when
        this one was built, so only these two are checked again (the engine's per-turn path)."""
        if type(max_tokens) is not int or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if seed is not None and (type(seed) is not int or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        new = object.__new__(SamplingParams)
        new.__dict__.update(self.__dict__)
        new.max_tokens, new.seed = max_tokens, seed
        new.stop_token_ids = list(self.stop_token_ids)  # each request owns its lists
        return new


@dataclass
class GenerateRequest:
    """One turn to generate: the whole context as token ids plus its images."""

    request_id: str
    prompt_ids: array  # any int sequence; stored as array('I') (compact, not GC-traversed)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    images: list[Image.Image] = field(default_factory=list)  # all images in the context, in order
    forced_ids: list[int] | None = None                      # replay: emit exactly these tokens
    messages: list[dict[str, Any]] | None = None  # OpenAI-format chat, only for chat-mode servers

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty str, got {self.request_id!r}")
        self.prompt_ids = _as_id_array(self.prompt_ids, allow_empty=self.messages is not None)
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(self.sampling).__name__}")
        for i, im in enumerate(self.images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(im).__name__}")
        if self.forced_ids is not None:
            _check_ids("forced_ids", self.forced_ids, allow_empty=False)


@dataclass
class GenerateOutput:
    """What one turn produced."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]            # one per token (empty if sampling.logprobs is False)
    finish_reason: str               # "stop" | "length" | "abort"
    version: int                     # weights version when the request finished
    server: str
    queue_s: float = 0.0             # submitted -> first forward pass that included it
    gen_s: float = 0.0               # that forward -> finished
    version_start: int = -1          # weights version when admitted (-1: unknown)
    text: str | None = None          # chat-mode servers only: the returned text

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        if self.version_start < 0:
            self.version_start = self.version


Weights = dict[str, torch.Tensor] | str


class Backend(abc.ABC):
    """A generation server (or an in-process engine) seen by the scheduler.

    Attributes: `name` (unique per server, used in outputs and errors), `version` (weights
    version), `token_in_token_out` (False only for chat-mode OpenAI servers, which take text
    and return text: their trajectories cannot be trained on exactly), `supports_images`,
    `supports_forced` (teacher forcing)."""

    name: str = "backend"
    version: int = 0
    token_in_token_out: bool = True
    supports_images: bool = False
    supports_forced: bool = False

    @abc.abstractmethod
    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        """Generate one turn; raises BackendError if the server is dead/unreachable."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Make the pending/in-flight request return "abort" with its tokens so far."""

    @abc.abstractmethod
    async def update_weights(self, weights: Weights, version: int) -> None:
        """Load new weights (a state dict, or a checkpoint directory) and set `version`."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the server can take requests."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources; pending requests return "abort"."""

    def check_request(self, req: GenerateRequest) -> None:
        """Shared admission checks: images and forcing only where supported."""
        if not isinstance(req, GenerateRequest):
            raise TypeError(f"expected GenerateRequest, got {type(req).__name__}")
        if req.images and not self.supports_images:
            raise ValueError(f"backend {self.name!r} does not take images "
                             f"(request {req.request_id!r} has {len(req.images)})")
        if not req.prompt_ids and self.token_in_token_out:
            raise ValueError(f"request {req.request_id!r} has no prompt_ids")
        if req.forced_ids is not None and not self.supports_forced:
            raise BackendError(self.name, f"forced_ids (replay) is not supported by {type(self).__name__}")

    async def __aenter__(self) -> "Backend":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def check_version(backend: Backend, version: int) -> None:
    """Weights versions are ints that never go backwards."""
    if not isinstance(version, int) or version < backend.version:
        raise ValueError(f"version must be an int >= current {backend.version}, got {version!r}")
