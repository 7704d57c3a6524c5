"""Tool-call parsing of model output: Hermes/Qwen ``<tool_call>`` blocks (default), Llama-3 JSON
tool calls, Mistral ``[TOOL_CALLS]`` (public API over the C++ core).

    parser = ToolCallParser(tools)                      # OpenAI-style or bare {"name","parameters"}
    parser = ToolCallParser(tools, mode="llama3_json")  # or "mistral"; default "hermes"
    r = parser.parse(text)                              # -> ParseResult
    rs = parser.parse_batch(texts, threads=2)           # GIL released, N worker threads
    s = parser.stream(); s.feed(chunk) -> [ToolCall | CallError, ...]; s.finish() -> ParseResult

``backend="cpp"`` (default) runs ``spyglass.engine._core``; ``backend="python"`` runs the pure-
Python reference ``spyglass.engine.toolcall_ref`` (same results, byte for byte; its result types
are dataclasses with the same fields and methods). This module owns the shared constants and
validators (``ERROR_KINDS``, ``MAX_DEPTH_LIMIT``, ``MODES``, ``check_parser_limits``), which the
reference imports from here; the reference is imported only lazily, by the python backend and
by ``canonical_json`` (the C++ core has no standalone JSON reader). Tests: ``.venv/bin/python
-m pytest -q tests/test_toolcall.py tests/test_toolcall_props.py tests/test_toolcall_modes.py``;
speed: ``.venv/bin/python benchmarks/bench_toolcall.py``.

Format (all positions are byte offsets into the UTF-8 text; a ``str`` is encoded with
"surrogatepass", so lone surrogates become ill-formed UTF-8)
- Tags are exact and case-sensitive: ``<think>``, ``<answer>``, ``<response>``, the mode's call
  opener (below) and their closing forms. Outside any block, a ``<`` that starts none of them
  is plain text. Think/answer/response blocks work the same in every mode.
- ``<think>…</think>``: only ``</think>`` ends it. ``think`` is the contents of all think blocks
  joined with "\\n" (None if there is none). If ``</think>`` comes before any block opened,
  everything before it is think (the chat template put ``<think>`` in the prompt).
- ``<answer>…</answer>`` / ``<response>…</response>``: only the matching close ends it. The
  first such block gives ``answer`` and ``answer_tag`` ("answer" | "response"); later ones are
  skipped. Blocks and tags are never recognised inside think or answer blocks.
- hermes mode: ``<tool_call>BODY</tool_call>``. BODY ends at the ``</tool_call>`` that follows
  a JSON value and blanks when the bytes before it are one valid JSON document of at most
  ``max_call_bytes`` bytes nested at most ``max_depth`` deep (steps 1-2 below; that tag is the
  first ``</tool_call>`` outside a JSON string, so one inside a string does not end the call).
  Otherwise (the body is known to be invalid: unbalanced quotes, bad syntax, too large or too
  deep) BODY ends at the first literal ``</tool_call>`` after the opener, so one bad call never
  hides the calls after it; with none at all the call is an ``unterminated_tag`` error to the
  end of the text. Cost: linear (a parse that runs past the next call's opener is inside a
  string there, and the next literal ``</tool_call>`` ends it or the next call's parse).
  Streaming decides a call once the bytes up to the last literal ``</tool_call>`` received
  decide it (the parse failed, or completed, or hit ``max_call_bytes``; a parse still inside a
  string there waits). A pending call is not parsed again while only plain string bytes
  (printable ASCII but ``"`` and ``\\``) arrived after its last parse (they cannot decide it);
  after 8 parses the C++ core parses it again only once its body has grown by a quarter since
  the last one, or at ``finish()`` (the reference parses at every tag), so one call's parses cost
  O(its bytes) however many closing tags its strings hold, and such a call may stream out later
  than the reference's, never differently. ``span`` = [its ``<``, end of its ``</tool_call>``)
  (or end of text).
  Other modes: see "Modes" below.
- Calls: every call gets the next ordinal ``index`` (0, 1, …), good or bad, in text order. A
  block whose value is a JSON array holds one call per element (each its own index and check,
  all sharing the block's span; ``[]`` is one ``invalid_call`` "tool call list is empty" at its
  ``[``); a block that fails before its elements are known takes one index.
- ``text_outside``: the bytes outside all blocks, concatenated. think / answer / text_outside are
  decoded with ``errors="replace"`` (Python's U+FFFD rule); nothing else is ever replaced.
- An unterminated think/answer block keeps its contents up to the end and adds an
  ``unterminated_tag`` error with index -1.

Modes (``mode=``, chosen when the parser is built; the call-object rules below are shared):
- ``hermes`` (default; Qwen 2.5/3, Hermes, vLLM's ``hermes`` parser): ``<tool_call>`` as above.
- ``llama3_json`` (Llama 3.1/3.2/3.3 "JSON based tool calling", vLLM's ``llama3_json``): a block
  is a VALUE (below) that starts at a ``{`` outside blocks while text_outside so far is only
  " \\t\\n\\r" (the assistant text *begins* with the call, after any think blocks: JSON after
  prose is prose), or after ``<|python_tag|>`` and blanks anywhere outside blocks (the tag is in
  that block's span). After a block, blanks ``;`` blanks and a ``{`` open the next block (those
  separator bytes belong to no output); anything else ends the run and the bytes from the
  value's end on are scanned as text (so a newline-separated ``{`` still opens a block while
  text_outside is blank). ``span`` = [the ``{`` or ``<|python_tag|>``, the value's end).
  ``<tool_call>`` is plain text in this mode. Typical: ``{"name": "f", "parameters": {...}}``.
- ``mistral`` (mistral-common tokenizers, vLLM's ``mistral``): ``[TOOL_CALLS]`` outside blocks
  opens a block ending at its value's end (``span`` from the ``[``); after blanks:
  ``{`` or a ``[`` that does not start ``[ARGS]``/``[CALL_ID]``/``[TOOL_CALLS]``: a VALUE, an
  object or a list of call objects (tokenizers < v11: ``[TOOL_CALLS] [{"name": "f",
  "arguments": {...}}, ...]``); otherwise the v11+ form ``NAME[ARGS]ARGS``,
  ``NAME[CALL_ID]ID[ARGS]ARGS`` (v11 with ids; v13 drops them) or ``NAME{...}`` (the special
  tokens decoded away), one call per ``[TOOL_CALLS]``: NAME = the bytes up to the first ``[`` or
  ``{``, ID = the bytes up to the next ``[``, blanks allowed after ``[ARGS]``, ARGS = a VALUE
  that is the call's arguments (the rules of "arguments" below; its object sits at depth 2,
  as inside a call object). If ``[ARGS]`` is not where expected the block is an
  ``invalid_call`` "expected [ARGS] after the tool name" (or "... after the call id") at that
  byte and ends there; otherwise NAME is checked first: empty -> "tool call has no name",
  ill-formed UTF-8 -> "tool name is not valid UTF-8" (``invalid_call`` at NAME's first byte),
  then ARGS from step 1 below, ``unknown_tool`` at NAME's first byte.
- VALUE (llama3_json, mistral): found lexically, then parsed as one JSON document. From ``{`` or
  ``[``: to the bracket that brings the count of open brackets (either kind, outside strings;
  strings found as in hermes) back to zero; from ``"``: to its closing quote; from anything
  else, or if it never closes: to the end of the text. But if a literal OPENER of the mode
  (mistral: ``[TOOL_CALLS]``; llama3_json: ``<|python_tag|>``, or ``;`` then blanks then ``{``)
  starts after the value's first byte and before that end, then: a value from ``{``, ``[`` or
  ``"`` whose JSON value (parsed from its first byte) is valid within ``max_call_bytes`` and
  ``max_depth`` keeps its end (the opener is inside one of its strings); any other value ends
  at the first such opener, which then opens the next block as usual (a ``;`` one through the
  llama3_json separator rule), so one bad call never hides the calls after it (the value is
  checked as usual: typically ``invalid_json`` "unexpected end of input" at the opener). Cost:
  linear, as in hermes (a parse that runs past the next opener is inside a string there, since
  an opener outside strings is invalid JSON; from there it and the next block's parse have
  opposite string states, so the next opener ends one of them). A streamed call is emitted when
  its value's end is known: when it closes before any opener, or once its parse after an opener
  is decided (it succeeded, reached ``max_call_bytes``, or failed more than 7 bytes before the
  end of the bytes received: closer, a cut UTF-8 sequence or surrogate pair could still
  continue; the C++ core retries a pending parse after max(16, a quarter of its bytes) more
  bytes, so the retries stay linear); one running to the end of the text only at ``finish()``.
  Calls after an undecided value wait for it.

A call BODY (hermes) or VALUE is checked in this order; the first failure is its one error:
1. ``too_large``: more than ``max_call_bytes`` bytes (byte_pos = body start + max_call_bytes).
2. JSON (RFC 8259, whitespace " \\t\\n\\r" around the value): ``invalid_json`` at the first byte
   that cannot continue a valid document ("unexpected end of input" at the body end); invalid
   UTF-8 in a string at the first byte of the ill-formed sequence (Unicode Table 3-7); a bad
   escape, bad ``\\u`` hex, or lone surrogate escape (low alone, or high not followed by
   ``\\u``+low) at its backslash; a raw byte < 0x20 in a string at that byte; a nonzero number
   whose decimal exponent (k - 1 below) is beyond +-(10**18 - 1) ("number exponent out of
   range", e.g. a literal exponent of more than 18 significant digits) at the number's first
   byte. ``too_deep``: an array/object opened at depth > ``max_depth`` (the call object is
   depth 1, 2 inside a list), at its bracket.
3. ``invalid_call`` (per call object): not an object ("tool call must be a JSON object, got
   T"), no ``"name"``, ``"name"`` not a string. The arguments are under ``"arguments"``, or
   under ``"parameters"`` when ``"arguments"`` is absent (Llama's key, accepted in every mode;
   neither means ``{}``); both present -> "tool call has both "arguments" and "parameters""
   at the ``"parameters"`` value. The arguments value must be an object, or a JSON string whose
   contents are one JSON document holding an object (the double-encoded form Qwen's reference
   and vLLM's hermes parser accept), parsed as if it sat where the string is (depth) with the
   rules of step 2: its errors are ``invalid_json``/``too_deep`` "in the "KEY" string at byte
   K: MESSAGE" (K = offset in the decoded string) at the string's opening quote; a non-object
   document -> ""KEY" string must hold a JSON object, got T" at the quote; any other value ->
   ""KEY" must be an object, got T" at the value (KEY = the key the text used). Other keys are
   ignored. Duplicate keys: the last one wins.
4. ``unknown_tool``: name not among the tools (byte_pos = the name string's quote).
5. Schema (JSON Schema subset): ``type`` (string, integer, number, boolean, array, object, null,
   or a list), ``enum``/``const`` (compared as canonical JSON), ``required``, ``properties``,
   ``additionalProperties: false``, ``items`` (a single schema), ``nullable``; recursively.
   Checked per value: type, then enum, then (objects) each ``required`` name in schema order ->
   ``missing_argument`` at the object's ``{``, then members in canonical key order ->
   ``invalid_argument`` at the value (unexpected key when additionalProperties is false), then
   (arrays) elements in order. Paths in messages are canonical JSON arrays, e.g.
   ``argument ["box",2]: expected integer, got number``. An integral number (canonical exponent
   >= 0, e.g. ``2.0``) is an integer. Inside string-encoded arguments every schema error is
   reported at the string's opening quote.

Canonical JSON (``ToolCall.arguments``): no whitespace, separators "," and ":", object keys
sorted by their UTF-8 bytes (= code point order), strings with only ``"`` ``\\`` and bytes < 0x20
escaped (\\b \\f \\n \\r \\t, else \\u00xx lowercase), other characters as raw UTF-8 (so equal to
``json.dumps(v, ensure_ascii=False, separators=(",", ":"), sort_keys=True)`` for strings).
Numbers, exactly and without floating point: write the value as D × 10^E with D a digit string
without leading or trailing zeros (zero and -0 -> ``0``); n = len(D), k = n + E (the number of
digits before the decimal point), L = the number of digits in the literal's integer part; then
  E >= 0 and k <= max(21, L) -> D followed by E zeros        (1.5e3 -> 1500, 100.0 -> 100)
  E < 0 and k > 0            -> D[:k] "." D[k:]              (12.50 -> 12.5)
  E < 0 and -6 < k <= 0      -> "0." + "0"*(-k) + D          (0.00012 -> 0.00012)
  otherwise                  -> D[0] ["." D[1:]] "e" (k-1)   (1e21 -> 1e21, 1.5e-7 -> 1.5e-7)
with "-" in front of negative values. So an integer literal always keeps its digit string
(any length), and integral values written with a fraction or exponent become plain integers up
to 21 digits (like JavaScript's Number-to-string, but exact). The canonical text of every
accepted document parses again to itself (the exponent bound is on the value, which canonical
form keeps). ``args()`` (``load_arguments``) is ``json.loads`` of it, except that an integer
longer than Python's int-string limit (``sys.get_int_max_str_digits()``, 4300 by default)
becomes an exact ``decimal.Decimal`` instead of raising (converting it to int would be
quadratic); non-integers are floats as ``json.loads`` makes them (nearest double: ``1e999999999``
-> inf, ``1E-400`` -> 0.0); ``arguments`` keeps the exact text.

Limits: 1 <= max_depth <= 512; 1 <= max_call_bytes < 2**32; texts < 4 GiB.

Streaming: ``feed`` costs O(len(chunk)) amortised in every mode (nothing before the scanner's
position is scanned again; a tag split across chunks is held back until it completes); the
stream keeps the whole text, so ``finish()`` equals ``parse()`` of the concatenation, byte for
byte.
"""
from __future__ import annotations

