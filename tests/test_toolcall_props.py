"""Property tests: the C++ parser agrees with the Python reference byte for byte on random and
adversarial input in every mode (hermes, llama3_json, mistral), streaming equals one-shot
parsing, and canonical JSON round-trips."""
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spyglass.engine.toolcall import MODES, ToolCallParser

TOOLS = [
    {"name": "crop", "parameters": {
        "type": "object", "properties": {
            "box": {"type": "array", "items": {"type": "integer"}},
            "mode": {"enum": ["fast", "exact", 1.5, None]}, "scale": {"type": "number"}},
        "required": ["box"], "additionalProperties": False}},
    {"name": "text_search", "parameters": {
        "type": "object", "properties": {
            "query": {"type": "string"}, "top_k": {"type": "integer"},
            "opts": {"type": "object", "properties": {"site": {"type": ["string", "null"]}},
                     "required": ["site"]}},
        "required": ["query"]}},
    {"name": "python"},
]
CPP = ToolCallParser(TOOLS, max_depth=8, max_call_bytes=4096)
REF = ToolCallParser(TOOLS, max_depth=8, max_call_bytes=4096, backend="python")
TIGHT = [ToolCallParser(TOOLS, max_depth=2, max_call_bytes=40, backend=b) for b in ("cpp", "python")]
BY_MODE = {m: [ToolCallParser(TOOLS, max_depth=8, max_call_bytes=4096, backend=b, mode=m)
               for b in ("cpp", "python")] for m in MODES}
TIGHT_BY_MODE = {m: [ToolCallParser(TOOLS, max_depth=3, max_call_bytes=60, backend=b, mode=m)
                     for b in ("cpp", "python")] for m in MODES}
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12)

PIECES = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>",
          "<response>", "</response>", "<", "<tool_", "</tool_call", '"', "\\", "{", "}", "[",
          "]", ":", ",", " ", "\n", "1e5", "-0.50", "true", "nul", "\\u00e9", "\\ud83d\\ude00",
          "\\udc00", '"name"', '"arguments"', '"crop"', '"box"', '"python"', '"query"', "é", "x",
          '"parameters"', "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>", ";", "[TOOL_",
          "<|python", "[ARG", "crop"]


def call_args(draw: st.DrawFn, name: str) -> dict:
    if name == "crop":
        args = {"box": draw(st.lists(st.integers(-5, 5) | st.floats(-3, 3), max_size=4))}
        if draw(st.booleans()):
            args["mode"] = draw(st.sampled_from(["fast", "slow", 1.5, None, 2]))
    elif name == "text_search":
        args = {"query": draw(st.text(max_size=20) | st.integers())}
        if draw(st.booleans()):
            args["opts"] = draw(st.dictionaries(st.sampled_from(["site", "x"]), json_values,
                                                max_size=2))
    else:
        args = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3))
    return args


def call_object(draw: st.DrawFn) -> dict:
    """A call object, sometimes with "parameters", both keys, or string-encoded arguments."""
    name = draw(st.sampled_from(["crop", "text_search", "python", "nope"]))
    args: object = call_args(draw, name)
    variant = draw(st.sampled_from(["plain"] * 4 + ["string", "parameters", "both", "none"]))
    if variant == "string":
        args = json.dumps(args) if draw(st.integers(0, 3)) else draw(json_values)
    if variant == "none":
        return {"name": name}
    if variant == "both":
        return {"name": name, "arguments": args, "parameters": args}
    return {"name": name, "parameters" if variant == "parameters" else "arguments": args}


def mutate(draw: st.DrawFn, body: str) -> str:
    mutation = draw(st.sampled_from(["none"] * 4 + ["truncate", "insert", "delete"]))
    if mutation != "none" and body:
        i = draw(st.integers(0, len(body) - 1))
        piece = draw(st.sampled_from(PIECES))
        body = {"truncate": body[:i], "insert": body[:i] + piece + body[i:],
                "delete": body[:i] + body[i + 1:]}[mutation]
    return body


