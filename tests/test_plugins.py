"""Tools from plain functions (tools.base.tool) and plugins by dotted path (engine/plugins.py):
exact schemas, sync and async calls, typed errors; a reward and tools loaded from a module on
sys.path, their one-line errors; a real rollout on the bundled world with a plugin tool."""
import asyncio
import json
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Literal, Optional, Union

import pytest
from PIL import Image

from spyglass.engine.config import ConfigError, from_dict
from spyglass.engine.env import EnvConfig, build_env
from spyglass.engine.plugins import PluginError, load_object, load_tools
from spyglass.engine.tools.base import ErrorKind, Tool, ToolContext, ToolError, ToolResult, tool
from spyglass.engine.tools.executor import ExecutorConfig, ToolExecutor
from spyglass.engine.trajectory import Status, Trajectory
from spyglass.trainer.reward import RewardConfig, score_group


def call(t: Tool, args: dict, ctx: ToolContext | None = None) -> ToolResult:
    return asyncio.run(t.fn(args, ctx or ToolContext()))


# ---------------------------------------------------------------------------------- schemas
def test_schema_of_scalars_defaults_and_google_docstring() -> None:
    @tool
    def search(query: str, top_k: int = 3, threshold: float = 0.5, exact: bool = False) -> str:
        """Search the corpus
        for pages.

        Longer explanation that the model does not need.

        Args:
            query (str): what to look for,
                in a few words.
            top_k: how many results.
            exact: match the words exactly.

        Returns:
            the hits.
        """
        return ""

    assert search.name == "search"
    assert search.schema() == {"type": "function", "function": {
        "name": "search", "description": "Search the corpus for pages.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "what to look for, in a few words."},
            "top_k": {"type": "integer", "description": "how many results.", "default": 3},
            "threshold": {"type": "number", "default": 0.5},
            "exact": {"type": "boolean", "description": "match the words exactly.", "default": False}},
            "required": ["query"], "additionalProperties": False}}}


def test_schema_of_containers_optional_and_literal() -> None:
    def f(tags: list[str], ids: list[int] | None, opts: dict, weights: dict[str, float],
          mode: Optional[Literal["fast", "slow"]] = None, level: Literal[1, 2, 3] = 1,
          note: Optional[str] = None, nested: list[list[bool]] = []) -> str:  # noqa: B006
        """No Args section."""
        return ""

    assert tool(f).parameters == {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}},
        "ids": {"type": ["array", "null"], "items": {"type": "integer"}},
        "opts": {"type": "object"},
        "weights": {"type": "object"},
        "mode": {"type": ["string", "null"], "enum": ["fast", "slow", None], "default": None},
        "level": {"type": "integer", "enum": [1, 2, 3], "default": 1},
        "note": {"type": ["string", "null"], "default": None},
        "nested": {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}, "default": []}},
        "required": ["tags", "ids", "opts", "weights"], "additionalProperties": False}


def test_schema_of_images_and_context_and_the_decorator_forms() -> None:
    @tool(name="Compare", description="Compare images.", timeout_s=5.0, cacheable=False, retries=0)
    async def compare(image: Image.Image, others: list[Image.Image], ctx: ToolContext) -> str:
        """Ignored: description= wins.

        Args:
            image: the image to compare.
        """
        return f"{image.size} vs {[o.size for o in others]} in {ctx.trajectory_id}"

    assert (compare.name, compare.description, compare.timeout_s, compare.cacheable, compare.retries) == \
        ("Compare", "Compare images.", 5.0, False, 0)
    assert compare.image_args == ("image", "others")  # keyed by content in the executor's cache
    assert compare.parameters == {"type": "object", "properties": {
        "image": {"type": "string", "description": "the image to compare."},
        "others": {"type": "array", "items": {"type": "string"},
                   "description": "images of the conversation by name (img_1, img_2, ...)"}},
        "required": ["image", "others"], "additionalProperties": False}
    ctx = ToolContext(images=[Image.new("RGB", (4, 3)), Image.new("RGB", (2, 2))], trajectory_id="t7")
    assert call(compare, {"image": "img_2", "others": ["img_1"]}, ctx).text == "(2, 2) vs [(4, 3)] in t7"
    r = call(compare, {"image": "img_9", "others": []}, ctx)
    assert r.error.kind is ErrorKind.BAD_ARGS and "unknown image 'img_9'" in r.error.message
    assert tool(name="plain")(lambda: "x").name == "plain"


