"""Reader for your own question dataset: the record format behind `--data FILE` (rollout, grpo,
sft, eval). Each record is one question with its images and reference answer.

    ds = load_dataset(DataConfig(path="questions.jsonl"))   # -> Dataset(records, bad, path)
    print(ds.summary())   # data questions.jsonl: 998 records, 2 skipped (first: ...:17: ...)
    python -m spyglass.engine.data questions.jsonl          # check a file; prints the summary

Where records come from (chosen by the path):
  FILE.jsonl / FILE.json   one JSON object per line (JSON lines); blank lines are ignored;
                           a record's source is "FILE:LINE" (1-based line). A .json file
                           that starts with '[' is one JSON array of records ("FILE:item N")
  FILE.parquet             one record per row (needs `pip install 'spyglass[data]'`);
                           source "FILE:row N" (0-based row)
  FOLDER/                  a `datasets` save_to_disk folder (holds dataset_info.json, state.json
                           or dataset_dict.json; needs `spyglass[data]`); for a DatasetDict the
                           split `split` (default "train") is read; source "FOLDER:row N"

Fields of a record:
  id        str or int, required, unique in the file (an int becomes its str)
  question  str, required, not empty
  answer    str, required, not empty (a number is converted with str())
  images    list of image entries (see below); may be missing, null or [] for a text-only
            question; a single `image` field is accepted as a one-element list (not both)
  aliases   list of str, optional: other accepted answers (numbers converted with str())
  tools     list of str, optional: the tool names this question may use (only type-checked
            here; null/missing = the run's configured tools)
  system    str, optional: a system prompt for this record
  any other field is kept untouched in `Record.meta` (a dict)
  A null optional field counts as missing (parquet/datasets columns are nullable).

An image entry is one of:
  "dir/a.png"                   a path relative to `media_dir` (default: the directory that
                                holds the data file or folder); `~` is expanded
  "/abs/a.png"                  an absolute path
  "data:image/png;base64,..."   a base64 data URI
  {"bytes": b"...", "path": p}  Hugging Face's `datasets.Image` storage form (parquet and
                                `datasets` rows carry it): the bytes win, else the path
  http(s) URLs are refused: nothing is downloaded at run time.
Images are decoded in full with PIL and converted to RGB. An encoded image larger than
`max_image_bytes`, or one whose header says width*height > `max_image_pixels` (checked before
decoding), is a bad record; so are PIL decompression-bomb warnings and errors (PIL's own
Image.MAX_IMAGE_PIXELS, ~89M, applies too).

A bad record (invalid JSON, not an object, a missing/empty/mistyped field, a duplicate id, an
unreadable, corrupt, missing or oversized image, bad base64) is skipped, kept in `Dataset.bad`
and logged as one warning line (logger "spyglass.data"; the first 20) naming "FILE:LINE" and the
field; the run goes on. `strict=True` raises DataError on the first one instead. A file with no
good record, or with more than `max_bad_fraction` of its records bad, raises DataError.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .config import check

log = logging.getLogger("spyglass.data")

_JSONL = (".jsonl", ".json")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SUPPORTED = ".jsonl / .json (JSON lines, or one JSON array), .parquet, or a `datasets` save_to_disk folder"
_EXTRA = "pip install 'spyglass[data]'"
_KNOWN = ("id", "question", "answer", "images", "image", "aliases", "tools", "system")
_MAX_WARNINGS = 20
_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,(.*)\Z", re.DOTALL)


@dataclass
class DataConfig:
    """A user dataset for --data: where it is, how images resolve, how bad records are handled."""

    path: str = ""  # the dataset file/folder ("" = none: the caller uses its default data)
    media_dir: str = ""  # relative image paths resolve here ("" = the data file's directory)
    split: str = "train"  # the split read from a `datasets` DatasetDict folder
    strict: bool = False  # stop at the first bad record instead of skipping it
    max_image_bytes: int = 32 << 20  # largest encoded image (file or bytes) accepted
    max_image_pixels: int = 50_000_000  # largest width*height accepted, read from the header
    max_bad_fraction: float = 1.0  # fail if more than this share of records was bad (1.0 = never)

    def __post_init__(self) -> None:
        check(not self.path or Path(self.path).exists(), f"path {self.path!r} does not exist")
        check(not self.media_dir or Path(self.media_dir).is_dir(),
              f"media_dir {self.media_dir!r} is not a directory")
        check(bool(self.split), f"split must not be empty, got {self.split!r}")
        check(self.max_image_bytes > 0, f"max_image_bytes must be > 0, got {self.max_image_bytes}")
        check(self.max_image_pixels > 0, f"max_image_pixels must be > 0, got {self.max_image_pixels}")
        check(0.0 <= self.max_bad_fraction <= 1.0,
              f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class Record:
    """One good question: images decoded to RGB; unknown fields in meta."""

    id: str
    question: str
    images: list[Image.Image]
    answer: str
    aliases: list[str]
    tools: list[str] | None
    system: str | None
    meta: dict[str, Any]
    source: str  # "FILE:LINE" (JSONL, 1-based) or "FILE:row N" (parquet / datasets, 0-based)


@dataclass
class BadRecord:
    """A skipped record: where it is and why (the field and its value)."""

    source: str
    reason: str


@dataclass
class Dataset:
    """What load_dataset read: the good records, the skipped ones, and the path."""

    records: list[Record]
    bad: list[BadRecord] = field(default_factory=list)
    path: str = ""

    def summary(self) -> str:
        """One line: "data FILE: N records, M skipped (first: FILE:LINE: reason)"."""
        line = f"data {self.path}: {len(self.records)} records, {len(self.bad)} skipped"
        return line + (f" (first: {self.bad[0].source}: {self.bad[0].reason})" if self.bad else "")


class DataError(ValueError):
    """A dataset problem, one line: "FILE:LINE: reason" (source and reason kept as attributes)."""

    def __init__(self, reason: str, source: str = "") -> None:
        self.source, self.reason = source, reason.replace("\n", " ")
        super().__init__(f"{source}: {self.reason}" if source else self.reason)


def _show(value: Any, width: int = 60) -> str:
    """The value's type and repr, cut to `width` characters."""
    text = repr(value)
    text = text if len(text) <= width else text[:width - 3] + "..."
    return f"{type(value).__name__} {text}"


