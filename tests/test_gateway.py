"""The OpenAI-compatible gateway against the real `openai` client: chat with tools and images,
a multi-turn session recorded token for token (the checkpoint's template deltas, the sampled
ids), prefix matching without a session id, a split reported, streaming, rewards closing
trajectories into groups, the 4xx of bad requests, and pause / resume around a weight sync
(held, drained, aborted and redone turns)."""
import asyncio
import base64
import io
import json
import threading
import time

import urllib.error
import urllib.request
import openai
import pytest
from aiohttp import web
from PIL import Image

from spyglass.engine.backends.base import Backend, GenerateOutput, GenerateRequest
from spyglass.engine.config import ConfigError
from spyglass.engine.gateway import Gateway, ServeConfig, make_app, parse_messages
from spyglass.engine.scheduler import EngineConfig
from spyglass.engine.loader import load_model
from spyglass.engine.trajectory import SegmentKind, Status, read_jsonl
from spyglass.trainer.distributed import free_port

def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """POST `body` (bytes as is, else JSON) -> (status, JSON reply)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


TOOLS = [{"type": "function", "function": {"name": "ocr", "description": "Read the text in an image.",
                                           "parameters": {"type": "object", "properties": {"image": {"type": "string"}},
                                                          "required": ["image"]}}}]
CALL = '<tool_call>\n{"name": "ocr", "arguments": {"image": "img_1"}}\n</tool_call>'


def _data_uri(color: str = "red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Scripted(Backend):
    """Answers each request with the next scripted text (its token ids + the stop token) and
    keeps what it was asked (the token ids the policy saw)."""

    supports_images = True

    def __init__(self, codec, script: dict[str, list[str]], delay: float = 0.0) -> None:
        self.name, self.version, self.codec, self.script, self.delay = "scripted-0", 3, codec, script, delay
        self.seen: list[GenerateRequest] = []

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        self.seen.append(req)
        await asyncio.sleep(self.delay)
        key = req.request_id.split("#")[0].split(":")[0]
        texts = self.script.get(key) or self.script["*"]
        turn = int(req.request_id.rsplit(":", 1)[1].split("/")[0])  # "<traj>:<turn>[/redo<k>]"
        text = texts[min(turn, len(texts) - 1)]
        ids = self.codec.encode_text(text) + [self.codec.stop_token_ids[0]]
        return GenerateOutput(req.request_id, ids, [-0.25] * len(ids), "stop", self.version, self.name)

    async def abort(self, request_id: str) -> None:
        pass

    async def update_weights(self, weights, version: int) -> None:
        self.version = version

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class Blocking(Scripted):
    """Scripted, but a turn waits until the event `go` is set, and abort() makes a waiting turn
    return finish "abort" with its first two tokens (logprobs -9); full turns have logprobs
    -0.1 * version. `started` is set when a turn is waiting; every output is kept in `outs`."""

    def __init__(self, codec, script: dict[str, list[str]]) -> None:
        super().__init__(codec, script)
        self.go, self.started, self.outs, self._stop = asyncio.Event(), asyncio.Event(), [], {}

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        full = await super().generate(req)
        stop = self._stop[req.request_id] = asyncio.Event()
        self.started.set()
        waits = [asyncio.ensure_future(self.go.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        del self._stop[req.request_id]
        if stop.is_set():
            out = GenerateOutput(req.request_id, full.token_ids[:2], [-9.0, -9.0], "abort", self.version, self.name)
        else:
            out = GenerateOutput(req.request_id, full.token_ids, [-0.1 * self.version] * len(full.token_ids), "stop",
                                 self.version, self.name)
        self.outs.append(out)
        return out

    async def abort(self, request_id: str) -> None:
        if request_id in self._stop:
            self._stop[request_id].set()


class Server:
    """The gateway app on a free loopback port, in a thread with its own event loop."""

    def __init__(self, gw: Gateway) -> None:
        self.gw, self.loop = gw, asyncio.new_event_loop()
        self.port = free_port("127.0.0.1")
        ready = threading.Event()

        async def start() -> None:
            self.runner = web.AppRunner(make_app(gw))
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        assert ready.wait(10), "the gateway did not start in 10 s"
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def codecs():
    return {f: load_model(f"tiny:{f}").codec() for f in ("qwen3_vl", "qwen2_vl")}


def _serve(codec, tmp_path, script, **kw) -> tuple[Server, Scripted]:
    backend = Scripted(codec, script, kw.pop("delay", 0.0))
    return Server(Gateway(ServeConfig(out=str(tmp_path / "gw.jsonl"), **kw), EngineConfig(), codec, [backend])), backend


@pytest.fixture
def served(codecs, tmp_path):
    made = []

    def make(family="qwen3_vl", script=None, **kw):
        srv, backend = _serve(codecs[family], tmp_path, script or {"*": [CALL, "<answer>HELLO</answer>"]}, **kw)
        made.append(srv)
        return srv, backend, openai.OpenAI(base_url=srv.url, api_key=kw.get("api_key") or "-", max_retries=0)
    yield make
    for s in made:
        s.stop()


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_vl"])
def test_a_tool_session_is_recorded_token_for_token(served, codecs, tmp_path, family):
    srv, backend, client = served(family)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is written on the sign?"},
                                         {"type": "image_url", "image_url": {"url": _data_uri()}}]}]
    r1 = client.chat.completions.create(model="policy", messages=msgs, tools=TOOLS,
                                        extra_body={"session_id": "ep1", "group_id": "g1"})
    (call,) = r1.choices[0].message.tool_calls
    assert r1.choices[0].finish_reason == "tool_calls" and call.function.name == "ocr"
    assert json.loads(call.function.arguments) == {"image": "img_1"}
    msgs += [r1.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "HELLO"}]
    r2 = client.chat.completions.create(model="policy", messages=msgs, tools=TOOLS, extra_body={"session_id": "ep1"})
    assert r2.choices[0].message.content == "<answer>HELLO</answer>" and r2.choices[0].finish_reason == "stop"
    status, ok = post(f"{srv.url}/sessions/ep1/reward", {"reward": 1.0, "components": {"acc": 1.0}})
    assert status == 200 and ok["status"] == "answered"
    (t,) = read_jsonl(tmp_path / "gw.jsonl")
    assert (t.id, t.group_id, t.status, t.answer, t.reward) == ("ep1", "g1", Status.ANSWERED, "HELLO",
                                                               {"acc": 1.0, "total": 1.0})
    assert [s.kind for s in t.segments] == [SegmentKind.GEN, SegmentKind.OBS, SegmentKind.GEN]
    assert all(s.version == 3 and list(s.logprobs) == [-0.25] * len(s.token_ids)
               for s in t.segments if s.kind is SegmentKind.GEN)
    # what the policy saw on turn 2 is the recording, and it is the template's rendering of the
    # whole conversation (token-in/token-out: the sampled ids are never re-tokenized)
    second = backend.seen[1]
    assert list(second.prompt_ids) == t.token_ids()[:len(second.prompt_ids)]
    codec, gw = codecs[family], srv.gw
    conv = gw.conversation(parse_messages(msgs[:1], 1 << 40), TOOLS) + [
        {"role": "assistant", "content": t.segments[0].text}, codec.tool_message("HELLO", [])]
    fresh = codec.encode_messages(conv, TOOLS).input_ids
    assert list(second.prompt_ids) == fresh == t.token_ids()[:len(fresh)]
    assert sum(t.loss_mask()) == len(t.segments[0].token_ids) + len(t.segments[2].token_ids)
    assert len(second.images) == 1 and len(t.images()) == 1
    delta = codec.decode(t.segments[1].token_ids)
    assert delta.startswith("\n<|im_start|>user\n<tool_response>\nHELLO\n</tool_response><|im_end|>")



def test_sessions_without_ids_are_found_by_prefix_and_a_changed_history_is_split(served, tmp_path):
    srv, _, client = served()
    a = [{"role": "user", "content": "Question A?"}]
    b = [{"role": "user", "content": "Question B?"}]
    ra = client.chat.completions.create(model="policy", messages=a, tools=TOOLS)
    rb = client.chat.completions.create(model="policy", messages=b, tools=TOOLS)
    sid_a, sid_b = ra.model_extra["spyglass"]["session_id"], rb.model_extra["spyglass"]["session_id"]
    assert sid_a != sid_b
    tool = lambda r: {"role": "tool", "tool_call_id": r.choices[0].message.tool_calls[0].id, "content": "seen"}
    ra2 = client.chat.completions.create(model="policy", messages=a + [ra.choices[0].message, tool(ra)], tools=TOOLS)
    assert ra2.model_extra["spyglass"]["session_id"] == sid_a and ra2.model_extra["spyglass"]["turn"] == 1
    # b's history edited: the request no longer extends what was sampled -> a new trajectory, reported
    edited = {"role": "assistant", "content": "I will just answer.", "tool_calls": None}
    raw = client.chat.completions.with_raw_response.create(
        model="policy", messages=b + [edited, {"role": "user", "content": "Go on."}], tools=TOOLS,
        extra_body={"session_id": sid_b})
    rb2 = raw.parse()
    assert "does not repeat" in rb2.model_extra["spyglass"]["split"] and raw.headers["X-Spyglass-Split"]
    assert rb2.model_extra["spyglass"]["trajectory_id"].startswith(f"{sid_b}#")
    (old,) = read_jsonl(tmp_path / "gw.jsonl")  # the split-off trajectory is kept, marked
    assert (old.id, old.status, old.stop_reason, len(old.turns)) == (sid_b, Status.INTERRUPTED, "split", 1)
    assert srv.gw.stats["splits"] == 1


def test_streaming_gives_the_same_message(served):
    _, _, client = served()
    msgs = [{"role": "user", "content": "Read it."}]
    whole = client.chat.completions.create(model="policy", messages=msgs, tools=TOOLS)
    chunks = list(client.chat.completions.create(model="policy", messages=msgs, tools=TOOLS, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == \
        [(tc.function.name, tc.function.arguments) for tc in whole.choices[0].message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_rewards_stream_out_as_groups(codecs, tmp_path):
    backend = Scripted(codecs["qwen3_vl"], {"*": ["<answer>x</answer>"]})

    async def run():
        gw = Gateway(ServeConfig(out=str(tmp_path / "g.jsonl")), EngineConfig(), codecs["qwen3_vl"], [backend])
        for i in range(3):
            await gw.chat({"messages": [{"role": "user", "content": "q?"}], "session_id": f"s{i}",
                           "group_id": "g" if i < 2 else "other"})
        gw.reward("s0", {"reward": 1.0})
        gw.reward("s2", {"reward": 0.0})
        gw.reward("s1", {"reward": 0.0})
        return await asyncio.wait_for(gw.groups(2).__anext__(), 5)
    group = asyncio.run(run())
    assert sorted(t.id for t in group) == ["s0", "s1"] and [t.reward["total"] for t in group] == [1.0, 0.0]
    assert len(read_jsonl(tmp_path / "g.jsonl")) == 3


def test_bad_requests_get_one_clear_4xx(served):
    srv, _, client = served(api_key="sekret", max_request_bytes=1 << 16)
    url, auth = f"{srv.url}/chat/completions", {"Authorization": "Bearer sekret"}
    assert post(url, {"messages": [{"role": "user", "content": "hi"}]})[0] == 401
    status, err = post(url, b"{not json", auth)
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    status, err = post(url, {"messages": []}, auth)
    assert (status, err["error"]["param"]) == (400, "messages")
    status, err = post(url, {"messages": [{"role": "robot", "content": "x"}]}, auth)
    assert status == 400 and "messages[0]: role must be" in err["error"]["message"]
    http_img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    status, err = post(url, {"messages": http_img}, auth)
    assert status == 400 and "nothing is fetched" in err["error"]["message"]
    assert post(url, {"messages": [{"role": "user", "content": "x" * (1 << 17)}]}, auth)[0] == 413
    assert post(url, {"messages": [{"role": "user", "content": "x"}], "n": 2}, auth)[0] == 400
    assert post(f"{srv.url}/sessions/nope/reward", {"reward": 1}, auth)[0] == 404
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        openai.OpenAI(base_url=srv.url, api_key="sekret", max_retries=0).chat.completions.create(model="p", messages=[])
    assert [m.id for m in openai.OpenAI(base_url=srv.url, api_key="sekret").models.list()] == ["policy"]


def test_concurrency_limit_answers_429(served):
    srv, _, _ = served(max_concurrency=1, delay=0.5)
    url = f"{srv.url}/chat/completions"
    out = []
    th = threading.Thread(target=lambda: out.append(post(url, {"messages": [{"role": "user", "content": "a"}]})))
    th.start()
    time.sleep(0.2)
    status, err = post(url, {"messages": [{"role": "user", "content": "b"}]})
    th.join(10)
    assert status == 429 and "max_concurrency 1" in err["error"]["message"] and out[0][0] == 200


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_spyglass_serve_from_the_command_line(tmp_path, stop):
    """`spyglass serve` as a user starts it: a tiny text checkpoint on the HF backend, a real chat
    request through the openai client, then stopped by Ctrl-C or SIGTERM, cleanly. Started as a
    script's background job is (SIGINT inherited ignored): the server handles both signals itself."""
    import signal
    import subprocess
    import sys
    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "spyglass.trainer.cli", "serve", "--model", "tiny:qwen2",
                             "--port", str(port), "--serve.out", str(tmp_path / "gw.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        deadline = time.monotonic() + 120  # the interpreter starts, the model loads, then the server listens
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "spyglass serve did not listen within 120 s"
                time.sleep(0.1)
        assert [m.id for m in models] == ["policy"]
        r = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           extra_body={"session_id": "cli"})
        assert r.choices[0].finish_reason in ("stop", "length") and r.model_extra["spyglass"]["session_id"] == "cli"
        status, body = post(f"http://127.0.0.1:{port}/v1/sessions/cli/reward", {"reward": 0.0})
        assert status == 200 and len(read_jsonl(tmp_path / "gw.jsonl")) == 1
    finally:
        proc.send_signal(getattr(signal, stop))
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert f"on http://127.0.0.1:{port}/v1" in out


