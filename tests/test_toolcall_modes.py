"""Tool-call formats beyond plain Hermes/Qwen, on both backends: string-encoded "arguments",
lists of calls in one block, "parameters" as the arguments key, and the llama3_json and mistral
parser modes. The model outputs are the peers' own test strings (vLLM's hermes, llama3_json and
mistral tool-parser tests; mistral-common's v11/v13 tool-call token layout)."""
import json

import pytest

from spyglass.engine import _core
from spyglass.engine.toolcall import MODES, ParserConfig, ToolCallParser, make_turn_parser

NAMES = ["ocr", "add", "multiply", "add_this_and_that", "get_current_weather", "get_age", "bash",
         "searchTool", "getOpenIncidentsTool", "complexTool", "simpleTool", "parserTool",
         "get_db_config", "do_thing"]
TOOLS = [{"name": n} for n in NAMES] + [{"name": "crop", "parameters": {
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}},
    "required": ["box"]}}]
BACKENDS = ["cpp", "python"]
WEATHER = {"city": "San Francisco", "state": "CA", "unit": "celsius"}


def parse(text: str | bytes, mode: str = "hermes", **kw: object) -> dict:
    """Both backends' result (they must agree byte for byte)."""
    a, b = (ToolCallParser(TOOLS, backend=be, mode=mode, **kw).parse(text).to_dict()  # type: ignore[arg-type]
            for be in BACKENDS)
    assert a == b, text
    return a


def calls(r: dict) -> list[tuple[str, dict]]:
    return [(c["name"], json.loads(c["arguments"])) for c in r["calls"]]


def errors(r: dict) -> list[tuple[str, str]]:
    return [(e["kind"], e["message"]) for e in r["errors"]]


# ---------------------------------------------------------------- call objects (every mode)
def test_parameters_key_is_never_silently_dropped() -> None:
    r = parse('<tool_call>{"name": "ocr", "parameters": {"lang": "en"}}</tool_call>')
    assert [c["arguments"] for c in r["calls"]] == ['{"lang":"en"}'] and not r["errors"]
    r = parse('<tool_call>{"name": "crop", "parameters": {"box": [1]}}</tool_call>')
    assert calls(r) == [("crop", {"box": [1]})] and not r["errors"]
    r = parse('<tool_call>{"name": "crop", "parameters": {"box": ["x"]}}</tool_call>')
    assert errors(r) == [("invalid_argument", 'argument ["box",0]: expected integer, got string')]


def test_arguments_and_parameters_together_is_an_error() -> None:
    text = '<tool_call>{"name": "ocr", "arguments": {}, "parameters": {"a": 1}}</tool_call>'
    r = parse(text)
    assert r["calls"] == [] and errors(r) == [
        ("invalid_call", 'tool call has both "arguments" and "parameters"')]
    assert r["errors"][0]["byte_pos"] == text.index('{"a"')


def test_string_encoded_arguments() -> None:  # vLLM hermes test_..._serialized_arguments
    text = ('<tool_call>\n{"name": "get_db_config", '
            '"arguments": "{\\"param\\": \\"max_connections\\"}"}\n</tool_call>')
    r = parse(text)
    assert calls(r) == [("get_db_config", {"param": "max_connections"})] and not r["errors"]
    assert r["calls"][0]["arguments"] == '{"param":"max_connections"}'
    r = parse('<tool_call>{"name": "crop", "parameters": "{\\"box\\": [1, 2.0]}"}</tool_call>')
    assert calls(r) == [("crop", {"box": [1, 2]})]