import decimal
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from spyglass.engine import _core

if TYPE_CHECKING:  # annotations only: the python backend returns the reference's dataclasses
    from spyglass.engine.toolcall_ref import RefCallError, RefParseResult, RefToolCall

    AnyParseResult = Union[_core.ParseResult, RefParseResult]
    AnyItem = Union[_core.ToolCall, _core.CallError, RefToolCall, RefCallError]

ToolCall = _core.ToolCall
CallError = _core.CallError
ParseResult = _core.ParseResult
StreamParser = _core.StreamParser

__all__ = ["ERROR_KINDS", "MAX_DEPTH_LIMIT", "MAX_EXP10", "MODES", "CallError", "ParseResult",
           "ParserConfig", "StreamParser", "ToolCall", "ToolCallParser", "canonical_json",
           "check_parser_limits", "load_arguments", "normalize_tools"]

ERROR_KINDS = ("unterminated_tag", "invalid_json", "too_deep", "too_large", "invalid_call",
               "unknown_tool", "missing_argument", "invalid_argument")
MAX_DEPTH_LIMIT = 512
MODES = ("hermes", "llama3_json", "mistral")
MAX_EXP10 = 10**18 - 1  # largest |decimal exponent| (k - 1) of a nonzero number
_MAX_CALL_BYTES_END = 2**32 - 15  # exclusive bound on max_call_bytes
_TYPES = ("string", "integer", "number", "boolean", "array", "object", "null")


