"""The rollout scheduler: streaming groups, limits, cascade, server death, pause/resume."""
import asyncio
import json
import re
import time

import pytest

from spyglass.engine.backends.base import Backend, BackendError, GenerateOutput, GenerateRequest
from spyglass.engine.chat import ByteCodec
from spyglass.engine.policy import ReplayPolicy, script_turns
from spyglass.engine.scheduler import Engine, EngineConfig, ParsedTurn, Prompt, ToolOutcome, is_repetitive
from spyglass.engine.trajectory import SegmentKind, Status

CODEC = ByteCodec()
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse(text: str) -> ParsedTurn:
    """A minimal test parser (the production one is the C++ core)."""
    calls, errors = [], []
    for m in CALL.finditer(text):
        try:
            d = json.loads(m.group(1))
            calls.append({"name": d["name"], "arguments": json.dumps(d["arguments"], sort_keys=True)})
        except (ValueError, KeyError) as e:
            errors.append({"kind": "invalid_json", "message": str(e)})
    a = re.search(r"<answer>(.*?)</answer>", text, re.S)
    return ParsedTurn(calls, errors, a.group(1) if a else None)


class FakeServer(Backend):
    """Emits the forced ids after `delay`; dies after `die_after` requests when set."""

    supports_forced = True

    def __init__(self, name: str, delay: float = 0.001, die_after: int | None = None) -> None:
        self.name, self.delay, self.die_after = name, delay, die_after
        self.version, self.requests, self.inflight = 0, 0, {}

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        self.requests += 1
        if self.die_after is not None and self.requests > self.die_after:
            raise BackendError(self.name, "connection refused")
        ev = asyncio.Event()
        self.inflight[req.request_id] = ev
        try:
            await asyncio.wait_for(ev.wait(), self.delay)
            ids, reason = req.forced_ids[:1], "abort"
        except asyncio.TimeoutError:
            ids = req.forced_ids[:req.sampling.max_tokens]
            reason = "stop" if len(ids) == len(req.forced_ids) else "length"
        finally:
            self.inflight.pop(req.request_id, None)
        return GenerateOutput(req.request_id, list(ids), [-0.5] * len(ids), reason, self.version, self.name)

    async def abort(self, request_id: str) -> None:
        if request_id in self.inflight:
            self.inflight[request_id].set()

    async def update_weights(self, weights, version: int) -> None:
        self.version = version

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def echo_tools(calls, traj):
    out = []
    for c in calls:
        args = json.loads(c["arguments"])
        if args.get("fail"):
            out.append(ToolOutcome("boom", error_kind="fatal"))
        else:
            if args.get("sleep"):
                await asyncio.sleep(args["sleep"])
            out.append(ToolOutcome(f"{c['name']} ok {args}"))
    return out


def _engine(cfg, scripts, servers=None, **kw):
    servers = servers or [FakeServer("s0")]
    return Engine(cfg, servers, CODEC, echo_tools, parse, policy=ReplayPolicy(CODEC, scripts), **kw), servers


async def _collect(engine, prompts):
    return [g async for g in engine.run(prompts)]


def test_groups_stream_and_records_are_exact() -> None:
    scripts = {f"p{i}": script_turns([("search", {"q": f"x{j}"}) for j in range(i + 1)], f"ans{i}")
               for i in range(4)}
    engine, _ = _engine(EngineConfig(n_samples=3, max_live=6), scripts)
    groups = asyncio.run(_collect(engine, [Prompt(f"p{i}", f"q{i}") for i in range(4)]))
    assert sorted(g[0].group_id for g in groups) == ["p0", "p1", "p2", "p3"]
    assert groups[0][0].group_id == "p0"  # the short group streams out first
    for g in groups:
        assert len(g) == 3 and len({t.id for t in g}) == 3
        for t in g:
            assert t.status is Status.ANSWERED and t.answer == f"ans{t.group_id[1:]}"
            assert t.fatal_step is None and len(t.turns) == int(t.group_id[1:]) + 2
            # token-in/token-out: the context is prompt + segments, the mask covers gen tokens
            gen = [s for s in t.segments if s.kind is SegmentKind.GEN]
            assert sum(t.loss_mask()) == sum(len(s.token_ids) for s in gen)
            assert all(s.token_ids[-1] == CODEC.IM_END for s in gen)
            assert CODEC.decode(t.token_ids()).count("<tool_response>") == len(t.turns) - 1
    assert engine.stats.finished == 12