def test_string_arguments_that_are_not_an_object_are_errors() -> None:
    text = '<tool_call>\n{"name": "do_thing", "arguments": "hello"}\n</tool_call>'
    r = parse(text)  # vLLM passes "hello" through as the arguments; a tool needs an object
    assert errors(r) == [("invalid_json",
                          'in the "arguments" string at byte 0: unexpected character \'h\'')]
    assert r["errors"][0]["byte_pos"] == text.index('"hello"')
    r = parse('<tool_call>{"name": "do_thing", "arguments": "[1, 2]"}</tool_call>')
    assert errors(r) == [("invalid_call", '"arguments" string must hold a JSON object, got array')]
    r = parse('<tool_call>{"name": "do_thing", "parameters": "{\\"a\\": 1"}</tool_call>')
    assert errors(r) == [("invalid_json",
                          'in the "parameters" string at byte 7: unexpected end of input')]
    text = '<tool_call>{"name": "crop", "arguments": "{\\"box\\": [\\"1\\"]}"}</tool_call>'
    r = parse(text)  # schema errors inside the string point at its opening quote
    assert errors(r) == [("invalid_argument", 'argument ["box",0]: expected integer, got string')]
    assert r["errors"][0]["byte_pos"] == text.index('"{')


def test_string_arguments_depth_counts_from_where_the_string_sits() -> None:
    for backend in BACKENDS:
        p = ToolCallParser(TOOLS, max_depth=3, backend=backend)
        assert p.parse('<tool_call>{"name": "ocr", "arguments": "{\\"a\\": [1]}"}</tool_call>').ok
        r = p.parse('<tool_call>{"name": "ocr", "arguments": "{\\"a\\": [[1]]}"}</tool_call>')
        assert [(e.kind, e.message) for e in r.errors] == [
            ("too_deep", 'in the "arguments" string at byte 7: nesting deeper than max_depth=3')]


def test_list_of_calls_in_one_block() -> None:
    text = ('<tool_call>[{"name": "add", "arguments": {"a": 1}}, {"name": "nope"}, '
            '{"name": "ocr"}]</tool_call>\n<tool_call>{"name": "ocr"}</tool_call>')
    r = parse(text)
    first = (0, text.index("\n"))
    assert [(c["index"], c["name"], c["span"]) for c in r["calls"]] == [
        (0, "add", first), (2, "ocr", first), (3, "ocr", (first[1] + 1, len(text)))]
    assert [(e["index"], e["kind"], e["span"]) for e in r["errors"]] == [
        (1, "unknown_tool", first)]
    assert errors(parse("<tool_call> [ ] </tool_call>")) == [
        ("invalid_call", "tool call list is empty")]
    r = parse('<tool_call>[{"name": "ocr"}, [{"name": "ocr"}], 3]</tool_call>')
    assert errors(r) == [("invalid_call", "tool call must be a JSON object, got array"),
                         ("invalid_call", "tool call must be a JSON object, got integer")]


# ---------------------------------------------------------------- llama3_json
def llama(text: str, **kw: object) -> dict:
    return parse(text, "llama3_json", **kw)


def test_llama3_json_vllm_strings() -> None:
    r = llama('{"name": "searchTool", "parameters": {"query": "test query", "limit": 10}}')
    assert calls(r) == [("searchTool", {"query": "test query", "limit": 10})]
    assert calls(llama('{"name": "searchTool", "arguments": {"query": "test"}}')) == [
        ("searchTool", {"query": "test"})]
    for sep in ["; ", " ; ", ";", ";\n", "\n"]:
        r = llama(sep.join(['{"name": "searchTool", "parameters": {"query": "test1"}}',
                            '{"name": "getOpenIncidentsTool", "parameters": {}}',
                            '{"name": "searchTool", "parameters": {"query": "test2"}}']))
        assert calls(r) == [("searchTool", {"query": "test1"}), ("getOpenIncidentsTool", {}),
                            ("searchTool", {"query": "test2"})], sep
        assert [c["index"] for c in r["calls"]] == [0, 1, 2] and r["text_outside"].strip() == ""
    r = llama('{"name": "complexTool", "parameters": {"level1": {"level2": {"level3": '
              '{"level4": {"value": "deep"}}}}}}')
    assert calls(r)[0][1]["level1"]["level2"]["level3"]["level4"] == {"value": "deep"}
    r = llama('{"name": "searchTool", "parameters": {"query": "test {value} [complex]",'
              '"nested": {"inner": "more {brackets}"}}}')
    assert calls(r) == [("searchTool", {"query": "test {value} [complex]",
                                        "nested": {"inner": "more {brackets}"}})]
    r = llama('{"name": "parserTool", "parameters": {"text": "He said \\"Hello {world}\\""}}')
    assert calls(r) == [("parserTool", {"text": 'He said "Hello {world}"'})]