def test_bad_signatures_raise_type_errors_naming_the_parameter() -> None:
    def untyped(query, k: int = 1) -> str:  # noqa: ANN001
        return ""

    def union(x: Union[int, str]) -> str:
        return ""

    def a_set(x: set[int]) -> str:
        return ""

    def int_keys(x: dict[int, str]) -> str:
        return ""

    def mixed(x: Literal["a", 1]) -> str:
        return ""

    def star(*xs: int) -> str:
        return ""

    def forward(x: "NoSuchType") -> str:  # noqa: F821
        return ""

    cases = [(untyped, "parameter 'query' has no type annotation"),
             (union, "parameter 'x': unsupported type typing.Union\\[int, str\\]"),
             (a_set, "parameter 'x': unsupported type set\\[int\\]"),
             (int_keys, "parameter 'x': unsupported type dict\\[int, str\\]: JSON object keys are str"),
             (mixed, "parameter 'x': Literal .* mixes value types"),
             (star, "parameter 'xs' is variadic positional"),
             (forward, "cannot resolve the type hints .*NoSuchType")]
    for fn, msg in cases:
        with pytest.raises(TypeError, match=f"tool {fn.__name__!r}: {msg}"):
            tool(fn)
    with pytest.raises(TypeError, match="unknown option\\(s\\) \\['timeout'\\]"):
        tool(timeout=3)
    with pytest.raises(TypeError, match="takes a function"):
        tool(int)


# -------------------------------------------------------------------------------- calling
def test_sync_runs_in_a_worker_thread_and_async_on_the_loop() -> None:
    seen = {}

    @tool
    def sync_add(a: int, b: float = 0.5) -> str:
        """Add."""
        seen["sync"] = threading.get_ident()
        return str(a + b)

    @tool
    async def async_info(word: str) -> dict:
        """Info."""
        seen["async"] = threading.get_ident()
        await asyncio.sleep(0)
        return {"word": word, "len": len(word)}

    assert call(sync_add, {"a": 2.0}).text == "2.5"  # an integral float is an integer
    assert json.loads(call(async_info, {"word": "héllo"}).text) == {"word": "héllo", "len": 5}
    assert seen["sync"] != threading.get_ident() and seen["async"] == threading.get_ident()


def test_return_values_become_text_images_or_a_result() -> None:
    red, blue = Image.new("RGB", (2, 2), "red"), Image.new("RGB", (3, 3), "blue")

    @tool
    def make(kind: Literal["one", "many", "result", "none", "bad"]) -> object:
        """Make."""
        return {"one": red, "many": [red, blue], "result": ToolResult(text="raw", meta={"k": 1}),
                "none": None, "bad": object()}[kind]

    assert call(make, {"kind": "one"}).images == [red]
    assert call(make, {"kind": "many"}).images == [red, blue]
    assert call(make, {"kind": "result"}).meta == {"k": 1}
    assert call(make, {"kind": "none"}).text == "null"
    r = call(make, {"kind": "bad"})
    assert r.error.kind is ErrorKind.FATAL and "make returned object: not a str" in r.error.message
    # through the executor: new images are named in the caller's context
    ctx = ToolContext(images=[blue])
    res = asyncio.run(ToolExecutor({"make": make}).execute("make", '{"kind":"many"}', ctx))
    assert res.text == "img_2\nimg_3" and len(ctx.images) == 3


