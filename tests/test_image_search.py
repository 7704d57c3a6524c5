"""ImageSearch: local hash + ORB index over the world, embedding interface, web lens backend
against a tiny aiohttp server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from spyglass.engine.tools.base import ToolContext
from spyglass.engine.tools.imgutil import publish
from spyglass.engine.tools.image_search import (ImageSearchConfig, ImageSearchIndex,
                                                image_search_tools)
from spyglass.engine.tools.visual import visual_tools
from spyglass.engine.offline.world import ensure_world

CROP = next(t for t in visual_tools() if t.name == "Crop")


def run(tool, args, ctx):
    return asyncio.run(tool.fn(args, ctx))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(tmp_path_factory.getbasetemp() / "world-v1")


@pytest.fixture(scope="module")
def index(world):
    return ImageSearchIndex.from_dir(world.root)


@pytest.fixture(scope="module")
def tool(world, index):
    return image_search_tools(ImageSearchConfig(corpus_dir=str(world.root)), index=index)[0]


def test_index_holds_only_corpus_images(world, index):
    corpus = [r for r in world.images if r["split"] == "corpus"]
    assert len(index) == len(corpus) and not index.skipped


def test_crop_of_a_known_image_finds_its_source(world, tool):
    """A crop defeats the global hash; local features still find the page."""
    for rec in [r for r in world.images if r["split"] == "corpus"
                and r["degradation"] in ("none", "perspective", "blur")][:6]:
        ctx = ToolContext(images=[world.load_image(rec["id"])])
        x1, y1, x2, y2 = rec["regions"][0]["box"]
        crop = publish(ctx, run(CROP, {"image": "img_1", "box": [x1, y1, (x1 + x2) // 2, y2]}, ctx))
        assert crop.ok
        r = run(tool, {"image": "img_2", "top_k": 3}, ctx)
        assert r.ok, r.error
        top = r.meta["matches"][0]
        assert top["id"] == rec["id"] and top["entity"] == rec["entity"], (rec["id"], r.text)
        assert top["hash_distance"] > 8 and top["inliers"] >= 12  # found by features, not hash
        assert f"{rec['title']} — page {rec['page']}" in r.text


def test_emblem_query_without_text_finds_the_entity(world, tool):
    for rec in [r for r in world.images if r["id"].startswith("emblem-")][:3]:
        r = run(tool, {"image": "img_1"}, ToolContext(images=[world.load_image(rec["id"])]))
        assert r.ok and r.meta["matches"], rec["id"]
        assert r.meta["matches"][0]["entity"] == rec["entity"]
        assert r.meta["matches"][0]["id"] == rec["source_image"]


def test_large_corpus_over_opencvs_train_row_limit(monkeypatch):
    """More descriptors than one OpenCV train matrix may hold (2**18 rows): the vote still finds
    the entry a query's descriptors come from, and the block size does not change the ranking."""
    import imagehash
    from spyglass.engine.tools import image_search as mod
    rng = np.random.default_rng(0)
    idx, blank = ImageSearchIndex(), imagehash.hex_to_hash("0" * 16)
    for i in range(300):  # 300 x 1000 = 300,000 descriptor rows
        idx.entries.append(mod._Entry({"id": f"e{i}"}, blank, blank, np.zeros((1000, 2), np.float32),
                                      rng.integers(0, 256, (1000, 32), dtype=np.uint8)))
    query = idx.entries[271].desc[:300]
    assert idx._candidates(query)[0] == 271
    monkeypatch.setattr(mod, "MATCH_ROWS", 4096)
    idx._stack = None
    assert idx._candidates(query)[0] == 271 and len(idx._stack[0]) == 74  # ceil(300,000 / 4096) blocks


def test_match_blocks_do_not_change_results(world, index, monkeypatch):
    from spyglass.engine.tools import image_search as mod
    rec = next(r for r in world.images if r["id"].startswith("emblem-"))
    desc = index.features(world.load_image(rec["id"]))[1]
    whole = index._candidates(desc)
    monkeypatch.setattr(mod, "MATCH_ROWS", 1000)
    index._stack = None
    try:
        assert index._candidates(desc) == whole and len(index._stack[0]) > 1
    finally:
        index._stack = None