def test_llama3_json_text_after_the_calls_is_text() -> None:
    for tail in [" I used {searchTool} for this.", ' The arguments were {"query": "test"}']:
        r = llama('{"name": "searchTool", "parameters": {"query": "test"}}' + tail)
        assert calls(r) == [("searchTool", {"query": "test"})] and not r["errors"]
        assert r["text_outside"] == tail


def test_llama3_json_call_must_open_the_text_or_follow_python_tag() -> None:
    text = ('Here is the result: {"name": "getOpenIncidentsTool", "parameters": {}} '
            "Would you like to know more?")
    r = llama(text)  # prose first: the assistant answered in text (vLLM >= 0.11 scans it)
    assert r["calls"] == [] and r["errors"] == [] and r["text_outside"] == text
    text = 'Let me search.<|python_tag|>{"name": "searchTool", "parameters": {"query": "q"}}'
    r = llama(text)
    assert calls(r) == [("searchTool", {"query": "q"})] and r["text_outside"] == "Let me search."
    assert r["calls"][0]["span"] == (text.index("<|python_tag|>"), len(text))
    r = llama('<think>plan</think>\n\n{"name": "ocr", "parameters": {}}<answer>x</answer>')
    assert calls(r) == [("ocr", {})] and r["think"] == "plan" and r["answer"] == "x"
    r = llama('<tool_call>{"name": "ocr"}</tool_call>')  # Hermes tags are text in this mode
    assert r["calls"] == [] and r["text_outside"] == '<tool_call>{"name": "ocr"}</tool_call>'


def test_llama3_json_errors() -> None:
    r = llama('{"name": "invalidTool", "parameters": {invalid json}')
    assert errors(r) == [("invalid_json", "unexpected character 'i'")]
    assert errors(llama('{"parameters": {}}')) == [("invalid_call", 'tool call has no "name"')]
    assert calls(llama('{"name": "getOpenIncidentsTool"}')) == [("getOpenIncidentsTool", {})]
    text = '{"name": "ocr", "parameters": {"a": "unclosed}}; {"name": "ocr"}'
    r = llama(text)  # invalid JSON (the quotes pair up differently): it ends at the "; {"
    assert calls(r) == [("ocr", {})] and errors(r) == [("invalid_json", "unexpected end of input")]
    assert r["errors"][0]["span"] == (0, text.index(";"))
    r = llama('<|python_tag|>brave_search.call(query="x")')  # a built-in tool, not JSON
    assert errors(r) == [("invalid_json", "unexpected character 'b'")]
    r = llama('{"name": "ocr", "parameters": {"a": 1]}}; {"name": "ocr"}')
    assert errors(r) == [("invalid_json", "unexpected character ']'")] and calls(r) == []
    assert r["text_outside"] == '}; {"name": "ocr"}'


# ---------------------------------------------------------------- mistral
def mistral(text: str | bytes) -> dict:
    return parse(text, "mistral")