def check_parser_limits(max_depth: int, max_call_bytes: int, mode: str = "hermes") -> None:
    """Raise ValueError naming the bad value unless 1 <= max_depth <= MAX_DEPTH_LIMIT,
    1 <= max_call_bytes < 2**32 (both ints) and mode is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'hermes', 'llama3_json' or 'mistral', got {mode!r}")
    if not isinstance(max_depth, int) or not 1 <= max_depth <= MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be an int in [1, {MAX_DEPTH_LIMIT}], got {max_depth!r}")
    if not isinstance(max_call_bytes, int) or not 1 <= max_call_bytes < _MAX_CALL_BYTES_END:
        raise ValueError(f"max_call_bytes must be an int in [1, 2**32), got {max_call_bytes!r}")


def _parse_int(text: str) -> int | decimal.Decimal:
    try:
        return int(text)
    except ValueError:  # over sys.get_int_max_str_digits(): exact, and linear to build
        return decimal.Decimal(text)


def load_arguments(arguments: str) -> Any:
    """``json.loads`` of canonical arguments that never raises on a valid document: integers
    beyond Python's int-string limit become exact ``decimal.Decimal`` (see "Canonical JSON")."""
    return json.loads(arguments, parse_int=_parse_int)


def canonical_json(text: str | bytes, max_depth: int = MAX_DEPTH_LIMIT) -> str:
    """Canonical form of one JSON document (the rule above); ValueError (with the byte
    position) if invalid. Runs the pure-Python reference's JSON reader."""
    from spyglass.engine.toolcall_ref import canonical_json as ref_canonical_json  # noqa: PLC0415
    return ref_canonical_json(text, max_depth)