# ------------------------------------------------------------------------------ pause / resume
ASK = {"messages": [{"role": "user", "content": "Read it."}], "tools": TOOLS}


def _gen(path) -> list:
    (t,) = read_jsonl(path)
    return [seg for seg in t.segments if seg.kind is SegmentKind.GEN]


def test_a_request_arriving_while_paused_is_held_and_served_by_the_new_weights(codecs, tmp_path):
    async def run():
        backend = Scripted(codecs["qwen3_vl"], {"*": [CALL]})
        gw = Gateway(ServeConfig(out=str(tmp_path / "g.jsonl"), max_concurrency=1), EngineConfig(),
                     codecs["qwen3_vl"], [backend])
        gw.resume()  # not paused: harmless
        await asyncio.wait_for(gw.pause(5.0), 5)
        await asyncio.wait_for(gw.pause(5.0), 5)  # twice: harmless, nothing in flight to wait for
        held = asyncio.ensure_future(gw.chat({**ASK, "session_id": "s"}))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not held.done() and backend.seen == []  # held, not refused, and not generated
        await backend.update_weights(None, 4)  # the sync
        gw.resume()
        r = await asyncio.wait_for(held, 5)
        gw.resume()
        gw.reward("s", {"reward": 1.0})
        return r, gw.stats
    r, stats = asyncio.run(run())
    assert r["spyglass"]["version"] == 4 and stats["aborted"] == 0
    assert [seg.version for seg in _gen(tmp_path / "g.jsonl")] == [4]


