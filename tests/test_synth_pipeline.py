"""The synthesis pipeline end to end: `python -m spyglass.trainer.synth --world DIR --out DIR` on
a small offline world (questions, images, accepted teacher trajectories in both formats), its
determinism, and the pages route from a converted MediaWiki dump."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from spyglass.engine.trajectory import Status, read_jsonl
from spyglass.engine.offline.world import WorldConfig, generate_world
from spyglass.trainer.synth.__main__ import main, parse_args
from spyglass.trainer.synth.dump import convert_mediawiki
from spyglass.trainer.synth.graph import build_graph
from spyglass.trainer.synth.pipeline import SynthConfig, run_pipeline
from spyglass.trainer.synth.questions import leaked
from spyglass.trainer.synth.trajectories import ungrounded

from test_synth_graph import XML


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w"), WorldConfig(
        n_people=10, n_places=10, n_orgs=10, n_products=8, n_events=8, n_sign_images=10,
        n_scenes=3, n_emblem_queries=4))


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_cli_end_to_end_on_a_small_world(world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    assert main(["--world", str(world.root), "--out", str(out), "--n", "6", "--seed", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    qs = _rows(out / "questions.jsonl")
    assert len(qs) == 6 and report["questions"]["kept"] == 6
    g = build_graph(world.root / "docs.jsonl")
    for q in qs:
        assert (out / q["image_file"]).is_file() and q["question"].endswith("?")
        assert " in the image" in q["question"] and len(q["path"]["hops"]) >= 2
        anchor = g.node(q["path"]["anchor"])
        names = anchor.names() + [q["answer"], *q["aliases"]]
        names += [n for b in q["path"]["hops"][:-1] for n in g.node(b["target"]).names()]
        assert not leaked(q["question"], names), q["question"]
        assert q["roles"][0] == ["anchor", anchor.id] and q["roles"][-1][0] == "answer"
        assert [h["action"] for h in q["hops"] if h["action"] == "visit"] == ["visit"] * len(q["path"]["hops"])
        assert (q["fix_tool"] is None) == (q["degradation"] == "none")
    # seed 0 on this world draws every view: page images (some degraded), a scene, an emblem
    assert {q["grounding"]["view"] for q in qs} == {"page", "scene", "emblem"}
    assert report["questions"]["degraded_added"] == 1  # 10% of the clean page images, at least one
    scene = next(q for q in qs if q["grounding"]["view"] == "scene")
    assert scene["hops"][0] == {"action": "crop", "box": scene["grounding"]["region"]["box"]}
    assert re.search(r"on the (leftmost|middle|rightmost) sign in the image", scene["question"])
    emblem = next(q for q in qs if q["grounding"]["view"] == "emblem")
    assert emblem["hops"][0]["action"] == "image_search" and "emblem is shown" in emblem["question"]
    added = next(q for q in qs if q["kind"].endswith("-added"))
    assert added["hops"][0]["action"] in ("sharpen", "super_resolution", "perspective")
    assert Image.open(out / added["image_file"]).size != Image.open(world.image_path(added["image"])).size \
        or Image.open(out / added["image_file"]).tobytes() != Image.open(world.image_path(added["image"])).tobytes()
    trajs = read_jsonl(out / "trajectories.jsonl")
    t = report["trajectories"]
    # the teacher replays the true path; a trajectory typing what its context never showed (an
    # OCR misread the replay corrects, a page no search returned) is not kept
    assert t["trajectories"] == 6 and len(trajs) == t["accepted"] == t["questions_with_accepted"] >= 4
    by_id = {q["id"]: q for q in qs}
    for tr in trajs:
        assert tr.status is Status.ANSWERED and tr.answer == by_id[tr.group_id]["answer"]
        assert tr.reward["accepted"] and tr.reward["acc"] == 1.0
        assert "Visit" in [c["name"] for turn in tr.turns for c in turn.calls]
        assert not any(turn.tool_errors for turn in tr.turns)
    used = {c["name"] for tr in trajs for turn in tr.turns for c in turn.calls}
    assert {"OCR", "ImageSearch", "TextSearch", "Visit"} <= used
    assert t["sharegpt"] == len(trajs) and len(_rows(out / "trajectories.sharegpt.jsonl")) == len(trajs)
    assert all(ungrounded(tr) is None for tr in trajs)


def test_questions_are_deterministic(world, tmp_path: Path) -> None:
    for name in ("a", "b"):
        main(["--world", str(world.root), "--out", str(tmp_path / name), "--n", "6", "--no-trajectories"])
    a, b = (tmp_path / "a" / "questions.jsonl").read_bytes(), (tmp_path / "b" / "questions.jsonl").read_bytes()
    assert a == b and len(a.splitlines()) == 6
    ia = sorted(p.read_bytes() for p in (tmp_path / "a" / "images").iterdir())
    assert ia == sorted(p.read_bytes() for p in (tmp_path / "b" / "images").iterdir())


def test_pages_from_a_mediawiki_dump(tmp_path: Path) -> None:
    xml = tmp_path / "dump.xml"
    xml.write_text(XML, encoding="utf-8")
    convert_mediawiki(xml, tmp_path / "pages.jsonl")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("Alice portrait.jpg", "Acme logo.png", "Springfield skyline.jpg"):
        Image.new("RGB", (80, 60), "navy").save(imgs / name, format="PNG")
    cfg = SynthConfig(out=str(tmp_path / "o"), pages=str(tmp_path / "pages.jsonl"), images_dir=str(imgs),
                      n_questions=3, trajectories=False)
    report = asyncio.run(run_pipeline(cfg))
    qs = _rows(tmp_path / "o" / "questions.jsonl")
    assert qs and report["questions"]["kept"] == len(qs)
    assert {q["path"]["anchor"] for q in qs} <= {"Alice Smith", "Acme Corporation", "Springfield"}
    for q in qs:
        assert (tmp_path / "o" / q["image_file"]).is_file() and q["hops"][-1]["action"] == "visit"


def test_config_errors_name_the_value(world, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of world"):
        SynthConfig(out=str(tmp_path))
    with pytest.raises(ValueError, match="trajectories need a world"):
        SynthConfig(out=str(tmp_path), pages=str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match="grounding must be one of .*, got 'clip'"):
        SynthConfig(out=str(tmp_path), world=str(world.root), grounding="clip")
    with pytest.raises(ValueError, match="difficulty='llm' needs difficulty_llm"):
        SynthConfig(out=str(tmp_path), world=str(world.root), difficulty="llm")
    with pytest.raises(ValueError, match="has no docs.jsonl"):
        parse_args(["--world", str(tmp_path), "--out", str(tmp_path / "o")])


def test_ocr_grounding_and_llm_endpoint(world, tmp_path: Path) -> None:
    from test_synth_questions import chat_reply, with_server

    def reply(body):
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Facts:"):
            anchor = re.search(r"starting from (.*?), and asks", prompt).group(1)
            said = " ".join(f"{b} is the {r} of {a}." for a, r, b in re.findall(r"- (.*?) --(.*?)--> (.*)", prompt))
            r, last = re.search(r"asks for the (.*?) of (.*?)\. Do not", prompt).groups()
            return chat_reply(f"Starting from {anchor}: {said} What is the {r} of {last}?")
        m = re.search(r'Question: (.*)\nRewrite this question so that it no longer names (.*?); '
                      r'refer to it only as "(.*?)"', prompt)
        current, name, desc = m.groups()  # a faithful rewriter: the name becomes the description
        return chat_reply(current.replace(name, desc))

    async def go(url):
        cfg = parse_args(["--world", str(world.root), "--out", str(tmp_path / "o"), "--n", "2",
                          "--no-trajectories", "--grounding", "ocr", "--views", "page", "--llm-url", url,
                          "--llm-model", "m"])
        return await run_pipeline(cfg)

    report, calls = asyncio.run(with_server(reply, go))
    qs = _rows(tmp_path / "o" / "questions.jsonl")
    assert len(qs) == 2 and calls
    for q in qs:
        assert q["grounding"]["method"] == "ocr" and q["grounding"]["score"] >= 0.6
        assert q["steps"][0]["source"] == "llm" and q["canonical_question"].startswith("Starting from")
        assert q["steps"][-1]["source"] in ("llm", "llm+substitution")
    assert report["questions"]["llm_steps"] >= 2 * len(qs)


def _traj(turns: list[tuple[str, list[dict], str]], answer: str | None) -> "Trajectory":
    """A trajectory from (gen text, calls, observation text) steps; the last step may answer."""
    from spyglass.engine.trajectory import Segment, SegmentKind, Trajectory, Turn
    t = Trajectory("q#0", "q", 0, [1], meta={"question": "Who founded the org shown?"})
    for i, (gen, calls, obs) in enumerate(turns):
        t.segments.append(Segment(SegmentKind.GEN, [2], i, logprobs=[0.0], version=0, text=gen))
        t.turns.append(Turn(i, calls=[{"name": c["name"], "arguments": json.dumps(c["args"])} for c in calls],
                            answered=answer is not None and i == len(turns) - 1))
        if obs:
            t.segments.append(Segment(SegmentKind.OBS, [3], i, text=obs))
    t.answer = answer
    return t


def test_ungrounded_names_the_step_that_types_what_was_never_seen() -> None:
    ok = _traj([("", [{"name": "OCR", "args": {"image": "img_1"}}], "Text:\nBrakorn Works"),
                ("", [{"name": "TextSearch", "args": {"query": "Brakorn Works"}}], "URL: corpus://org-001 founder: Ana"),
                ("", [{"name": "Visit", "args": {"url": "corpus://org-001", "goal": "founder"}}], "- founder: Ana Vel"),
                ("<answer>Ana Vel</answer>", [], "")], "Ana Vel")
    assert ungrounded(ok) is None
    misread = _traj([("", [{"name": "OCR", "args": {"image": "img_1"}}], "Text:\nBrak0rn Works"),
                     ("", [{"name": "TextSearch", "args": {"query": "Brakorn Works"}}], "")], None)
    assert "turn 1 types 'Brakorn Works'" in ungrounded(misread)
    oracle = _traj([("", [{"name": "Visit", "args": {"url": "corpus://person-084"}}], "- born: 1900"),
                    ("<answer>1901</answer>", [], "")], "1901")
    assert "corpus://person-084" in ungrounded(oracle)
    oracle.turns[0].calls = []
    assert "'1901'" in ungrounded(oracle)
    ok.turns[1].tool_errors = [{"name": "TextSearch", "kind": "bad_args", "message": "empty query"}]
    assert ungrounded(ok).startswith("tool error at turn 1")
