"""The offline world generator: determinism, the docs/images/questions contract, caching."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from spyglass.engine.offline.world import (ENTITY_KINDS, FACT_FIELDS, VERSION, WorldConfig, ensure_world, generate_world, load_world,
                                   main)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(tmp_path_factory.getbasetemp() / "world-v1")


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_world(tmp_path / "a", WorldConfig(seed=3, n_sign_images=8, n_scenes=2,
                                                   n_emblem_queries=2))
    b = generate_world(tmp_path / "b", WorldConfig(seed=3, n_sign_images=8, n_scenes=2,
                                                   n_emblem_queries=2))
    c = generate_world(tmp_path / "c", WorldConfig(seed=4, n_sign_images=8, n_scenes=2,
                                                   n_emblem_queries=2))
    assert _tree_digest(a.root) == _tree_digest(b.root)
    assert a.manifest["sha256"] != c.manifest["sha256"]
    assert [d["title"] for d in a.docs] != [d["title"] for d in c.docs]


def test_docs_contract(world):
    docs = world.docs
    assert 250 <= len(docs) <= 400
    ids = {d["id"] for d in docs}
    titles = {d["title"]: d["id"] for d in docs}
    assert len(titles) == len(docs), "titles must be unique (links are by title)"
    for d in docs:
        assert set(d) == {"id", "title", "url", "type", "aliases", "text", "links", "infobox", "image"}
        assert d["url"] == f"corpus://{d['id']}" and d["id"].startswith(d["type"] + "-")
        linked_titles = re.findall(r"\[\[([^\]]+)\]\]", d["text"])
        assert linked_titles, d["id"]
        assert sorted({titles[t] for t in linked_titles}) == d["links"]
        assert set(d["links"]) <= ids
        for v in d["infobox"].values():
            assert isinstance(v, (str, int))
        if d["image"] is not None:
            assert world.image_record(d["image"])["entity"] == d["id"]
    assert {d["type"] for d in docs} == set(ENTITY_KINDS)
    assert all(set(d["infobox"]) == set(FACT_FIELDS[d["type"]]) for d in docs)  # the shared field list holds


def test_images_exist_and_match_index(world):
    recs = world.images
    assert 30 <= len(recs) <= 100
    assert {r["degradation"] for r in recs} == {"none", "perspective", "blur", "lowres"}
    for r in recs:
        with Image.open(world.image_path(r["id"])) as im:
            assert im.size == (r["width"], r["height"])
        for reg in r["regions"]:
            x1, y1, x2, y2 = reg["box"]
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
        if r["split"] == "corpus":
            doc = world.doc(r["entity"])
            assert r["page"] == doc["url"] and r["title"] == doc["title"] and doc["image"] == r["id"]
            assert r["text"] and r["title"] in " ".join(r["text"]) or doc["type"] == "place"
    total = sum(p.stat().st_size for p in world.root.rglob("*") if p.is_file())
    assert total < 5e6, total


def test_questions_hops_are_consistent(world):
    qs = world.questions
    assert 25 <= len(qs) <= 80
    assert {q["kind"] for q in qs} >= {"sign-none", "sign-perspective", "sign-blur",
                                       "sign-lowres", "scene-crop", "emblem-search"}
    for q in qs:
        world.image_record(q["image"])
        assert q["answer"] and q["question"].endswith("?")
        visits = [h for h in q["hops"] if h["action"] == "visit"]
        assert len(visits) == 2 and visits[-1]["value"] == q["answer"]
        for h in visits:
            assert str(world.doc(h["doc"])["infobox"][h["field"]]) == h["value"]
        # the first visit is the entity the image shows
        shown = world.doc(visits[0]["doc"])
        rec = world.image_record(q["image"])
        if q["kind"] == "scene-crop":
            crop = next(h for h in q["hops"] if h["action"] == "crop")
            reg = next(r for r in rec["regions"] if r["box"] == crop["box"])
            assert reg["entity"] == shown["id"]
        else:
            assert rec["entity"] == shown["id"]
        # the second visit follows a link of the first document
        assert visits[1]["doc"] in shown["links"]


def test_solve_script_quotes_the_answer_line(world):
    """The teacher's answer turn quotes the last page's infobox line (`field: value`, as Visit
    renders it), then answers with its value; the tool turns are unchanged."""
    from spyglass.engine.env import solve_script
    from spyglass.engine.tools.web import render_doc
    for q in world.questions[:10]:
        last = [h for h in q["hops"] if h["action"] == "visit"][-1]
        turns = solve_script(q)
        assert turns[-1] == (f"<think>The page says {last['field']}: {last['value']}.</think>\n"
                             f"<answer>{q['answer']}</answer>")
        page = render_doc(world.doc(last["doc"]), {d["id"]: d for d in world.docs})
        assert f"- {last['field']}: {last['value']}" in page
        assert all("<tool_call>" in t for t in turns[:-1])


def test_ensure_world_generates_once_and_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SPYGLASS_WORLD", str(tmp_path / "w"))
    cfg = WorldConfig(n_sign_images=6, n_scenes=1, n_emblem_queries=1)
    w1 = ensure_world(cfg=cfg)
    assert w1.root == tmp_path / "w" and w1.manifest["version"] == VERSION
    stamp = (w1.root / "docs.jsonl").stat().st_mtime_ns
    w2 = ensure_world(cfg=cfg)
    assert (w2.root / "docs.jsonl").stat().st_mtime_ns == stamp and w2.docs == w1.docs
    with pytest.raises(ValueError, match="different config"):
        ensure_world(cfg=WorldConfig(seed=9))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_load_world_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_world(tmp_path)
    generate_world(tmp_path, WorldConfig(n_sign_images=4, n_scenes=0, n_emblem_queries=0))
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["version"] = "world-v0"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="world-v0"):
        load_world(tmp_path)


@pytest.mark.parametrize("kw,needle", [({"n_people": 2}, "n_people"), ({"n_sign_images": 1000}, "n_sign_images"),
                                       ({"width": 10}, "10x420"), ({"n_scenes": 99}, "n_scenes")])
def test_config_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        WorldConfig(**kw)


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--seed", "1"]) == 0
    assert "docs" in capsys.readouterr().out
    assert load_world(tmp_path / "cli").manifest["seed"] == 1
