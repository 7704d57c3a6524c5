"""Example-based tests of the tool-call parser, run on both backends (C++ core and reference)."""
import json

import pytest

from spyglass.engine.toolcall import ERROR_KINDS, ParserConfig, ToolCallParser, canonical_json

TOOLS = [
    {"type": "function", "function": {"name": "crop", "parameters": {
        "type": "object",
        "properties": {"box": {"type": "array", "items": {"type": "integer"}},
                       "mode": {"enum": ["fast", "exact"]},
                       "scale": {"type": "number"}},
        "required": ["box"], "additionalProperties": False}}},
    {"name": "text_search", "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"},
                       "filters": {"type": "object", "properties": {"site": {"type": "string"}},
                                   "required": ["site"]},
                       "safe": {"type": "boolean"}, "lang": {"type": ["string", "null"]}},
        "required": ["query"]}},
    {"name": "ocr"},
]
BACKENDS = ["cpp", "python"]


@pytest.fixture(params=BACKENDS)
def parser(request: pytest.FixtureRequest) -> ToolCallParser:
    return ToolCallParser(TOOLS, backend=request.param)


def call(body: object) -> str:
    return f"<tool_call>{body if isinstance(body, str) else json.dumps(body)}</tool_call>"


def only_error(parser: ToolCallParser, text: str | bytes) -> dict:
    r = parser.parse(text)
    assert r.calls == [] and len(r.errors) == 1, r.to_dict()
    return r.errors[0].to_dict()


def test_full_output(parser: ToolCallParser) -> None:
    text = ("<think>I should crop.</think>\n"
            + call({"name": "crop", "arguments": {"mode": "fast", "box": [1, 2, 30, 40]}})
            + "\n" + call({"name": "ocr", "arguments": {}}))
    r = parser.parse(text)
    assert r.ok and r.think == "I should crop." and r.answer is None and r.answer_tag is None
    assert [c.name for c in r.calls] == ["crop", "ocr"]
    c0 = r.calls[0]
    assert c0.index == 0 and c0.arguments == '{"box":[1,2,30,40],"mode":"fast"}'
    assert c0.args() == {"box": [1, 2, 30, 40], "mode": "fast"}
    start = text.index("<tool_call>")
    assert c0.span == (start, text.index("</tool_call>") + len("</tool_call>"))
    assert r.calls[1].index == 1 and r.calls[1].span[1] == len(text)
    assert r.text_outside == "\n\n"


@pytest.mark.parametrize("tag", ["answer", "response"])
def test_answer(parser: ToolCallParser, tag: str) -> None:
    r = parser.parse(f"<think>done</think><{tag}>Paris, 1889</{tag}><answer>second</answer>")
    assert (r.answer, r.answer_tag, r.errors) == ("Paris, 1889", tag, [])


def test_implicit_think_open_and_multiple_think(parser: ToolCallParser) -> None:
    r = parser.parse("reasoning here</think><think>more</think><answer>4</answer>")
    assert r.think == "reasoning here\nmore" and r.text_outside == ""
    r = parser.parse("<answer>4</answer> tail</think>")
    assert r.think is None and r.text_outside == " tail</think>"


def test_one_bad_call_does_not_hide_good_ones(parser: ToolCallParser) -> None:
    text = (call({"name": "ocr"}) + call('{"name": "crop", "arguments": {"box": [1,}}')
            + call({"name": "nope", "arguments": {}}) + call({"name": "text_search",
                                                              "arguments": {"query": "eiffel"}}))
    r = parser.parse(text)
    assert [(c.index, c.name) for c in r.calls] == [(0, "ocr"), (3, "text_search")]
    assert [(e.index, e.kind) for e in r.errors] == [(1, "invalid_json"), (2, "unknown_tool")]


def test_unbalanced_quotes_recover_later_calls(parser: ToolCallParser) -> None:
    text = call('{"name": "ocr, "arguments": {}}') + "\n" + call({"name": "ocr"})
    r = parser.parse(text)
    assert [e.kind for e in r.errors] == ["invalid_json"] and [c.index for c in r.calls] == [1]


def test_close_tag_inside_json_string(parser: ToolCallParser) -> None:
    q = "find </tool_call> and <tool_call> \\\" here"
    r = parser.parse(call('{"name": "text_search", "arguments": {"query": "%s"}}' % q))
    assert r.ok and r.calls[0].args()["query"] == json.loads(f'"{q}"')


