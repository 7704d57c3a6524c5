"""Evaluation: the replay policy on world questions scores 1.0, the tiny model's direct answers
0.0; tool-use and cost statistics; a loader per benchmark layout; malformed files name the line."""
import base64
import io
import json

import pytest
from PIL import Image

from spyglass.engine.env import EnvConfig
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.engine.rollout import RolloutConfig
from spyglass.engine.scheduler import EngineConfig
from spyglass.trainer.eval import BenchmarkError, EvalConfig, load_benchmark, run_eval


def _rollout(env: EnvConfig, **kw) -> RolloutConfig:
    kw.setdefault("policy", "replay")
    return RolloutConfig(engine=EngineConfig(n_samples=1, max_live=64, temperature=0.0), env=env, out="",
                         progress=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "world-v1"
    ensure_world(root, WorldConfig())
    return root


def test_replay_is_right_and_direct_baseline_is_not(world, tmp_path):
    cfg = EvalConfig(rollout=_rollout(EnvConfig(world_dir=str(world), questions=2, dense_search=False)),
                     direct_max_tokens=12, out_dir=str(tmp_path))
    rep = run_eval(cfg)
    ag, di = rep["modes"]["agentic"], rep["modes"]["direct"]
    assert rep["benchmarks"] == ["world"]
    assert ag["benchmarks"]["world"]["accuracy"] == 1.0 and ag["average_accuracy"] == 1.0
    assert di["benchmarks"]["world"]["accuracy"] == 0.0
    s = ag["benchmarks"]["world"]
    assert s["n"] == 2 and s["answered_rate"] == 1.0 and s["fatal_rate"] == 0.0 and s["tool_errors"] == 0
    assert s["tool_calls"] == sum(s["calls_per_tool"].values()) >= 2 * 3 and s["turns_mean"] >= 4
    assert s["gen_tokens"] > 0 and s["obs_tokens"] > 0 and s["prompt_tokens"] > 0
    d = di["benchmarks"]["world"]
    assert d["tool_calls"] == 0 and d["turns_mean"] == 1.0 and d["obs_tokens"] == 0
    assert d["prompt_tokens"] < s["prompt_tokens"]  # no tool schemas in the direct prompt
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["modes"]["agentic"]["average_accuracy"] == 1.0
    table = (tmp_path / "report.md").read_text()
    assert "| agentic | 100.0 | 100.0 |" in table and "| direct | 0.0 | 0.0 |" in table
    assert (tmp_path / "agentic.jsonl").is_file() and (tmp_path / "direct.jsonl").is_file()


def _png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_layouts_map_their_fields(tmp_path):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "p.png")
    Image.new("RGB", (64, 48), "blue").save(tmp_path / "img-7.jpg")
    b64 = base64.b64encode(_png_bytes("green")).decode()
    files = {
        "mmsearch": [{"sample_id": 3, "query": "Who built it?", "query_image": "p.png", "gt_answer": "Ann",
                      "alternative_gt_answers": ["A. Smith"]}],
        "fvqa": [{"data_id": "f1", "prompt": [{"role": "user", "content": "<image>\nWhat bird is this?"}],
                  "images": [{"bytes": b64}], "reward_model": {"ground_truth": "robin",
                                                               "candidate_answers": ["robin", "European robin"]}}],
        "infoseek": [{"data_id": "i1", "image_id": "img-7", "question": "Which river?", "answer": ["Nile"],
                      "answer_eval": ["Nile", "the Nile"]}],
        "browsecomp_vl": [{"id": 9, "prompt": "Where?", "file_path": str(tmp_path / "p.png"), "answer": "Oslo"}],
        "livevqa": [{"sample_id": "l1", "query": "When?", "image": "p.png", "gt_answer": "2024"}],
        "simplevqa": [{"data_id": 5, "image": b64, "question": "Colour?", "answer": "green"}],
        "vdr": [{"id": "v1", "image": f"data:image/png;base64,{b64}", "question": "What?", "answer": "x"}],
    }
    got = {k: load_benchmark(k, _write(tmp_path / f"{k}.jsonl", v)) for k, v in files.items()}
    p = got["mmsearch"][0]
    assert p.id == "mmsearch:3" and p.question == "Who built it?" and p.meta["answers"] == ["Ann", "A. Smith"]
    assert p.images[0].getpixel((0, 0)) == (255, 0, 0)
    f = got["fvqa"][0]
    assert f.question == "What bird is this?" and f.meta["answers"] == ["robin", "European robin"]
    assert f.images[0].getpixel((0, 0)) == (0, 128, 0)
    i = got["infoseek"][0]
    assert i.meta["answers"] == ["Nile", "the Nile"] and i.images[0].getpixel((0, 0))[2] > 200
    assert got["browsecomp_vl"][0].meta["item_id"] == "9" and got["livevqa"][0].meta["answers"] == ["2024"]
    assert got["simplevqa"][0].images[0].size == (64, 48) and got["vdr"][0].images[0].size == (64, 48)