def test_exact_copy_matches_by_hash_and_box_argument(world, tool):
    rec = next(r for r in world.images if r["split"] == "corpus")
    img = world.load_image(rec["id"]).resize((320, 210))  # rescaled copy
    r = run(tool, {"image": "img_1", "top_k": 1}, ToolContext(images=[img]))
    assert r.meta["matches"][0]["id"] == rec["id"] and r.meta["matches"][0]["hash_distance"] <= 8
    big = Image.new("RGB", (900, 300), "white")
    big.paste(img, (500, 50))
    r = run(tool, {"image": "img_1", "box": [500, 50, 820, 260]}, ToolContext(images=[big]))
    assert r.meta["matches"][0]["id"] == rec["id"] and "region [500, 50, 820, 260]" in r.text


def test_unrelated_image_is_no_match(tool):
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    r = run(tool, {"image": "img_1"}, ToolContext(images=[noise]))
    assert r.ok and r.meta["matches"] == [] and "no match" in r.text


def test_bad_inputs(tool):
    ctx = ToolContext(images=[Image.new("RGB", (30, 20))])
    for args, needle in [({"image": "img_2"}, "img_2"), ({"image": "img_1", "top_k": 0}, "top_k=0"),
                         ({"image": "img_1", "top_k": 500}, "top_k=500"),
                         ({"image": "img_1", "box": [40, 0, 50, 5]}, "30x20"),
                         ({"image": "img_1", "query": "x"}, "query")]:
        r = run(tool, args, ctx)
        assert r.error.kind.value == "bad_args" and needle in r.error.message, (args, r.error)


def test_corrupt_corpus_files_are_skipped(world, tmp_path):
    rows = [r for r in world.images if r["split"] == "corpus"][:3]
    (tmp_path / "images").mkdir()
    for r in rows:
        shutil.copy(world.root / r["file"], tmp_path / r["file"])
    (tmp_path / rows[1]["file"]).write_bytes((world.root / rows[1]["file"]).read_bytes()[:200])
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx = ImageSearchIndex.from_dir(tmp_path)
    assert len(idx) == 2 and len(idx.skipped) == 1 and rows[1]["file"] in idx.skipped[0][0]
    with pytest.raises(FileNotFoundError, match="images.jsonl"):
        ImageSearchIndex.from_dir(tmp_path / "images")


class _TinyEmbedder:
    """A stand-in encoder: 16x16 grey thumbnail, mean-removed (tests the embedding path)."""

    def embed(self, images):
        out = [np.asarray(im.convert("L").resize((16, 16)), np.float32).ravel() for im in images]
        return np.stack([v - v.mean() for v in out])  # [N, 256]


def test_embedding_interface(world):
    cfg = ImageSearchConfig(use_embedding=True, embedding_min_cosine=0.95)
    idx = ImageSearchIndex(cfg)
    recs = [r for r in world.images if r["split"] == "corpus"][:4]
    for r in recs:
        idx.add(world.load_image(r["id"]), r)
    with pytest.raises(Exception, match="embedding_model"):
        idx.search(world.load_image(recs[0]["id"]), 3)
    idx = ImageSearchIndex(cfg, embedder=_TinyEmbedder())
    for r in recs:
        idx.add(world.load_image(r["id"]), r)
    hits = idx.search(world.load_image(recs[2]["id"]), 3)
    assert hits[0]["id"] == recs[2]["id"] and hits[0]["cosine"] > 0.99
    assert any("embedding cosine" in e for e in hits[0]["evidence"])
    t = image_search_tools(ImageSearchConfig(use_embedding=True, corpus_dir=str(world.root)))[0]
    r = run(t, {"image": "img_1"}, ToolContext(images=[world.load_image(recs[0]["id"])]))
    assert r.error.kind.value == "fatal" and "embedding_model" in r.error.message


# ------------------------------------------------------------------------------------ web lens

