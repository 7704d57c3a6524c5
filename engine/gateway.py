"""The OpenAI-compatible gateway: unmodified agent code (an `openai` client with tools and
images) runs on the policy, and every conversation is recorded as a Trajectory to train on.

    spyglass serve --model /models/Qwen2.5-VL-7B-Instruct --port 8000 --out runs/gateway.jsonl
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    r = client.chat.completions.create(model="policy", messages=msgs, tools=tools,
                                       extra_body={"session_id": "ep-17", "group_id": "q-3"})
    requests.post("http://127.0.0.1:8000/v1/sessions/ep-17/reward", json={"reward": 1.0})

Endpoints: GET /v1/models; POST /v1/chat/completions (tools, images as data: URIs, `stream`);
POST /v1/sessions/{id}/reward ({"reward": float, "components": {...}}) closes a trajectory: it
is scored, written to `out` (JSONL, fsynced) and handed to `Gateway.groups()` (what a trainer
iterates, as it iterates engine groups).

Token-faithful: the first request of a session is rendered with the checkpoint's chat template
(engine/chat.py HFCodec); the model's reply is kept as the token ids it sampled (with their
logprobs and policy version); a later request must repeat the session's messages, our replies
included, and add tool / user messages, whose template token delta is appended. A request that
does not extend its session (an edited or dropped message) starts a new trajectory: the old one
is closed as INTERRUPTED ("split"), written, and the response says so (`spyglass.split`, header
X-Spyglass-Split). Sessions are named by `session_id` (body, or header X-Session-Id) or, without
one, found by the longest recorded message prefix the request repeats.

Weight updates: `await gw.pause(drain_s)` holds every new turn (the request waits, it is not
refused), gives in-flight turns `drain_s` seconds to finish, then aborts the rest, whose partial
tokens are dropped; `gw.resume()` lets them go, and an aborted turn is generated again whole
under the new weights (the client only sees a slower reply). No turn mixes two versions.

Bounded: `max_request_bytes` (413), `max_concurrency` requests at once (429), `max_sessions`
open sessions (the idlest is closed as INTERRUPTED, "abandoned"), an optional API key (401),
127.0.0.1 by default; a bad request is a 400 naming the field.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import io
import json
import math
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, ClassVar

from PIL import Image

from .config import check
from .rollout import RolloutConfig
from .trajectory import Segment, SegmentKind, Status, Trajectory, Turn, write_jsonl


@dataclass
class ServeConfig:
    """The gateway's HTTP side: where it listens, what it writes, its limits."""

    host: str = "127.0.0.1"  # listen address (0.0.0.0 exposes the policy to the network)
    port: int = 8000  # listen port (0 = any free port)
    out: str = "runs/gateway.jsonl"  # closed trajectories, one JSONL line each ("" = not written)
    api_key: str = ""  # "" = none; else requests need the header Authorization: Bearer <api_key>
    max_request_bytes: int = 32 << 20  # larger request bodies get 413
    max_concurrency: int = 64  # chat requests served at once; more get 429
    max_sessions: int = 4096  # open sessions kept; beyond, the idlest is closed (INTERRUPTED, abandoned)
    max_image_pixels: int = 50_000_000  # larger images in a request get 400
    model_name: str = "policy"  # the id /v1/models lists (any `model` a request names is served)
    wait_s: float = 3600.0  # GRPO over the gateway: how long a step waits for its groups
    drain_s: float = 5.0  # weight sync: in-flight turns get this long, then are aborted and redone (0 = at once);
    #   on shutdown (Ctrl-C), in-flight requests get this long, then are cancelled

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        for k in ("max_request_bytes", "max_concurrency", "max_sessions", "max_image_pixels"):
            check(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
        check(self.wait_s > 0, f"wait_s must be > 0, got {self.wait_s}")
        check(self.drain_s >= 0, f"drain_s must be >= 0, got {self.drain_s}")


@dataclass
class GatewayConfig:
    """`spyglass serve` (every field is a flag: --model DIR --port 8000)."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {"model": "rollout.model", "port": "serve.port"}
    # the policy: model, load (device, dtype), backend and servers; engine.temperature,
    # top_p and max_tokens_per_turn are the defaults of a request that names none
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(out="", progress=False, resume=False))
    serve: ServeConfig = field(default_factory=ServeConfig)  # listen address, output, limits


class RequestError(ValueError):
    """A client error: HTTP `status`, OpenAI error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


# ------------------------------------------------------------------------------ messages
def _image_from_url(url: Any, where: str, max_pixels: int) -> Image.Image:
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise RequestError(f"{where}: images must be data:image/...;base64 URIs (nothing is fetched), "
                           f"got {str(url)[:60]!r}", where)
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise RequestError(f"{where}: image of {im.width}x{im.height} pixels is over the limit "
                                   f"{max_pixels}", where)
            return im.convert("RGB")
    except (binascii.Error, OSError, Image.DecompressionBombError) as e:
        raise RequestError(f"{where}: cannot decode the image ({type(e).__name__}: {e})", where) from None


def _parts(content: Any, where: str, max_pixels: int) -> list[dict[str, Any]]:
    """OpenAI content (a string or a list of text / image_url parts) as codec parts (PIL images)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}", where)
    out = []
    for i, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            out.append({"type": "text", "text": p["text"]})
        elif kind == "image_url":
            url = p["image_url"].get("url") if isinstance(p.get("image_url"), dict) else p.get("image_url")
            out.append({"type": "image", "image": _image_from_url(url, f"{where}[{i}]", max_pixels)})
        else:
            raise RequestError(f"{where}[{i}]: a part must be text or image_url, got {str(p)[:60]!r}", f"{where}[{i}]")
    return out


def _text(parts: list[dict[str, Any]]) -> str:
    return "".join(p["text"] for p in parts if p["type"] == "text")


def _calls_of(msg: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of an assistant message's tool_calls."""
    out = []
    for i, c in enumerate(msg.get("tool_calls") or []):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise RequestError(f"{where}.tool_calls[{i}]: expected {{id, type, function: {{name, arguments}}}}",
                               f"{where}.tool_calls[{i}]")
        args = f.get("arguments", "{}")
        out.append((str(c.get("id", "")), f["name"], args if isinstance(args, str) else json.dumps(args)))
    return out


def canonical(msg: dict[str, Any], parts: list[dict[str, Any]], calls: list[tuple[str, str, str]]) -> str:
    """A message as the session index compares it: role, text, image digests, tool calls."""
    body = [p["text"] if p["type"] == "text" else
            "<image:" + hashlib.sha1(p["image"].tobytes()).hexdigest() + ">" for p in parts]
    return json.dumps([msg.get("role"), body, calls, msg.get("tool_call_id")], ensure_ascii=False)


@dataclass
class _Msg:
    role: str
    parts: list[dict[str, Any]]
    calls: list[tuple[str, str, str]]
    key: str  # canonical()


def parse_messages(messages: Any, max_pixels: int) -> list[_Msg]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"{where}: role must be system, user, assistant or tool, got "
                               f"{(m.get('role') if isinstance(m, dict) else m)!r}", where)
        parts = _parts(m.get("content"), f"{where}.content", max_pixels)
        calls = _calls_of(m, where) if m["role"] == "assistant" else []
        out.append(_Msg(m["role"], parts, calls, canonical(m, parts, calls)))
    return out


