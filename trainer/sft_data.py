"""The data side of SFT (`spyglass sft`, trainer/sft.py): three layouts become the same thing, a
Trajectory whose GEN segments are the assistant turns; trajectories go back to ShareGPT.

(a) ShareGPT, the layout of OpenSearch-VL's SearchVL-SFT-36k release (LLaMA-Factory's
    `formatting: sharegpt`): one JSON object per line with
      conversations  [{"from": "human"|"gpt"|"function_call"|"observation", "value": str}, ...]
                     (an optional leading {"from": "system"}); human/observation at even positions,
                     gpt/function_call at odd ones, ending with an assistant message
      images         image paths; the n-th `<image>` placeholder in any message's text is
                     images[n]. A relative path resolves under `media_dir`, by default as
                     LLaMA-Factory does: under its dataset_dir (the folder up from the file
                     holding dataset_info.json: OpenSearch-VL's data/new_fvqa/*.json name
                     images relative to data/), then under the file's own folder
      system         system prompt (absent: the engine's DEFAULT_SYSTEM)
      tools          tool schemas: a JSON string (or list) of OpenAI-style or bare
                     {"name", "description", "parameters"} functions
      id, meta       optional spyglass extras (LLaMA-Factory ignores them)
    A function_call value is `[<think>...</think>] JSON` (one {"name", "arguments"} object or a
    list of them), rendered as `<think>...</think>\\n<tool_call>{json}</tool_call>` (the agent
    format of the engine's system prompt; `call_style="qwen"` puts newlines inside the tags as
    Qwen2.5/3's template does). Tag names are configurable (`ShareGPTTags`).
(b) ms-swift / OpenAI `messages` records (ms-swift's agent format, docs/Instruction/Agent-support):
      messages       [{"role": "system"|"user"|"assistant"|"tool_call"|"tool_response"|"tool",
                     "content": str}, ...]; a tool_call's content is JSON {"name", "arguments"}; an
                     assistant message may carry OpenAI `tool_calls` instead. Consecutive
                     assistant / tool_call messages are one assistant turn (text, then the calls:
                     parallel calls, or "an assistant turn followed by a tool call"); consecutive
                     tool responses are one observation. `tools` (a JSON string or a list of
                     schemas or of JSON strings) and `images` as in (a). Read by the same
                     functions (a record with `messages` and no ShareGPT messages column);
                     per-message "loss" flags are not read (every assistant turn trains).
(c) spyglass Trajectory JSONL (`engine.trajectory.write_jsonl`): the token ids are the truth.
    `--data.format auto` tells them apart by the first record (`sniff_format`).

    trajectories_to_sharegpt(trajs, "d/teacher.sharegpt.jsonl", codec, tools=env.schemas)
    trajs = load_sharegpt("d/teacher.sharegpt.jsonl", codec)      # and back (round trip exact
                                                                   # for canonical turns)

Tests: `.venv/bin/python -m pytest -q tests/test_sft.py tests/test_layouts_real.py`.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from spyglass.engine.config import check
from spyglass.engine.trajectory import Segment, SegmentKind, Status, Trajectory, Turn, write_jsonl


IMAGE = "<image>"
CALL_STYLES = ("compact", "qwen")


class RecordError(ValueError):
    """A bad SFT record: the message names the record (file:line or id) and the field."""

    def __init__(self, where: str, fld: str, msg: str) -> None:
        super().__init__(f"{where}: field {fld!r}: {msg}")


@dataclass
class ShareGPTTags:
    """Column and role names of a ShareGPT file (defaults: LLaMA-Factory's)."""

    messages: str = "conversations"  # column of the message list
    system: str = "system"  # column of the system prompt
    tools: str = "tools"  # column of the tool schemas (a JSON string or a list)
    images: str = "images"  # column of the image paths
    role_tag: str = "from"  # message key holding the role
    content_tag: str = "value"  # message key holding the text
    user_tag: str = "human"  # role of a user message
    assistant_tag: str = "gpt"  # role of an assistant text message
    observation_tag: str = "observation"  # role of a tool output message
    function_tag: str = "function_call"  # role of an assistant tool-call message
    system_tag: str = "system"  # role of an optional leading system message

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            check(isinstance(v, str) and bool(v), f"ShareGPTTags.{k} must be a non-empty string, got {v!r}")
        roles = [self.user_tag, self.assistant_tag, self.observation_tag, self.function_tag, self.system_tag]
        check(len(set(roles)) == len(roles), f"ShareGPTTags role tags must be distinct, got {roles}")


# ------------------------------------------------------------------------------ ShareGPT / messages -> Trajectory
def media_dirs(path: str | Path, media_dir: str | Path | None = None) -> list[Path]:
    """Where a data file's relative image paths resolve, in order: `media_dir` if given, else
    LLaMA-Factory's: its dataset_dir (the nearest folder at or up to 3 levels above the file that
    holds a dataset_info.json; LLaMA-Factory's `media_dir` defaults to it, so OpenSearch-VL's
    data/new_fvqa/x.json names images relative to data/); then the file's own folder."""
    here = Path(path).resolve().parent
    first = Path(media_dir) if media_dir else \
        next((d for d in [here, *here.parents][:4] if (d / "dataset_info.json").is_file()), here)
    return list(dict.fromkeys([first, here]))


def _load_image(entry: Any, dirs: Sequence[Path], where: str, fld: str) -> Image.Image:
    """An image path (absolute, else under each of `dirs` in turn) or a {bytes|path} dict."""
    if isinstance(entry, dict):
        if entry.get("bytes"):
            try:
                with Image.open(io.BytesIO(entry["bytes"])) as im:
                    return im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - PIL raises several kinds
                raise RecordError(where, fld, f"image bytes do not decode: {e}") from None
        entry = entry.get("path")
    if not isinstance(entry, str) or not entry:
        raise RecordError(where, fld, f"expected an image path, got {entry!r}")
    if entry.startswith(("http://", "https://")):
        raise RecordError(where, fld, f"{entry!r} is a URL and there is no network here: download it, give its path")
    cands = [Path(entry)] if Path(entry).is_absolute() else [Path(d) / entry for d in dirs]
    for p in cands:
        if p.is_file():
            with Image.open(p) as im:
                return im.convert("RGB")
    also = f" (nor {', '.join(repr(str(c)) for c in cands[1:])})" if len(cands) > 1 else ""
    raise RecordError(where, fld, f"image file {str(cands[0])!r} does not exist{also}")


def _parts(text: str, images: Iterator[Image.Image]) -> list[dict[str, Any]]:
    """Message content parts: text split at <image>, each placeholder taking the next image."""
    out: list[dict[str, Any]] = []
    for k, chunk in enumerate(text.split(IMAGE)):
        if k:
            out.append({"type": "image", "image": next(images)})
        if chunk:
            out.append({"type": "text", "text": chunk})
    return out


def _render_calls(calls: list[Any], where: str, fld: str, style: str) -> str:
    """{"name", "arguments" (object or JSON string)} calls as <tool_call> blocks, one per line."""
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise RecordError(where, fld, f"a call must be an object with a string 'name', got {c!r}")
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise RecordError(where, fld, f"call {c['name']!r}: arguments string is not JSON: {e}") from None
        if not isinstance(args, dict):
            raise RecordError(where, fld, f"call {c['name']!r}: arguments must be an object, got {args!r}")
        payload = json.dumps({"name": c["name"], "arguments": args}, ensure_ascii=False)
        out.append(f"<tool_call>\n{payload}\n</tool_call>" if style == "qwen" else f"<tool_call>{payload}</tool_call>")
    return "\n".join(out)


def render_call(value: str, where: str = "record", fld: str = "value", style: str = "compact") -> str:
    """A function_call value (`[<think>..</think>] JSON`) as the assistant text the model emits."""
    m = re.fullmatch(r"\s*(<think>.*?</think>)?\s*(.*?)\s*", value, re.S)
    assert m is not None
    thought, body = m.group(1) or "", m.group(2)
    try:
        calls = json.loads(body)
    except json.JSONDecodeError as e:
        raise RecordError(where, fld, f"function_call must be [<think>..</think>] + JSON call(s): {e}") from None
    return thought + ("\n" if thought else "") + _render_calls(calls if isinstance(calls, list) else [calls],
                                                               where, fld, style)


def _tools_of(value: Any, where: str, fld: str) -> list[dict[str, Any]]:
    """A tool column: a JSON string, a list of schemas (or of JSON strings: ms-swift), or one schema."""
    if value is None or value == "":
        return []
    try:
        value = json.loads(value) if isinstance(value, str) else value
        value = [value] if isinstance(value, dict) else value
        if isinstance(value, list):
            value = [json.loads(t) if isinstance(t, str) else t for t in value]
    except json.JSONDecodeError as e:
        raise RecordError(where, fld, f"not a JSON list of tool schemas: {e}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError(where, fld, f"expected a list of tool schema objects, got {value!r:.80}")
    return value


def _record_head(rec: Any, where: str, tags: ShareGPTTags) -> tuple[list[dict], str | None, list]:
    """Validate a ShareGPT record's shape; returns (messages without system, system, tools)."""
    if not isinstance(rec, dict):
        raise RecordError(where, "<record>", f"expected a JSON object, got {type(rec).__name__}")
    msgs = rec.get(tags.messages)
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(where, tags.messages, f"expected a non-empty list of messages, got {msgs!r:.80}")
    system = rec.get(tags.system)
    if system is not None and not isinstance(system, str):
        raise RecordError(where, tags.system, f"expected a string, got {type(system).__name__}")
    if isinstance(msgs[0], dict) and msgs[0].get(tags.role_tag) == tags.system_tag:
        system, msgs = msgs[0].get(tags.content_tag), msgs[1:]
        if not isinstance(system, str):
            raise RecordError(where, f"{tags.messages}[0].{tags.content_tag}", "system message must be a string")
    tools = _tools_of(rec.get(tags.tools), where, tags.tools)
    odd, even = (tags.user_tag, tags.observation_tag), (tags.assistant_tag, tags.function_tag)
    off = 1 if len(rec.get(tags.messages)) != len(msgs) else 0
    for i, m in enumerate(msgs):
        fld = f"{tags.messages}[{i + off}]"
        if not isinstance(m, dict):
            raise RecordError(where, fld, f"expected a message object, got {m!r:.80}")
        role, content = m.get(tags.role_tag), m.get(tags.content_tag)
        want = odd if i % 2 == 0 else even
        if role not in want:
            raise RecordError(where, f"{fld}.{tags.role_tag}", f"role {role!r} at turn {i}: expected one of "
                              f"{list(want)} ({'/'.join(odd)} at even turns, {'/'.join(even)} at odd turns)")
        if not isinstance(content, str):
            raise RecordError(where, f"{fld}.{tags.content_tag}", f"expected a string, got {type(content).__name__}")
    if msgs[0][tags.role_tag] != tags.user_tag:
        raise RecordError(where, tags.messages, f"the first message must be from {tags.user_tag!r}")
    if len(msgs) % 2:
        raise RecordError(where, tags.messages, f"ends with a {msgs[-1][tags.role_tag]!r} message; "
                          f"the last one must be {tags.assistant_tag!r} or {tags.function_tag!r}")
    return msgs, system, tools


def _sharegpt_turns(rec: dict[str, Any], where: str, tags: ShareGPTTags, call_style: str) -> tuple[list, Any, list]:
    """A ShareGPT record as (turns, system, tools): turns are (role, text(s), field) with role
    user | tool (a list of tool outputs) | assistant (the rendered text the model emits)."""
    msgs, system, tools = _record_head(rec, where, tags)
    off = len(rec[tags.messages]) - len(msgs)
    turns: list[tuple[str, Any, str]] = []
    for i, m in enumerate(msgs):
        role, text, fld = m[tags.role_tag], m[tags.content_tag], f"{tags.messages}[{i + off}].{tags.content_tag}"
        if role == tags.function_tag:
            turns.append(("assistant", render_call(text, where, fld, call_style), fld))
        else:
            kind = {tags.assistant_tag: "assistant", tags.observation_tag: "tool"}.get(role, "user")
            turns.append((kind, [text] if kind == "tool" else text, fld))
    return turns, system, tools


_SWIFT_ROLES = ("system", "user", "assistant", "tool_call", "tool_response", "tool")


def _messages_turns(rec: dict[str, Any], where: str, call_style: str) -> tuple[list, Any, list]:
    """An ms-swift / OpenAI `messages` record (ms-swift's agent format: roles system, user,
    assistant, tool_call (content: a JSON {"name", "arguments"}), tool_response | tool; an
    assistant message may carry OpenAI `tool_calls`; a `tools` column) as (turns, system, tools).
    As ms-swift's agent templates do, consecutive assistant / tool_call messages form one
    assistant turn (the calls as <tool_call> blocks after the text) and consecutive tool
    responses one observation (parallel calls)."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(where, "messages", f"expected a non-empty list of messages, got {msgs!r:.80}")
    system, tools = rec.get("system"), _tools_of(rec.get("tools"), where, "tools")
    turns: list[tuple[str, Any, str]] = []
    for i, m in enumerate(msgs):
        fld = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _SWIFT_ROLES or (role == "system" and i):
            raise RecordError(where, f"{fld}.role", f"role {role!r}: expected one of {list(_SWIFT_ROLES)} "
                              "(system only first)")
        content, kind = m.get("content"), {"tool_call": "assistant", "tool_response": "tool"}.get(role, role)
        if not (isinstance(content, str) or (role == "assistant" and content is None and m.get("tool_calls"))):
            raise RecordError(where, f"{fld}.content", f"expected a string, got {type(content).__name__}")
        if role == "system":
            system = content
            continue
        if role == "tool_call":
            try:
                call = json.loads(content)
            except json.JSONDecodeError as e:
                raise RecordError(where, f"{fld}.content",
                                  f"a tool_call must be JSON {{name, arguments}}: {e}") from None
            pieces = [(_render_calls([call], where, f"{fld}.content", call_style), True)]
        elif kind == "assistant":
            calls = [c.get("function", c) if isinstance(c, dict) else c for c in m.get("tool_calls") or []]
            pieces = [(content or "", False)] + ([(_render_calls(calls, where, f"{fld}.tool_calls", call_style), True)]
                                                 if calls else [])
        else:
            pieces = [content]
        if turns and turns[-1][0] == kind and kind != "user":
            turns[-1][1].extend(pieces)
        else:
            turns.append((kind, pieces, f"{fld}.content"))
    for j, (kind, _, fld) in enumerate(turns):
        if kind not in (("user", "tool") if j % 2 == 0 else ("assistant",)):
            raise RecordError(where, fld.removesuffix(".content") + ".role", f"a {kind} turn at turn {j}: turns must "
                              "alternate user/tool (even) and assistant (odd), starting with user")
    if turns[0][0] != "user" or turns[-1][0] != "assistant":
        raise RecordError(where, "messages", "must start with a user message and end with an assistant one")
    return [(k, _join(p) if k == "assistant" else p[0] if k == "user" else p, f) for k, p, f in turns], system, tools


def _join(pieces: list[tuple[str, bool]]) -> str:
    """Assistant text pieces and call blocks as one turn; a call block starts on its own line."""
    out, prev_call = "", False
    for text, is_call in pieces:
        if out and (is_call or prev_call) and not out.endswith("\n"):
            out += "\n"
        out, prev_call = out + text, is_call
    return out


def sharegpt_to_trajectory(rec: dict[str, Any], codec: Any, *, where: str = "record",
                           media_dir: str | Path | Sequence[str | Path] = ".", tags: ShareGPTTags | None = None,
                           call_style: str = "compact") -> Trajectory:
    """One ShareGPT record (or an ms-swift / OpenAI `messages` one: `_messages_turns`) as a
    Trajectory: prompt ids from the chat template (system, tools, first user turn with its
    images), then a GEN segment per assistant turn (its text's ids plus the stop token; logprobs
    0.0 and version 0: not sampled, meta["logprobs"]="none") and an OBS segment per observation /
    later user turn (the template's token delta). Relative image paths resolve under media_dir
    (a folder or a list of folders tried in turn)."""
    tags = tags or ShareGPTTags()
    if call_style not in CALL_STYLES:
        raise ValueError(f"call_style must be one of {CALL_STYLES}, got {call_style!r}")
    swift = isinstance(rec, dict) and tags.messages not in rec and "messages" in rec
    turns, system, tools = _messages_turns(rec, where, call_style) if swift else \
        _sharegpt_turns(rec, where, tags, call_style)
    if system is not None and not isinstance(system, str):
        raise RecordError(where, tags.system, f"expected a string, got {type(system).__name__}")
    dirs = [Path(media_dir)] if isinstance(media_dir, (str, Path)) else [Path(d) for d in media_dir]
    return _build_trajectory(rec, turns, system, tools, codec, where, dirs, "images" if swift else tags.images,
                             "tools" if swift else tags.tools, "messages" if swift else "sharegpt")


def _build_trajectory(rec: dict[str, Any], turns: list, system: str | None, tools: list, codec: Any, where: str,
                      dirs: list[Path], images_key: str, tools_key: str, source: str) -> Trajectory:
    from spyglass.engine.toolcall import make_turn_parser

    paths = rec.get(images_key) or []
    if not isinstance(paths, list):
        raise RecordError(where, images_key, f"expected a list of image paths, got {paths!r:.80}")
    n_ph = sum((t[1].count(IMAGE) if t[0] != "tool" else sum(x.count(IMAGE) for x in t[1])) for t in turns)
    if n_ph != len(paths):
        raise RecordError(where, images_key, f"{len(paths)} images but {n_ph} {IMAGE} placeholders in the messages")
    try:
        parser = make_turn_parser(tools)
    except (TypeError, ValueError) as e:
        raise RecordError(where, tools_key, f"bad tool schema: {e}") from None
    images = iter([_load_image(p, dirs, where, f"{images_key}[{k}]") for k, p in enumerate(paths)])
    stop = codec.stop_token_ids[0]
    question = turns[0][1]
    prompt = codec.encode_messages([codec.system_message(system, tools or []),
                                    codec.user_message_parts(_parts(question, images))], tools or [])
    segs: list[Segment] = []
    steps: list[Turn] = []
    answer = None
    for kind, said, fld in turns[1:]:
        if kind == "assistant":
            if IMAGE in said:
                raise RecordError(where, fld, f"an assistant message cannot hold {IMAGE}")
            ids = codec.encode_text(said) + [stop]
            parsed = parser(said)
            turn = Turn(index=len(steps), calls=parsed.calls, parse_errors=parsed.errors,
                        answered=parsed.answer is not None and not parsed.calls, gen_tokens=len(ids))
            answer = parsed.answer if turn.answered else answer
            steps.append(turn)
            segs.append(Segment(SegmentKind.GEN, ids, turn=turn.index, logprobs=[0.0] * len(ids), version=0,
                                text=codec.decode(ids), finish_reason="stop"))
        else:
            texts = said if kind == "tool" else [said]
            msgs = [codec.tool_message_parts(_parts(t, images)) if kind == "tool" else
                    codec.user_message_parts(_parts(t, images)) for t in texts]
            enc = codec.encode_delta(msgs)
            steps[-1].obs_tokens = len(enc.input_ids)
            segs.append(Segment(SegmentKind.OBS, enc.input_ids, turn=steps[-1].index, images=enc.images,
                                text="\n".join(t.replace(IMAGE, "") for t in texts)))
    rid = str(rec.get("id") or where)
    meta = dict(rec.get("meta") or {})
    meta.setdefault("question", question.replace(IMAGE, "").strip())
    meta.update(source=source, logprobs="none")
    traj = Trajectory(id=rid, group_id=rid, sample_index=0, prompt_ids=prompt.input_ids,
                      prompt_images=prompt.images, prompt_messages=[{"role": "user", "content": meta["question"]}],
                      segments=segs, turns=steps, status=Status.ANSWERED if answer is not None else Status.TRUNCATED,
                      stop_reason="answer" if answer is not None else source, answer=answer, meta=meta)
    traj.fatal_step = traj.compute_fatal_step()
    return traj


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed object) per non-empty line of a JSONL file, or per item of a JSON list."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON list: {e}") from None
        for i, rec in enumerate(items):
            yield f"{path}[{i}]", rec
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None


def sniff_format(path: str | Path, tags: ShareGPTTags | None = None) -> str | None:
    """"trajectory" (spyglass Trajectory JSONL: prompt_ids + segments), "sharegpt" (a JSON list,
    or a record with the ShareGPT messages column or an ms-swift / OpenAI `messages` list) or
    None, from the file's first record."""
    tags = tags or ShareGPTTags()
    with open(path, encoding="utf-8") as f:
        line = next((ln for ln in f if ln.strip()), "")
    if line.lstrip().startswith("["):
        return "sharegpt"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    if "prompt_ids" in rec and "segments" in rec:
        return "trajectory"
    return "sharegpt" if tags.messages in rec or "messages" in rec else None


def load_sharegpt(path: str | Path, codec: Any, *, media_dir: str | Path | None = None,
                  tags: ShareGPTTags | None = None, call_style: str = "compact") -> list[Trajectory]:
    """Every record (ShareGPT, or ms-swift / OpenAI `messages`) of a JSONL / JSON file as a
    Trajectory (errors name file:line and field); images resolve as `media_dirs` says."""
    dirs = media_dirs(path, media_dir)
    return [sharegpt_to_trajectory(rec, codec, where=where, media_dir=dirs, tags=tags, call_style=call_style)
            for where, rec in read_records(path)]


# ------------------------------------------------------------------------------ Trajectory -> ShareGPT
def _assistant_message(text: str, tags: ShareGPTTags, call_style: str) -> dict[str, str]:
    """function_call when the turn is exactly `[thought\\n]<tool_call>JSON</tool_call>...` as
    render_call writes it; otherwise a gpt message holding the text verbatim (lossless)."""
    i = text.find("<tool_call>")
    if i >= 0:
        thought = text[:i].rstrip("\n")
        bodies = re.findall(r"<tool_call>(.*?)</tool_call>", text[i:], re.S)
        try:
            calls = [json.loads(b) for b in bodies]
            value = thought + json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            if (not thought or re.fullmatch(r"<think>.*?</think>", thought, re.S)) and \
                    render_call(value, style=call_style) == text:
                return {tags.role_tag: tags.function_tag, tags.content_tag: value}
        except (json.JSONDecodeError, RecordError):
            pass
    return {tags.role_tag: tags.assistant_tag, tags.content_tag: text}


def _save_image(img: Image.Image, image_dir: Path, name: str) -> str:
    image_dir.mkdir(parents=True, exist_ok=True)
    img.save(image_dir / name, format="PNG")
    return f"{image_dir.name}/{name}"


def trajectory_to_sharegpt(traj: Trajectory, codec: Any, tools: Sequence[dict[str, Any]], image_dir: str | Path,
                           *, system: str | None = None, tags: ShareGPTTags | None = None,
                           call_style: str = "compact", verify: bool = True) -> dict[str, Any]:
    """A finished trajectory as a ShareGPT record; its images are written as PNGs into
    `image_dir` (paths relative to its parent). `tools` / `system` must be what the engine used:
    with `verify`, re-encoding the record's prompt must give the trajectory's prompt ids."""
    from spyglass.engine.chat import DEFAULT_SYSTEM

    tags = tags or ShareGPTTags()
    if not traj.segments or traj.segments[-1].kind is not SegmentKind.GEN:
        raise ValueError(f"trajectory {traj.id!r} does not end with an assistant turn (status "
                         f"{traj.status.value}); ShareGPT records must")
    question = traj.meta.get("question") if not traj.prompt_messages else traj.prompt_messages[0].get("content")
    if not isinstance(question, str) or IMAGE in question:
        raise ValueError(f"trajectory {traj.id!r}: question must be a string without {IMAGE}, got {question!r:.80}")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", traj.id)
    image_dir = Path(image_dir)
    paths = [_save_image(im, image_dir, f"{safe}_{k}.png") for k, im in enumerate(traj.images())]
    conv = [{tags.role_tag: tags.user_tag, tags.content_tag: IMAGE * len(traj.prompt_images) + question}]
    stops = set(codec.stop_token_ids)
    for s in traj.segments:
        if s.kind is SegmentKind.GEN:
            ids = s.token_ids.tolist()
            text = codec.decode(ids[:-1] if ids and ids[-1] in stops else ids)
            conv.append(_assistant_message(text, tags, call_style))
        else:
            if IMAGE in s.text:
                raise ValueError(f"trajectory {traj.id!r}: observation of turn {s.turn} contains {IMAGE}")
            conv.append({tags.role_tag: tags.observation_tag, tags.content_tag: s.text + IMAGE * len(s.images)})
    rec = {"id": traj.id, tags.messages: conv, tags.images: paths,
           tags.system: system if system is not None else (codec.system or DEFAULT_SYSTEM),
           tags.tools: json.dumps(list(tools), ensure_ascii=False), "meta": traj.meta}
    if verify:
        back = sharegpt_to_trajectory(rec, codec, where=f"trajectory {traj.id!r}", media_dir=image_dir.parent,
                                      tags=tags, call_style=call_style)
        if back.prompt_ids != traj.prompt_ids:
            raise ValueError(f"trajectory {traj.id!r}: the system prompt / tools given do not reproduce its "
                             "prompt tokens (pass the ones the engine used)")
    return rec


def trajectories_to_sharegpt(trajs: Iterable[Trajectory], out: str | Path, codec: Any,
                             tools: Sequence[dict[str, Any]], *, system: str | None = None,
                             tags: ShareGPTTags | None = None, call_style: str = "compact") -> int:
    """Write trajectories as ShareGPT JSONL at `out`, images under `<out stem>_images/`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_dir = out.parent / f"{out.name.split('.')[0]}_images"
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for t in trajs:
            rec = trajectory_to_sharegpt(t, codec, tools, image_dir, system=system, tags=tags, call_style=call_style)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------ the SFT step