def test_recite_question_ends_every_observation_with_the_question() -> None:
    scripts = {"p0": script_turns([("search", {"q": "a"}), ("search", {"q": "b"})], "done")}
    for recite in (False, True):
        engine, _ = _engine(EngineConfig(n_samples=1, recite_question=recite), scripts)
        (t,) = asyncio.run(_collect(engine, [Prompt("p0", "What is the mayor of X?")]))[0]
        obs = [s for s in t.segments if s.kind is SegmentKind.OBS]
        assert len(obs) == 2 and t.status is Status.ANSWERED
        for s in obs:
            assert s.text.endswith("\nQuestion: What is the mayor of X?") is recite, s.text
            assert ("Question: What is the mayor of X?" in CODEC.decode(s.token_ids)) is recite


def test_limits_and_cascade() -> None:
    fail = ("search", {"fail": True})
    ok = ("search", {"q": "a"})
    scripts = {
        "casc": script_turns([ok, fail, fail, ok, fail, fail, fail, ok], "never"),
        "long": script_turns([ok] * 10, "late"),
        "rep": ["<think>" + "ab" * 200],  # a loop runs to the end of the turn
        "slow": script_turns([("search", {"sleep": 5})], "slow"),
    }
    cfg = EngineConfig(n_samples=1, max_turns=8, timeout_s=1.0, repetition_min_tokens=64)
    engine, _ = _engine(cfg, scripts)
    groups = asyncio.run(_collect(engine, [Prompt(k, k) for k in scripts]))
    got = {g[0].group_id: g[0] for g in groups}
    assert got["casc"].status is Status.FATAL and got["casc"].fatal_step == 4
    assert got["casc"].loss_mask(fatal=True) != got["casc"].loss_mask()
    assert got["long"].status is Status.TRUNCATED and got["long"].stop_reason == "max_turns"
    assert got["long"].fatal_step is None  # out of turns without a cascade: an anomaly, not fatal
    assert got["rep"].status is Status.INTERRUPTED and got["rep"].stop_reason == "repetition"
    assert got["slow"].status is Status.TRUNCATED and got["slow"].stop_reason == "timeout"


def test_format_errors_are_observations_and_count_toward_the_cascade() -> None:
    scripts = {"bad": ["no call here", "<tool_call>{not json</tool_call>", "still nothing", "x"]}
    engine, _ = _engine(EngineConfig(n_samples=1), scripts)
    (g,) = asyncio.run(_collect(engine, [Prompt("bad", "q")]))
    t = g[0]
    assert t.status is Status.FATAL and t.fatal_step == 0 and len(t.turns) == 3
    assert "Error:" in t.segments[1].text


def test_fatal_errors_tool_stops_only_on_tool_failures() -> None:
    """EngineConfig.fatal_errors="tool": the model's own format errors neither count nor reset,
    so a run of them goes on to max_turns (an anomaly, no fatal step), and a tool cascade with a
    malformed turn inside it is still one, fatal from its first failed call."""
    fail = script_turns([("search", {"fail": True})], "x")[0]
    scripts = {"bad": ["no call here", "<tool_call>{not json</tool_call>", "still nothing", "x", "y", "z"],
               "mixed": [fail, "<tool_call>{not json</tool_call>", fail, fail, "never reached"]}
    for errors, bad, mixed in (("any", (Status.FATAL, 0, 3), (Status.FATAL, 0, 3)),
                               ("tool", (Status.TRUNCATED, None, 5), (Status.FATAL, 0, 4))):
        engine, _ = _engine(EngineConfig(n_samples=1, max_turns=5, fatal_errors=errors), scripts)
        got = {g[0].group_id: g[0] for g in asyncio.run(_collect(engine, [Prompt(k, "q") for k in scripts]))}
        assert (got["bad"].status, got["bad"].fatal_step, len(got["bad"].turns)) == bad, errors
        assert (got["mixed"].status, got["mixed"].fatal_step, len(got["mixed"].turns)) == mixed, errors
    with pytest.raises(Exception, match="fatal_errors must be one of"):
        EngineConfig(fatal_errors="format")


