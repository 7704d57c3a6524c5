"""Benchmark and SFT files in exactly the layouts their authors released (written small, with
tiny PNGs, in tmp_path): MMSearch (CaraJ7/MMSearch end2end: text-only rows have query_image
null), LiveVQA (fumingyang2004/LIVEVQA benchmark.json: level1_qa / level2_qa, images in
<bench>_imgs), BrowseComp-VL (WebWatcher bc_vl_level*.jsonl: no id, URL images), VDR-Bench (no
id), FVQA / InfoSeek-human (MMSearch-R1 parquet: reward_model.candidate_answers as a JSON or
Python-style list string), InfoSeek (edchengg/infoseek_eval: numerical answer_eval with
wikidata/range, judged as a range); OpenSearch-VL's LLaMA-Factory data folder (images relative
to the dataset_info.json folder) and ms-swift's documented agent examples (parallel tool calls,
an assistant turn followed by a tool call, OpenAI tool_calls, a tools column).
Run: .venv/bin/python -m pytest -q tests/test_layouts_real.py"""
import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image

from spyglass.engine.chat import HFCodec
from spyglass.engine.offline.tiny import build_tiny_vlm
from spyglass.engine.trajectory import SegmentKind, Status, Trajectory, iter_jsonl, write_jsonl
from spyglass.trainer.eval import BenchmarkError, load_benchmark, read_benchmark
from spyglass.trainer.judges import JudgeConfig, JudgeSession, in_numeric_range, run_judge
from spyglass.trainer.sft import (RecordError, SFTDataConfig, load_sft_data, load_sharegpt, media_dirs,
                                  sharegpt_to_trajectory, sniff_format)


def _png(path=None, color=(200, 30, 30), size=(64, 48)):
    im = Image.new("RGB", size, color)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _near(px, color, tol=4):  # JPEG files shift a solid colour slightly
    return all(abs(a - b) <= tol for a, b in zip(px, color))


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------ benchmarks
def test_mmsearch_end2end_text_only_rows_and_a_bad_row(tmp_path, caplog):
    """CaraJ/MMSearch end2end columns; eval_end2end.py treats query_image None as a text query."""
    def row(sid, image, answer="Ann", **kw):
        return {"sample_id": sid, "query": f"question {sid}?", "query_image": image,
                "image_search_result": image, "area": "news", "subfield": "sports", "timestamp": "2024-08",
                "gt_requery": "requery", "gt_answer": answer, "alternative_gt_answers": ["A. Smith"], **kw}
    img = {"bytes": _png(color=(0, 0, 255)), "path": None}
    pq_file = _parquet(tmp_path / "end2end.parquet", [row("0", img), row("1", None)])
    got = load_benchmark("mmsearch", pq_file)
    assert [p.id for p in got] == ["mmsearch:0", "mmsearch:1"]
    assert got[0].images[0].getpixel((0, 0)) == (0, 0, 255) and got[1].images == []  # text-only item
    assert got[1].question == "question 1?" and got[1].meta["answers"] == ["Ann", "A. Smith"]
    # the same rows as JSONL with one bad row between them: skipped with a FILE:LINE warning
    _png(tmp_path / "q0.png")
    f = _jsonl(tmp_path / "mmsearch.jsonl", [row("0", "q0.png"), row("2", None, answer=None), row("1", None)])
    with caplog.at_level("WARNING", logger="spyglass.eval"):
        res = read_benchmark("mmsearch", f)
    assert [p.meta["item_id"] for p in res.prompts] == ["0", "1"]
    assert res.bad == [(f"{f}:2", "mmsearch record has no answers (tried ['gt_answer']); its keys: "
                                  + str(sorted(row("2", None))))]
    assert any(f"skipping bad benchmark row {f}:2" in r.getMessage() for r in caplog.records)