def test_errors_are_typed_results() -> None:
    calls = []

    @tool(retries=1)
    def picky(n: int, mode: Literal["a", "b"] = "a", tags: list[str] = []) -> str:  # noqa: B006
        """Picky."""
        calls.append(n)
        if n == 1:
            raise ToolError(ErrorKind.BAD_ARGS, "n must not be 1")
        if n == 2:
            raise ValueError("two is right out")
        if n == 3:
            raise TimeoutError("upstream slow")
        return "ok"

    def err(args: dict) -> ToolError:
        r = call(picky, args)
        assert not r.ok and r.error.tool == "picky"
        return r.error

    for args, kind, msg in [
            ({}, "bad_args", "picky: missing required argument(s) ['n']"),
            ({"n": 0, "x": 1}, "bad_args", "picky: unknown argument(s) ['x']; expected ['mode', 'n', 'tags']"),
            ({"n": "0"}, "bad_args", "picky: argument 'n' must be integer, got str '0'"),
            ({"n": True}, "bad_args", "picky: argument 'n' must be integer, got bool True"),
            ({"n": 0, "mode": "c"}, "bad_args", "picky: argument 'mode'='c' is not one of ['a', 'b']"),
            ({"n": 0, "tags": ["x", 2]}, "bad_args", "picky: argument 'tags[1]' must be string, got int 2"),
            ({"n": 1}, "bad_args", "n must not be 1"),
            ({"n": 2}, "fatal", "ValueError: two is right out"),
            ({"n": 3}, "transient", "picky timed out: upstream slow")]:
        e = err(args)
        assert (e.kind.value, e.message) == (kind, msg)
    assert calls == [1, 2, 3]  # bad arguments never reach the function
    assert call(picky, {"n": 0, "tags": ["x"]}).text == "ok"
    # the executor retries a transient failure, then reports it fatal
    ex = ToolExecutor({"picky": picky}, config=ExecutorConfig(backoff_base_s=0.0, backoff_max_s=0.0))
    res = asyncio.run(ex.execute("picky", '{"n": 3}', ToolContext()))
    assert res.error.kind is ErrorKind.FATAL and "still failing after 2 attempts" in res.error.message
    assert calls.count(3) == 3 and ex.stats()["retries"] == 1