async def _with_server(handler_state: dict, body):
    async def upload(request: web.Request) -> web.Response:
        data = await request.post()
        handler_state["uploaded"] = len(data["file"].file.read())
        return web.Response(text=f"http://127.0.0.1/files/{handler_state['uploaded']}.png\n")

    async def lens(request: web.Request) -> web.Response:
        handler_state["key"] = request.headers.get("X-API-KEY")
        handler_state["payload"] = await request.json()
        status = handler_state.get("status", 200)
        if status != 200:
            return web.Response(status=status, text="nope")
        return web.json_response({"organic": [
            {"title": "Nurk Optics storefront", "link": "https://example.org/nurk",
             "source": "example.org", "imageUrl": "https://example.org/nurk.png"},
            {"title": "Second", "link": "https://example.org/2", "source": "example.org"}]})

    app = web.Application()
    app.router.add_post("/upload", upload)
    app.router.add_post("/lens", lens)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_web_lens_backend(monkeypatch):
    img = Image.new("RGB", (40, 30), "navy")
    state: dict = {}

    async def body(base: str):
        cfg = ImageSearchConfig(backend="web", web_endpoint=f"{base}/lens",
                                web_upload_url=f"{base}/upload", web_timeout_s=5)
        t = image_search_tools(cfg)[0]
        monkeypatch.delenv("SERPER_API_KEY", raising=False)
        out = {"nokey": await t.fn({"image": "img_1"}, ToolContext(images=[img]))}
        monkeypatch.setenv("SERPER_API_KEY", "k-123")
        out["ok"] = await t.fn({"image": "img_1", "top_k": 1}, ToolContext(images=[img]))
        out["batch"] = await t.batch_fn([({"image": "img_1"}, ToolContext(images=[img]))] * 2)
        state["status"] = 503
        out["503"] = await t.fn({"image": "img_1"}, ToolContext(images=[img]))
        state["status"] = 401
        out["401"] = await t.fn({"image": "img_1"}, ToolContext(images=[img]))
        state["status"] = 200
        hosted = img.copy()
        hosted.info["url"] = "https://host/pic.png"
        state.pop("uploaded", None)
        out["hosted"] = await t.fn({"image": "img_1"}, ToolContext(images=[hosted]))
        noup = image_search_tools(ImageSearchConfig(backend="web", web_endpoint=f"{base}/lens"))[0]
        out["noupload"] = await noup.fn({"image": "img_1"}, ToolContext(images=[img]))
        down = image_search_tools(ImageSearchConfig(backend="web", web_endpoint="http://127.0.0.1:9/lens",
                                                    web_timeout_s=2))[0]
        out["down"] = await down.fn({"image": "img_1"}, ToolContext(images=[hosted]))
        return out

    out = asyncio.run(_with_server(state, body))
    assert out["nokey"].error.kind.value == "fatal" and "SERPER_API_KEY" in out["nokey"].error.message
    ok = out["ok"]
    assert ok.ok and ok.meta["matches"] == [{"title": "Nurk Optics storefront", "page": "https://example.org/nurk",
                                             "source": "example.org", "image_url": "https://example.org/nurk.png"}]
    assert "Nurk Optics storefront — https://example.org/nurk" in ok.text
    assert all(r.ok and len(r.meta["matches"]) == 2 for r in out["batch"])
    assert out["503"].error.kind.value == "transient" and "503" in out["503"].error.message
    assert out["401"].error.kind.value == "fatal" and "API key" in out["401"].error.message
    assert out["hosted"].ok and "uploaded" not in state
    assert state["key"] == "k-123" and state["payload"]["url"] == "https://host/pic.png"
    assert out["noupload"].error.kind.value == "fatal" and "web_upload_url" in out["noupload"].error.message
    assert out["down"].error.kind.value == "transient"


@pytest.mark.parametrize("kw,needle", [({"backend": "bing"}, "bing"), ({"ratio": 1.0}, "ratio"),
                                       ({"default_top_k": 50}, "default_top_k"),
                                       ({"web_endpoint": "ftp://x"}, "ftp://x"),
                                       ({"min_inliers": 2}, "min_inliers")])
def test_config_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ImageSearchConfig(**kw)