def test_dead_server_moves_its_trajectories() -> None:
    scripts = {f"p{i}": script_turns([("search", {"q": "a"})] * 3, "y") for i in range(6)}
    servers = [FakeServer("s0", die_after=4), FakeServer("s1")]
    engine, _ = _engine(EngineConfig(n_samples=2, max_live=12), scripts, servers)
    groups = asyncio.run(_collect(engine, [Prompt(f"p{i}", "q") for i in range(6)]))
    assert len(groups) == 6
    assert all(t.status is Status.ANSWERED for g in groups for t in g)
    assert engine.stats.server_moves > 0


def test_pause_abort_resume_keeps_every_group() -> None:
    scripts = {f"p{i}": script_turns([("search", {"q": "a"})] * 4, "y") for i in range(4)}
    server = FakeServer("s0", delay=0.02)

    async def main():
        engine = Engine(EngineConfig(n_samples=4, max_live=16), [server], CODEC, echo_tools, parse,
                        policy=ReplayPolicy(CODEC, scripts))
        out = []

        async def updater():
            await asyncio.sleep(0.03)
            await engine.pause(abort=True)
            await server.update_weights({}, 1)
            engine.resume()

        task = asyncio.ensure_future(updater())
        async for g in engine.run([Prompt(f"p{i}", "q") for i in range(4)]):
            out.append(g)
        await task
        return engine, out

    engine, groups = asyncio.run(main())
    assert len(groups) == 4 and all(len(g) == 4 for g in groups)
    assert engine.stats.aborted_turns > 0
    for g in groups:
        for t in g:
            assert t.status is Status.ANSWERED
            vs = t.versions()
            assert vs == sorted(vs) and vs[-1] == 1  # every turn has one version, never mixed


def test_staleness_bound_gates_admission() -> None:
    scripts = {f"p{i}": script_turns([], "y") for i in range(6)}
    cfg = EngineConfig(n_samples=1, max_live=8, max_version_lag=0, groups_per_step=2)
    engine, (server,) = _engine(cfg, scripts)

    async def main():
        seen = []
        async for g in engine.run([Prompt(f"p{i}", "q") for i in range(6)]):
            seen.append(g)
            if len(seen) % 2 == 0:
                await server.update_weights({}, server.version + 1)
                engine.resume()  # wake the loop: the bound moved
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 6
    # at most 2 groups per version: each group's version equals its admission order // 2
    assert sorted(t.versions()[0] for g in seen for t in g) == [0, 0, 1, 1, 2, 2]


def test_repetition_detector() -> None:
    assert is_repetitive([1, 2, 3] * 10, 8, 8)
    assert not is_repetitive(list(range(100)), 8, 8)
    assert not is_repetitive([1, 2] * 3, 8, 8)


def test_config_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="max_turns must be >= 1, got 0"):
        EngineConfig(max_turns=0)
    with pytest.raises(ValueError, match="groups_per_step"):
        EngineConfig(max_version_lag=1)


def test_timeout_while_generating_and_while_waiting_for_a_slot() -> None:
    scripts = {f"p{i}": script_turns([], "y") for i in range(3)}
    server = FakeServer("s0", delay=5.0)
    cfg = EngineConfig(n_samples=1, max_inflight_per_server=1, timeout_s=0.3)
    engine, _ = _engine(cfg, scripts, [server])

    async def main():
        import time
        t0 = time.perf_counter()
        groups = [g async for g in engine.run([Prompt(f"p{i}", "q") for i in range(3)])]
        return groups, time.perf_counter() - t0

    groups, wall = asyncio.run(main())
    assert wall < 2.0  # nobody waited for the 5 s generation
    assert [g[0].stop_reason for g in groups] == ["timeout"] * 3
    assert all(g[0].status is Status.TRUNCATED and g[0].fatal_step is None for g in groups)