def _str_or_number(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{name}: expected str or number, got {_show(value)}")


def _str_list(value: Any, name: str, numbers: bool) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{name}: expected a list of str, got {_show(value)}")
    out = []
    for i, v in enumerate(value):
        if numbers:
            out.append(_str_or_number(v, f"{name}[{i}]"))
        elif isinstance(v, str):
            out.append(v)
        else:
            raise DataError(f"{name}[{i}]: expected str, got {_show(v)}")
    return out


def _check_pixels(img: Image.Image, what: str, cfg: DataConfig) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise DataError(f"{what}: empty image {w}x{h}")
    if w * h > cfg.max_image_pixels:
        raise DataError(f"{what}: {w}x{h} = {w * h} pixels > max_image_pixels "
                        f"{cfg.max_image_pixels}")


def _decode(data: bytes, what: str, cfg: DataConfig) -> Image.Image:
    """Bytes -> a fully decoded RGB image; size checked from the header first."""
    if len(data) > cfg.max_image_bytes:
        raise DataError(f"{what}: {len(data)} bytes > max_image_bytes {cfg.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(img, what, cfg)
            img.load()
            return img.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"{what}: PIL decompression-bomb check: {e}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file can raise almost anything in PIL
        raise DataError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None


def _read_path(p: str, what: str, cfg: DataConfig, media_dir: Path) -> bytes:
    if p.startswith(("http://", "https://")):
        raise DataError(f"{what}: URL {_show(p)} is not fetched (no network at run time); "
                        f"download it and give a path")
    path = Path(p).expanduser()
    path = path if path.is_absolute() else media_dir / path
    if not path.is_file():
        raise DataError(f"{what}: image file not found: {path}")
    size = path.stat().st_size
    if size > cfg.max_image_bytes:
        raise DataError(f"{what}: {path} is {size} bytes > max_image_bytes {cfg.max_image_bytes}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{what}: cannot read {path} ({e})") from None


def _image(entry: Any, what: str, cfg: DataConfig, media_dir: Path) -> Image.Image:
    """One image entry (path, data URI, {"bytes","path"} dict, or a PIL image) -> RGB image."""
    if isinstance(entry, Image.Image):
        _check_pixels(entry, what, cfg)
        entry.load()
        return entry.convert("RGB")
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
        if isinstance(data, (bytes, bytearray, memoryview)):
            return _decode(bytes(data), what, cfg)
        if data is not None:
            raise DataError(f"{what}: 'bytes' must be bytes, got {_show(data)}")
        if isinstance(path, str) and path:
            return _decode(_read_path(path, what, cfg, media_dir), f"{what} ({path})", cfg)
        raise DataError(f"{what}: image dict has neither bytes nor a path: {_show(entry)}")
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{what}: expected a path, data URI or {{bytes, path}} dict, "
                        f"got {_show(entry)}")
    if entry.startswith("data:"):
        m = _DATA_URI.match(entry)
        if m is None:
            raise DataError(f"{what}: only data:image/...;base64,... URIs are supported, "
                            f"got {_show(entry)}")
        payload = "".join(m.group(1).split())
        if len(payload) * 3 // 4 > cfg.max_image_bytes + 3:
            raise DataError(f"{what}: data URI > max_image_bytes {cfg.max_image_bytes}")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{what}: bad base64 in data URI ({e})") from None
        return _decode(data, what, cfg)
    return _decode(_read_path(entry, what, cfg, media_dir), f"{what} ({entry})", cfg)


def _images(raw: dict[str, Any], cfg: DataConfig, media_dir: Path) -> list[Image.Image]:
    many, one = raw.get("images"), raw.get("image")
    if many is not None and one is not None:
        raise DataError("images: give either `images` (a list) or `image` (one), not both")
    if one is not None:
        return [_image(one, "image", cfg, media_dir)]
    if many is None:
        return []
    if not isinstance(many, (list, tuple)):
        raise DataError(f"images: expected a list (use `image` for one), got {_show(many)}")
    return [_image(e, f"images[{i}]", cfg, media_dir) for i, e in enumerate(many)]


def _fields(raw: Any, cfg: DataConfig, media_dir: Path) -> dict[str, Any]:
    """The checked fields of one raw record (raises DataError without a source)."""
    if not isinstance(raw, dict):
        raise DataError(f"record: expected a JSON object (one per line), got {_show(raw)}")
    rid = raw.get("id")
    if rid is None:
        raise DataError("id: missing (a str or int, unique per record)")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise DataError(f"id: expected a non-empty str or an int, got {_show(rid)}")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError("question: missing" if question is None
                        else f"question: expected a non-empty str, got {_show(question)}")
    if raw.get("answer") is None:
        raise DataError("answer: missing")
    answer = _str_or_number(raw["answer"], "answer")
    if not answer.strip():
        raise DataError(f"answer: empty, got {_show(answer)}")
    aliases = raw.get("aliases")
    tools, system = raw.get("tools"), raw.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"system: expected str, got {_show(system)}")
    return {"id": str(rid), "question": question, "answer": answer,
            "aliases": [] if aliases is None else _str_list(aliases, "aliases", numbers=True),
            "tools": None if tools is None else _str_list(tools, "tools", numbers=False),
            "system": system, "images": _images(raw, cfg, media_dir),
            "meta": {k: v for k, v in raw.items() if k not in _KNOWN}}