def test_a_turn_aborted_by_pause_is_dropped_and_redone_whole_after_resume(codecs, tmp_path):
    """Over HTTP: the client's one request spans the pause; its reply and its recording are the
    redone turn's (new version, that generate's ids and logprobs), the partial tokens are gone."""
    backend = Blocking(codecs["qwen3_vl"], {"*": [CALL]})
    srv = Server(Gateway(ServeConfig(out=str(tmp_path / "gw.jsonl")), EngineConfig(), codecs["qwen3_vl"], [backend]))
    try:
        reply: list = []
        client = threading.Thread(target=lambda: reply.append(
            post(f"{srv.url}/chat/completions", {**ASK, "session_id": "ep"})))
        client.start()
        srv.call(asyncio.wait_for(backend.started.wait(), 5))  # the turn is generating
        srv.call(asyncio.wait_for(srv.gw.pause(0.0), 5))  # drain_s 0: aborted at once
        assert [o.finish_reason for o in backend.outs] == ["abort"] and not reply
        srv.call(backend.update_weights(None, 4))
        srv.loop.call_soon_threadsafe(backend.go.set)
        srv.loop.call_soon_threadsafe(srv.gw.resume)
        client.join(10)
        assert not client.is_alive()
        status, r = reply[0]
        assert status == 200 and r["choices"][0]["finish_reason"] == "tool_calls"
        assert r["spyglass"]["version"] == 4 and srv.gw.stats["aborted"] == 1
        assert post(f"{srv.url}/sessions/ep/reward", {"reward": 1.0})[0] == 200
    finally:
        srv.stop()
    partial, redone = backend.outs
    assert [q.request_id for q in backend.seen] == ["ep:0", "ep:0/redo1"]
    assert list(backend.seen[1].prompt_ids) == list(backend.seen[0].prompt_ids)  # the same turn, whole
    (seg,) = _gen(tmp_path / "gw.jsonl")
    assert (seg.version, list(seg.token_ids), list(seg.logprobs)) == (4, redone.token_ids, redone.logprobs)
    assert seg.finish_reason == "stop" and -9.0 not in list(seg.logprobs) and len(partial.token_ids) == 2
    (t,) = read_jsonl(tmp_path / "gw.jsonl")
    assert t.token_ids() == list(backend.seen[0].prompt_ids) + redone.token_ids  # nothing of the partial