@pytest.mark.parametrize("text,expected,content", [  # vLLM: pre-v11 tokenizer
    ('[TOOL_CALLS][{"name": "add", "arguments":{"a": 3.5, "b": 4}}]',
     [("add", {"a": 3.5, "b": 4})], ""),
    ('[TOOL_CALLS] [{"name": "get_current_weather", "arguments":{"city": "San Francisco", '
     '"state": "CA", "unit": "celsius"}}]', [("get_current_weather", WEATHER)], ""),
    ('[TOOL_CALLS] [{"arguments":{"city": "San Francisco", "state": "CA", "unit": "celsius"}, '
     '"name": "get_current_weather"}]', [("get_current_weather", WEATHER)], ""),
    ('[TOOL_CALLS] [{"arguments":{"name": "John Doe"}, "name": "get_age"}]',
     [("get_age", {"name": "John Doe"})], ""),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3.5, "b": 4}}, {"name": '
     '"get_current_weather", "arguments":{"city": "San Francisco", "state": "CA", "unit": '
     '"celsius"}}]', [("add", {"a": 3.5, "b": 4}), ("get_current_weather", WEATHER)], ""),
    ('Hello[TOOL_CALLS] [{"name": "add", "arguments":{"a": 1, "b": 2}}]',
     [("add", {"a": 1, "b": 2})], "Hello"),
    ('[TOOL_CALLS] [{"name": "get_current_weather", "arguments":{"city": "Dallas", "state": '
     '"TX", "unit": "fahrenheit"}}]\nextra trailing data',
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})],
     "\nextra trailing data"),
    ('[TOOL_CALLS]  [ {"name":"add" , "arguments" : {"a": 3, "b": 4} } ]',
     [("add", {"a": 3, "b": 4})], ""),
    ('[TOOL_CALLS]{"name": "add", "arguments": {"a": 1}, "id": "a1B2c3D4e"}',
     [("add", {"a": 1})], ""),
])
def test_mistral_json_list_form(text: str, expected: list, content: str) -> None:
    r = mistral(text)
    assert calls(r) == expected and not r["errors"] and r["text_outside"] == content
    end = len(text) - len(content) if content and text.endswith(content) else len(text)
    assert {c["span"] for c in r["calls"]} == {(text.index("[TOOL_CALLS]"), end)}


@pytest.mark.parametrize("text,expected,content", [  # vLLM: v11+ (mistral-common's layout)
    ('[TOOL_CALLS]add_this_and_that[ARGS]{"a": 3.5, "b": 4}',
     [("add_this_and_that", {"a": 3.5, "b": 4})], ""),
    ('[TOOL_CALLS]get_current_weather[ARGS]{"city": "San Francisco", "state": "CA", '
     '"unit": "celsius"}', [("get_current_weather", WEATHER)], ""),
    ('[TOOL_CALLS]add[ARGS]{"a": 3.5, "b": 4}[TOOL_CALLS]multiply[ARGS]{"a": 3, "b": 6}',
     [("add", {"a": 3.5, "b": 4}), ("multiply", {"a": 3, "b": 6})], ""),
    ('hi[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', [("add", {"a": 1, "b": 2})], "hi"),
    ('[TOOL_CALLS]add[CALL_ID]a1B2c3D4e[ARGS]{"a": 1}', [("add", {"a": 1})], ""),
    ('[TOOL_CALLS]add{"a": 3.5, "b": 4}[TOOL_CALLS]multiply{"a": 3, "b": 6}',
     [("add", {"a": 3.5, "b": 4}), ("multiply", {"a": 3, "b": 6})], ""),
    ('hi{hi[TOOL_CALLS]bash{"command": "print(\\"hello world!\\")\\nre.compile(r\'{}\')"}',
     [("bash", {"command": "print(\"hello world!\")\nre.compile(r'{}')"})], "hi{hi"),
    ('[TOOL_CALLS]add[ARGS]"{\\"a\\": 1}" done', [("add", {"a": 1})], " done"),
])
def test_mistral_v11_name_form(text: str, expected: list, content: str) -> None:
    r = mistral(text)
    assert calls(r) == expected and not r["errors"] and r["text_outside"] == content
    assert [c["index"] for c in r["calls"]] == list(range(len(expected)))