def dumps(draw: st.DrawFn, v: object) -> str:
    return json.dumps(v, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))


def call_body(draw: st.DrawFn) -> str:
    """One JSON call block: an object, or (sometimes) a list of 0-3 call objects."""
    if draw(st.integers(0, 5)) == 0:
        v: object = [call_object(draw) for _ in range(draw(st.integers(0, 3)))]
    else:
        v = call_object(draw)
    return mutate(draw, dumps(draw, v))


def framed_call(draw: st.DrawFn, mode: str) -> str:
    """A call as the mode frames it (llama3_json: a JSON value, maybe after <|python_tag|>,
    maybe several joined by ';'; mistral: [TOOL_CALLS] + a list, or the v11 name form)."""
    if mode == "hermes":
        return f"<tool_call>{call_body(draw)}</tool_call>"
    if mode == "llama3_json":
        bodies = [call_body(draw) for _ in range(draw(st.integers(1, 3)))]
        sep = draw(st.sampled_from(["; ", ";", " ; ", "\n", ";\n"]))
        return draw(st.sampled_from(["", "<|python_tag|>", "<|python_tag|> "])) + sep.join(bodies)
    if draw(st.booleans()):
        return "[TOOL_CALLS]" + draw(st.sampled_from(["", " "])) + call_body(draw)
    obj = call_object(draw)
    args = mutate(draw, dumps(draw, obj.get("arguments", obj.get("parameters", {}))))
    mid = draw(st.sampled_from(["[ARGS]", "[ARGS]", "", "[CALL_ID]a1B2c3D4e[ARGS]", "[CALL_ID]x"]))
    return f"[TOOL_CALLS]{obj['name']}{mid}{args}"


@st.composite
def outputs(draw: st.DrawFn, mode: str = "hermes") -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["think", "call", "call", "answer", "noise", "text"]))
        if kind == "think":
            parts.append(f"<think>{draw(st.text(max_size=30))}</think>")
        elif kind == "call":
            parts.append(framed_call(draw, mode))
        elif kind == "answer":
            tag = draw(st.sampled_from(["answer", "response"]))
            parts.append(f"<{tag}>{draw(st.text(max_size=10))}</{tag}>")
        elif kind == "noise":
            parts.append("".join(draw(st.lists(st.sampled_from(PIECES), max_size=8))))
        else:
            parts.append(draw(st.text(max_size=10)))
    data = bytearray("\n".join(parts).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 2))):  # corrupt a few bytes (invalid UTF-8 and worse)
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def agree(text: bytes | str) -> dict:
    a, b = CPP.parse(text).to_dict(), REF.parse(text).to_dict()
    assert a == b, text
    return a


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_agree(data: bytes) -> None:
    agree(data)
    agree(b"<tool_call>" + data + b"</tool_call>")


@SETTINGS
@given(outputs())
def test_structured_outputs_agree(data: bytes) -> None:
    agree(data)
    assert TIGHT[0].parse(data).to_dict() == TIGHT[1].parse(data).to_dict(), data


@SETTINGS
@given(st.text(max_size=60))
def test_str_input_agrees_with_its_utf8(text: str) -> None:  # incl. lone surrogates
    assert agree(text) == agree(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 20), st.sampled_from(["[", "{\"a\":"]), st.booleans())
def test_deep_nesting_agrees(depth: int, opener: str, close: bool) -> None:
    closer = "]" if opener == "[" else "}"
    inner = opener * depth + "1" + (closer * depth if close else "")
    r = agree('<tool_call>{"name": "python", "arguments": {"v": %s}}</tool_call>' % inner)
    kinds = [e["kind"] for e in r["errors"]]
    assert kinds == (["too_deep"] if depth + 2 > 8 else [] if close or depth == 0
                     else ["invalid_json"])