def test_a_turn_that_finishes_within_drain_s_is_not_aborted(codecs, tmp_path):
    async def run():
        backend = Blocking(codecs["qwen3_vl"], {"*": [CALL]})
        gw = Gateway(ServeConfig(out=str(tmp_path / "g.jsonl")), EngineConfig(), codecs["qwen3_vl"], [backend])
        first = asyncio.ensure_future(gw.chat({**ASK, "session_id": "a"}))
        await asyncio.wait_for(backend.started.wait(), 5)
        pause = asyncio.ensure_future(gw.pause(30.0))
        second = asyncio.ensure_future(gw.chat({**ASK, "session_id": "b"}))  # arrives while draining
        for _ in range(20):
            await asyncio.sleep(0)
        assert not pause.done() and len(backend.seen) == 1  # draining; the newcomer is held
        backend.go.set()  # the in-flight turn finishes within drain_s
        await asyncio.wait_for(pause, 5)
        r1 = await asyncio.wait_for(first, 5)
        assert not second.done() and len(backend.seen) == 1
        await backend.update_weights(None, 4)
        gw.resume()
        r2 = await asyncio.wait_for(second, 5)
        gw.reward("a", {"reward": 1.0})
        return r1, r2, gw.stats, backend.outs
    r1, r2, stats, outs = asyncio.run(run())
    assert [o.finish_reason for o in outs] == ["stop", "stop"] and stats["aborted"] == 0
    assert (r1["spyglass"]["version"], r2["spyglass"]["version"]) == (3, 4)
    assert [(seg.version, list(seg.logprobs)) for seg in _gen(tmp_path / "g.jsonl")] == \
        [(3, outs[0].logprobs)]