def test_mistral_errors() -> None:
    r = mistral("[TOOL_CALLS]toolname_no_args")  # newer vLLM makes this a {} call
    assert errors(r) == [("invalid_call", "expected [ARGS] after the tool name")]
    r = mistral('[TOOL_CALLS]add[CALL_ID]abc[TOOL_CALLS]ocr[ARGS]{}')
    assert errors(r) == [("invalid_call", "expected [ARGS] after the call id")]
    assert calls(r) == [("ocr", {})] and [c["index"] for c in r["calls"]] == [1]
    r = mistral('hi{hi[TOOL_CALLS]bash{"command": "print(\\"hello world!\\")\\nre.compile(r\'{}\')')
    assert errors(r) == [("invalid_json", "unexpected end of input")]  # truncated: no call
    assert errors(mistral('[TOOL_CALLS][ARGS]{"a": 1}')) == [
        ("invalid_call", "tool call has no name")]
    assert errors(mistral(b'[TOOL_CALLS]ad\xffd[ARGS]{}')) == [
        ("invalid_call", "tool name is not valid UTF-8")]
    assert errors(mistral('[TOOL_CALLS]zoom[ARGS]{}')) == [("unknown_tool", 'unknown tool "zoom"')]
    assert errors(mistral('[TOOL_CALLS]crop[ARGS]{"box": "x"}')) == [
        ("invalid_argument", 'argument ["box"]: expected array, got string')]
    assert errors(mistral('[TOOL_CALLS]ocr[ARGS][1]')) == [
        ("invalid_call", '"arguments" must be an object, got array')]
    r = mistral('[TOOL_CALLS] not json at all')  # vLLM: plain content
    assert errors(r) == [("invalid_call", "expected [ARGS] after the tool name")]
    r = mistral('<tool_call>{"name": "ocr"}</tool_call> [1] [TOOL_CALL]')
    assert r["calls"] == r["errors"] == [] and r["text_outside"].startswith("<tool_call>")


# ---------------------------------------------------------------- every mode
@pytest.mark.parametrize("mode,text,n,early", [
    ("hermes", '<think>a</think><tool_call>[{"name": "ocr"}, {"name": "add"}]</tool_call>x'
     '<tool_call>{"name": "zoom"}</tool_call><answer>done</answer>', 3, 3),
    ("llama3_json", '<think>a</think>{"name": "ocr"} ; {"name": "zoom"};\n'
     '{"name": "add", "parameters": "{}"}\n<|python_tag|>[{"name": "ocr"}]; {"name": "ocr"', 5, 4),
    ("mistral", 'x[TOOL_CALLS][{"name": "ocr"}, {"name": "add"}][TOOL_CALLS]ocr[CALL_ID]i1'
     '[ARGS] {"a": [1, "]"]}[TOOL_CALLS]zoom{}[TOOL_CALLS]ocr[ARGS]{', 5, 4),
])
def test_streaming_emits_each_call_once_complete(mode: str, text: str, n: int,
                                                 early: int) -> None:
    for backend in BACKENDS:
        p = ToolCallParser(TOOLS, backend=backend, mode=mode)
        s, got = p.stream(), []
        for i in range(len(text)):
            new = [x.to_dict() for x in s.feed(text[i])]
            assert all(x["span"][1] == i + 1 for x in new if "name" in x)  # on its last byte
            got += new
        final = s.finish().to_dict()
        assert final == p.parse(text).to_dict()
        items = sorted(final["calls"] + final["errors"], key=lambda x: x["index"])
        assert got == items[:len(got)] and len(items) == n
        assert len(got) == early  # an unclosed value runs to the end: only finish() knows


def test_mode_is_validated_and_reaches_the_turn_parser() -> None:
    for bad in ["qwen", "Hermes", "", None]:
        with pytest.raises(ValueError, match="mode must be 'hermes', 'llama3_json' or 'mistral', "
                                             f"got {bad!r}"):
            ToolCallParser(TOOLS, mode=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=repr(bad)):
            ParserConfig(mode=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 'llama3'"):
        _core.Parser([("ocr", None)], 64, 1 << 20, "llama3")
    assert _core.Parser([("ocr", None)], 64, 1 << 20).mode == "hermes"
    for mode in MODES:
        assert ToolCallParser(TOOLS, mode=mode).mode == mode == ToolCallParser(
            TOOLS, mode=mode)._impl.mode
    turn = make_turn_parser(TOOLS, mode="mistral")('[TOOL_CALLS]add[ARGS]{"a": 1}')
    assert turn.calls == [{"name": "add", "arguments": '{"a":1}'}] and turn.errors == []
    turn = make_turn_parser(TOOLS, mode="llama3_json", backend="python")('{"name": "zoom"}')
    assert turn.calls == [] and turn.errors[0]["kind"] == "unknown_tool"