def test_livevqa_github_benchmark_json_levels(tmp_path):
    """liveVQA_benchmarks/News/benchmark.json: one item per level1_qa / level2_qa, the free-form
    Ground_Truth_List as references (never the option letter), images in News/News_imgs/."""
    bench = tmp_path / "News"
    _png(bench / "News_imgs" / "cnn_ba72.jpg", (10, 200, 10))
    _png(bench / "News_imgs" / "bbc_9cae.png", (200, 10, 10))

    def level(q, gt, img, letter="B"):
        return {"question": q, "question_type": "event", "options": ["A. x", "B. y"], "Ground_Truth": letter,
                "Ground_Truth_List": gt, "img_path": img, "img_url": f"https://media.cnn.com/{img}"}
    recs = [{"id": "0_20250507132827113360", "img_path": "cnn_ba72.jpg",
             "level1_qa": level("Based on the provided image, what event is taking place?",
                                ["CBS News vice presidential debate", "CBS vice presidential debate"], "cnn_ba72.jpg"),
             "level2_qa": level("What is the exact count of new clean energy jobs?", ["109,000"], "cnn_ba72.jpg"),
             "source": "CNN World", "time": "2024-10-02T01:38:01.679Z"},
            {"id": "0_20250429164247179897", "img_path": "bbc_9cae.png",
             "level1_qa": level("Based on the provided image, who is performing on stage?", ["Dave Smith", "Mr Smith"],
                                "bbc_9cae.png", "A"),
             "level2_qa": level("Which organization did the main character collaborate with in 2021?",
                                ["University of Bristol"], "missing.png"),
             "source": "BBC Health", "time": "2025-04-29T05:19:56.004Z"}]
    (bench / "benchmark.json").write_text(json.dumps(recs, indent=2))
    res = read_benchmark("livevqa", bench / "benchmark.json")
    assert [p.id for p in res.prompts] == ["livevqa:0_20250507132827113360:level1", "livevqa:0_20250507132827113360:level2",
                                           "livevqa:0_20250429164247179897:level1"]
    p = res.prompts[0]
    assert p.question == "Based on the provided image, what event is taking place?"
    assert p.meta["answers"] == ["CBS News vice presidential debate", "CBS vice presidential debate"]
    assert _near(p.images[0].getpixel((0, 0)), (10, 200, 10)) and res.prompts[1].meta["answers"] == ["109,000"]
    assert len(res.bad) == 1 and res.bad[0][0].endswith("benchmark.json:item 1 level2_qa") and "missing.png" in res.bad[0][1]
    # the HF-style row (sample_id, query, query_image, gt_answer) still loads
    _png(tmp_path / "hf" / "x.png")
    hf = _jsonl(tmp_path / "hf" / "livevqa.jsonl", [{"sample_id": "s1", "query": "When?", "query_image": "x.png",
                                                     "gt_answer": "2024"}])
    assert load_benchmark("livevqa", hf)[0].meta["answers"] == ["2024"]


def test_browsecomp_vl_no_id_and_url_images(tmp_path, caplog):
    """WebWatcher's bc_vl_level1.jsonl (question, image_path, answers, domain; no id). A URL is
    used only through a local copy (last path components under the image root, as WebWatcher's
    eval looks up basename(file_path) in IMAGE_DIR); else the row is refused, not the file."""
    url = "https://mitalinlp.oss-cn-hangzhou.aliyuncs.com/browsecomp_vl/level1/level1_{}.jpg"
    _png(tmp_path / "level1" / "level1_1.jpg", (1, 2, 3))
    _png(tmp_path / "image" / "level1" / "level1_3.jpg", (4, 5, 6))
    rows = [{"question": "Which country produced the movie that won the most Oscars?", "image_path": url.format(1),
             "answers": ["United States"], "domain": "TV"},
            {"question": "What year marked the end of the initial era?", "image_path": url.format(2),
             "answers": ["2014"], "domain": "Other"},
            {"question": "Which Thingiverse project?", "image_path": "image/level1/level1_3.jpg",  # older release
             "answers": ["The HIVE Evo"], "domain": "Engineering"}]
    f = _jsonl(tmp_path / "bc_vl_level1.jsonl", rows)
    with caplog.at_level("WARNING", logger="spyglass.eval"):
        res = read_benchmark("browsecomp_vl", f)
    assert [p.id for p in res.prompts] == ["browsecomp_vl:level1_1", "browsecomp_vl:level1_3"]
    assert _near(res.prompts[0].images[0].getpixel((0, 0)), (1, 2, 3)) and res.prompts[0].meta["answers"] == ["United States"]
    (where, reason), = res.bad
    assert where == f"{f}:2" and "is a URL and there is no network here" in reason and "level1/level1_2.jpg" in reason
    only_urls = _jsonl(tmp_path / "v2.jsonl", rows[1:2])
    with pytest.raises(BenchmarkError, match=r"no usable browsecomp_vl records \(1 bad; first: .*v2\.jsonl:1: .*no network"):
        load_benchmark("browsecomp_vl", only_urls)
    # WebWatcher's older eval files (prompt, file_path, answer) keep working
    old = _jsonl(tmp_path / "bc_vl_v1.jsonl", [{"prompt": "Where?", "file_path": str(tmp_path / "level1" / "level1_1.jpg"),
                                               "answer": "Oslo"}])
    assert load_benchmark("browsecomp_vl", old)[0].meta["item_id"] == "level1_1"