@pytest.mark.parametrize("body,kind,msg,pos", [
    ('{"name": "crop", "arguments": {"box": [1, 2}}', "invalid_json",
     "unexpected character '}'", 43),
    ('{"name": "ocr"', "invalid_json", "unexpected end of input", 14),
    ('{"name": "ocr"} x', "invalid_json", "unexpected character 'x'", 16),
    ('{"name": "o\\qcr"}', "invalid_json", "invalid escape", 11),
    ('{"name": "\\ud800"}', "invalid_json", "lone surrogate in \\u escape", 10),
    ('{"name": "\\u12G4"}', "invalid_json", "invalid \\u escape", 10),
    ('{"name": "a\tb"}', "invalid_json", "control character in string", 11),
    ('{"name": 1e1234567890123456789}', "invalid_json", "number exponent out of range", 9),
    ('{"name": 01}', "invalid_json", "unexpected character '1'", 10),
    ('"ocr"', "invalid_call", "tool call must be a JSON object, got string", 0),
    ('[[1]]', "invalid_call", "tool call must be a JSON object, got array", 1),
    ('[]', "invalid_call", "tool call list is empty", 0),
    ('{"arguments": {}}', "invalid_call", 'tool call has no "name"', 0),
    ('{"name": 3}', "invalid_call", '"name" must be a string, got integer', 9),
    ('{"name": "ocr", "arguments": 5}', "invalid_call",
     '"arguments" must be an object, got integer', 29),
    ('{"name": "ocr", "parameters": [1]}', "invalid_call",
     '"parameters" must be an object, got array', 30),
    ('{"name": "ocr", "arguments": {}, "parameters": {}}', "invalid_call",
     'tool call has both "arguments" and "parameters"', 47),
    ('{"name": "ocr", "arguments": "[1]"}', "invalid_call",
     '"arguments" string must hold a JSON object, got array', 29),
    ('{"name": "ocr", "arguments": "hello"}', "invalid_json",
     'in the "arguments" string at byte 0: unexpected character \'h\'', 29),
    ('{"name": "ocr", "arguments": "{\\"a\\": }"}', "invalid_json",
     'in the "arguments" string at byte 6: unexpected character \'}\'', 29),
    ('{"name": "ocr", "arguments": ""}', "invalid_json",
     'in the "arguments" string at byte 0: unexpected end of input', 29),
    ('{"name": "zoom", "arguments": "{}"}', "unknown_tool", 'unknown tool "zoom"', 9),
    ('{"name": "crop", "arguments": "{\\"box\\": [1, \\"2\\"]}"}', "invalid_argument",
     'argument ["box",1]: expected integer, got string', 30),
    ('{"name": "zoom"}', "unknown_tool", 'unknown tool "zoom"', 9),
    ('{"name": "crop", "arguments": {"mode": "fast"}}', "missing_argument",
     'missing required argument ["box"]', 30),
    ('{"name": "crop", "arguments": {"box": [1, "2"]}}', "invalid_argument",
     'argument ["box",1]: expected integer, got string', 42),
    ('{"name": "crop", "arguments": {"box": [1.5]}}', "invalid_argument",
     'argument ["box",0]: expected integer, got number', 39),
    ('{"name": "crop", "arguments": {"box": [], "mode": "slow"}}', "invalid_argument",
     'argument ["mode"]: not one of the enum values', 50),
    ('{"name": "crop", "arguments": {"box": [], "zoom": 2}}', "invalid_argument",
     'argument ["zoom"]: unexpected argument', 50),
    ('{"name": "text_search", "arguments": {"query": "q", "filters": {}}}', "missing_argument",
     'missing required argument ["filters","site"]', 63),
    ('{"name": "text_search", "arguments": {"query": "q", "safe": "yes"}}', "invalid_argument",
     'argument ["safe"]: expected boolean, got string', 60),
    ('{"name": "text_search", "arguments": {"query": "q", "lang": 7}}', "invalid_argument",
     'argument ["lang"]: expected string or null, got integer', 60),
    ('{"name": "text_search", "arguments": {"query": ["q"]}}', "invalid_argument",
     'argument ["query"]: expected string, got array', 47),
])
def test_error_kinds(parser: ToolCallParser, body: str, kind: str, msg: str, pos: int) -> None:
    text = "<think>x</think>" + call(body)  # the body starts at byte 27; pos is relative to it
    err = only_error(parser, text)
    assert (err["kind"], err["message"], err["byte_pos"] - 27) == (kind, msg, pos), err
    assert err["index"] == 0 and err["span"] == (16, len(text.encode()))


def test_invalid_utf8_in_json_and_text(parser: ToolCallParser) -> None:
    text = b'<think>caf\xc3</think><tool_call>{"name": "o\xe4\xb8cr"}</tool_call>\xff'
    r = parser.parse(text)
    assert r.think == "caf\ufffd" and r.text_outside == "\ufffd"
    e = r.errors[0]
    assert (e.kind, e.message, e.byte_pos) == ("invalid_json", "invalid UTF-8", text.index(b"\xe4"))
    s = "<answer>\ud800x</answer>"  # lone surrogate in a str: encoded with surrogatepass
    assert parser.parse(s).answer == "\ufffd\ufffd\ufffdx"


