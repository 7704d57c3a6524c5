"""engine/data.py: the --data record format (JSONL, parquet, `datasets` folders), bad-record
handling, limits and DataConfig validation. Fast, offline; every file is built in tmp_path.

    .venv/bin/python -m pytest -q tests/test_data.py
"""
from __future__ import annotations

import base64
import io
import json
import logging
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from spyglass.engine.config import ConfigError
from spyglass.engine.data import DataConfig, DataError, load_dataset, parse_record


def _png_bytes(size: tuple[int, int] = (8, 8), color: Any = (255, 0, 0), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _png(path: Path, size: tuple[int, int] = (8, 8), color: Any = (255, 0, 0),
         mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(size, color, mode))
    return path


def _write_lines(path: Path, lines: list[Any]) -> Path:
    """Dicts/lists are JSON-encoded; str lines are written verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _rec(i: Any, **kw: Any) -> dict[str, Any]:
    return {"id": i, "question": f"q{i}?", "answer": f"a{i}", **kw}


def test_jsonl_good_records(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _png(data / "img" / "a.png", (8, 6), (255, 0, 0))
    absolute = _png(tmp_path / "elsewhere" / "b.png", (5, 7), (0, 255, 0, 128), mode="RGBA")
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes((3, 4), 200, mode="L")).decode()
    p = _write_lines(data / "q.jsonl", [
        {"id": "r1", "question": "Where?", "images": ["img/a.png", str(absolute)], "answer": "Oslo",
         "aliases": ["Christiania"], "difficulty": 3, "hops": [{"action": "crop"}]},
        "",
        {"id": 7, "question": "Year?", "image": uri, "answer": 1990, "tools": ["OCR", "Crop"],
         "system": "Be brief."},
        "   ",
        {"id": "r3", "question": "Pi?", "answer": 3.5, "images": []},
        {"id": "r4", "question": "Text only?", "answer": "yes", "images": None, "tools": None},
    ])
    ds = load_dataset(DataConfig(path=str(p)))
    assert ds.bad == []
    assert [r.id for r in ds.records] == ["r1", "7", "r3", "r4"]
    assert [r.source for r in ds.records] == [f"{p}:1", f"{p}:3", f"{p}:5", f"{p}:6"]
    r1, r7, r3, r4 = ds.records
    assert [im.size for im in r1.images] == [(8, 6), (5, 7)]
    assert all(im.mode == "RGB" for im in r1.images + r7.images)
    assert r1.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert r1.images[1].getpixel((0, 0)) == (0, 255, 0)
    assert (r1.answer, r1.aliases, r1.tools, r1.system) == ("Oslo", ["Christiania"], None, None)
    assert r1.meta == {"difficulty": 3, "hops": [{"action": "crop"}]}
    assert r7.images[0].size == (3, 4) and r7.images[0].getpixel((1, 1)) == (200, 200, 200)
    assert (r7.answer, r7.tools, r7.system, r7.meta) == ("1990", ["OCR", "Crop"], "Be brief.", {})
    assert (r3.answer, r3.images, r3.aliases) == ("3.5", [], [])
    assert (r4.images, r4.tools) == ([], None)
    assert ds.summary() == f"data {p}: 4 records, 0 skipped"


def test_media_dir_overrides_data_dir(tmp_path: Path) -> None:
    _png(tmp_path / "media" / "x.png", (4, 4), (0, 0, 255))
    p = _write_lines(tmp_path / "data" / "q.json", [_rec(1, images=["x.png"])])
    ds = load_dataset(DataConfig(path=str(p), media_dir=str(tmp_path / "media")))
    assert ds.records[0].images[0].getpixel((2, 2)) == (0, 0, 255)
    with pytest.raises(DataError, match=r"image file not found: .*data/x\.png"):
        load_dataset(DataConfig(path=str(p)))


def _mixed_file(tmp_path: Path) -> Path:
    _png(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    _png(tmp_path / "big.png", (100, 100))
    return _write_lines(tmp_path / "mixed.jsonl", [
        _rec(1, images=["ok.png"]),                       # 1 good
        '{"id": 2, "question": ',                         # 2 invalid JSON
        {"id": 3, "answer": "x"},                         # 3 missing question
        _rec(4, images=["corrupt.png"]),                  # 4 corrupt image
        _rec(5, image="missing.png"),                     # 5 missing image file
        _rec(6, images=["ok.png", "big.png"]),            # 6 over max_image_pixels
        _rec(1),                                          # 7 duplicate id
        _rec(8, aliases="not a list"),                    # 8 wrong type of aliases
        _rec(9, image="ok.png"),                          # 9 good
        [1, 2],                                           # 10 not an object
        _rec(11, image="data:image/png;base64,@@not base64@@"),  # 11 bad base64
        {"id": 12, "question": "q?"},                     # 12 missing answer
    ])


EXPECTED_BAD = {
    2: "invalid JSON",
    3: "question: missing",
    4: "images[0] (corrupt.png): cannot decode image",
    5: "image: image file not found",
    6: "images[1] (big.png): 100x100 = 10000 pixels > max_image_pixels 1000",
    7: "id: duplicate '1' (first at ",
    8: "aliases: expected a list of str, got str 'not a list'",
    10: "record: expected a JSON object (one per line), got list [1, 2]",
    11: "image: bad base64 in data URI",
    12: "answer: missing",
}


def test_bad_records_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _mixed_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="spyglass.data"):
        ds = load_dataset(DataConfig(path=str(p), max_image_pixels=1000))
    assert [r.id for r in ds.records] == ["1", "9"]
    assert [b.source for b in ds.bad] == [f"{p}:{n}" for n in EXPECTED_BAD]
    for b, (n, reason) in zip(ds.bad, EXPECTED_BAD.items()):
        assert reason in b.reason, (n, b.reason)
    assert f"first at {p}:1" in ds.bad[5].reason
    warned = [r.getMessage() for r in caplog.records if r.name == "spyglass.data"]
    assert len(warned) == len(EXPECTED_BAD)
    assert all(f"{p}:{n}: " in w and "\n" not in w for w, n in zip(warned, EXPECTED_BAD))
    assert ds.summary() == (f"data {p}: 2 records, 10 skipped (first: {p}:2: {ds.bad[0].reason})")


def test_strict_raises_on_first_bad_line(tmp_path: Path) -> None:
    p = _mixed_file(tmp_path)
    with pytest.raises(DataError) as ei:
        load_dataset(DataConfig(path=str(p), strict=True, max_image_pixels=1000))
    assert str(ei.value).startswith(f"{p}:2: invalid JSON")
    assert ei.value.source == f"{p}:2"


def test_max_bad_fraction(tmp_path: Path) -> None:
    p = _write_lines(tmp_path / "q.jsonl", [_rec(1), _rec(2), {"id": 3}, _rec(4)])
    with pytest.raises(DataError, match=r"1 of 4 records bad \(25%\) > max_bad_fraction 0\.2; "
                                        rf"first: {p}:3: question: missing"):
        load_dataset(DataConfig(path=str(p), max_bad_fraction=0.2))
    assert len(load_dataset(DataConfig(path=str(p), max_bad_fraction=0.25)).records) == 3


def test_zero_good_records(tmp_path: Path) -> None:
    p = _write_lines(tmp_path / "q.jsonl", ["not json", "", {"id": 1, "question": "q"}])
    with pytest.raises(DataError) as ei:
        load_dataset(DataConfig(path=str(p)))
    msg = str(ei.value)
    assert msg.startswith(f"no usable records in {p} (2 bad; first: {p}:1: invalid JSON")


def test_limit_keeps_first_good_records(tmp_path: Path) -> None:
    p = _write_lines(tmp_path / "q.jsonl", [_rec(1), {"id": 2}, _rec(3), _rec(4), "garbage"])
    ds = load_dataset(DataConfig(path=str(p)), limit=2)
    assert [r.id for r in ds.records] == ["1", "3"]
    assert [b.source for b in ds.bad] == [f"{p}:2"]


def test_field_types(tmp_path: Path) -> None:
    cfg, media = DataConfig(), tmp_path
    cases = [
        (_rec(True), "id: expected a non-empty str or an int, got bool True"),
        (_rec(1.5), "id: expected a non-empty str or an int, got float 1.5"),
        ({"question": "q", "answer": "a"}, "id: missing"),
        (_rec(1, question="  "), "question: expected a non-empty str, got str '  '"),
        (_rec(1, answer=""), "answer: empty"),
        (_rec(1, answer=[1]), "answer: expected str or number, got list [1]"),
        (_rec(1, aliases=["ok", None]), "aliases[1]: expected str or number, got NoneType None"),
        (_rec(1, tools="OCR"), "tools: expected a list of str, got str 'OCR'"),
        (_rec(1, tools=["OCR", 3]), "tools[1]: expected str, got int 3"),
        (_rec(1, system=5), "system: expected str, got int 5"),
        (_rec(1, images="a.png"), "images: expected a list (use `image` for one)"),
        (_rec(1, images=[], image="a.png"), "images: give either"),
        (_rec(1, images=[5]), "images[0]: expected a path, data URI"),
        (_rec(1, image={"path": None}), "image: image dict has neither bytes nor a path"),
        (_rec(1, image="https://x.org/a.png"), "image: URL str 'https://x.org/a.png' is not fetched"),
        (_rec(1, image="data:text/plain,hi"), "image: only data:image/...;base64,... URIs"),
        (_rec(1, question="x" * 500), None),
    ]
    for raw, reason in cases:
        if reason is None:
            assert parse_record(raw, "f.jsonl:9", cfg, media).question == "x" * 500
            continue
        with pytest.raises(DataError) as ei:
            parse_record(raw, "f.jsonl:9", cfg, media)
        assert str(ei.value).startswith(f"f.jsonl:9: {reason}"), str(ei.value)
    with pytest.raises(DataError) as ei:
        parse_record(_rec(1, answer=["y" * 500]), "s", cfg, media)
    assert len(ei.value.reason) < 120 and ei.value.reason.endswith("...")


def test_image_limits_and_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "a.png", (20, 20))
    size = (tmp_path / "a.png").stat().st_size
    raw = _rec(1, image="a.png")
    uri_raw = _rec(2, image="data:image/png;base64," + base64.b64encode(_png_bytes((20, 20))).decode())
    small = DataConfig(max_image_bytes=size - 1)
    with pytest.raises(DataError, match=rf"image: .*a\.png is {size} bytes > max_image_bytes {size - 1}"):
        parse_record(raw, "s", small, tmp_path)
    with pytest.raises(DataError, match="image: data URI > max_image_bytes 10"):
        parse_record(uri_raw, "s", DataConfig(max_image_bytes=10), tmp_path)
    with pytest.raises(DataError, match="20x20 = 400 pixels > max_image_pixels 399"):
        parse_record(uri_raw, "s", DataConfig(max_image_pixels=399), tmp_path)
    assert parse_record(raw, "s", DataConfig(max_image_pixels=400), tmp_path).images[0].size == (20, 20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 px: PIL warns (> 300), errors (> 600)
    with pytest.raises(DataError, match="image \\(a.png\\): PIL decompression-bomb check"):
        parse_record(raw, "s", DataConfig(), tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="image: PIL decompression-bomb check"):
        parse_record(uri_raw, "s", DataConfig(), tmp_path)


def _header_only_png(w: int, h: int) -> bytes:
    """A PNG whose header says w x h but which has no pixel data: decoding it would fail."""
    head = bytearray(_png_bytes((1, 1)))
    ihdr = struct.pack(">II", w, h) + bytes(head[24:29])
    idat = b"\x78\x9c\x03\x00"  # a few bytes of zlib: far too little for w*h pixels
    return (bytes(head[:16]) + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
            + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def test_pixels_checked_from_header_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "huge.png").write_bytes(_header_only_png(8000, 8000))  # 64M px < PIL's 89M
    with pytest.raises(DataError, match=r"^s: image \(huge.png\): 8000x8000 = 64000000 pixels > "
                                        r"max_image_pixels 50000000$"):
        parse_record(_rec(1, image="huge.png"), "s", DataConfig(), tmp_path)
    with pytest.raises(DataError, match=r"^s: image \(huge.png\): cannot decode image"):
        parse_record(_rec(1, image="huge.png"), "s", DataConfig(max_image_pixels=10**8), tmp_path)


def test_warnings_are_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _write_lines(tmp_path / "q.jsonl", [_rec(0)] + [{"id": i} for i in range(1, 26)])
    with caplog.at_level(logging.WARNING, logger="spyglass.data"):
        ds = load_dataset(DataConfig(path=str(p)))
    assert (len(ds.records), len(ds.bad)) == (1, 25)
    warned = [r.getMessage() for r in caplog.records if r.name == "spyglass.data"]
    assert len(warned) == 20 and warned[-1].endswith("(further bad records are not logged)")
    assert warned[0] == f"skipping bad record {p}:2: question: missing"


def test_unsupported_paths(tmp_path: Path) -> None:
    csv = tmp_path / "q.csv"
    csv.write_text("id,question\n")
    with pytest.raises(DataError, match=r"q\.csv: unsupported file type '\.csv'; supported: .*\.parquet"):
        load_dataset(DataConfig(path=str(csv)))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="must be a `datasets` save_to_disk folder"):
        load_dataset(DataConfig(path=str(tmp_path / "folder")))
    arr = tmp_path / "arr.jsonl"  # an array in a .jsonl file is one bad line (.json takes arrays)
    arr.write_text(json.dumps([_rec(1), _rec(2)]))
    with pytest.raises(DataError, match=rf"no usable records in {arr} \(1 bad; first: {arr}:1: "
                                        r"record: expected a JSON object \(one per line\), got list"):
        load_dataset(DataConfig(path=str(arr)))
    with pytest.raises(DataError, match="path is empty"):
        load_dataset(DataConfig())


def test_missing_optional_package_names_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "q.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    with pytest.raises(DataError, match=r"q\.parquet: reading parquet needs the `pyarrow` package: "
                                        r"pip install 'spyglass\[data\]'"):
        load_dataset(DataConfig(path=str(p)))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _png(tmp_path / "media" / "side.png", (6, 6), (0, 0, 255))
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "id": pa.array([10, 11, 12, 13], pa.int64()),
        "question": ["a?", "b?", "c?", "d?"],
        "answer": ["A", "B", "C", "D"],
        "images": pa.array([[{"bytes": _png_bytes((4, 3), (9, 8, 7)), "path": "gone.png"}],
                            None,
                            [{"bytes": b"garbage", "path": None}],
                            [{"bytes": None, "path": "side.png"}]], pa.list_(img)),
        "aliases": pa.array([["aa"], None, None, []], pa.list_(pa.string())),
        "level": [1, 2, 3, 4],
    })
    p = tmp_path / "q.parquet"
    pq.write_table(table, p)
    ds = load_dataset(DataConfig(path=str(p), media_dir=str(tmp_path / "media")))
    assert [r.id for r in ds.records] == ["10", "11", "13"]
    assert [r.source for r in ds.records] == [f"{p}:row 0", f"{p}:row 1", f"{p}:row 3"]
    a, b, d = ds.records
    assert a.images[0].size == (4, 3) and a.images[0].getpixel((0, 0)) == (9, 8, 7)
    assert (a.aliases, a.meta, b.images, b.aliases) == (["aa"], {"level": 1}, [], [])
    assert d.images[0].getpixel((0, 0)) == (0, 0, 255)
    assert [(x.source, x.reason.split(" (")[0]) for x in ds.bad] == [
        (f"{p}:row 2", "images[0]: cannot decode image")]


def test_datasets_folder_and_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"), "images": [datasets.Image()],
                               "source_url": datasets.Value("string")})
    rows = [{"id": "h1", "question": "x?", "answer": "X", "source_url": "u1",
             "images": [Image.new("RGB", (5, 5), (1, 2, 3))]},
            {"id": "h2", "question": "y?", "answer": "Y", "source_url": "u2", "images": []},
            {"id": "h1", "question": "z?", "answer": "Z", "source_url": "u3", "images": []}]
    ds_dir = tmp_path / "hf"
    datasets.Dataset.from_list(rows, features=feats).save_to_disk(str(ds_dir))
    ds = load_dataset(DataConfig(path=str(ds_dir)))
    assert [r.id for r in ds.records] == ["h1", "h2"]
    assert ds.records[0].images[0].getpixel((4, 4)) == (1, 2, 3)
    assert ds.records[0].meta == {"source_url": "u1"} and ds.records[1].source == f"{ds_dir}:row 1"
    assert [(b.source, b.reason.split(" (")[0]) for b in ds.bad] == [(f"{ds_dir}:row 2", "id: duplicate 'h1'")]

    dd_dir = tmp_path / "hfdict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1], features=feats),
                          "test": datasets.Dataset.from_list(rows[1:2], features=feats)}
                         ).save_to_disk(str(dd_dir))
    assert [r.id for r in load_dataset(DataConfig(path=str(dd_dir))).records] == ["h1"]
    assert [r.id for r in load_dataset(DataConfig(path=str(dd_dir), split="test")).records] == ["h2"]
    with pytest.raises(DataError, match=r"hfdict: no split 'validation'; available splits: train, test"):
        load_dataset(DataConfig(path=str(dd_dir), split="validation"))


@pytest.mark.parametrize("kw, needle", [
    ({"path": "/no/such/file.jsonl"}, "path '/no/such/file.jsonl' does not exist"),
    ({"media_dir": "/no/such/dir"}, "media_dir '/no/such/dir' is not a directory"),
    ({"split": ""}, "split must not be empty, got ''"),
    ({"max_image_bytes": 0}, "max_image_bytes must be > 0, got 0"),
    ({"max_image_pixels": -5}, "max_image_pixels must be > 0, got -5"),
    ({"max_bad_fraction": 1.5}, "max_bad_fraction must be in [0, 1], got 1.5"),
    ({"max_bad_fraction": -0.1}, "max_bad_fraction must be in [0, 1], got -0.1"),
])
def test_config_validation(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        DataConfig(**kw)
    assert str(ei.value) == needle


def test_json_array_file_is_read_whole(tmp_path: Path) -> None:
    """A pretty-printed .json array is records, not lines (read as lines, most would be 'bad')."""
    p = tmp_path / "qs.json"
    p.write_text(json.dumps([{"id": 1, "question": "a?", "answer": "x"}, {"id": 2, "question": "b?", "answer": 3},
                             {"id": 3, "question": ""}], indent=2))
    ds = load_dataset(DataConfig(path=str(p)))
    assert [r.id for r in ds.records] == ["1", "2"] and ds.records[1].answer == "3"
    assert [b.source for b in ds.bad] == [f"{p}:item 2"] and "question" in ds.bad[0].reason
    (tmp_path / "broken.json").write_text('[{"id": 1, "question": "a?", "answer": "x"},')
    with pytest.raises(DataError, match="not one valid JSON array"):
        load_dataset(DataConfig(path=str(tmp_path / "broken.json")))