def test_lockstep_baseline_runs_turns_in_batches() -> None:
    scripts = {f"p{i}": script_turns([("search", {"sleep": 0.01 * (i + 1)})] * (i % 3 + 1), "y")
               for i in range(6)}
    cfg = EngineConfig(n_samples=1, max_live=3, lockstep=True)
    engine, _ = _engine(cfg, scripts, record_spans=True)
    groups = asyncio.run(_collect(engine, [Prompt(f"p{i}", "q") for i in range(6)]))
    assert len(groups) == 6 and all(g[0].status is Status.ANSWERED for g in groups)
    spans = engine.stats.spans
    gens = [(t0, t1) for _, k, t0, t1 in spans if k == "gen"]
    tools = [(t0, t1) for _, k, t0, t1 in spans if k.startswith("tool")]
    # lock-step: no generation overlaps any tool span, and batches of 3 never interleave
    assert not any(g0 < t1 and t0 < g1 for g0, g1 in gens for t0, t1 in tools)
    first_batch = {f"p{i}#0" for i in range(3)}
    end_first = max(t1 for tid, _, _, t1 in spans if tid in first_batch)
    assert all(t0 >= end_first for tid, _, t0, _ in spans if tid not in first_batch)


def test_metrics_busy_fraction_and_tool_histogram() -> None:
    scripts = {f"p{i}": script_turns([("search", {"sleep": 0.02})] * 2, "y") for i in range(3)}
    engine, _ = _engine(EngineConfig(n_samples=2), scripts, servers=[FakeServer("s0", delay=0.01)])
    asyncio.run(_collect(engine, [Prompt(f"p{i}", "q") for i in range(3)]))
    s = engine.stats.summary()
    assert 0.0 < s["generator_busy_fraction"] <= 1.0
    h = s["tool_latency_s"]
    assert h["count"] == 12 and sum(h["buckets"].values()) == 12 and 0.02 <= h["p50"] < 1.0


def test_review_regressions_group_emission_cancel_before_start_and_bad_policy() -> None:
    # a prompt over max_context with n_samples > 1: the group is emitted once, no KeyError
    engine, _ = _engine(EngineConfig(n_samples=2, max_context=8), {"p0": script_turns([], "y")})
    (g,) = asyncio.run(_collect(engine, [Prompt("p0", "q")]))
    assert [t.stop_reason for t in g] == ["max_context", "max_context"]
    # a policy that raises ends that trajectory as ERROR; the run and the other groups go on
    engine, _ = _engine(EngineConfig(n_samples=1), {"ok": script_turns([], "y")})
    groups = asyncio.run(_collect(engine, [Prompt("ok", "q"), Prompt("no-script", "q")]))
    got = {g[0].group_id: g[0] for g in groups}
    assert got["ok"].status is Status.ANSWERED
    assert got["no-script"].status is Status.ERROR and "no script" in got["no-script"].meta["engine_error"]
    # deadlines that expire right at launch (cancel before the job starts) never hang the run
    for _ in range(5):
        scripts = {f"p{i}": script_turns([("search", {"sleep": 0.01})] * 3, "y") for i in range(16)}
        engine, _ = _engine(EngineConfig(n_samples=2, max_live=32, timeout_s=0.02), scripts,
                            servers=[FakeServer("s0", delay=0.005)])

        async def bounded():
            return await asyncio.wait_for(_collect(engine, [Prompt(f"p{i}", "q") for i in range(16)]), 20)
        assert len(asyncio.run(bounded())) == 16


def test_lockstep_launches_the_whole_batch_at_once() -> None:
    scripts = {f"p{i}": script_turns([], "y") for i in range(64)}
    server = FakeServer("s0", delay=0.01)
    peak = 0
    orig = server.generate

    async def counting(req):
        nonlocal peak
        peak = max(peak, len(server.inflight) + 1)
        return await orig(req)
    server.generate = counting
    engine, _ = _engine(EngineConfig(n_samples=1, max_live=64, max_inflight_per_server=64, lockstep=True),
                        scripts, servers=[server])
    asyncio.run(_collect(engine, [Prompt(f"p{i}", "q") for i in range(64)]))
    assert peak == 64


class EosServer(FakeServer):
    """Ends every turn with <|endoftext|> instead of <|im_end|> (a model's other stop token)."""

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        out = await super().generate(req)
        if out.token_ids and out.token_ids[-1] == CODEC.IM_END:
            out.token_ids[-1] = CODEC.EOS
        return out