def test_vdr_without_id(tmp_path):
    """VDR-Bench rows without an id get row<N> (the image is bytes) or the image file's stem."""
    _png(tmp_path / "vdr_0007.png")
    f = _jsonl(tmp_path / "vdr.jsonl", [{"question": "Who?", "image": {"bytes": None, "path": "vdr_0007.png"},
                                         "answer": "x"},
                                        {"query": "What?", "image": "vdr_0007.png", "answers": ["y", "z"]}])
    got = load_benchmark("vdr", f)
    assert [p.meta["item_id"] for p in got] == ["row1", "vdr_0007"] and got[1].meta["answers"] == ["y", "z"]
    pq_file = _parquet(tmp_path / "testmini.parquet", [{"id": 12, "question": "Q?", "image": {"bytes": _png(), "path": None},
                                                        "answer": "A"}])
    assert load_benchmark("vdr", pq_file)[0].id == "vdr:12"


def test_fvqa_mmsearch_r1_parquet_and_python_list_strings(tmp_path):
    """MMSearch-R1's parquet (mini_data.pq): prompt messages, images [{bytes, path}], reward_model
    {candidate_answers: JSON list string, ground_truth, style}, no id column; a Python-style list
    string (str(list)) is parsed too."""
    rows = [{"prompt": [{"content": "What is the country of origin of this food?", "role": "user"}],
             "images": [{"bytes": _png(color=(9, 9, 9)), "path": None}],
             "reward_model": {"candidate_answers": '["Kingdom of Spain", "ESP", "\\ud83c\\uddea\\ud83c\\uddf8", "Spain"]',
                              "ground_truth": "Spain", "style": "rule"},
             "data_source": "mmsearch_r1/fvqa_test", "image_urls": None},
            {"prompt": [{"content": "<image>\nWhat bird is this?", "role": "user"}],
             "images": [{"bytes": _png(), "path": None}],
             "reward_model": {"candidate_answers": "['robin', 'European robin', \"Erithacus rubecula\"]",
                              "ground_truth": "robin", "style": "rule"},
             "data_source": "mmsearch_r1/fvqa_test", "image_urls": None}]
    got = load_benchmark("fvqa", _parquet(tmp_path / "fvqa_test.parquet", rows))
    assert [p.meta["item_id"] for p in got] == ["row1", "row2"]
    assert got[0].meta["answers"] == ["Spain", "Kingdom of Spain", "ESP", "\U0001F1EA\U0001F1F8"]
    assert got[1].question == "What bird is this?"
    assert got[1].meta["answers"] == ["robin", "European robin", "Erithacus rubecula"]


def _judge(prompt, answer: str | None) -> float:
    t = Trajectory(id=prompt.id, group_id=prompt.id, sample_index=0, prompt_ids=[1], status=Status.ANSWERED,
                   answer=answer, meta=dict(prompt.meta))

    async def go():
        async with JudgeSession(JudgeConfig()) as s:
            return await run_judge("rule_accuracy", t, s)
    return asyncio.run(go()).score