def test_unterminated_tags(parser: ToolCallParser) -> None:
    first = call({"name": "ocr"})
    r = parser.parse(first + '<tool_call>{"name": "ocr"')
    assert [c.index for c in r.calls] == [0]
    e = r.errors[0].to_dict()
    assert e["kind"] == "unterminated_tag" and e["index"] == 1 and e["byte_pos"] == len(first)
    r = parser.parse("<think>still thinking")
    assert r.think == "still thinking" and r.errors[0].index == -1
    assert r.errors[0].message == "unterminated <think>"
    r = parser.parse("<answer>42")
    assert (r.answer, r.errors[0].kind) == ("42", "unterminated_tag")


def test_limits_too_deep_and_too_large() -> None:
    for backend in BACKENDS:
        p = ToolCallParser(TOOLS, max_depth=3, max_call_bytes=60, backend=backend)
        err = only_error(p, call('{"name": "ocr", "arguments": {"a": [[1]]}}'))
        assert (err["kind"], err["byte_pos"]) == ("too_deep", 11 + 36)
        assert err["message"] == "nesting deeper than max_depth=3"
        assert p.parse(call('{"name": "ocr", "arguments": {"a": [1]}}')).ok
        err = only_error(p, call({"name": "ocr", "arguments": {"a": "x" * 60}}))
        assert (err["kind"], err["byte_pos"]) == ("too_large", 11 + 60)


@pytest.mark.parametrize("raw,canon", [
    ("100.0", "100"), ("1.5e3", "1500"), ("-0", "0"), ("-0.0e5", "0"), ("12.50", "12.5"),
    ("0.00012", "0.00012"), ("1.2e-6", "0.0000012"), ("1.2e-7", "1.2e-7"), ("1e20", "1" + "0" * 20),
    ("1e21", "1e21"), ("1000000000000000000000000.0", "1" + "0" * 24), ("123e30", "1.23e32"),
    ("-4.5E-10", "-4.5e-10"),
    ("123456789012345678901234567890", "123456789012345678901234567890"),
    ('{"b": 1, "a": [true, null, "\\u00e9\\n\\ud83d\\ude00"], "a": 2}', '{"a":2,"b":1}'),
    ('"\\u001f\\/"', '"\\u001f/"'),
])
def test_canonical_json(raw: str, canon: str) -> None:
    assert canonical_json(raw) == canon
    for backend in BACKENDS:
        p = ToolCallParser([{"name": "f"}], backend=backend)
        r = p.parse(call('{"name": "f", "arguments": {"v": %s}}' % raw))
        assert r.calls[0].arguments == '{"v":%s}' % canon


def test_integral_float_is_integer(parser: ToolCallParser) -> None:
    r = parser.parse(call('{"name": "crop", "arguments": {"box": [1.0, 2e1], "scale": 2}}'))
    assert r.calls[0].args() == {"box": [1, 20], "scale": 2}


def test_streaming_split_tags(parser: ToolCallParser) -> None:
    text = ("<think>a</think>" + call({"name": "ocr"}) + "x <tool" + call({"name": "zoom"})
            + "<answer>done</answer>")
    s = parser.stream()
    got = []
    for i in range(len(text)):
        items = s.feed(text[i])
        for it in items:  # each call arrives exactly when its closing tag completes
            assert text[:i + 1].endswith("</tool_call>")
        got += items
    assert [type(g).__name__.replace("Ref", "") for g in got] == ["ToolCall", "CallError"]
    assert s.finish().to_dict() == parser.parse(text).to_dict()
    with pytest.raises(ValueError, match="after finish"):
        s.feed("x")


def test_batch_and_threads(parser: ToolCallParser) -> None:
    texts = [call({"name": "ocr", "arguments": {"i": i}}) * (i % 3) for i in range(200)]
    texts[7] = texts[7].encode()
    one = [parser.parse(t).to_dict() for t in texts]
    for threads in (0, 1, 3):
        assert [r.to_dict() for r in parser.parse_batch(texts, threads=threads)] == one
    with pytest.raises(ValueError, match="-1"):
        parser.parse_batch(texts, threads=-1)
    with pytest.raises(TypeError, match="int"):
        parser.parse_batch(["ok", 5])


def test_bad_tools_and_config() -> None:
    with pytest.raises(ValueError, match="duplicate tool name 'a'"):
        ToolCallParser([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="'strin'"):
        ToolCallParser([{"name": "a", "parameters": {"type": "object", "properties": {
            "x": {"type": "strin"}}}}])
    with pytest.raises(ValueError, match="non-empty str, got None"):
        ToolCallParser([{"type": "function", "function": {"parameters": {}}}])
    with pytest.raises(ValueError, match="nan"):
        ToolCallParser([{"name": "a", "parameters": {"enum": [float("nan")]}}])
    with pytest.raises(ValueError, match="max_depth .* got 0"):
        ParserConfig(max_depth=0)
    with pytest.raises(ValueError, match="'rust'"):
        ToolCallParser(TOOLS, backend="rust")
    with pytest.raises(TypeError, match="must be str or bytes"):
        ToolCallParser(TOOLS).parse(None)  # type: ignore[arg-type]
    assert len(ERROR_KINDS) == 8
