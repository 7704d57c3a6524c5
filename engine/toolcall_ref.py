"""Pure-Python reference of spyglass's tool-call parser (the C++ core's executable spec).

It implements exactly the format, error kinds, messages, byte positions and canonical JSON
specified in :mod:`spyglass.engine.toolcall` (whose constants and limit check it imports; the
production module never imports this one at load time), written independently of the C++
(regexes and ``bytes.decode`` where the C++ walks bytes), so the property tests in
``tests/test_toolcall_props.py`` can check the two against each other byte for byte. It is plain
Python and slow; its streaming form re-parses the whole buffer on every ``feed`` (quadratic),
which is fine for a reference and wrong for production. It also backs
``spyglass.engine.toolcall.canonical_json``. All parser modes (hermes, llama3_json, mistral)
are here; C++ splits them between csrc/toolcall.cpp and csrc/toolcall_modes.cpp.

Use it through ``ToolCallParser(tools, backend="python", mode=...)``; run its tests with
``.venv/bin/python -m pytest -q tests/test_toolcall.py tests/test_toolcall_props.py
tests/test_toolcall_modes.py``.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

from spyglass.engine.toolcall import (MAX_DEPTH_LIMIT, MAX_EXP10, check_parser_limits,
                                      load_arguments)

_WS = re.compile(rb"[ \t\n\r]*")
_RUN = re.compile(rb'[^"\\\x00-\x1f]*')
_DIGITS = re.compile(rb"[0-9]*")
_ESC_OUT = re.compile(rb'["\\\x00-\x1f]')
_SIMPLE_ESC = {ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/", ord("b"): b"\b",
               ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}
_ESC_MAP = {b'"': b'\\"', b"\\": b"\\\\", b"\b": b"\\b", b"\f": b"\\f", b"\n": b"\\n",
            b"\r": b"\\r", b"\t": b"\\t"}
_KIND_NAME = {"null": "null", "false": "boolean", "true": "boolean", "int": "integer",
              "num": "number", "str": "string", "arr": "array", "obj": "object"}
_KIND_TYPES = {"null": {"null"}, "false": {"boolean"}, "true": {"boolean"},
               "int": {"integer", "number"}, "num": {"number"}, "str": {"string"},
               "arr": {"array"}, "obj": {"object"}}
_OPEN_TAGS = (b"<think>", b"<answer>", b"<response>")
_BLANKS = b" \t\n\r"
_LEX = re.compile(rb'"(?:[^"\\]|\\.)*(")?|[{}\[\]]', re.S)  # a string or a bracket
_M_TAGS = (b"[ARGS]", b"[CALL_ID]", b"[TOOL_CALLS]")
_SEP = re.compile(rb"[ \t\n\r]*(;[ \t\n\r]*)?")
_NAME = re.compile(rb"[^\[{]*")
_ID = re.compile(rb"[^\[]*")
# Literal openers of the next block, where a value that is not valid JSON ends.
_OPENERS = {"llama3_json": re.compile(rb"<\|python_tag\|>|;[ \t\n\r]*\{"),
            "mistral": re.compile(rb"\[TOOL_CALLS\]")}
_CLOSE = {"think": b"</think>", "answer": b"</answer>", "response": b"</response>"}


@dataclass(frozen=True)
class RefToolCall:
    """A validated tool call (same fields and methods as ``_core.ToolCall``)."""
    index: int
    name: str
    arguments: str
    span: tuple[int, int]

    def args(self) -> dict[str, Any]:
        return load_arguments(self.arguments)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "arguments": self.arguments,
                "span": self.span}


@dataclass(frozen=True)
class RefCallError:
    """A typed error of one call or tag (same fields and methods as ``_core.CallError``)."""
    index: int
    kind: str
    message: str
    byte_pos: int
    span: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "message": self.message,
                "byte_pos": self.byte_pos, "span": self.span}


@dataclass(frozen=True)
class RefParseResult:
    """Everything parsed from one text (same fields and methods as ``_core.ParseResult``)."""
    calls: list[RefToolCall]
    errors: list[RefCallError]
    answer: str | None
    answer_tag: str | None
    think: str | None
    text_outside: str

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"calls": [c.to_dict() for c in self.calls],
                "errors": [e.to_dict() for e in self.errors], "answer": self.answer,
                "answer_tag": self.answer_tag, "think": self.think,
                "text_outside": self.text_outside}


class _JsonError(Exception):
    """A JSON error; in_string: the input ended inside a string (plain bytes, not an escape)."""

    def __init__(self, message: str, pos: int, too_deep: bool = False,
                 in_string: bool = False) -> None:
        super().__init__(message)
        self.message, self.pos, self.too_deep, self.in_string = message, pos, too_deep, in_string


def canonical_number(neg: bool, digits: bytes, int_len: int,
                     exp: int) -> tuple[str | None, bool]:
    """Canonical text of the number ``(-1)**neg * int(digits) * 10**(exp - frac_len)``, where
    the first ``int_len`` digits were the literal's integer part, and whether it is integral
    (the rule is spelled out in spyglass.engine.toolcall); None when its decimal exponent is
    out of range (beyond +-MAX_EXP10)."""
    frac_len = len(digits) - int_len
    d = digits.lstrip(b"0")
    if not d:
        return "0", True
    stripped = d.rstrip(b"0")
    e = exp - frac_len + (len(d) - len(stripped))
    d = stripped.decode()
    n, k = len(d), len(d) + e
    if abs(k - 1) > MAX_EXP10:
        return None, False
    sign = "-" if neg else ""
    if e >= 0 and k <= max(21, int_len):
        return sign + d + "0" * e, True
    if e < 0 and k > -6:
        if k > 0:
            return f"{sign}{d[:k]}.{d[k:]}", False
        return f"{sign}0.{'0' * -k}{d}", False
    mant = d[0] + ("." + d[1:] if n > 1 else "")
    return f"{sign}{mant}e{k - 1}", e >= 0


def json_string(raw: bytes) -> bytes:
    """Canonical JSON string literal of UTF-8 bytes (escapes only '"', '\\' and < 0x20)."""
    def esc(m: re.Match[bytes]) -> bytes:
        c = m.group()
        return _ESC_MAP.get(c) or b"\\u%04x" % c[0]
    return b'"' + _ESC_OUT.sub(esc, raw) + b'"'


class _Json:
    """Recursive-descent JSON parser over s[.., end) producing (kind, pos, payload) nodes."""

    def __init__(self, s: bytes, end: int, max_depth: int) -> None:
        self.s, self.end, self.max_depth = s, end, max_depth

    def unexpected(self, p: int) -> _JsonError:
        if p >= self.end:
            return _JsonError("unexpected end of input", self.end)
        c = self.s[p]
        if 0x21 <= c <= 0x7E:
            return _JsonError(f"unexpected character '{chr(c)}'", p)
        return _JsonError(f"unexpected byte 0x{c:02x}", p)

    def ws(self, p: int) -> int:
        return _WS.match(self.s, p, self.end).end()

    def parse(self, begin: int, depth0: int = 0) -> tuple:
        node, p = self.value(begin, depth0)
        p = self.ws(p)
        if p < self.end:
            raise self.unexpected(p)
        return node

    def value(self, p: int, depth: int) -> tuple[tuple, int]:
        s, end = self.s, self.end
        p = self.ws(p)
        if p >= end:
            raise self.unexpected(p)
        c = s[p]
        if c in b"{[":
            if depth + 1 > self.max_depth:
                raise _JsonError(f"nesting deeper than max_depth={self.max_depth}", p, True)
            start, close = p, (b"}" if c == 0x7B else b"]")[0]
            items: list = []
            members: dict[bytes, tuple] = {}
            p = self.ws(p + 1)
            if p < end and s[p] == close:
                return (("obj", start, {}) if close == 0x7D else ("arr", start, [])), p + 1
            while True:
                if close == 0x7D:
                    if p >= end or s[p] != 0x22:
                        raise self.unexpected(p)
                    key, p = self.string(p)
                    p = self.ws(p)
                    if p >= end or s[p] != 0x3A:
                        raise self.unexpected(p)
                    val, p = self.value(p + 1, depth + 1)
                    members.pop(key[2], None)
                    members[key[2]] = val
                else:
                    val, p = self.value(p, depth + 1)
                    items.append(val)
                p = self.ws(p)
                if p < end and s[p] == 0x2C:
                    p = self.ws(p + 1) if close == 0x7D else p + 1
                    continue
                if p < end and s[p] == close:
                    node = ("obj", start, members) if close == 0x7D else ("arr", start, items)
                    return node, p + 1
                raise self.unexpected(p)
        if c == 0x22:
            return self.string(p)
        for lit in (b"true", b"false", b"null"):
            if c == lit[0]:
                for i in range(len(lit)):
                    if p + i >= end or s[p + i] != lit[i]:
                        raise self.unexpected(p + i)
                return (lit.decode(), p, None), p + len(lit)
        if c == 0x2D or 0x30 <= c <= 0x39:
            return self.number(p)
        raise self.unexpected(p)

    def string(self, p: int) -> tuple[tuple, int]:
        s, end, start = self.s, self.end, p
        out = bytearray()
        p += 1
        while True:
            q = _RUN.match(s, p, end).end()
            run = s[p:q]
            try:
                run.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _JsonError("invalid UTF-8", p + e.start) from None
            out += run
            p = q
            if p >= end:
                raise _JsonError("unexpected end of input", end, in_string=True)
            c = s[p]
            if c == 0x22:
                return ("str", start, bytes(out)), p + 1
            if c != 0x5C:
                raise _JsonError("control character in string", p)
            p = self.escape(p, out)

    def hex4(self, bs: int) -> int:
        h = self.s[bs + 2:min(bs + 6, self.end)]
        for i, c in enumerate(h):
            if chr(c) not in "0123456789abcdefABCDEF":
                raise _JsonError("invalid \\u escape", bs)
        if len(h) < 4:
            raise _JsonError("unexpected end of input", self.end)
        return int(h, 16)

    def escape(self, bs: int, out: bytearray) -> int:
        s, end = self.s, self.end
        if bs + 1 >= end:
            raise _JsonError("unexpected end of input", end)
        c = s[bs + 1]
        if c in _SIMPLE_ESC:
            out += _SIMPLE_ESC[c]
            return bs + 2
        if c != 0x75:
            raise _JsonError("invalid escape", bs)
        cp = self.hex4(bs)
        p = bs + 6
        if 0xDC00 <= cp <= 0xDFFF:
            raise _JsonError("lone surrogate in \\u escape", bs)
        if 0xD800 <= cp <= 0xDBFF:
            if s[p:p + 2] != b"\\u" or p + 1 >= end:
                raise _JsonError("lone surrogate in \\u escape", bs)
            lo = self.hex4(p)
            if not 0xDC00 <= lo <= 0xDFFF:
                raise _JsonError("lone surrogate in \\u escape", bs)
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
            p += 6
        out += chr(cp).encode("utf-8")
        return p

    def number(self, p: int) -> tuple[tuple, int]:
        s, end, start = self.s, self.end, p
        neg = s[p] == 0x2D
        p += neg
        if p >= end:
            raise self.unexpected(p)
        i0 = p
        if s[p] == 0x30:
            p += 1
        elif 0x31 <= s[p] <= 0x39:
            p = _DIGITS.match(s, p, end).end()
        else:
            raise self.unexpected(p)
        digits, int_len, exp = s[i0:p], p - i0, 0
        if p < end and s[p] == 0x2E:
            q = _DIGITS.match(s, p + 1, end).end()
            if q == p + 1:
                raise self.unexpected(q)
            digits, p = digits + s[p + 1:q], q
        if p < end and s[p] in b"eE":
            p += 1
            eneg = p < end and s[p] == 0x2D
            if p < end and s[p] in b"+-":
                p += 1
            q = _DIGITS.match(s, p, end).end()
            if q == p:
                raise self.unexpected(p)
            e = s[p:q].lstrip(b"0")
            # > 18 digits: out of range for any nonzero value (texts are < 4 GiB); int() of it
            # could also hit Python's int-string limit
            exp = None if len(e) > 18 else -int(e or b"0") if eneg else int(e or b"0")
            p = q
        if exp is None and digits.strip(b"0"):
            raise _JsonError("number exponent out of range", start)
        text, integral = canonical_number(neg, digits, int_len, exp or 0)
        if text is None:
            raise _JsonError("number exponent out of range", start)
        return ("int" if integral else "num", start, text), p


def canonical(node: tuple) -> bytes:
    """Canonical JSON bytes of a parsed node (sorted keys, no whitespace, exact numbers)."""
    kind, _, v = node
    if kind in ("null", "true", "false"):
        return kind.encode()
    if kind in ("int", "num"):
        return v.encode()
    if kind == "str":
        return json_string(v)
    if kind == "arr":
        return b"[" + b",".join(canonical(x) for x in v) + b"]"
    return b"{" + b",".join(json_string(k) + b":" + canonical(v[k]) for k in sorted(v)) + b"}"


def canonical_json(text: str | bytes, max_depth: int = MAX_DEPTH_LIMIT) -> str:
    """Canonical form of one JSON document; ValueError (with the byte position) if invalid."""
    s = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    try:
        return canonical(_Json(s, len(s), max_depth).parse(0)).decode("utf-8")
    except _JsonError as e:
        raise ValueError(f"invalid JSON at byte {e.pos}: {e.message}") from None


@dataclass
class _Out:
    calls: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    think: bytes | None = None
    answer: bytes | None = None
    answer_tag: str | None = None
    outside: bytes = b""
    blank: bool = True  # outside is only " \t\n\r"
    seen_block: bool = False
    ncalls: int = 0

    def text(self, b: bytes) -> None:
        self.outside += b
        self.blank = self.blank and not b.strip(_BLANKS)

    def open(self) -> int:
        """Opens a call block: its first index."""
        self.seen_block, self.ncalls = True, self.ncalls + 1
        return self.ncalls - 1

    def add(self, item: RefToolCall | RefCallError) -> None:
        (self.calls if isinstance(item, RefToolCall) else self.errors).append(item)


class RefParser:
    """Reference parser over normalized tools (see ``toolcall.normalize_tools``)."""

    def __init__(self, tools: list[tuple[str, dict | None]], max_depth: int,
                 max_call_bytes: int, mode: str = "hermes") -> None:
        check_parser_limits(max_depth, max_call_bytes, mode)
        self.tools = {name.encode(): schema for name, schema in tools}
        self.max_depth, self.max_call_bytes, self.mode = max_depth, max_call_bytes, mode
        self._next = re.compile({"hermes": rb"<", "llama3_json": rb"[<{]",
                                 "mistral": rb"[<\[]"}[mode])
        self._call_tag = {"hermes": b"<tool_call>", "llama3_json": b"<|python_tag|>"}.get(mode)
        if sys.getrecursionlimit() < 2 * max_depth + 1000:
            sys.setrecursionlimit(2 * max_depth + 1000)

    def parse(self, text: str | bytes) -> RefParseResult:
        return _result(self.scan(_to_bytes(text), True))

    def parse_batch(self, texts: list[str | bytes], threads: int = 0) -> list[RefParseResult]:
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        return [self.parse(t) for t in texts]

    def stream(self) -> RefStreamParser:
        return RefStreamParser(self)

    def scan(self, s: bytes, final: bool) -> _Out:
        """Scans s; with final=False stops at the first construct later bytes could change."""
        out, p, n = _Out(), 0, len(s)
        while p is not None and p < n:
            m = self._next.search(s, p)
            q = n if m is None else m.start()
            out.text(s[p:q])
            if q < n:
                p = self._tag(s, q, final, out) if s[q] == 0x3C else self._opener(s, q, final, out)
            else:
                p = n
        return out

    def _tag(self, s: bytes, q: int, final: bool, out: _Out) -> int | None:
        ct = self._call_tag
        if ct and s.startswith(ct, q):
            if self.mode == "hermes":
                return self._call(s, q, out.open(), final, out)
            return self._lead(s, q, q + len(ct), out.open(), final, out)
        if s.startswith((b"<think>", b"<answer>", b"<response>"), q):
            out.seen_block = True
            return self._block(s, q, final, out)
        if not out.seen_block and s.startswith(b"</think>", q):
            out.think, out.outside, out.blank, out.seen_block = out.outside, b"", True, True
            return q + len(b"</think>")
        tags = ((ct,) if ct else ()) + _OPEN_TAGS + (() if out.seen_block else (b"</think>",))
        if not final and _partial(s, q, tags):
            return None
        out.text(b"<")
        return q + 1

    def _opener(self, s: bytes, q: int, final: bool, out: _Out) -> int | None:
        """A '{' (llama3_json) or '[' (mistral) outside blocks."""
        if self.mode == "llama3_json":
            if out.blank:
                return self._seq(s, q, q, out.open(), final, out)
        elif s.startswith(b"[TOOL_CALLS]", q):
            return self._lead(s, q, q + len(b"[TOOL_CALLS]"), out.open(), final, out)
        elif not final and _partial(s, q, (b"[TOOL_CALLS]",)):
            return None
        out.text(s[q:q + 1])
        return q + 1

    def _block(self, s: bytes, q: int, final: bool, out: _Out) -> int | None:
        kind = s[q + 1:s.index(b">", q)].decode()
        body = q + len(kind) + 2
        close = _CLOSE[kind]
        c = s.find(close, body)
        if c < 0 and not final:
            return None
        content = s[body:] if c < 0 else s[body:c]
        if kind == "think":
            out.think = content if out.think is None else out.think + b"\n" + content
        elif out.answer_tag is None:
            out.answer, out.answer_tag = content, kind
        if c >= 0:
            return c + len(close)
        out.errors.append(RefCallError(-1, "unterminated_tag", f"unterminated <{kind}>", q,
                                       (q, len(s))))
        return len(s)

    def _call(self, s: bytes, q: int, index: int, final: bool, out: _Out) -> int | None:
        """A hermes body: up to the </tool_call> after a JSON value and blanks if the body is
        valid JSON within the limits, else up to the first literal </tool_call>. Streaming, the
        parse ends at the last literal </tool_call> (a '<' there only continues a string)."""
        body, n, cl = q + len(b"<tool_call>"), len(s), b"</tool_call>"
        first = s.find(cl, body)
        if first < 0 and not final:
            return None
        lim = body + self.max_call_bytes
        end = min(lim, n if final else s.rfind(cl, body))
        j = _Json(s, end, self.max_depth)
        try:
            p = j.ws(j.value(body, 0)[1])
            if s.startswith(cl, p):
                return self._body(s, q, body, p, index, out)
        except _JsonError as e:
            if not final and e.in_string and end < lim:
                return None
        if first < 0:
            out.errors.append(RefCallError(index, "unterminated_tag", "unterminated <tool_call>",
                                           q, (q, n)))
            return n
        return self._body(s, q, body, first, index, out)

    def _body(self, s: bytes, q: int, body: int, close: int, index: int, out: _Out) -> int:
        span = (q, close + len(b"</tool_call>"))
        self._value(s, body, close, 0, index, span, out)
        return span[1]

    def _value(self, s: bytes, v: int, end: int, depth: int, index: int, span: tuple[int, int],
               out: _Out, name: tuple[bytes, int] | None = None) -> None:
        """Parses s[v:end] as a call block (name None) or a Mistral v11 arguments value."""
        def err(kind: str, message: str, pos: int) -> None:
            out.add(RefCallError(index, kind, message, pos, span))
        if end - v > self.max_call_bytes:
            return err("too_large", f"tool call body is {end - v} bytes, more than "
                       f"max_call_bytes={self.max_call_bytes}", v + self.max_call_bytes)
        try:
            root = _Json(s, end, self.max_depth).parse(v, depth)
        except _JsonError as e:
            return err("too_deep" if e.too_deep else "invalid_json", e.message, e.pos)
        if name is not None:
            return out.add(self._args(name[0], name[1], root, 0, "arguments", 1, index, span))
        if root[0] != "arr":
            return out.add(self._one(root, 1, index, span))
        if not root[2]:
            return err("invalid_call", "tool call list is empty", root[1])
        for i, node in enumerate(root[2]):
            out.add(self._one(node, 2, out.open() if i else index, span))

    def _one(self, node: tuple, depth: int, index: int,
             span: tuple[int, int]) -> RefToolCall | RefCallError:
        """One call object: {"name": str, "arguments" | "parameters": object or JSON string}."""
        def err(message: str, pos: int) -> RefCallError:
            return RefCallError(index, "invalid_call", message, pos, span)
        if node[0] != "obj":
            return err(f"tool call must be a JSON object, got {_KIND_NAME[node[0]]}", node[1])
        members = node[2]
        name = members.get(b"name")
        if name is None:
            return err('tool call has no "name"', node[1])
        if name[0] != "str":
            return err(f'"name" must be a string, got {_KIND_NAME[name[0]]}', name[1])
        if b"arguments" in members and b"parameters" in members:
            return err('tool call has both "arguments" and "parameters"',
                       members[b"parameters"][1])
        key = "arguments" if b"arguments" in members or b"parameters" not in members \
            else "parameters"
        return self._args(name[2], name[1], members.get(key.encode()), node[1], key, depth,
                          index, span)

    def _args(self, name: bytes, name_pos: int, args: tuple | None, empty_pos: int, key: str,
              depth: int, index: int, span: tuple[int, int]) -> RefToolCall | RefCallError:
        """Arguments (an object, or a JSON string holding one), tool name, then schema."""
        def err(kind: str, message: str, pos: int) -> RefCallError:
            return RefCallError(index, kind, message, pos, span)
        at = None  # the string's quote when the arguments were a JSON string
        if args is None:
            args = ("obj", empty_pos, {})
        elif args[0] == "str":
            at = args[1]
            try:
                args = _Json(args[2], len(args[2]), self.max_depth).parse(0, depth)
            except _JsonError as e:
                return err("too_deep" if e.too_deep else "invalid_json",
                           f'in the "{key}" string at byte {e.pos}: {e.message}', at)
        if args[0] != "obj":
            what = f'"{key}" string must hold a JSON object' if at is not None \
                else f'"{key}" must be an object'
            return err("invalid_call", f"{what}, got {_KIND_NAME[args[0]]}",
                       args[1] if at is None else at)
        if name not in self.tools:
            return err("unknown_tool", "unknown tool " + json_string(name).decode(), name_pos)
        bad = _validate(args, self.tools[name], [])
        if bad is not None:
            return err(bad[0], bad[1], bad[2] if at is None else at)
        return RefToolCall(index, name.decode(), canonical(args).decode(), span)

    def _lead(self, s: bytes, start: int, p: int, index: int, final: bool,
              out: _Out) -> int | None:
        """After <|python_tag|> (llama3_json) or [TOOL_CALLS] (mistral) and its blanks."""
        p, n = _WS.match(s, p).end(), len(s)
        if p >= n and not final:
            return None
        if self.mode == "mistral" and not s.startswith(b"{", p):
            if not s.startswith(b"[", p) or s.startswith(_M_TAGS, p):
                return self._named(s, start, p, index, final, out)
            if not final and _partial(s, p, _M_TAGS):
                return None
        return self._seq(s, start, p, index, final, out)

    def _seq(self, s: bytes, start: int, v: int, index: int, final: bool,
             out: _Out) -> int | None:
        """A block's value; llama3_json: then (blanks ';' blanks '{' value)*, the rest is text."""
        while True:
            end = self._end(s, v, 0, final)
            if end is None:
                return None
            self._value(s, v, end, 0, index, (start, end), out)
            m = _SEP.match(s, end)
            if self.mode == "mistral" or m.end() < len(s) and (m.group(1) is None
                                                               or s[m.end()] != 0x7B):
                return end
            if m.end() >= len(s):
                return end if final else None
            start = v = m.end()
            index = out.open()

    def _named(self, s: bytes, start: int, p: int, index: int, final: bool,
               out: _Out) -> int | None:
        """Mistral v11+: NAME[ARGS]value, NAME[CALL_ID]ID[ARGS]value or NAME{...}."""
        n, in_id = len(s), False
        name_end = q = _NAME.match(s, p).end()
        if s.startswith(b"[CALL_ID]", q):
            in_id, q = True, _ID.match(s, q + len(b"[CALL_ID]")).end()
        if q >= n and not final:
            return None
        if s.startswith(b"[ARGS]", q):
            v = _WS.match(s, q + len(b"[ARGS]")).end()
            if v >= n and not final:
                return None
        elif q < n and s[q] == 0x7B and not in_id:
            v = q
        elif not final and _partial(s, q, (b"[ARGS]",) + (() if in_id else (b"[CALL_ID]",))):
            return None
        else:
            message = f"expected [ARGS] after the {'call id' if in_id else 'tool name'}"
            out.add(RefCallError(index, "invalid_call", message, q, (start, q)))
            return q
        end = self._end(s, v, 1, final)
        if end is None:
            return None
        name = s[p:name_end]
        try:
            bad = None if name.decode("utf-8") else "tool call has no name"
        except UnicodeDecodeError:
            bad = "tool name is not valid UTF-8"
        if bad:
            out.add(RefCallError(index, "invalid_call", bad, p, (start, end)))
        else:
            self._value(s, v, end, 1, index, (start, end), out, (name, p))
        return end


    def _end(self, s: bytes, v: int, depth: int, final: bool) -> int | None:
        """End of the value at v: its lexical extent (``_close``) if that ends before the first
        literal opener of a next block after v (or there is none); else the end of the JSON
        value parsed from v if that is valid within the limits (the opener is inside one of its
        strings); else that opener. Streaming, the parse runs to the end of the bytes received
        and is final once it succeeds, reaches max_call_bytes or fails more than 7 bytes before
        the end (closer, a cut UTF-8 sequence or surrogate pair could still continue). None:
        more bytes are needed (final=False)."""
        n = len(s)
        m = _OPENERS[self.mode].search(s, v + 1)
        o = n if m is None else m.start()
        close = _close(s, v, o)
        if close is not None:
            return close
        if m is None:
            return n if final else None
        if s[v] not in b'{["':
            return o
        lim = v + self.max_call_bytes
        e = min(lim, n)
        try:
            return _Json(s, e, self.max_depth).value(v, depth)[1]
        except _JsonError as err:
            if not final and e < lim and err.pos + 7 >= n:
                return None
        return o


def _close(s: bytes, v: int, stop: int) -> int | None:
    """End of the lexical value at v within s[:stop]: '{'/'[' to the bracket closing the first
    (either kind counted, outside strings), '"' to its closing quote; None if it does not close
    there (or v starts neither)."""
    if v < stop and s[v] in b'{["':
        depth = 0
        for m in _LEX.finditer(s, v, stop):
            if s[m.start()] == 0x22 and m.group(1) is None:
                return None  # an unclosed string
            depth += {0x22: 0, 0x7B: 1, 0x5B: 1}.get(s[m.start()], -1)
            if depth == 0:
                return m.end()
    return None


def _partial(s: bytes, q: int, tags: tuple[bytes, ...]) -> bool:
    """s ends inside a prefix of one of the tags starting at q."""
    return any(t.startswith(s[q:]) and len(s) - q < len(t) for t in tags)


def _validate(node: tuple, sc: dict | None, path: list[bytes]) -> tuple[str, str, int] | None:
    """First schema violation as (kind, message, byte_pos), or None."""
    if sc is None:
        return None
    kind, pos, v = node
    where = (b"[" + b",".join(path) + b"]").decode()
    if sc["types"] and not _KIND_TYPES[kind] & set(sc["types"]):
        return ("invalid_argument", f"argument {where}: expected {' or '.join(sc['types'])}, "
                f"got {_KIND_NAME[kind]}", pos)
    if sc["enum"] is not None and canonical(node).decode() not in sc["enum"]:
        return ("invalid_argument", f"argument {where}: not one of the enum values", pos)
    if kind == "obj":
        for r in sc["required"]:
            if r.encode() not in v:
                key = json_string(r.encode())
                return ("missing_argument",
                        f"missing required argument {where[:-1]}{',' if path else ''}"
                        f"{key.decode()}]", pos)
        for k in sorted(v):
            prop = sc["properties"].get(k.decode())
            if prop is None and sc["additional"]:
                continue
            sub = path + [json_string(k)]
            if prop is None:
                return ("invalid_argument", f"argument {(b'[' + b','.join(sub) + b']').decode()}"
                        ": unexpected argument", v[k][1])
            bad = _validate(v[k], prop, sub)
            if bad is not None:
                return bad
    elif kind == "arr" and sc["items"] is not None:
        for i, x in enumerate(v):
            bad = _validate(x, sc["items"], path + [str(i).encode()])
            if bad is not None:
                return bad
    return None


class RefStreamParser:
    """Reference streaming parser: re-parses the whole buffer on each feed (quadratic)."""

    def __init__(self, parser: RefParser) -> None:
        self._parser, self._buf, self._sent, self._done = parser, b"", 0, False
        self._result: RefParseResult | None = None

    def feed(self, chunk: str | bytes) -> list[RefToolCall | RefCallError]:
        if self._done:
            raise ValueError("feed() after finish(): this stream is closed")
        self._buf += _to_bytes(chunk)
        out = self._parser.scan(self._buf, False)
        items = sorted(out.calls + [e for e in out.errors if e.index >= 0],
                       key=lambda x: x.index)
        new, self._sent = items[self._sent:], len(items)
        return new

    def finish(self) -> RefParseResult:
        if not self._done:
            self._result, self._done = self._parser.parse(self._buf), True
        assert self._result is not None
        return self._result


def _to_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    if isinstance(text, bytes):
        return text
    raise TypeError(f"text must be str or bytes, got {type(text).__name__}")


def _result(out: _Out) -> RefParseResult:
    def dec(b: bytes | None) -> str | None:
        return None if b is None else b.decode("utf-8", "replace")
    return RefParseResult(out.calls, out.errors, dec(out.answer), out.answer_tag,
                          dec(out.think), out.outside.decode("utf-8", "replace"))