def test_a_turn_ended_by_another_stop_token_is_closed_by_the_observation() -> None:
    scripts = {"p": script_turns([("search", {"q": "x"})], "a")}
    engine, _ = _engine(EngineConfig(n_samples=1), scripts, servers=[EosServer("s0")])
    (group,) = asyncio.run(_collect(engine, [Prompt("p", "q")]))
    t = group[0]
    gen, obs = t.segments[0], t.segments[1]
    assert gen.token_ids[-1] == CODEC.EOS  # the sampled stop token stays: token-in/token-out
    assert obs.token_ids[0] == CODEC.IM_END  # and the template's turn end follows it
    assert CODEC.decode(obs.token_ids).startswith("<|im_end|>\n<|im_start|>user\n<tool_response>")


def test_a_reward_hook_scores_each_group_before_it_is_yielded() -> None:
    scripts = {f"p{i}": script_turns([], f"ans{i}") for i in range(3)}
    seen = []

    async def reward(group):
        await asyncio.sleep(0.01)  # an async judge
        for t in group:
            t.reward["total"] = float(t.answer == "ans1")
        seen.append(group[0].group_id)

    engine, _ = _engine(EngineConfig(n_samples=2, max_live=4), scripts, reward=reward)
    groups = asyncio.run(_collect(engine, [Prompt(f"p{i}", "q") for i in range(3)]))
    assert sorted(seen) == ["p0", "p1", "p2"] and len(groups) == 3
    assert {g[0].group_id: [t.reward["total"] for t in g] for g in groups} == \
        {"p0": [0.0, 0.0], "p1": [1.0, 1.0], "p2": [0.0, 0.0]}


def test_a_hung_server_fails_over_in_request_timeout_s() -> None:
    """A server that accepts requests and never answers (SIGSTOPped) costs request_timeout_s,
    not the trajectory's timeout_s: its turns move to the live server."""
    scripts = {f"p{i}": script_turns([("search", {"q": "x"})], f"a{i}") for i in range(4)}
    hung, ok = FakeServer("hung", delay=60.0), FakeServer("ok")
    engine, _ = _engine(EngineConfig(n_samples=2, max_live=8, request_timeout_s=0.3, timeout_s=30), scripts,
                        servers=[hung, ok])
    t0 = time.perf_counter()
    groups = asyncio.run(_collect(engine, [Prompt(f"p{i}", "q") for i in range(4)]))
    assert time.perf_counter() - t0 < 10
    assert all(t.status is Status.ANSWERED for g in groups for t in g) and hung.requests >= 1


class GuessEnv:
    """A custom environment (AgentEnv): guess the secret number; 'higher' / 'lower' until right."""

    def __init__(self, secret: int) -> None:
        self.secret, self.calls = secret, 0

    async def step(self, traj, turn):
        from spyglass.engine.scheduler import EnvStep
        self.calls += 1
        m = re.search(r"guess (\d+)", traj.segments[-1].text)
        if m is None:
            return EnvStep("say: guess N", ok=False)
        n = int(m.group(1))
        if n == self.secret:
            return EnvStep(done=True, reward=1.0, answer=str(n))
        return EnvStep("higher" if n < self.secret else "lower")


def test_a_custom_environment_drives_the_turns() -> None:
    scripts = {"p": ["guess 5", "hmm", "guess 2", "guess 3"]}
    env = GuessEnv(3)
    engine, _ = _engine(EngineConfig(n_samples=1, max_turns=6), scripts, env=env)
    (group,) = asyncio.run(_collect(engine, [Prompt("p", "Guess my number.")]))
    t = group[0]
    assert (t.status, t.stop_reason, t.answer, t.reward) == (Status.ANSWERED, "env_done", "3", {"total": 1.0})
    assert env.calls == 4 and len(t.turns) == 4
    assert [tr.ok for tr in t.turns] == [True, False, True, True] and t.fatal_step is None
    obs = [CODEC.decode(s.token_ids) for s in t.segments if s.kind is SegmentKind.OBS]
    assert len(obs) == 3 and "lower" in obs[0] and "say: guess N" in obs[1] and "higher" in obs[2]
    # the engine's limits still hold: an environment that never ends stops at max_turns
    engine, _ = _engine(EngineConfig(n_samples=1, max_turns=2), {"p": ["guess 9"] * 5}, env=GuessEnv(3))
    (group,) = asyncio.run(_collect(engine, [Prompt("p", "Guess.")]))
    assert (group[0].status, group[0].stop_reason, len(group[0].turns)) == (Status.TRUNCATED, "max_turns", 2)
