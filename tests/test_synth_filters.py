"""The difficulty filter: stub solvers that say yes/no, the LLM solver against a local
OpenAI-compatible server (with one image search), and the engine solver on a tiny VLM."""
from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from spyglass.engine.tools.image_search import ImageSearchConfig, image_search_tools
from spyglass.engine.tools.llm import LLMConfig
from spyglass.engine.offline.world import WorldConfig, generate_world
from spyglass.trainer.synth.filters import (EngineSolver, LLMSolver, difficulty_filter, extract_answer,
                                            is_correct, tool_image_search)
from spyglass.engine.scheduler import EngineConfig
from spyglass.trainer.synth.trajectories import TeacherConfig, teacher_rollout

from test_synth_questions import chat_reply, with_server

RECS = [{"id": f"q{i}", "question": f"What is item {i}?", "answer": f"Answer {i}", "aliases": [f"A{i}"]}
        for i in range(4)]
IMGS = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(4)]


def test_is_correct_normalises() -> None:
    r = {"answer": "The Port Vale", "aliases": ["PV"]}
    assert is_correct("port vale.", r) and is_correct("pv", r) and not is_correct("Port", r)
    assert not is_correct(None, r) and not is_correct("", r)
    assert extract_answer("<think>x</think> <answer> Port  Vale </answer>") == "Port Vale"


def test_stub_solvers_yes_no() -> None:
    calls = []

    async def solver(rec, img, mode):
        calls.append((rec["id"], mode))
        i = int(rec["id"][1:])
        if mode == "no_tools":
            return rec["answer"] if i == 0 else "no idea"
        return rec["aliases"][0] if i == 1 else None

    res = asyncio.run(difficulty_filter(RECS, IMGS, solver))
    assert [d.kept for d in res] == [False, False, True, True]
    assert [d.solved_by for d in res] == ["no_tools", "one_image_search", None, None]
    assert ("q0", "one_image_search") not in calls and len(calls) == 7  # stops at the first solve
    assert res[2].answers == {"no_tools": "no idea", "one_image_search": None}

    async def never(rec, img, mode):
        return "wrong"

    assert all(d.kept for d in asyncio.run(difficulty_filter(RECS, IMGS, never)))
    with pytest.raises(ValueError, match="modes must be in"):
        asyncio.run(difficulty_filter(RECS, IMGS, never, modes=("oracle",)))
    with pytest.raises(ValueError, match="4 records but 1 images"):
        asyncio.run(difficulty_filter(RECS, IMGS[:1], never))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w"), WorldConfig(
        n_people=8, n_places=8, n_orgs=8, n_products=6, n_events=6, n_sign_images=6, n_scenes=0,
        n_emblem_queries=0))


def test_llm_solver_with_one_image_search(world) -> None:
    rec = next(r for r in world.images if r["split"] == "corpus")
    title = world.doc(rec["entity"])["title"]
    q = {"id": "q", "question": "Which organisation is this?", "answer": title, "aliases": []}
    search = next(t for t in image_search_tools(ImageSearchConfig(corpus_dir=str(world.root)))
                  if t.name == "ImageSearch")

    def reply(body):
        content = body["messages"][0]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        text = content[1]["text"]
        if "reverse image search" in text:  # answers from the search result it was given
            return chat_reply(f"<answer>{title}</answer>" if title in text else "<answer>?</answer>")
        return chat_reply("<answer>no idea</answer>")

    async def go(url):
        solver = LLMSolver(LLMConfig(base_url=url, model="m", api_key_env=None), tool_image_search(search))
        return await difficulty_filter([q], [world.load_image(rec["id"])], solver)

    (d,), calls = asyncio.run(with_server(reply, go))
    assert len(calls) == 2 and not d.kept and d.solved_by == "one_image_search"
    assert d.answers == {"no_tools": "no idea", "one_image_search": title}


def test_llm_solver_endpoint_down_keeps_the_question() -> None:
    solver = LLMSolver(LLMConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None, timeout_s=2))
    (d,) = asyncio.run(difficulty_filter(RECS[:1], IMGS[:1], solver, modes=("no_tools",)))
    assert d.kept and d.answers == {"no_tools": None}


def test_engine_solver_runs_the_tiny_vlm(world) -> None:
    search = next(t for t in image_search_tools(ImageSearchConfig(corpus_dir=str(world.root)))
                  if t.name == "ImageSearch")
    solver = EngineSolver(TeacherConfig(rollout=teacher_rollout(policy="sample", engine=EngineConfig(max_tokens_per_turn=8))), search)

    async def go():
        try:
            return await difficulty_filter(RECS[:2], IMGS[:2], solver)
        finally:
            await solver.close()

    res = asyncio.run(go())
    # a random-weight model cannot answer: both kept, each mode really ran
    assert [d.kept for d in res] == [True, True]
    assert all(set(d.answers) == {"no_tools", "one_image_search"} for d in res)
    assert solver.turns >= 4  # four engine runs, at least one generated turn each
