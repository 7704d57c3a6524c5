"""Hostile inputs a fuzzer found (both backends): a call whose JSON string never closes must not
swallow the good calls after it (hermes recovers at the first literal ``</tool_call>`` once the
quote-aware body is known to be invalid; llama3_json / mistral end such a value at the next
literal opener of their mode), the k-unbalanced-calls case stays linear (asserted on
a 390 KB input here; its speed is measured outside unit tests), and canonical JSON of any
accepted number re-parses to itself while ``args()`` never raises."""
import json
import random
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spyglass.engine.toolcall import MODES, ToolCallParser, canonical_json

TOOLS = [{"name": "a"}, {"name": "b"}]
BACKENDS = ["cpp", "python"]
BAD = '<tool_call>{"name": "a", "arguments": {"q": "oops}}</tool_call>'
GOOD = '<tool_call>{"name": "b", "arguments": {}}</tool_call>'


@pytest.fixture(params=BACKENDS)
def parser(request: pytest.FixtureRequest) -> ToolCallParser:
    return ToolCallParser(TOOLS, backend=request.param)


def summary(r: object) -> tuple[list, list]:
    return ([(c.index, c.name) for c in r.calls], [(e.index, e.kind) for e in r.errors])


@pytest.mark.parametrize("between", [" text ", ' he said "hi ', ' "x" ', '\\"'])
def test_unclosed_string_does_not_swallow_the_next_call(parser: ToolCallParser,
                                                        between: str) -> None:
    text = BAD + between + GOOD
    r = parser.parse(text)
    assert summary(r) == ([(1, "b")], [(0, "invalid_json")])
    e = r.errors[0]
    assert (e.message, e.byte_pos, e.span) == ("unexpected end of input", 51, (0, 63))
    assert r.text_outside == between


def test_bad_good_bad_keeps_the_good_one(parser: ToolCallParser) -> None:
    r = parser.parse(BAD + "\n" + GOOD + "\n" + BAD + "\n" + GOOD)
    assert summary(r) == ([(1, "b"), (3, "b")], [(0, "invalid_json"), (2, "invalid_json")])


def test_close_tag_in_a_string_of_a_valid_call_still_works(parser: ToolCallParser) -> None:
    body = '{"name": "b", "arguments": {"q": "x </tool_call> y \\" z"}}'
    r = parser.parse(f"<tool_call>{body}</tool_call> after")
    assert r.ok and r.calls[0].args() == {"q": 'x </tool_call> y " z'}
    assert r.text_outside == " after"


def test_invalid_body_with_close_tag_in_a_string_recovers_at_the_first_one(
        parser: ToolCallParser) -> None:
    text = '<tool_call>{"name": "b", "q": "</tool_call>"} junk </tool_call>' + GOOD
    r = parser.parse(text)
    assert summary(r) == ([(1, "b")], [(0, "invalid_json")])
    assert r.errors[0].span == (0, 43) and r.text_outside == '"} junk </tool_call>'


def test_too_large_quote_aware_body_recovers_at_the_first_literal_close() -> None:
    body = '{"name": "b", "arguments": {"q": "</tool_call>%s"}}' % ("x" * 80)
    for backend in BACKENDS:
        p = ToolCallParser(TOOLS, max_call_bytes=60, backend=backend)
        r = p.parse(f"<tool_call>{body}</tool_call>{GOOD}")
        assert summary(r) == ([(1, "b")], [(0, "invalid_json")])


def test_streaming_emits_the_good_call_at_its_close(parser: ToolCallParser) -> None:
    text = BAD + ' he said "hi ' + GOOD
    s, got = parser.stream(), []
    for i in range(len(text)):
        items = s.feed(text[i])
        if items:
            assert text[:i + 1].endswith("</tool_call>")
        got += [(type(x).__name__.replace("Ref", ""), x.index) for x in items]
    assert got == [("CallError", 0), ("ToolCall", 1)]
    assert s.finish().to_dict() == parser.parse(text).to_dict()