def parse_record(raw: dict[str, Any], source: str, cfg: DataConfig, media_dir: Path) -> Record:
    """Check one raw record and decode its images; DataError("SOURCE: field: why") if bad."""
    try:
        return Record(source=source, **_fields(raw, cfg, media_dir))
    except DataError as e:
        raise DataError(e.reason, source) from None


def _array_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """(source "FILE:item N", object) per element of a file holding one JSON array."""
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{name}: starts with '[' but is not one valid JSON array ({e})") from None
    for i, item in enumerate(items):
        yield f"{name}:item {i}", item


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """(source, object) per non-blank line; an unparsable line yields a DataError as object. A
    .json file whose first character is '[' is one JSON array instead (_array_rows)."""
    if path.suffix.lower() == ".json":
        with path.open("rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
        if head.startswith("["):
            yield from _array_rows(path, name)
            return
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            source = f"{name}:{lineno}"
            try:
                text = line.decode("utf-8").lstrip("\ufeff" if lineno == 1 else "")
            except UnicodeDecodeError as e:
                yield source, DataError(f"line is not UTF-8 ({e})")
                continue
            if not text.strip():
                continue
            try:
                yield source, json.loads(text)
            except json.JSONDecodeError as e:
                yield source, DataError(f"invalid JSON ({e.msg} at column {e.colno}): "
                                        f"{_show(text.strip())}")


def _need(module: str, name: str, what: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"{name}: reading {what} needs the `{module}` package: {_EXTRA}") from None


def _arrow_rows(batches: Iterator[Any], name: str) -> Iterator[tuple[str, Any]]:
    """(source, row dict) per row of pyarrow record batches; images stay {"bytes", "path"}."""
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            yield f"{name}:row {row}", obj
            row += 1


def _parquet_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    _need("pyarrow", name, "parquet")
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=256)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{name}: cannot read parquet ({type(e).__name__}: {e})") from None
    yield from _arrow_rows(batches, name)