def test_huge_strings_and_many_calls() -> None:
    big = "é\\n\\u00e9" * 1000
    for n in (4000, 5000):
        agree('<tool_call>{"name": "python", "arguments": {"code": "%s"}}</tool_call>'
              % big[:n])
    calls = [f'<tool_call>{{"name": "crop", "arguments": {{"box": [{i}, {i % 7}.0]}}}}</tool_call>'
             if i % 10 else '<tool_call>{"name": "crop", "arguments": {"box": [1,}}</tool_call>'
             for i in range(3000)]
    r = agree("<think>plan</think>" + "\n".join(calls))
    assert len(r["calls"]) == 2700 and len(r["errors"]) == 300
    assert [c["index"] for c in r["calls"]][:3] == [1, 2, 3]


def agree_in(parsers: list[ToolCallParser], text: bytes | str) -> dict:
    a, b = (p.parse(text).to_dict() for p in parsers)
    assert a == b, text
    return a


OPENERS = {"hermes": [b"<tool_call>"], "llama3_json": [b"<|python_tag|>", b"{", b" {"],
           "mistral": [b"[TOOL_CALLS]", b"[TOOL_CALLS] [", b"[TOOL_CALLS]python[ARGS]",
                       b"[TOOL_CALLS]crop[CALL_ID]"]}


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(data=st.binary(max_size=300))
def test_modes_random_bytes_agree(mode: str, data: bytes) -> None:
    for opener in [b""] + OPENERS[mode]:
        agree_in(BY_MODE[mode], opener + data)


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(data=st.data())
def test_modes_structured_outputs_agree(mode: str, data: st.DataObject) -> None:
    text = data.draw(outputs(mode))
    agree_in(BY_MODE[mode], text)
    agree_in(TIGHT_BY_MODE[mode], text)


def stream_items(parser: ToolCallParser, data: bytes, rnd: random.Random) -> tuple[list, dict]:
    s, got, i = parser.stream(), [], 0
    while i < len(data):
        k = rnd.choice([1, 2, 3, 5, 16, 64])
        got += [x.to_dict() for x in s.feed(data[i:i + k])]
        i += k
    return got, s.finish().to_dict()


@SETTINGS
@given(outputs(), st.integers(0, 2**32))
def test_streaming_equals_one_shot(data: bytes, seed: int) -> None:
    one = CPP.parse(data).to_dict()
    items = sorted(one["calls"] + [e for e in one["errors"] if e["index"] >= 0],
                   key=lambda x: x["index"])
    got, final = stream_items(CPP, data, random.Random(seed))
    assert final == one
    assert got == items[:len(got)]  # emitted early, in order, never retracted
    ref_got, ref_final = stream_items(REF, data, random.Random(seed))
    assert (ref_got, ref_final) == (got, final)


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_modes_streaming_equals_one_shot(mode: str, data: st.DataObject, seed: int) -> None:
    text = data.draw(outputs(mode))
    cpp, ref = BY_MODE[mode]
    one = cpp.parse(text).to_dict()
    items = sorted(one["calls"] + [e for e in one["errors"] if e["index"] >= 0],
                   key=lambda x: x["index"])
    got, final = stream_items(cpp, text, random.Random(seed))
    assert final == one
    assert got == items[:len(got)]  # emitted early, in order, never retracted
    assert stream_items(ref, text, random.Random(seed)) == (got, final)


@SETTINGS
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_canonical_arguments_roundtrip(args: dict) -> None:
    text = f'<tool_call>{json.dumps({"name": "python", "arguments": args})}</tool_call>'
    call = agree(text)["calls"][0]
    # floats: the exact decimal of their repr (integral ones become ints, e.g. 1e+16)
    assert _floats(json.loads(call["arguments"])) == _floats(args)
    if not _has_float(args):
        assert call["arguments"] == json.dumps(args, ensure_ascii=False, sort_keys=True,
                                               separators=(",", ":"))


def _has_float(v: object) -> bool:
    if isinstance(v, float):
        return True
    if isinstance(v, dict):
        return any(_has_float(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_float(x) for x in v)
    return False


def _floats(v: object) -> object:
    if isinstance(v, dict):
        return {k: _floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_floats(x) for x in v]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v