def _stream_randomly(p: ToolCallParser, text: str, seed: int) -> tuple[object, list[dict]]:
    """Feed `text` in seeded random chunks of 1, 2, 5 or 16; the stream and what it emitted."""
    rnd, s, got, i = random.Random(seed), p.stream(), [], 0
    while i < len(text):
        k = rnd.choice([1, 2, 5, 16])
        got += [x.to_dict() for x in s.feed(text[i:i + k])]
        i += k
    return s, got


def _streamed(parser: ToolCallParser, text: str, chunk: int) -> list[dict]:
    s, got = parser.stream(), []
    for i in range(0, len(text), chunk):
        got += [x.to_dict() for x in s.feed(text[i:i + chunk])]
    assert s.finish().to_dict() == parser.parse(text).to_dict()
    return got


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_closing_tags_in_one_string_stream_out_at_the_real_close(parser: ToolCallParser, chunk: int) -> None:
    """500 closing tags inside one string of a pending call (the C++ core skips re-parsing while
    only plain string bytes arrived): the call still comes out at its real close."""
    body = json.dumps({"name": "a", "arguments": {"q": "x" * 40 + "</tool_call>" * 500}})
    text = f"<tool_call>{body}</tool_call>" + GOOD + " done"
    one = parser.parse(text).to_dict()
    assert [c["index"] for c in one["calls"]] == [0, 1] and not one["errors"]
    assert _streamed(parser, text, chunk) == one["calls"]  # both before finish()


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_closing_tags_in_many_strings_stream_a_prefix_of_the_one_shot_parse(parser: ToolCallParser,
                                                                            chunk: int) -> None:
    """Hundreds of strings each holding a closing tag, and non-ASCII ones: after a few parses the
    C++ core parses such a call again only once it has grown by a quarter (linear cost), so it
    may come out later than the reference's (at the latest at finish()), never differently."""
    body = json.dumps({"name": "a", "arguments": {"r": ["</tool_call>"] * 300, "s": "é</tool_call>" * 30}},
                      ensure_ascii=False)
    text = f"<tool_call>{body}</tool_call>" + GOOD + " done"
    one = parser.parse(text).to_dict()
    assert [c["index"] for c in one["calls"]] == [0, 1] and not one["errors"]
    got = _streamed(parser, text, chunk)
    assert got == one["calls"][:len(got)]


@pytest.mark.parametrize("block", [BAD + "\n", BAD + '"\n', BAD[:-12] + '\\"}}</tool_call>"\n',
                                   BAD + "\n" + GOOD + "\n"])