def test_infoseek_numerical_answer_eval_is_a_range(tmp_path):
    """edchengg/infoseek_eval: a numerical answer_eval is [{"wikidata": v, "range": [lo, hi]}]
    (or one such object); v joins the references, [lo, hi] is judged as a range."""
    _png(tmp_path / "oven_05050169.jpg")
    rows = [{"data_id": "infoseek_val_00001", "image_id": "oven_05050169", "question": "How tall is this tower in metres?",
             "answer": ["324"], "answer_eval": [{"wikidata": 324.0, "range": [291.6, 356.4]}],
             "data_split": "val_unseen_question"},
            {"data_id": "infoseek_val_00002", "image_id": "oven_05050169", "question": "How long is it in km?",
             "answer": ["1.0"], "answer_eval": {"wikidata": 1.0, "range": [0.9, 1.1]}, "data_split": "val_unseen_entity"},
            {"data_id": "infoseek_val_00003", "image_id": "oven_05050169", "question": "Which river?",
             "answer": ["Nile"], "answer_eval": ["Nile", "the Nile"], "data_split": "val_unseen_entity"}]
    tall, long_, river = load_benchmark("infoseek", _jsonl(tmp_path / "infoseek_val.jsonl", rows))
    assert tall.meta["answers"] == ["324"] and tall.meta["answer_ranges"] == [[291.6, 356.4]]
    assert long_.meta["answers"] == ["1.0", "1"] and long_.meta["answer_ranges"] == [[0.9, 1.1]]
    assert "answer_ranges" not in river.meta and river.meta["answers"] == ["Nile", "the Nile"]
    assert _judge(tall, "About 330 m") == 1.0 and _judge(tall, "1,024 feet") == 0.0
    assert _judge(tall, "300-330") == 1.0 and _judge(tall, "200-300") == 0.0  # a range: inside, or IoU >= 0.5
    assert _judge(long_, "0.95 km") == 1.0 and _judge(long_, "1.2 km") == 0.0 and _judge(long_, None) == 0.0
    assert _judge(river, "the nile") == 1.0 and _judge(river, "12") == 0.0


def test_in_numeric_range_is_infoseeks_metric():
    assert in_numeric_range("1.1", [[0.9, 1.1]]) and not in_numeric_range("1.11", [[0.9, 1.1]])
    assert in_numeric_range("-3", [[-4, -2]]) and in_numeric_range("1,200 people", [[1080, 1320]])
    assert in_numeric_range("9-10", [[9.2, 10.2]])  # a range answer: IoU 0.8 / 1.2 >= 0.5
    assert not in_numeric_range("9-10", [[9.5, 10.5]])  # IoU 0.5 / 1.5
    assert not in_numeric_range("5 to 20", [[9, 11]])  # IoU 2/15
    assert in_numeric_range("10 - 12", [[9, 13]]) and not in_numeric_range("no number", [[0, 1]])
    assert not in_numeric_range("3", []) and not in_numeric_range("3", None)
    assert in_numeric_range("20 or 3", [[2.5, 3.5]]) is False  # descending pair: the first number


# ------------------------------------------------------------------------------ SFT files
@pytest.fixture(scope="module")
def codec():
    return HFCodec.from_model(build_tiny_vlm("qwen2_vl", seed=0))