# ------------------------------------------------------------------------ plugins by path
PLUGIN = '''
import asyncio
from PIL import Image, ImageOps
from spyglass.engine.tools.base import Tool, ToolResult, tool

def exact(traj):
    return 1.0 if traj.answer == traj.meta.get("answer") else 0.0

async def judged(traj):
    await asyncio.sleep(0)
    return {"total": 0.5, "acc": 1.0}

def two_args(traj, cfg):
    return 0.0

def returns_text(traj):
    return "high"

NOT_A_FUNCTION = 42

class Holder:
    reward = staticmethod(exact)

def word_count(text: str) -> str:
    """Count the words of a text.

    Args:
        text: the text to count.
    """
    return str(len(text.split()))

def mirror(image: Image.Image) -> Image.Image:
    """Mirror an image left to right."""
    return ImageOps.mirror(image)

async def _shout(args, ctx):
    return ToolResult(text=args["text"].upper())

SHOUT = Tool("Shout", "Shout a text.", {"type": "object", "properties": {"text": {"type": "string"}},
             "required": ["text"]}, _shout)
TOOLS = [word_count, mirror, SHOUT]

def untyped(text):
    return text

def Crop(image: str) -> str:
    """Shadows a built-in."""
    return image

BAD_LIST = [word_count, "Visit"]
EMPTY = []


class TwoTurns:
    """An AgentEnv: a nudge after the first turn, done after the second (reward 0.5)."""

    def __init__(self):
        self.turns = 0

    async def step(self, traj, turn):
        from spyglass.engine.scheduler import EnvStep
        self.turns += 1
        return EnvStep(done=True, reward=0.5, answer="done") if self.turns % 2 == 0 else EnvStep("go on")
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch) -> str:
    """A module on sys.path (a fresh name per test), removed from sys.modules afterwards."""
    name = f"spyglass_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('broken on purpose\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for m in (name, f"{name}_broken"):
        sys.modules.pop(m, None)


def _finished(answer: str | None, target: str = "Paris") -> Trajectory:
    return Trajectory(id=f"t-{answer}", group_id="g", sample_index=0, prompt_ids=[1, 2],
                      status=Status.ANSWERED, answer=answer, meta={"answer": target})


def test_reward_by_dotted_path(plugin: str) -> None:
    right, wrong = _finished("Paris"), _finished("Rome")
    assert asyncio.run(score_group([right, wrong], RewardConfig(name=f"{plugin}:exact"))) == [1.0, 0.0]
    assert right.reward == {"total": 1.0, "plugin": f"{plugin}:exact"}
    t = _finished("x")
    assert asyncio.run(score_group([t], RewardConfig(name=f"{plugin}:judged"))) == [0.5]
    assert t.reward["acc"] == 1.0 and t.reward["total"] == 0.5
    assert asyncio.run(score_group([_finished("Paris")], RewardConfig(name=f"{plugin}:Holder.reward"))) == [1.0]
    with pytest.raises(TypeError, match=f"reward function '{plugin}:returns_text' returned 'high'"):
        asyncio.run(score_group([t], RewardConfig(name=f"{plugin}:returns_text")))


def test_plugin_errors_are_one_line_naming_the_path(plugin: str) -> None:
    cases = [
        (lambda: load_object("no_such_module_xyz:fn", "reward"),
         "reward 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz' "
         "(ModuleNotFoundError: No module named 'no_such_module_xyz')"),
        (lambda: load_object(f"{plugin}_broken:fn", "reward"),
         f"reward '{plugin}_broken:fn': cannot import module '{plugin}_broken' "
         f"(RuntimeError: broken on purpose second line)"),
        (lambda: load_object(f"{plugin}:missing", "reward"),
         f"reward '{plugin}:missing': '{plugin}' has no attribute 'missing'"),
        (lambda: load_object(f"{plugin}:Holder.nope", "reward"),
         f"reward '{plugin}:Holder.nope': '{plugin}:Holder' has no attribute 'nope'"),
        (lambda: load_object("pkg.mod.fn", "reward"), "reward 'pkg.mod.fn': not of the form 'pkg.module:attribute'"),
        (lambda: RewardConfig(name=f"{plugin}:NOT_A_FUNCTION"),
         f"RewardConfig.name: reward function '{plugin}:NOT_A_FUNCTION': expected a function "
         f"fn(traj) -> float, got int"),
        (lambda: RewardConfig(name=f"{plugin}:two_args"),
         f"RewardConfig.name: reward function '{plugin}:two_args': must take one trajectory, fn(traj) -> float; "
         f"its signature (traj, cfg) does not (missing a required argument: 'cfg')"),
        (lambda: load_tools(f"{plugin}:NOT_A_FUNCTION"),
         f"tool plugin '{plugin}:NOT_A_FUNCTION': expected a function, a Tool or a list of them, got int 42"),
        (lambda: load_tools(f"{plugin}:BAD_LIST"),
         f"tool plugin '{plugin}:BAD_LIST' item 1: expected a function, a Tool or a list of them, got str 'Visit'"),
        (lambda: load_tools(f"{plugin}:EMPTY"), f"tool plugin '{plugin}:EMPTY': an empty list"),
        (lambda: load_tools(f"{plugin}:untyped"),
         f"tool plugin '{plugin}:untyped': tool 'untyped': parameter 'text' has no type annotation"),
    ]
    for fn, msg in cases:
        with pytest.raises(PluginError) as e:
            fn()
        assert str(e.value).startswith(msg), str(e.value)
        assert "\n" not in str(e.value)
    # through the config layer: the key path, then the same line
    from spyglass.trainer.grpo import GRPOConfig
    with pytest.raises(ConfigError, match=r"^reward\.name: reward function 'no_such_module_xyz:f': cannot import"):
        from_dict(GRPOConfig, {"reward": {"name": "no_such_module_xyz:f"}})


def test_env_tools_take_plugin_paths_beside_the_built_ins(plugin: str) -> None:
    cfg = from_dict(EnvConfig, {"tools": f"TextSearch,{plugin}:word_count,{plugin}:SHOUT"})  # a CLI flag's text
    assert cfg.tools == ["TextSearch", f"{plugin}:word_count", f"{plugin}:SHOUT"]
    assert [t.name for t in load_tools(f"{plugin}:TOOLS")] == ["word_count", "mirror", "Shout"]
    for tools, msg in [
            (["Crop", "Telescope"], r"tools: unknown \['Telescope'\]; known \[.*\] or a plugin 'pkg.module:attr'"),
            ([f"{plugin}:Crop"], f"tools: plugin '{plugin}:Crop' has a tool named 'Crop', a built-in's name"),
            ([f"{plugin}:TOOLS", f"{plugin}:word_count"],
             f"tools: plugins '{plugin}:TOOLS' and '{plugin}:word_count' both have a tool named 'word_count'"),
            (["OCR", "OCR"], r"tools: \['OCR'\] listed more than once"),
            ([f"{plugin}:nope"], f"tools: tool plugin '{plugin}:nope': '{plugin}' has no attribute 'nope'")]:
        with pytest.raises(ConfigError, match=msg):
            EnvConfig(tools=tools)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from spyglass.engine.offline.world import WorldConfig, ensure_world
    root = tmp_path_factory.mktemp("world") / "w"
    ensure_world(root, WorldConfig())
    return root


def test_rollout_on_the_world_with_a_plugin_tool(plugin: str, world: Path, tmp_path: Path) -> None:
    from spyglass.engine.loader import load_model
    from spyglass.engine.rollout import RolloutConfig, run_rollout
    from spyglass.engine.scheduler import EngineConfig
    from spyglass.engine.trajectory import read_jsonl

    env_cfg = EnvConfig(world_dir=str(world), dense_search=False, questions=1,
                        tools=["TextSearch", f"{plugin}:TOOLS"])
    cfg = RolloutConfig(model="tiny:qwen2_vl", policy="sample", env=env_cfg, out=str(tmp_path / "r.jsonl"),
                        progress=False, engine=EngineConfig(n_samples=2, max_turns=2, max_tokens_per_turn=8))
    summary = run_rollout(cfg)
    trajs = read_jsonl(cfg.out)
    assert summary["groups"] == 1 and len(trajs) == 2
    prompt = load_model("tiny:qwen2_vl").tokenizer.decode(trajs[0].prompt_ids)
    for name, desc in [("word_count", "Count the words of a text."), ("mirror", "Mirror an image left to right."),
                       ("Shout", "Shout a text."), ("TextSearch", "")]:
        assert f'"name": "{name}"' in prompt and desc in prompt
    assert "the text to count." in prompt  # the Args: line became the argument's description

    env = build_env(env_cfg)
    assert list(env.tools) == ["TextSearch", "word_count", "mirror", "Shout"]  # the config's order
    traj = trajs[0]
    outs = asyncio.run(env.runner([
        {"name": "word_count", "arguments": json.dumps({"text": "a lantern in the fog"})},
        {"name": "mirror", "arguments": json.dumps({"image": "img_1"})},
        {"name": "Shout", "arguments": json.dumps({"text": "hi"})},
        {"name": "word_count", "arguments": json.dumps({"words": "x"})}], traj))
    assert outs[0].text == "5" and outs[0].error_kind is None
    first = traj.prompt_images[0]
    assert outs[1].image_refs == ["img_2"] and outs[1].images[0].size == first.size
    assert outs[1].images[0].tobytes() == first.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    assert outs[2].text == "HI"
    assert outs[3].error_kind == "bad_args" and "unknown argument(s) ['words']" in outs[3].text


def test_a_custom_environment_by_dotted_path(plugin: str, world: Path, tmp_path: Path) -> None:
    from spyglass.engine.rollout import RolloutConfig, run_rollout
    from spyglass.engine.scheduler import EngineConfig
    from spyglass.engine.trajectory import read_jsonl

    env_cfg = EnvConfig(world_dir=str(world), dense_search=False, questions=1, tools=["TextSearch"])
    cfg = RolloutConfig(model="tiny:qwen2_vl", policy="sample", env=env_cfg, out=str(tmp_path / "r.jsonl"),
                        progress=False, agent_env=f"{plugin}:TwoTurns",
                        engine=EngineConfig(n_samples=1, max_turns=4, max_tokens_per_turn=4))
    run_rollout(cfg)
    (t,) = read_jsonl(cfg.out)
    assert (t.stop_reason, t.answer, t.reward, len(t.turns)) == ("env_done", "done", {"total": 0.5}, 2)
    assert "go on" in t.segments[1].text
    with pytest.raises(ValueError, match="agent_env .*has no attribute 'Nothing'"):  # a PluginError
        RolloutConfig(agent_env=f"{plugin}:Nothing")