def test_shutdown_gives_a_request_in_flight_drain_s_then_cancels_it(codecs, tmp_path):
    """serve()'s runner stops within about drain_s even while a request waits (held by a pause):
    aiohttp's default grace is 60 s, which a Ctrl-C would wait out."""
    from spyglass.engine.gateway import serve
    port = free_port("127.0.0.1")

    async def run() -> float:
        gw = Gateway(ServeConfig(port=port, drain_s=0.5, out=str(tmp_path / "g.jsonl")), EngineConfig(),
                     codecs["qwen3_vl"], [Scripted(codecs["qwen3_vl"], {"*": [CALL]})])
        runner = await serve(gw)
        await gw.pause(0.5)  # the request below is held: in flight until the runner stops
        client = asyncio.ensure_future(asyncio.to_thread(post, f"http://127.0.0.1:{port}/v1/chat/completions",
                                                         {**ASK, "model": "policy"}))
        for _ in range(100):
            if gw.stats.get("requests") or client.done():
                break
            await asyncio.sleep(0.05)
        assert not client.done()
        t0 = time.perf_counter()
        await asyncio.wait_for(runner.cleanup(), 10)
        took = time.perf_counter() - t0
        try:
            await asyncio.wait_for(client, 10)
        except Exception:  # noqa: BLE001 - the cancelled request's connection is closed: any client error
            pass
        return took
    assert asyncio.run(run()) < 3.0


def test_drain_s_is_validated():
    with pytest.raises(ConfigError, match="drain_s must be >= 0, got -1"):
        ServeConfig(drain_s=-1)