@dataclass(frozen=True)
class ParserConfig:
    """Limits, backend and call format (mode) of a ToolCallParser (validated on construction)."""
    max_depth: int = 64
    max_call_bytes: int = 1 << 20
    backend: str = "cpp"
    mode: str = "hermes"

    def __post_init__(self) -> None:
        check_parser_limits(self.max_depth, self.max_call_bytes, self.mode)
        if self.backend not in ("cpp", "python"):
            raise ValueError(f"backend must be 'cpp' or 'python', got {self.backend!r}")


def _utf8_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty str, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not encodable as UTF-8: {value!r}") from None
    return value


def _canon(value: Any, where: str) -> str:
    try:
        return canonical_json(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {value!r} is not a JSON value ({e})") from None


def _normalize_schema(s: Any, where: str) -> dict[str, Any]:
    """The JSON-schema subset the parser checks, as the plain dict both backends consume."""
    if not isinstance(s, Mapping):
        raise ValueError(f"{where} must be a JSON schema dict, got {s!r}")
    t = s.get("type", [])
    types = [t] if isinstance(t, str) else t
    if not isinstance(types, list) or any(x not in _TYPES for x in types):
        raise ValueError(f"{where}.type must be one of {_TYPES} or a list of them, got {t!r}")
    types = list(dict.fromkeys(types))
    if s.get("nullable") is True and types and "null" not in types:
        types.append("null")
    enum = None
    if "enum" in s:
        if not isinstance(s["enum"], list):
            raise ValueError(f"{where}.enum must be a list, got {s['enum']!r}")
        enum = [_canon(v, f"{where}.enum") for v in s["enum"]]
    elif "const" in s:
        enum = [_canon(s["const"], f"{where}.const")]
    props = s.get("properties", {})
    if not isinstance(props, Mapping):
        raise ValueError(f"{where}.properties must be a dict, got {props!r}")
    required = s.get("required", [])
    if not isinstance(required, list):
        raise ValueError(f"{where}.required must be a list of str, got {required!r}")
    items = s.get("items")
    return {
        "types": types,
        "enum": enum,
        "properties": {_utf8_name(k, f"{where}.properties key"):
                       _normalize_schema(v, f"{where}.properties.{k}") for k, v in props.items()},
        "required": [_utf8_name(r, f"{where}.required[]") for r in required],
        "items": _normalize_schema(items, f"{where}.items") if isinstance(items, Mapping) else None,
        "additional": s.get("additionalProperties", True) is not False,
    }


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict | None]]:
    """[(name, normalized parameters schema or None)] from OpenAI-style
    ``{"type": "function", "function": {"name", "parameters"}}`` or bare ``{"name", "parameters"}``
    dicts. Raises ValueError/TypeError naming the offending tool or value."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
        raise TypeError(f"tools must be a list of dicts, got {type(tools).__name__}")
    out: list[tuple[str, dict | None]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise TypeError(f"tools[{i}] must be a dict, got {tool!r}")
        fn = tool["function"] if "function" in tool else tool
        if not isinstance(fn, Mapping):
            raise TypeError(f"tools[{i}].function must be a dict, got {fn!r}")
        name = _utf8_name(fn.get("name"), f"tools[{i}].name")
        if name in seen:
            raise ValueError(f"tools[{i}]: duplicate tool name {name!r}")
        seen.add(name)
        params = fn.get("parameters")
        out.append((name, None if params is None
                    else _normalize_schema(params, f"tools[{i}] ({name}).parameters")))
    return out


class ToolCallParser:
    """Parses model outputs against a fixed tool set (see the module docstring for the format).

    ``backend="cpp"`` results are ``_core.ParseResult`` / ``ToolCall`` / ``CallError``;
    ``backend="python"`` returns the reference's dataclasses with the same fields and methods.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]], max_depth: int = 64,
                 max_call_bytes: int = 1 << 20, backend: str = "cpp",
                 mode: str = "hermes") -> None:
        self.config = ParserConfig(max_depth, max_call_bytes, backend, mode)
        self.tools = normalize_tools(tools)
        if backend == "cpp":
            self._impl: Any = _core.Parser(self.tools, max_depth, max_call_bytes, mode)
        else:
            from spyglass.engine.toolcall_ref import RefParser  # noqa: PLC0415
            self._impl = RefParser(self.tools, max_depth, max_call_bytes, mode)

    @property
    def mode(self) -> str:
        """How tool calls are framed: "hermes", "llama3_json" or "mistral"."""
        return self.config.mode

    @property
    def tool_names(self) -> list[str]:
        return [name for name, _ in self.tools]

    def parse(self, text: str | bytes) -> AnyParseResult:
        """Parses one whole model output."""
        return self._impl.parse(text)

    def parse_batch(self, texts: Iterable[str | bytes], threads: int = 0) -> list[AnyParseResult]:
        """Parses many outputs with the GIL released; threads=0 runs in the calling thread,
        N >= 1 on N worker threads (the calling thread is one of them)."""
        if not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {threads!r}")
        return self._impl.parse_batch(texts, threads)

    def stream(self) -> Any:
        """A streaming parser: ``feed(chunk)`` returns each call (or its error) once its
        ``</tool_call>`` has arrived; ``finish()`` returns the same ParseResult as ``parse``
        of the concatenated chunks. Total cost is linear in the bytes fed (C++ backend)."""
        return self._impl.stream()


def make_turn_parser(tools: Sequence[Mapping[str, Any]], **kw: Any) -> Any:
    """The engine's TurnParser over this parser: calls as {"name", "arguments"} (canonical
    JSON), every CallError as a dict (format errors of the turn), and the answer. ``kw`` are
    ToolCallParser's (``mode="llama3_json"``/``"mistral"``, limits, backend)."""
    from .scheduler import ParsedTurn  # noqa: PLC0415 - the engine imports this module lazily

    parser = ToolCallParser(tools, **kw)

    def parse_turn(text: str) -> ParsedTurn:
        r = parser.parse(text)
        return ParsedTurn([{"name": c.name, "arguments": c.arguments} for c in r.calls],
                          [e.to_dict() for e in r.errors], r.answer)

    return parse_turn