def _hf_rows(path: Path, name: str, split: str) -> Iterator[tuple[str, Any]]:
    datasets = _need("datasets", name, "a `datasets` folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a broken folder raises several types
        raise DataError(f"{name}: cannot load the `datasets` folder ({type(e).__name__}: {e})"
                        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; available splits: {', '.join(ds)}")
        ds = ds[split]
    yield from _arrow_rows(ds.with_format("arrow").iter(batch_size=256), name)  # not decoded


def _rows(path: Path, cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    name = str(cfg.path)
    if path.is_dir():
        if not any((path / m).is_file() for m in _HF_MARKERS):
            raise DataError(f"{name}: a folder must be a `datasets` save_to_disk folder (with "
                            f"{' or '.join(_HF_MARKERS)}); supported: {_SUPPORTED}")
        return _hf_rows(path, name, cfg.split)
    suffix = path.suffix.lower()
    if suffix in _JSONL:
        return _jsonl_rows(path, name)
    if suffix == ".parquet":
        return _parquet_rows(path, name)
    raise DataError(f"{name}: unsupported file type {suffix or '(no suffix)'!r}; "
                    f"supported: {_SUPPORTED}")


def load_dataset(cfg: DataConfig, limit: int = 0) -> Dataset:
    """Read the records of cfg.path (the first `limit` good ones; 0 = all); skip (or, strict,
    raise on) bad ones; see the module doc."""
    if not cfg.path:
        raise DataError("DataConfig.path is empty: no dataset to read")
    path = Path(cfg.path)
    media_dir = Path(cfg.media_dir) if cfg.media_dir else path.resolve().parent
    records: list[Record] = []
    bad: list[BadRecord] = []
    seen: dict[str, str] = {}
    for source, raw in _rows(path, cfg):
        try:
            if isinstance(raw, DataError):
                raise DataError(raw.reason, source)
            rec = parse_record(raw, source, cfg, media_dir)
            if rec.id in seen:
                raise DataError(f"id: duplicate {rec.id!r} (first at {seen[rec.id]})", source)
        except DataError as e:
            if cfg.strict:
                raise
            bad.append(BadRecord(source, e.reason))
            if len(bad) <= _MAX_WARNINGS:
                more = " (further bad records are not logged)" if len(bad) == _MAX_WARNINGS else ""
                log.warning("skipping bad record %s: %s%s", source, e.reason, more)
            continue
        seen[rec.id] = source
        records.append(rec)
        if limit and len(records) >= limit:
            break
    first = f"; first: {bad[0].source}: {bad[0].reason}" if bad else ""
    if not records:
        raise DataError(f"no usable records in {cfg.path} ({len(bad)} bad{first})")
    total = len(records) + len(bad)
    if len(bad) / total > cfg.max_bad_fraction:
        raise DataError(f"{cfg.path}: {len(bad)} of {total} records bad ({len(bad) / total:.0%}) > "
                        f"max_bad_fraction {cfg.max_bad_fraction}{first}")
    return Dataset(records=records, bad=bad, path=str(cfg.path))


def main(argv: list[str] | None = None) -> int:
    """`python -m spyglass.engine.data FILE [--strict]`: load FILE and print the summary."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-h"):
        print("usage: python -m spyglass.engine.data FILE [--strict]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        print(load_dataset(DataConfig(path=args[0], strict="--strict" in args[1:])).summary())
    except ValueError as e:  # DataError, or ConfigError from DataConfig
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