def test_malformed_benchmark_files_name_the_line(tmp_path):
    """strict=True: the first bad row raises, naming FILE:LINE and the field."""
    Image.new("RGB", (64, 48), "red").save(tmp_path / "p.png")
    good = {"sample_id": 1, "query": "q", "query_image": "p.png", "gt_answer": "a"}
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(BenchmarkError, match=r"b\.jsonl:2: not valid JSON"):
        load_benchmark("mmsearch", bad_json, strict=True)
    missing = _write(tmp_path / "m.jsonl", [good, {"sample_id": 2, "query_image": "p.png", "gt_answer": "a"}])
    with pytest.raises(BenchmarkError, match=r"m\.jsonl:2: mmsearch record has no question \(tried \['query'\]\)"):
        load_benchmark("mmsearch", missing, strict=True)
    url = _write(tmp_path / "u.jsonl", [{**good, "query_image": "https://x.org/a.png"}])
    with pytest.raises(BenchmarkError, match=r"u\.jsonl:1: field 'query_image': .*no network"):
        load_benchmark("mmsearch", url)  # its only row is bad: an error even when not strict
    gone = _write(tmp_path / "g.jsonl", [good, {**good, "sample_id": 2, "query_image": "nope.png"}])
    with pytest.raises(BenchmarkError, match=r"g\.jsonl:2: field 'query_image': image file .*nope\.png"):
        load_benchmark("mmsearch", gone, strict=True)
    dup = _write(tmp_path / "d.jsonl", [good, good])
    with pytest.raises(BenchmarkError, match=r"d\.jsonl:2: duplicate id '1'"):
        load_benchmark("mmsearch", dup, strict=True)
    with pytest.raises(BenchmarkError, match="unknown benchmark layout 'okvqa'"):
        load_benchmark("okvqa", dup)


def test_bad_rows_are_skipped_counted_and_warned(tmp_path, caplog):
    """Not strict (the default, what `spyglass eval` uses): each bad row is skipped with one
    warning naming FILE:LINE; the good rows load; a file with no good row is still an error."""
    from spyglass.trainer.eval import read_benchmark
    Image.new("RGB", (64, 48), "red").save(tmp_path / "p.png")
    good = {"sample_id": 1, "query": "q", "query_image": "p.png", "gt_answer": "a"}
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "sample_id": 2, "query_image": "nope.png"}),
                            json.dumps(good), json.dumps({**good, "sample_id": 3})]) + "\n")
    with caplog.at_level("WARNING", logger="spyglass.eval"):
        got = read_benchmark("mmsearch", f)
    assert [p.id for p in got.prompts] == ["mmsearch:1", "mmsearch:3"]
    assert [w.rsplit(":", 1)[1] for w, _ in got.bad] == ["2", "3", "4"]
    assert "not valid JSON" in got.bad[0][1] and "nope.png" in got.bad[1][1] and "duplicate id '1'" in got.bad[2][1]
    lines = [r.getMessage() for r in caplog.records]
    assert sum(f"skipping bad benchmark row {f}:" in m for m in lines) == 3
    assert any("2 items, 3 rows skipped" in m for m in lines)
    assert [p.id for p in load_benchmark("mmsearch", f, limit=1)] == ["mmsearch:1"]


def test_replay_needs_world_items_and_config_errors(world, tmp_path):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "p.png")
    f = _write(tmp_path / "mm.jsonl", [{"sample_id": 1, "query": "q", "query_image": "p.png", "gt_answer": "a"}])
    cfg = EvalConfig(benchmarks=[f"mmsearch:{f}"], rollout=_rollout(EnvConfig(world_dir=str(world), questions=1,
                                                                                dense_search=False)),
                     out_dir=str(tmp_path / "o"))
    with pytest.raises(BenchmarkError, match=r"no script for \['mmsearch:1'\]"):
        run_eval(cfg)
    with pytest.raises(ValueError, match="benchmarks entry 'okvqa:x.jsonl' must be layout:path"):
        EvalConfig(benchmarks=["okvqa:x.jsonl"])
    with pytest.raises(ValueError, match="policy must be replay|sample for eval, got 'mixed'"):
        EvalConfig(rollout=_rollout(EnvConfig(), policy="mixed"))