def test_many_unbalanced_calls_390kb(block: str) -> None:
    """k calls with unbalanced quotes: each is its own error, none swallows another (this was
    O(k·n) in the C++ core: 0.7 s for 390 KB; benchmarks measure the speed, not this test)."""
    text = block * (390_000 // len(block))
    k = text.count("<tool_call>")
    r = ToolCallParser(TOOLS).parse(text)
    bad = text.count(BAD[:40])
    assert len(r.errors) == bad and len(r.calls) == k - bad
    assert [e.index for e in r.errors] == [i for i in range(k) if block != BAD + "\n" + GOOD + "\n"
                                           or i % 2 == 0]
    if len(block) > 70:  # the reference is quadratic on this input; spot-check a prefix
        small = block * 40
        assert ToolCallParser(TOOLS, backend="python").parse(small).to_dict() == \
            ToolCallParser(TOOLS).parse(small).to_dict()


NUMBERS = ["1e999999999", "-0", "1E-400", "12345678901234567890123", "9" * 5000, "-" + "7" * 5000,
           "0.1", "1.5e+300", "12e999999999", "0.5e-999999999", "-1e1234567890",
           "123.456e-999999999999999990", "0e99999999999999999999999", "1" + "0" * 30 + "e-30",
           "1" * 30 + "." + "5" * 30 + "e999999999999999900"]


@pytest.mark.parametrize("num", NUMBERS, ids=lambda s: s if len(s) < 30 else s[:12] + "...")
def test_canonical_numbers_reparse_to_themselves(num: str) -> None:
    out = []
    for backend in BACKENDS:
        p = ToolCallParser([{"name": "f"}], backend=backend)
        r = p.parse('<tool_call>{"name": "f", "arguments": {"v": %s}}</tool_call>' % num)
        assert r.ok, r.to_dict()
        canon = r.calls[0].arguments
        again = p.parse('<tool_call>{"name": "f", "arguments": %s}</tool_call>' % canon)
        assert again.ok and again.calls[0].arguments == canon  # idempotent
        assert canonical_json(canon) == canon
        v = r.calls[0].args()["v"]  # never raises
        assert isinstance(v, (int, float, Decimal))
        out.append(canon)
    assert out[0] == out[1]


def test_args_keeps_huge_integers_exact() -> None:
    for backend in BACKENDS:
        p = ToolCallParser([{"name": "f"}], backend=backend)
        big = "-" + "7" * 5000
        v = p.parse('<tool_call>{"name": "f", "arguments": {"v": %s, "w": 12}}</tool_call>'
                    % big).calls[0].args()
        assert v["v"] == Decimal(big) and v["w"] == 12 and type(v["w"]) is int


def test_exponent_out_of_range_is_still_an_error() -> None:
    for backend in BACKENDS:
        p = ToolCallParser([{"name": "f"}], backend=backend)
        for num in ("1e1000000000000000000", "-0.25e-999999999999999999", "1e" + "9" * 40):
            r = p.parse('<tool_call>{"name": "f", "arguments": {"v": %s}}</tool_call>' % num)
            e = r.errors[0]
            assert (e.kind, e.message, e.byte_pos) == ("invalid_json",
                                                        "number exponent out of range", 44)


SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROSE = st.sampled_from(["", " ", "\n", ' he said "', '"', "\\", "text", "</tool_call>", "<",
                         '\\"', "<tool_call>"])


@st.composite
def unbalanced_outputs(draw: st.DrawFn) -> str:
    """Several calls, some with a quote or backslash inserted or removed, prose with quotes."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        body = json.dumps({"name": draw(st.sampled_from(["a", "b", "c"])),
                           "arguments": {"q": draw(st.text(max_size=6)),
                                         "n": draw(st.integers(-5, 5))}})
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.integers(0, len(body)))
            op = draw(st.sampled_from(['"', "\\", "</tool_call>", "del"]))
            body = body[:i] + body[i + 1:] if op == "del" else body[:i] + op + body[i:]
        parts.append(f"<tool_call>{body}</tool_call>" + draw(PROSE))
    return "".join(parts)


@SETTINGS
@given(unbalanced_outputs(), st.integers(0, 2**32))
def test_unbalanced_calls_agree_and_stream(text: str, seed: int) -> None:
    for mode in MODES:
        cpp, ref = (ToolCallParser(TOOLS, max_call_bytes=70, backend=b, mode=mode)
                    for b in BACKENDS)
        one = cpp.parse(text).to_dict()
        assert one == ref.parse(text).to_dict(), (mode, text)
        for p in (cpp, ref):
            s, got = _stream_randomly(p, text, seed)
            assert s.finish().to_dict() == one
            items = sorted(one["calls"] + [e for e in one["errors"] if e["index"] >= 0],
                           key=lambda x: x["index"])
            assert got == items[:len(got)]


def test_json_module_agrees_on_canonical_numbers() -> None:
    for num in ("0.1", "1.5e+300", "1E-400", "-0"):
        assert json.loads(canonical_json(num)) == json.loads(num)


@SETTINGS
@given(st.booleans(), st.text("0123456789", min_size=1, max_size=30),
       st.text("0123456789", max_size=30), st.sampled_from(["", "e", "E-", "e+"]),
       st.integers(0, 10**19))
def test_canonical_numbers_are_idempotent(neg: bool, ip: str, fp: str, e: str, exp: int) -> None:
    num = ("-" if neg else "") + (ip.lstrip("0") or "0") + ("." + fp if fp else "") \
        + (e + str(exp) if e else "")
    try:
        canon = canonical_json(num)
    except ValueError as err:
        assert "number exponent out of range" in str(err)
        return
    assert canonical_json(canon) == canon
    r = ToolCallParser([{"name": "f"}]).parse(
        '<tool_call>{"name": "f", "arguments": {"v": %s}}</tool_call>' % num)
    assert r.calls[0].arguments == '{"v":%s}' % canon
    r.calls[0].args()


# llama3_json / mistral: a value that is not valid JSON within the limits ends at the next
# literal opener of its mode ([TOOL_CALLS]; <|python_tag|> or ';' blanks '{'), so the calls after
# it are still parsed.
M_BAD = '[TOOL_CALLS][{"name": "a", "arguments": {"q": "oops}}]'
M_GOOD = '[TOOL_CALLS][{"name": "b", "arguments": {}}]'
UNCLOSED = {
    "mistral": [M_BAD + " text " + M_GOOD,
                '[TOOL_CALLS]a[ARGS]{"q": "oops}] text [TOOL_CALLS]b[ARGS]{}',
                M_BAD + ' he said "hi ' + M_GOOD],
    "llama3_json": ['<|python_tag|>{"name": "a", "parameters": {"q": "oops}} text '
                    '<|python_tag|>{"name": "b", "parameters": {}}',
                    '{"name": "a", "parameters": {"q": "oops}}; {"name": "b", "parameters": {}}',
                    '{"name": "a", "parameters": {"q": "oops}} ;\n {"name": "b", "parameters": {}}',
                    '{"name": "a", "parameters": {"q": "oops}} "x" <|python_tag|>{"name": "b"}'],
}
OPENER = {"mistral": "[TOOL_CALLS]", "llama3_json": None}


@pytest.mark.parametrize("mode,text", [(m, t) for m in UNCLOSED for t in UNCLOSED[m]])
def test_unclosed_value_ends_at_the_next_opener(backend: str, mode: str, text: str) -> None:
    p = ToolCallParser(TOOLS, mode=mode, backend=backend)
    r = p.parse(text)
    assert summary(r) == ([(1, "b")], [(0, "invalid_json")])
    e = r.errors[0]
    if mode == "mistral":
        o = text.index("[TOOL_CALLS]", 1)
    elif "<|python_tag|>" in text[1:]:
        o = text.index("<|python_tag|>", 1)
    else:
        o = text.index(";")
    assert e.span == (0, o) and e.byte_pos <= o
    if "oops}" + ("}] text " if mode == "mistral" else "} text ") in text:
        assert (e.message, e.byte_pos) == ("unexpected end of input", o)
    assert r.text_outside == ""
    s, got = p.stream(), []
    for ch in text:
        got += [(type(x).__name__.replace("Ref", ""), x.index) for x in s.feed(ch)]
    assert got == [("CallError", 0), ("ToolCall", 1)][:len(got)]
    assert s.finish().to_dict() == r.to_dict()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("mode,text", [
    ("mistral", '[TOOL_CALLS][{"name": "b", "arguments": {"q": "x [TOOL_CALLS] y"}}] after'),
    ("mistral", '[TOOL_CALLS]b[ARGS]{"q": "[TOOL_CALLS]"} after'),
    ("llama3_json", '{"name": "b", "parameters": {"q": "a; {b} <|python_tag|>"}} after'),
    ("llama3_json", '<|python_tag|>{"name": "b", "parameters": {"q": "; {"}} after'),
])
def test_opener_in_a_string_of_a_valid_value_still_works(backend: str, mode: str,
                                                         text: str) -> None:
    p = ToolCallParser(TOOLS, mode=mode, backend=backend)
    r = p.parse(text)
    assert r.ok and [c.name for c in r.calls] == ["b"] and r.text_outside == " after"
    s = p.stream()
    for ch in text:
        s.feed(ch)
    assert s.finish().to_dict() == r.to_dict()


def test_invalid_value_with_opener_in_a_string_recovers_at_the_first_one(backend: str) -> None:
    text = '[TOOL_CALLS]{"name": "b", "q": "[TOOL_CALLS]", } junk ' + M_GOOD
    r = ToolCallParser(TOOLS, mode="mistral", backend=backend).parse(text)
    assert summary(r) == ([(2, "b")], [(0, "invalid_json"), (1, "invalid_call")])
    assert (r.errors[0].byte_pos, r.errors[0].span) == (32, (0, 32))


@pytest.mark.parametrize("mode,block", [
    ("mistral", M_BAD + "\n"), ("mistral", M_BAD + '"\n'), ("mistral", M_BAD + "\n" + M_GOOD),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"q": "oops}}\n'),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"q": "oops}}"\n'),
])
def test_many_unclosed_values_390kb(mode: str, block: str) -> None:
    text = block * (390_000 // len(block))
    k = text.count(OPENER[mode] or "<|python_tag|>")
    r = ToolCallParser(TOOLS, mode=mode).parse(text)
    bad = text.count('"oops}')
    assert len(r.errors) == bad and len(r.calls) == k - bad
    small = block * 40
    assert ToolCallParser(TOOLS, mode=mode, backend="python").parse(small).to_dict() == \
        ToolCallParser(TOOLS, mode=mode).parse(small).to_dict()


MODE_PROSE = {"mistral": st.sampled_from(["", " ", "\n", ' he said "', '"', "\\", "text", "[",
                                          "[TOOL_CALLS]", "[TOOL", '\\"']),
              "llama3_json": st.sampled_from(["", " ", "\n", ' he said "', '"', "\\", "; ", ";",
                                              "<|python_tag|>", "<", '\\"', "text"])}


@st.composite
def unbalanced_mode_outputs(draw: st.DrawFn, mode: str) -> str:
    """Calls framed for `mode`, some with a quote, backslash or opener inserted or removed."""
    parts = []
    for i in range(draw(st.integers(1, 6))):
        obj = {"name": draw(st.sampled_from(["a", "b", "c"])),
               "parameters" if mode == "llama3_json" else "arguments":
               {"q": draw(st.text(max_size=6)), "n": draw(st.integers(-5, 5))}}
        v11 = mode == "mistral" and draw(st.booleans())
        body = json.dumps(obj[list(obj)[1]] if v11 else obj)
        if mode == "mistral" and not v11 and draw(st.booleans()):
            body = f"[{body}]"
        opener = "[TOOL_CALLS]" if mode == "mistral" else draw(
            st.sampled_from(["<|python_tag|>", "; " if i else "", ";" if i else ""]))
        ops = ['"', "\\", "del", opener or ";"]
        for _ in range(draw(st.integers(0, 2))):
            j = draw(st.integers(0, len(body)))
            op = draw(st.sampled_from(ops))
            body = body[:j] + body[j + 1:] if op == "del" else body[:j] + op + body[j:]
        head = opener + (obj["name"] + "[ARGS]" if v11 else "")
        parts.append(head + body + draw(MODE_PROSE[mode]))
    return "".join(parts)


@pytest.mark.parametrize("mode", ["mistral", "llama3_json"])
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_unclosed_values_agree_and_stream(mode: str, data: st.DataObject, seed: int) -> None:
    text = data.draw(unbalanced_mode_outputs(mode))
    for mcb in (70, 1 << 20):
        cpp, ref = (ToolCallParser(TOOLS, max_call_bytes=mcb, backend=b, mode=mode)
                    for b in BACKENDS)
        one = cpp.parse(text).to_dict()
        assert one == ref.parse(text).to_dict(), (mode, text)
        for p in (cpp, ref):
            s, got = _stream_randomly(p, text, seed)
            assert s.finish().to_dict() == one, (mode, text)
            items = sorted(one["calls"] + [e for e in one["errors"] if e["index"] >= 0],
                           key=lambda x: x["index"])
            assert got == items[:len(got)]