OSVL_TOOLS = json.dumps([{"type": "function", "function": {"name": "text_search", "description": "web search",
                         "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                        "required": ["query"]}}}])


def _osvl_record(image: str) -> dict:
    call = '<think>search it</think>\n<tool_call>\n{"name": "text_search", "arguments": {"query": "Kessock Bridge"}}\n</tool_call>'
    return {"conversations": [{"from": "human", "value": "<image>When did this bridge open?"},
                              {"from": "gpt", "value": call},
                              {"from": "observation", "value": "<tool_response>Opened 1982.</tool_response>"},
                              {"from": "gpt", "value": "<think>found</think>\n<answer>1982</answer>"}],
            "images": [image], "system": "You are a visual investigation agent.", "tools": OSVL_TOOLS}


def test_opensearch_vl_llama_factory_media_dir(tmp_path, codec):
    """OpenSearch-VL SFT/data/: dataset_info.json names new_fvqa/fvqa_llama_factory_clean.json;
    its images are relative to data/ (LLaMA-Factory's media_dir = dataset_dir), not the JSON's
    folder; a path relative to the JSON's folder (the raw release) is the fallback."""
    data = tmp_path / "data"
    _png(data / "new_fvqa" / "images" / "a.png", (7, 8, 9))
    (data / "dataset_info.json").write_text(json.dumps({"new_fvqa_agent_sft": {
        "file_name": "new_fvqa/fvqa_llama_factory_clean.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images", "system": "system", "tools": "tools"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation"}}}))
    f = data / "new_fvqa" / "fvqa_llama_factory_clean.json"
    f.write_text(json.dumps([_osvl_record("new_fvqa/images/a.png"), _osvl_record("images/a.png")], indent=1))
    assert media_dirs(f) == [data.resolve(), f.parent.resolve()]
    assert SFTDataConfig(path=str(f)).resolved_format() == "sharegpt"
    a, b = load_sharegpt(f, codec)
    assert a.prompt_images[0].getpixel((0, 0)) == (7, 8, 9) and b.token_ids() == a.token_ids()
    assert [s.kind for s in a.segments] == [SegmentKind.GEN, SegmentKind.OBS, SegmentKind.GEN]
    assert a.turns[0].calls[0]["name"] == "text_search" and a.status is Status.ANSWERED and a.answer == "1982"
    assert "You are a visual investigation agent." in codec.decode(a.prompt_ids) and "text_search" in codec.decode(a.prompt_ids)
    with pytest.raises(RecordError, match=r"images\[0\]'.*new_fvqa/images/nope\.png' does not exist \(nor "):
        sharegpt_to_trajectory(_osvl_record("new_fvqa/images/nope.png"), codec, media_dir=media_dirs(f))


# ms-swift docs/source_en/Instruction/Agent-support.md, the two dataset examples verbatim
SWIFT_AQI = {"tools": "[{\"type\": \"function\", \"function\": {\"name\": \"realtime_aqi\", \"description\": \"Weather forecast. Get real-time air quality, including current air quality, PM2.5, and PM10 information.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"City name, e.g., Shanghai\"}}, \"required\": [\"city\"]}}}]", "messages": [{"role": "user", "content": "What is the weather like in Beijing and Shanghai today?"}, {"role": "tool_call", "content": "{\"name\": \"realtime_aqi\", \"arguments\": {\"city\": \"Beijing\"}}"}, {"role": "tool_call", "content": "{\"name\": \"realtime_aqi\", \"arguments\": {\"city\": \"Shanghai\"}}"}, {"role": "tool_response", "content": "{\"city\": \"Beijing\", \"aqi\": \"10\", \"unit\": \"celsius\"}"}, {"role": "tool_response", "content": "{\"city\": \"Shanghai\", \"aqi\": \"72\", \"unit\": \"fahrenheit\"}"}, {"role": "assistant", "content": "According to the weather forecast tool, the air quality index (AQI) in Beijing is 10, which indicates good air quality; whereas in Shanghai, the AQI is 72, indicating mild pollution."}]}  # noqa: E501
SWIFT_CLICK = {"tools": "[{\"type\": \"function\", \"function\": {\"name\": \"click\", \"description\": \"Click on a position on the screen\", \"parameters\": {\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\", \"description\": \"X-coordinate representing the horizontal position on the screen\"}, \"y\": {\"type\": \"integer\", \"description\": \"Y-coordinate representing the vertical position on the screen\"}}, \"required\": [\"x\", \"y\"]}}}]", "messages": [{"role": "user", "content": "<image>What time is it now?"}, {"role": "assistant", "content": "<think>\nI can check the current time by opening the calendar app.\n</think>\n"}, {"role": "tool_call", "content": "{\"name\": \"click\", \"arguments\": {\"x\": 105, \"y\": 132}}"}, {"role": "tool_response", "content": "{\"images\": \"<image>\", \"status\": \"success\"}"}, {"role": "assistant", "content": "Successfully opened the calendar app. The current time is 11 o'clock in the morning."}], "images": ["desktop.png", "calendar.png"]}  # noqa: E501


def _assistant_ids(codec, texts):
    return [i for t in texts for i in codec.encode_text(t) + [codec.stop_token_ids[0]]]


def test_ms_swift_agent_messages_jsonl(tmp_path, codec):
    """An ms-swift messages JSONL is detected as such (not as spyglass Trajectory JSONL) and its
    documented agent examples load: parallel tool calls as one GEN turn with two calls and one
    OBS with both responses; an assistant turn followed by a tool call as one GEN turn."""
    _png(tmp_path / "desktop.png", (1, 1, 1), (84, 56))
    _png(tmp_path / "calendar.png", (2, 2, 2), (56, 56))
    f = _jsonl(tmp_path / "agent.jsonl", [SWIFT_AQI, SWIFT_CLICK])
    assert sniff_format(f) == "sharegpt" and SFTDataConfig(path=str(f)).resolved_format() == "sharegpt"
    aqi, click = load_sft_data(SFTDataConfig(path=str(f), call_style="qwen"), str(f), codec)
    # parallel calls: one assistant turn, both calls; one observation holding both responses
    assert [s.kind for s in aqi.segments] == [SegmentKind.GEN, SegmentKind.OBS, SegmentKind.GEN]
    assert [json.loads(c["arguments"])["city"] for c in aqi.turns[0].calls] == ["Beijing", "Shanghai"]
    said = codec.decode(aqi.segments[0].token_ids[:-1])
    assert said == ('<tool_call>\n{"name": "realtime_aqi", "arguments": {"city": "Beijing"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "realtime_aqi", "arguments": {"city": "Shanghai"}}\n</tool_call>')
    obs = codec.decode(aqi.segments[1].token_ids)
    assert obs.count("<tool_response>") == 2 and '"Beijing"' in obs and '"Shanghai"' in obs
    assert "realtime_aqi" in codec.decode(aqi.prompt_ids) and aqi.meta["source"] == "messages"
    # an assistant turn followed by a tool call: one GEN turn (text, then the call block)
    assert [s.kind for s in click.segments] == [SegmentKind.GEN, SegmentKind.OBS, SegmentKind.GEN]
    said = codec.decode(click.segments[0].token_ids[:-1])
    assert said == ("<think>\nI can check the current time by opening the calendar app.\n</think>\n"
                    '<tool_call>\n{"name": "click", "arguments": {"x": 105, "y": 132}}\n</tool_call>')
    assert click.turns[0].calls[0]["name"] == "click" and click.turns[0].parse_errors == []
    assert click.prompt_images[0].size == (84, 56) and click.segments[1].images[0].size == (56, 56)
    # the loss covers exactly the assistant tokens
    ids, mask = np.array(click.token_ids()), np.array(click.loss_mask(), bool)
    assert ids[mask].tolist() == _assistant_ids(codec, [said, SWIFT_CLICK["messages"][-1]["content"]])
    # spyglass's own Trajectory JSONL is still detected as trajectory
    tj = tmp_path / "trajs.jsonl"
    write_jsonl(tj, [click], append=False)
    assert sniff_format(tj) == "trajectory" and SFTDataConfig(path=str(tj)).resolved_format() == "trajectory"
    assert list(iter_jsonl(tj))[0].token_ids() == click.token_ids()


def test_openai_tool_calls_and_tool_list_columns(tmp_path, codec):
    """OpenAI-style assistant tool_calls (arguments as a JSON string) + role tool give the same
    tokens as ms-swift's tool_call / tool_response; the tools column may be a list of schemas
    or of JSON strings (ms-swift) and is rendered into the prompt."""
    tools = json.loads(SWIFT_AQI["tools"])
    calls = [json.loads(m["content"]) for m in SWIFT_AQI["messages"][1:3]]
    openai = {"tools": tools, "messages": [
        SWIFT_AQI["messages"][0],
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for i, c in enumerate(calls)]},
        {"role": "tool", "tool_call_id": "call_0", "content": SWIFT_AQI["messages"][3]["content"]},
        {"role": "tool", "tool_call_id": "call_1", "content": SWIFT_AQI["messages"][4]["content"]},
        SWIFT_AQI["messages"][5]]}
    a = sharegpt_to_trajectory(SWIFT_AQI, codec)
    b = sharegpt_to_trajectory(openai, codec)
    c = sharegpt_to_trajectory({**SWIFT_AQI, "tools": [json.dumps(t) for t in tools]}, codec)
    assert a.token_ids() == b.token_ids() == c.token_ids() and len(b.turns[0].calls) == 2
    no_tools = sharegpt_to_trajectory({**SWIFT_AQI, "tools": []}, codec)
    assert "realtime_aqi" not in codec.decode(no_tools.prompt_ids) and "realtime_aqi" in codec.decode(a.prompt_ids)
    bad = {**SWIFT_AQI, "messages": SWIFT_AQI["messages"][:1] + [{"role": "tool_call", "content": "click it"}]}
    with pytest.raises(RecordError, match=r"field 'messages\[1\]\.content': a tool_call must be JSON"):
        sharegpt_to_trajectory(bad, codec, where="f.jsonl:3")
    bad = {**SWIFT_AQI, "messages": SWIFT_AQI["messages"][:1] + SWIFT_AQI["messages"][3:4]}
    with pytest.raises(RecordError, match=r"field 'messages\[1\]\.role': a tool turn at turn 1"):
        sharegpt_to_trajectory(bad, codec)
    with pytest.raises(RecordError, match=r"field 'tools': not a JSON list"):
        sharegpt_to_trajectory({**SWIFT_AQI, "tools": "[{oops"}, codec)