def _prefix_keys(keys: list[str]) -> list[str]:
    """The session index's key of every prefix keys[:1], keys[:2], ... (one running digest)."""
    h, out = hashlib.sha1(), []
    for k in keys:
        h.update(k.encode() + b"\n")
        out.append(h.hexdigest())
    return out


# ------------------------------------------------------------------------------ sessions
@dataclass(eq=False)
class _Session:
    id: str
    traj: Trajectory
    keys: list[str]  # canonical messages so far (the client's and our replies)
    tools: list[dict[str, Any]]
    parser: Any
    server: int
    prefixes: list[str] = field(default_factory=list)  # its entries in Gateway._by_prefix
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Gateway:
    """The recorder behind the HTTP app (usable in-process: `await gw.chat(body)`)."""

    def __init__(self, cfg: ServeConfig, engine: Any, codec: Any, backends: list[Any]) -> None:
        """`engine`: the EngineConfig whose sampling defaults, max_context and fatal_k / fatal_errors apply."""
        check(bool(backends), "the gateway needs at least one backend")
        self.cfg, self.engine_cfg, self.codec, self.backends = cfg, engine, codec, backends
        self.sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._by_prefix: dict[str, str] = {}
        self._parsers: dict[str, Any] = {}
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._finished: asyncio.Queue[Trajectory] = asyncio.Queue()
        self._gate = asyncio.Event()  # set = turns may generate (cleared by pause)
        self._gate.set()
        self._live: dict[str, Any] = {}  # request id -> backend, turns generating now
        self._drained = asyncio.Event()  # set when _live is empty
        self._drained.set()
        self._aborting: set[str] = set()  # request ids pause() aborted (redone after resume)
        self.stats = {"requests": 0, "sessions": 0, "splits": 0, "closed": 0, "aborted": 0}

    # -- weight updates ------------------------------------------------------------------
    async def pause(self, drain_s: float) -> None:
        """Hold new turns, wait up to `drain_s` for in-flight ones, abort those still running
        and wait for them to return; afterwards no turn generates until resume(). A held request
        keeps its max_concurrency slot (pause waits only on generating turns, never on a slot).
        Pausing again is harmless."""
        self._gate.clear()
        if self._live:
            try:
                await asyncio.wait_for(self._drained.wait(), drain_s)
            except asyncio.TimeoutError:
                live = list(self._live.items())
                self._aborting.update(rid for rid, _ in live)
                await asyncio.gather(*(b.abort(rid) for rid, b in live), return_exceptions=True)
                await self._drained.wait()  # aborted turns return their partial tokens (dropped)

    def resume(self) -> None:
        """Let held and aborted turns generate (a no-op when not paused)."""
        self._gate.set()

    # -- the chat request ----------------------------------------------------------------
    async def chat(self, body: dict[str, Any], session_id: str | None = None) -> dict[str, Any]:
        """One /v1/chat/completions body -> the response dict (raises RequestError)."""
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        if body.get("n", 1) != 1:
            raise RequestError("n must be 1 (send n requests in one group_id for a group)", "n")
        msgs = parse_messages(body.get("messages"), self.cfg.max_image_pixels)
        tools = body.get("tools") or []
        if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
            raise RequestError("tools must be a list of {type: function, function: {...}}", "tools")
        sid = session_id or body.get("session_id")
        if sid is not None and (not isinstance(sid, str) or not sid or len(sid) > 200):
            raise RequestError("session_id must be a non-empty string of at most 200 characters", "session_id")
        sampling = self._sampling(body)
        if self._sem.locked():
            raise RequestError(f"too many concurrent requests (max_concurrency {self.cfg.max_concurrency})",
                               status=429)
        async with self._sem:
            self.stats["requests"] += 1
            s, split = self._session(sid, msgs, tools, body.get("group_id"))
            async with s.lock:
                return await self._turn(s, msgs, sampling, split)

    def _sampling(self, body: dict[str, Any]) -> Any:
        from .backends.base import SamplingParams  # noqa: PLC0415
        e = self.engine_cfg
        try:
            return SamplingParams(
                max_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or e.max_tokens_per_turn),
                temperature=float(body["temperature"]) if body.get("temperature") is not None else e.temperature,
                top_p=float(body["top_p"]) if body.get("top_p") is not None else e.top_p,
                stop_token_ids=list(self.codec.stop_token_ids),
                seed=int(body["seed"]) if body.get("seed") is not None else None)
        except (TypeError, ValueError) as err:
            raise RequestError(f"sampling: {err}", "temperature") from None

    def _session(self, sid: str | None, msgs: list[_Msg], tools: list[dict[str, Any]],
                 group: Any) -> tuple[_Session, str]:
        """The session this request extends, or a new one; (session, split reason or "")."""
        keys = [m.key for m in msgs]
        s = self.sessions.get(sid) if sid is not None else None
        if s is None and sid is None:  # the longest recorded prefix this request repeats
            digests = _prefix_keys(keys)
            for i in range(len(msgs) - 1, 0, -1):
                if msgs[i - 1].role == "assistant" and digests[i - 1] in self._by_prefix:
                    s = self.sessions.get(self._by_prefix[digests[i - 1]])
                    break
        split = ""
        if s is not None:
            new = msgs[len(s.keys):]
            if keys[:len(s.keys)] != s.keys or not new:
                split = "the request does not repeat the session's recorded messages"
            elif any(m.role == "assistant" for m in new):
                split = "the request adds an assistant message the policy did not sample"
            elif s.tools != tools:
                split = "the request changes the tools"
            if not split:
                self.sessions.move_to_end(s.id)
                return s, ""
            self._close(s, Status.INTERRUPTED, "split", {})
            self.stats["splits"] += 1
        return self._open(sid, msgs, tools, group, again=s is not None), split

    def _open(self, sid: str | None, msgs: list[_Msg], tools: list[dict[str, Any]], group: Any,
              again: bool) -> _Session:
        while len(self.sessions) >= self.cfg.max_sessions:
            _, idle = self.sessions.popitem(last=False)
            self._close(idle, Status.INTERRUPTED, "abandoned", {}, drop=False)
        base = sid or f"s-{uuid.uuid4().hex[:16]}"
        tid = f"{base}#{uuid.uuid4().hex[:6]}" if again else base
        prompt = self._render(msgs, tools)
        first_user = next((_text(m.parts) for m in msgs if m.role == "user"), "")
        traj = Trajectory(id=tid, group_id=str(group) if group is not None else tid, sample_index=0,
                          prompt_ids=prompt.input_ids, prompt_images=prompt.images,
                          prompt_messages=[{"role": "user", "content": first_user}],
                          meta={"question": first_user, "source": "gateway", "session_id": base},
                          started_at=time.time())
        key = json.dumps(tools, sort_keys=True)
        if key not in self._parsers:
            from .toolcall import make_turn_parser  # noqa: PLC0415
            self._parsers[key] = make_turn_parser(tools)
        s = _Session(base, traj, [], tools, self._parsers[key], hash(base) % len(self.backends))
        s.keys = [m.key for m in msgs]
        self.sessions[base] = s
        self.stats["sessions"] += 1
        return s

    def _codec_messages(self, msgs: list[_Msg], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        c, out = self.codec, []
        for i, m in enumerate(msgs):
            if m.role == "system":
                sysmsg = c.system_message(_text(m.parts) or None, tools if i == 0 else [])
                out.append(sysmsg if i == 0 else {"role": "system", "content": _text(m.parts)})
            elif m.role == "user":
                out.append(c.user_message_parts(m.parts))
            elif m.role == "tool":
                out.append(c.tool_message_parts(m.parts))
            else:  # history the client wrote: the template's own tool-call layout, else Hermes text
                calls = "".join(f'\n<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for _, n, a in m.calls)
                out.append({"role": "assistant", "content": _text(m.parts) + calls})
        return out

    def conversation(self, msgs: list[_Msg], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A new session's messages as the codec renders them (a template that ignores `tools`
        gets a system turn to carry the tool block when the client sent none)."""
        if tools and not self.codec.template_tools and msgs[0].role != "system":
            msgs = [_Msg("system", [{"type": "text", "text": "You are a helpful assistant."}], [], ""), *msgs]
        return self._codec_messages(msgs, tools)

    def _render(self, msgs: list[_Msg], tools: list[dict[str, Any]]) -> Any:
        return self.codec.encode_messages(self.conversation(msgs, tools), tools)

    # -- one assistant turn --------------------------------------------------------------
    async def _turn(self, s: _Session, msgs: list[_Msg], sampling: Any, split: str) -> dict[str, Any]:
        from .backends.base import BackendError, GenerateRequest  # noqa: PLC0415
        t, t_start = s.traj, time.perf_counter()
        new = msgs[len(s.keys):] if t.segments else []
        if new:  # the observation: the template's delta after our last turn (never re-tokenized)
            last = t.segments[-1].token_ids
            closed = len(last) > 0 and last[-1] == self.codec.stop_token_ids[0]
            enc = self.codec.encode_delta(self._codec_messages(new, s.tools), closed)
            t.segments.append(Segment(SegmentKind.OBS, enc.input_ids, turn=len(t.turns) - 1, images=enc.images,
                                      text="\n".join(_text(m.parts) for m in new)))
            s.keys = [m.key for m in msgs]
        if t.num_tokens + 1 > self.engine_cfg.max_context:
            raise RequestError(f"the conversation has {t.num_tokens} tokens, over max_context "
                               f"{self.engine_cfg.max_context}", "messages")
        backend = self.backends[s.server]
        try:
            out, t0 = await self._generate(backend, GenerateRequest(f"{t.id}:{len(t.turns)}", t.token_array(),
                                                                    sampling, images=t.images()))
        except BackendError as e:
            raise RequestError(f"backend {backend.name} failed: {e}", status=503) from None
        queue_s = out.queue_s + (t0 - t_start)
        text = self.codec.decode(out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids)
        parsed = s.parser(text)
        turn = Turn(index=len(t.turns), calls=parsed.calls, parse_errors=parsed.errors,
                    answered=parsed.answer is not None and not parsed.calls, gen_tokens=len(out.token_ids),
                    queue_s=queue_s, gen_s=time.perf_counter() - t0)
        t.turns.append(turn)
        t.meta.setdefault("temperatures", []).append(sampling.temperature)  # the trainer checks its own
        t.segments.append(Segment(SegmentKind.GEN, out.token_ids, turn=turn.index, logprobs=out.logprobs,
                                  version=out.version, text=text, finish_reason=out.finish_reason))
        if turn.answered:
            t.answer = parsed.answer
        reply = self._reply(t, turn, text)
        key = canonical(reply, _parts(reply["content"], "reply", 1 << 62), _calls_of(reply, "reply"))
        s.keys.append(key)
        s.prefixes.append(_prefix_keys(s.keys)[-1])
        self._by_prefix[s.prefixes[-1]] = s.id
        finish = "tool_calls" if turn.calls else ("length" if out.finish_reason == "length" else "stop")
        resp = {"id": f"chatcmpl-{t.id}-{turn.index}", "object": "chat.completion", "created": int(time.time()),
                "model": self.cfg.model_name,
                "choices": [{"index": 0, "message": reply, "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": t.num_tokens - len(out.token_ids), "completion_tokens": len(out.token_ids),
                          "total_tokens": t.num_tokens},
                "spyglass": {"session_id": s.id, "trajectory_id": t.id, "turn": turn.index, "version": out.version}}
        if split:
            resp["spyglass"]["split"] = split
        return resp

    async def _generate(self, backend: Any, req: Any) -> tuple[Any, float]:
        """(output, launch time) of one turn: it waits while paused, and a turn pause() aborted
        is dropped (its partial tokens are never recorded) and launched again, whole and under
        a fresh request id, once resumed."""
        base, attempt = req.request_id, 0
        while True:
            while not self._gate.is_set():
                await self._gate.wait()
            rid, t0 = req.request_id, time.perf_counter()
            self._live[rid] = backend  # no await between the gate and here: pause() sees every launch
            self._drained.clear()
            try:
                out = await backend.generate(req)
            finally:
                del self._live[rid]
                if not self._live:
                    self._drained.set()
                ours = rid in self._aborting
                self._aborting.discard(rid)
            if not ours or out.finish_reason != "abort":  # an abort that lost the race keeps its whole turn
                return out, t0
            self.stats["aborted"] += 1
            attempt += 1
            req = dataclasses.replace(req, request_id=f"{base}/redo{attempt}")

    def _reply(self, t: Trajectory, turn: Turn, text: str) -> dict[str, Any]:
        """The OpenAI assistant message: the text outside <tool_call> blocks, and the calls."""
        content = text
        while "<tool_call>" in content:
            a = content.index("<tool_call>")
            b = content.find("</tool_call>", a)
            content = content[:a] + (content[b + len("</tool_call>"):] if b >= 0 else "")
        calls = [{"id": f"call_{t.id}_{turn.index}_{k}", "type": "function",
                  "function": {"name": c["name"], "arguments": c["arguments"]}} for k, c in enumerate(turn.calls)]
        msg: dict[str, Any] = {"role": "assistant", "content": content.strip() or (None if calls else "")}
        if calls:
            msg["tool_calls"] = calls
        return msg

    # -- closing -------------------------------------------------------------------------
    def reward(self, sid: str, body: Any) -> dict[str, Any]:
        """POST /v1/sessions/{sid}/reward: score and close the session's trajectory."""
        s = self.sessions.get(sid)
        if s is None:
            raise RequestError(f"no open session {sid!r}", "session_id", status=404)
        r = body.get("reward") if isinstance(body, dict) else None
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise RequestError(f"reward must be a finite number, got {r!r}", "reward")
        comps = body.get("components") or {}
        if not isinstance(comps, dict):
            raise RequestError("components must be an object", "components")
        if not s.traj.turns:
            raise RequestError(f"session {sid!r} has no turn yet", "session_id", status=409)
        status = Status.ANSWERED if not s.traj.turns[-1].calls else Status.TRUNCATED
        t = self._close(s, status, "reward", {**comps, "total": float(r)})
        return {"trajectory_id": t.id, "status": t.status.value, "turns": len(t.turns)}

    def _close(self, s: _Session, status: Status, reason: str, reward: dict[str, Any],
               drop: bool = True) -> Trajectory:
        t = s.traj
        t.status, t.stop_reason, t.reward, t.finished_at = status, reason, reward, time.time()
        if t.answer is None and status is Status.ANSWERED:
            t.answer = next((seg.text for seg in reversed(t.segments) if seg.kind is SegmentKind.GEN), "")
        t.fatal_step = t.compute_fatal_step(self.engine_cfg.fatal_k, self.engine_cfg.fatal_errors)
        if drop:
            self.sessions.pop(s.id, None)
        for k in s.prefixes:
            self._by_prefix.pop(k, None)
        if self.cfg.out:
            Path(self.cfg.out).parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(self.cfg.out, [t])
        self.stats["closed"] += 1
        if reason == "reward":
            self._finished.put_nowait(t)
        return t

    async def groups(self, group_size: int) -> AsyncIterator[list[Trajectory]]:
        """Rewarded trajectories, `group_size` per group_id, as engine groups stream (forever)."""
        pending: dict[str, list[Trajectory]] = defaultdict(list)
        while True:
            t = await self._finished.get()
            pending[t.group_id].append(t)
            if len(pending[t.group_id]) >= group_size:
                yield pending.pop(t.group_id)


# ------------------------------------------------------------------------------ HTTP
def _error(e: RequestError) -> Any:
    from aiohttp import web  # noqa: PLC0415
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return web.json_response({"error": {"message": str(e), "type": kind, "param": e.param, "code": e.status}},
                             status=e.status)


def make_app(gw: Gateway) -> Any:
    """The aiohttp application over `gw` (routes in the module docstring)."""
    from aiohttp import web  # noqa: PLC0415

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> Any:
        key = gw.cfg.api_key
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            return _error(RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401))
        try:
            return await handler(request)
        except RequestError as e:
            return _error(e)
        except web.HTTPRequestEntityTooLarge:
            return _error(RequestError(f"request body over max_request_bytes {gw.cfg.max_request_bytes}", status=413))

    async def body_of(request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the body is not valid JSON ({e})") from None

    async def models(_: web.Request) -> Any:
        return web.json_response({"object": "list", "data": [{"id": gw.cfg.model_name, "object": "model",
                                                              "created": 0, "owned_by": "spyglass"}]})

    async def chat(request: web.Request) -> Any:
        body = await body_of(request)
        resp = await gw.chat(body, request.headers.get("X-Session-Id"))
        headers = {"X-Session-Id": resp["spyglass"]["session_id"]}
        if "split" in resp["spyglass"]:
            headers["X-Spyglass-Split"] = resp["spyglass"]["split"]
        if not (isinstance(body, dict) and body.get("stream")):
            return web.json_response(resp, headers=headers)
        out = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        for chunk in stream_chunks(resp):
            await out.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def reward(request: web.Request) -> Any:
        return web.json_response(gw.reward(request.match_info["sid"], await body_of(request)))

    app = web.Application(middlewares=[guard], client_max_size=gw.cfg.max_request_bytes)
    app.add_routes([web.get("/v1/models", models), web.post("/v1/chat/completions", chat),
                    web.post("/v1/sessions/{sid}/reward", reward)])
    return app


async def serve(gw: Gateway) -> Any:
    """Listen on gw.cfg's host and port on the running event loop; returns the aiohttp runner
    (`await runner.cleanup()` stops it: requests in flight get drain_s to finish, then are
    cancelled, so a Ctrl-C never waits on aiohttp's 60 s default)."""
    from aiohttp import web  # noqa: PLC0415
    runner = web.AppRunner(make_app(gw), shutdown_timeout=gw.cfg.drain_s)
    await runner.setup()
    await web.TCPSite(runner, gw.cfg.host, gw.cfg.port).start()
    return runner


def stream_chunks(resp: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished response as chat.completion.chunk events (the turn is generated whole, then
    sent as role, content, each tool call, and the finish reason)."""
    msg, choice = resp["choices"][0]["message"], resp["choices"][0]
    head = {k: resp[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    out = [chunk({"role": "assistant", "content": ""})]
    if msg.get("content"):
        out.append(chunk({"content": msg["content"]}))
    for i, c in enumerate(msg.get("tool_calls", [])):
        out.append(chunk({"tool_calls": [{"index": i, **c}]}))
    out.append(chunk({}, choice["finish_reason"]) | {"spyglass": resp["spyglass"]})
    return out


def build_gateway(cfg: GatewayConfig) -> Gateway:
    """The gateway over cfg.rollout's model and backends (engine/rollout.py's one assembly)."""
    from .rollout import _model_and_codec, make_backends  # noqa: PLC0415
    loaded, codec = _model_and_codec(cfg.rollout)
    return Gateway(cfg.serve, cfg.rollout.engine, codec, make_backends(cfg.rollout, loaded, prefix="gateway"))


def run_gateway(cfg: GatewayConfig) -> dict[str, Any]:
    """`spyglass serve`: serve until SIGINT (Ctrl-C) or SIGTERM, then stop cleanly; returns the
    counters. Both signals are handled explicitly: a process started in the background of a
    script inherits SIGINT ignored, and `docker stop` / Kubernetes send SIGTERM."""
    import signal  # noqa: PLC0415

    async def main() -> None:
        gw = build_gateway(cfg)
        runner = await serve(gw)
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"spyglass serve: {cfg.rollout.model} on http://{cfg.serve.host}:{cfg.serve.port}/v1 (closed "
              f"trajectories -> {cfg.serve.out or 'not written'})", flush=True)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await runner.cleanup()
            for b in gw.backends:
                await b.close()
            stats.update(gw.stats)

    stats: dict[str, Any] = {}
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return stats
