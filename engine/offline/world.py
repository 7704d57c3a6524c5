"""The offline world: a deterministic small encyclopedia of invented entities, images of their
signs and labels, and multi-hop visual questions over them. Tools and tests run against it with
no network.

    python -m spyglass.engine.offline.world --out /tmp/world --seed 0      # writes the files below
    world = ensure_world()     # generate once into $SPYGLASS_WORLD or ~/.cache/spyglass/world-v1
    world = load_world(dir)    # read an existing one

Files (the contract TextSearch / Visit / ImageSearch read):
  docs.jsonl     one document per line:
                   id        "org-007" (type-index; types person, place, org, product, event)
                   title     the entity's name; also how other docs link to it
                   url       "corpus://<id>" (what Visit opens)
                   type      entity type
                   aliases   other names (list of str)
                   text      paragraphs separated by blank lines; links written [[Title]]
                   links     ids of the docs linked from text/infobox (sorted, unique)
                   infobox   {field: value}; a value naming another entity is its title
                   image     image id shown on the page, or null
  images.jsonl   one image per line: id, file (relative to the world dir), entity (doc id or
                 null), title, page (url or null), text (rendered lines), degradation (none |
                 perspective | blur | lowres), split ("corpus": indexed by ImageSearch; "query":
                 question-only: street scenes and emblem crops), regions ([{box [x1,y1,x2,y2] in
                 pixels, entity, text}] of the boards drawn), width, height
  questions.jsonl  id, question, image (image id), answer, aliases, hops ([{action, ...}]: what
                 a solver must do: crop, perspective, sharpen, super_resolution, ocr,
                 image_search, visit), kind
  manifest.json  version, seed, counts, sha256 of the three JSONL files

Generation is seeded (random.Random + numpy Generator): the same seed gives byte-identical
files. Text is drawn with the DejaVu fonts that matplotlib ships. Default size: 300 documents,
about 70 images, about 40 questions, a few MB, a few seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .render import RenderKit

VERSION = "world-v1"
TYPES = ("person", "place", "org", "product", "event")

_ONSET = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "pr",
          "r", "s", "st", "t", "tr", "v", "z", "j", "sh"]
_VOWEL = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou"]
_CODA = ["", "", "n", "r", "l", "s", "nd", "rk", "sk", "m", "x", "v", "th"]
_OCCUPATIONS = ["engineer", "painter", "botanist", "architect", "cartographer", "violinist",
                "chemist", "novelist", "glassblower", "astronomer", "shipwright", "economist"]
_INDUSTRIES = ["optics", "shipping", "textiles", "publishing", "clockmaking", "aviation",
               "ceramics", "telegraphy", "brewing", "instruments"]
_ORG_FORMS = ["{w} Dynamics", "{s} & Sons", "{p} Institute", "{w} Works", "{w} Trading Company",
              "{w} Optics", "{s} Foundry", "{w} Press"]
_PRODUCT_NOUNS = ["Lantern", "Kettle", "Camera", "Bicycle", "Radio", "Typewriter", "Compass",
                  "Telescope", "Loom", "Barometer"]
_EVENT_KINDS = ["Lantern Festival", "Marathon", "Chess Open", "Film Week", "Regatta",
                "Book Fair"]
_PLACE_KINDS = ["city", "town", "village", "harbour town"]
_PLACE_PREFIX = ["Port", "Upper", "New", "Saint", "Lake"]
_REGIONS = ["Ostmark Vale", "the Teller Coast", "High Varn", "the Sallow Plains", "Korrin Fells"]


@dataclass
class WorldConfig:
    """Sizes of the generated world (validated)."""

    seed: int = 0
    n_people: int = 90
    n_places: int = 60
    n_orgs: int = 60
    n_products: int = 50
    n_events: int = 40
    n_sign_images: int = 48      # entity images (split "corpus"), degradations cycle over them
    n_scenes: int = 8            # street scenes with three small signs (crop questions)
    n_emblem_queries: int = 10   # emblem crops without text (image-search questions)
    width: int = 640
    height: int = 420

    def __post_init__(self) -> None:
        for k in ("n_people", "n_places", "n_orgs", "n_products", "n_events"):
            v = getattr(self, k)
            if not isinstance(v, int) or not 6 <= v <= 5000:
                raise ValueError(f"WorldConfig.{k} must be an int in [6, 5000], got {v!r}")
        if not 4 <= self.n_sign_images <= min(self.n_orgs, self.n_places) * 2:
            raise ValueError(f"WorldConfig.n_sign_images={self.n_sign_images!r} must be in "
                             f"[4, {min(self.n_orgs, self.n_places) * 2}]")
        if not 0 <= self.n_scenes <= self.n_orgs // 3:
            raise ValueError(f"WorldConfig.n_scenes={self.n_scenes!r} must be in [0, n_orgs/3]")
        if not 0 <= self.n_emblem_queries <= self.n_sign_images:
            raise ValueError(f"WorldConfig.n_emblem_queries={self.n_emblem_queries!r} must be "
                             f"in [0, n_sign_images={self.n_sign_images}]")
        if not (320 <= self.width <= 2048 and 240 <= self.height <= 2048):
            raise ValueError(f"WorldConfig width/height {self.width}x{self.height} out of "
                             "[320..2048]x[240..2048]")


@dataclass
class World:
    """A loaded world: its directory and the three record lists."""

    root: Path
    docs: list[dict[str, Any]]
    images: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._docs = {d["id"]: d for d in self.docs}
        self._images = {i["id"]: i for i in self.images}

    def doc(self, doc_id: str) -> dict[str, Any]:
        try:
            return self._docs[doc_id]
        except KeyError:
            raise KeyError(f"no document {doc_id!r} in the world at {self.root}") from None

    def image_record(self, image_id: str) -> dict[str, Any]:
        try:
            return self._images[image_id]
        except KeyError:
            raise KeyError(f"no image {image_id!r} in the world at {self.root}") from None

    def image_path(self, image_id: str) -> Path:
        return self.root / self.image_record(image_id)["file"]

    def load_image(self, image_id: str) -> Image.Image:
        with Image.open(self.image_path(image_id)) as im:
            return im.convert("RGB")


# ------------------------------------------------------------------------------------ entities

class _Namer:
    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def word(self, lo: int = 2, hi: int = 3) -> str:
        r = self.rng
        s = "".join(r.choice(_ONSET) + r.choice(_VOWEL) + r.choice(_CODA)
                    for _ in range(r.randint(lo, hi)))
        return s[:11].capitalize()

    def unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            if name.lower() not in self.used and 4 <= len(name) <= 30:
                self.used.add(name.lower())
                return name
        raise RuntimeError("could not draw a unique name in 1000 tries")


def _entities(cfg: WorldConfig, rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    nm = _Namer(rng)
    ents: dict[str, list[dict[str, Any]]] = {t: [] for t in TYPES}

    def add(t: str, title: str, aliases: list[str]) -> dict[str, Any]:
        e = {"id": f"{t}-{len(ents[t]):03d}", "type": t, "title": title, "aliases": aliases,
             "facts": {}}
        ents[t].append(e)
        return e

    for _ in range(cfg.n_people):
        first = nm.word(2, 2)
        title = nm.unique(lambda: f"{first} {nm.word(2, 3)}")
        add("person", title, [f"{title[0]}. {title.split()[1]}"])
    for _ in range(cfg.n_places):
        title = nm.unique(lambda: (rng.choice(_PLACE_PREFIX) + " " if rng.random() < 0.25 else "")
                          + nm.word(2, 3))
        add("place", title, [f"{title} {rng.choice(['City', 'Township', 'Municipality'])}"])
    for _ in range(cfg.n_orgs):
        title = nm.unique(lambda: rng.choice(_ORG_FORMS).format(
            w=nm.word(2, 3), s=nm.word(2, 2), p=rng.choice(ents["place"])["title"]))
        acro = "".join(w[0] for w in title.replace("&", "").split()).upper()
        add("org", title, [acro] if len(acro) >= 2 else [])
    for _ in range(cfg.n_products):
        title = nm.unique(lambda: f"{nm.word(2, 2)} {rng.choice(_PRODUCT_NOUNS)} "
                          f"{rng.choice([100, 200, 300, 500, 700, 900])}")
        add("product", title, [title.rsplit(" ", 1)[0]])
    for _ in range(cfg.n_events):
        year = rng.randint(1950, 2020)
        title = nm.unique(lambda: f"{rng.choice(ents['place'])['title']} "
                          f"{rng.choice(_EVENT_KINDS)} {year}")
        add("event", title, [title.rsplit(" ", 1)[0] + f" of {year}"])
    _link_facts(ents, rng)
    return ents


# The infobox fields _link_facts writes, by entity kind (the synthesis pipeline's relations and
# the warm-up / copy curriculum's keys are these names).
FACT_FIELDS = {"person": ("born", "birthplace", "occupation", "employer"),
               "place": ("kind", "region", "founded", "population", "mayor"),
               "org": ("founded", "founder", "headquarters", "industry"),
               "product": ("maker", "released", "designer", "category"),
               "event": ("year", "location", "organiser", "guest_of_honour")}
ENTITY_KINDS = tuple(FACT_FIELDS)


def _link_facts(ents: dict[str, list[dict[str, Any]]], rng: random.Random) -> None:
    """Infobox facts; entity-valued facts hold the target's id (titles substituted on output)."""
    P, L, O = ents["person"], ents["place"], ents["org"]
    for p in P:
        p["facts"] = {"born": rng.randint(1880, 1995), "birthplace": rng.choice(L)["id"],
                      "occupation": rng.choice(_OCCUPATIONS), "employer": rng.choice(O)["id"]}
    for pl in L:
        pl["facts"] = {"kind": rng.choice(_PLACE_KINDS), "region": rng.choice(_REGIONS),
                       "founded": rng.randint(1100, 1900),
                       "population": rng.randint(800, 900_000), "mayor": rng.choice(P)["id"]}
    for o in O:
        o["facts"] = {"founded": rng.randint(1850, 2010), "founder": rng.choice(P)["id"],
                      "headquarters": rng.choice(L)["id"], "industry": rng.choice(_INDUSTRIES)}
    for pr in ents["product"]:
        pr["facts"] = {"maker": rng.choice(O)["id"], "released": rng.randint(1900, 2020),
                       "designer": rng.choice(P)["id"],
                       "category": pr["title"].split()[1].lower()}
    for ev in ents["event"]:
        ev["facts"] = {"year": int(ev["title"].rsplit(" ", 1)[1]),
                       "location": next(x["id"] for x in L if ev["title"].startswith(x["title"] + " ")),
                       "organiser": rng.choice(O)["id"], "guest_of_honour": rng.choice(P)["id"]}


def _doc_text(e: dict[str, Any], t: dict[str, str], rng: random.Random) -> str:
    """Paragraphs for an entity; `t` maps ids to [[Title]] link strings."""
    f = e["facts"]
    name = e["title"]
    if e["type"] == "person":
        paras = [f"{name} (born {f['born']}) is a {f['occupation']} from {t[f['birthplace']]}.",
                 f"{name.split()[0]} joined {t[f['employer']]} early in their career and "
                 f"became known as a {f['occupation']} and for public lectures."]
    elif e["type"] == "place":
        paras = [f"{name} is a {f['kind']} in {f['region']}, founded in {f['founded']}. "
                 f"It has a population of {f['population']:,}.",
                 f"The current mayor of {name} is {t[f['mayor']]}."]
    elif e["type"] == "org":
        paras = [f"{name} is a {f['industry']} organisation founded in {f['founded']} by "
                 f"{t[f['founder']]}.",
                 f"Its headquarters are in {t[f['headquarters']]}, where it keeps a small "
                 f"museum of its early {f['industry']} work."]
    elif e["type"] == "product":
        paras = [f"The {name} is a {f['category']} made by {t[f['maker']]} and first "
                 f"released in {f['released']}.",
                 f"It was designed by {t[f['designer']]}."]
    else:
        paras = [f"The {name} took place in {t[f['location']]} in {f['year']}, organised by "
                 f"{t[f['organiser']]}.",
                 f"The guest of honour was {t[f['guest_of_honour']]}."]
    filler = rng.choice(["Little else is recorded in the archives.",
                         "Local newspapers covered it at length.",
                         "Several letters about it survive in private collections.",
                         "It is mentioned in most regional guidebooks."])
    return "\n\n".join(paras + [filler])


def _docs(ents: dict[str, list[dict[str, Any]]], rng: random.Random) -> list[dict[str, Any]]:
    by_id = {e["id"]: e for es in ents.values() for e in es}
    links = {i: f"[[{e['title']}]]" for i, e in by_id.items()}
    docs = []
    for t in TYPES:
        for e in ents[t]:
            linked = sorted({v for v in e["facts"].values() if isinstance(v, str) and v in by_id})
            infobox = {k: (by_id[v]["title"] if isinstance(v, str) and v in by_id else v)
                       for k, v in e["facts"].items()}
            docs.append({"id": e["id"], "title": e["title"], "url": f"corpus://{e['id']}",
                         "type": t, "aliases": e["aliases"], "text": _doc_text(e, links, rng),
                         "links": linked, "infobox": infobox, "image": e.get("image")})
    return docs


# -------------------------------------------------------------------------------------- images

_DEGRADATIONS = ("none", "perspective", "blur", "lowres")
_SIGN_KINDS = (("org", 0.34), ("place", 0.22), ("product", 0.2), ("event", 0.14), ("person", 0.1))


def _sign_lines(e: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    f = e["facts"]
    if e["type"] == "org":
        return "shop", [e["title"], f"Est. {f['founded']}"]
    if e["type"] == "place":
        return "road", [f"Welcome to {e['title']}", f"Founded {f['founded']}"]
    if e["type"] == "product":
        return "label", [e["title"], f"by {by_id[f['maker']]['title']}"]
    if e["type"] == "event":
        return "banner", [e["title"]]
    return "plaque", [e["title"], f["occupation"].capitalize()]


def _make_images(cfg: WorldConfig, ents: dict[str, list[dict[str, Any]]], rng: random.Random,
                 out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Render corpus signs, scenes and emblem queries; returns (records, question seeds)."""
    kit = RenderKit(np.random.default_rng(cfg.seed), cfg.width, cfg.height, cfg.seed)
    by_id = {e["id"]: e for es in ents.values() for e in es}
    (out / "images").mkdir(parents=True, exist_ok=True)
    pools = {t: rng.sample(ents[t], len(ents[t])) for t in TYPES}
    records: list[dict[str, Any]] = []
    n = 0
    while n < cfg.n_sign_images:
        for t, frac in _SIGN_KINDS:
            if n >= cfg.n_sign_images:
                break
            if not pools[t] or rng.random() > frac * 2.5:
                continue
            e = pools[t].pop()
            style, lines = _sign_lines(e, by_id)
            deg = _DEGRADATIONS[n % len(_DEGRADATIONS)]
            img, regions = kit.sign_image(style, lines, e["id"], deg)
            iid = f"img-{n:03d}"
            e["image"] = iid
            records.append(_save(out, iid, img, e, lines, deg, "corpus", regions))
            n += 1
    orgs_free = [o for o in pools["org"]]
    for s in range(cfg.n_scenes):
        if len(orgs_free) < 3:
            break
        trio = [orgs_free.pop() for _ in range(3)]
        boards = [(o["id"], [o["title"]]) for o in trio]
        img, regions = kit.scene_image(boards)
        iid = f"scene-{s:03d}"
        text = [r["text"][0] for r in regions]
        records.append(_save(out, iid, img, None, text, "none", "query", regions))
    signs = [r for r in records if r["split"] == "corpus"]
    sharp = [r for r in signs if r["degradation"] == "none"]  # emblems seen frontally, sharp
    for q, src in enumerate(rng.sample(sharp, min(cfg.n_emblem_queries, len(sharp)))):
        img = kit.emblem_query(src["entity"], scale=0.7 + 0.6 * rng.random())
        iid = f"emblem-{q:03d}"
        rec = _save(out, iid, img, by_id[src["entity"]], [], "none", "query", [])
        rec["source_image"] = src["id"]
        records.append(rec)
    return records, signs


def _save(out: Path, iid: str, img: Image.Image, e: dict[str, Any] | None, text: list[str],
          deg: str, split: str, regions: list[dict[str, Any]]) -> dict[str, Any]:
    rel = f"images/{iid}.png"
    img.save(out / rel, format="PNG", optimize=False, compress_level=6)
    return {"id": iid, "file": rel, "entity": e["id"] if e else None,
            "title": e["title"] if e else None, "page": f"corpus://{e['id']}" if e else None,
            "text": text, "degradation": deg, "split": split, "regions": regions,
            "width": img.size[0], "height": img.size[1]}


# ----------------------------------------------------------------------------------- questions

def _ask(by_id: dict[str, dict[str, Any]], e: dict[str, Any], img: dict[str, Any],
         see: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    """A 2- or 3-hop question from entity `e` shown in `img` (after the visual hops `see`)."""
    f = e["facts"]
    chains = {"org": [("founder", "birthplace", "In which place was the founder of the "
                                                "organisation shown in the image born?"),
                      ("headquarters", "mayor", "Who is the mayor of the place where the "
                                                "organisation shown in the image has its headquarters?")],
              "place": [("mayor", "employer", "The mayor of the place shown in the image works "
                                              "for which organisation?")],
              "product": [("maker", "headquarters", "In which place does the maker of the "
                                                    "product shown in the image have its headquarters?")],
              "event": [("organiser", "founder", "Who founded the organisation that organised "
                                                 "the event shown in the image?")],
              "person": [("employer", "founded", "In which year was the employer of the person "
                                                 "shown in the image founded?")]}
    f1, f2, question = rng.choice(chains[e["type"]])
    mid = by_id[f[f1]]
    last = mid["facts"][f2]
    if isinstance(last, str) and last in by_id:
        answer, aliases = by_id[last]["title"], list(by_id[last]["aliases"])
    else:
        answer, aliases = str(last), []
    hops = see + [{"action": "visit", "doc": e["id"], "field": f1, "value": mid["title"]},
                  {"action": "visit", "doc": mid["id"], "field": f2, "value": answer}]
    return {"question": question, "image": img["id"], "answer": answer, "aliases": aliases,
            "hops": hops}


def _visual_hops(rec: dict[str, Any]) -> list[dict[str, Any]]:
    fix = {"perspective": [{"action": "perspective"}], "blur": [{"action": "sharpen"}],
           "lowres": [{"action": "super_resolution"}], "none": []}[rec["degradation"]]
    return fix + [{"action": "ocr", "value": rec["text"][0]}]


def _questions(ents: dict[str, list[dict[str, Any]]], records: list[dict[str, Any]],
               rng: random.Random) -> list[dict[str, Any]]:
    by_id = {e["id"]: e for es in ents.values() for e in es}
    qs = []
    for rec in records:
        if rec["split"] == "corpus" and rng.random() < 0.5:
            q = _ask(by_id, by_id[rec["entity"]], rec, _visual_hops(rec), rng)
            q["kind"] = f"sign-{rec['degradation']}"
        elif rec["id"].startswith("scene-"):
            side = rng.choice([("leftmost", 0), ("middle", 1), ("rightmost", 2)])
            reg = rec["regions"][side[1]]
            see = [{"action": "crop", "box": reg["box"]}, {"action": "ocr", "value": reg["text"][0]}]
            q = _ask(by_id, by_id[reg["entity"]], rec, see, rng)
            q["question"] = q["question"].replace("shown in the image",
                                                  f"on the {side[0]} sign in the image")
            q["kind"] = "scene-crop"
        elif rec["id"].startswith("emblem-"):
            see = [{"action": "image_search", "value": rec["source_image"]}]
            q = _ask(by_id, by_id[rec["entity"]], rec, see, rng)
            q["question"] = q["question"].replace("shown in the image",
                                                  "whose emblem is shown in the image")
            q["kind"] = "emblem-search"
        else:
            continue
        q["id"] = f"q-{len(qs):03d}"
        qs.append({k: q[k] for k in ("id", "question", "image", "answer", "aliases", "hops", "kind")})
    return qs


# --------------------------------------------------------------------------------- top level

def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path.write_text(data, encoding="utf-8")
    return hashlib.sha256(data.encode()).hexdigest()


def generate_world(out: str | Path, cfg: WorldConfig | None = None) -> World:
    """Generate the world into `out` (created; existing world files are overwritten)."""
    cfg = cfg or WorldConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    ents = _entities(cfg, rng)
    records, _ = _make_images(cfg, ents, rng, out)
    docs = _docs(ents, rng)
    questions = _questions(ents, records, rng)
    manifest = {"version": VERSION, "seed": cfg.seed, "config": asdict(cfg),
                "counts": {"docs": len(docs), "images": len(records), "questions": len(questions)},
                "sha256": {"docs.jsonl": _write_jsonl(out / "docs.jsonl", docs),
                           "images.jsonl": _write_jsonl(out / "images.jsonl", records),
                           "questions.jsonl": _write_jsonl(out / "questions.jsonl", questions)}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return World(out, docs, records, questions, manifest)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_world(root: str | Path) -> World:
    """Read a generated world; a missing or partial world is a FileNotFoundError naming it."""
    root = Path(root)
    need = ["manifest.json", "docs.jsonl", "images.jsonl", "questions.jsonl"]
    missing = [n for n in need if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a spyglass world: missing {missing} "
                                "(generate one with `python -m spyglass.engine.offline.world --out DIR`)")
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest.get("version") != VERSION:
        raise ValueError(f"{root}: world version {manifest.get('version')!r}, expected {VERSION!r}")
    return World(root, _read_jsonl(root / "docs.jsonl"), _read_jsonl(root / "images.jsonl"),
                 _read_jsonl(root / "questions.jsonl"), manifest)


def default_world_dir() -> Path:
    env = os.environ.get("SPYGLASS_WORLD")
    return Path(env) if env else Path.home() / ".cache" / "spyglass" / VERSION


def ensure_world(cache_dir: str | Path | None = None, cfg: WorldConfig | None = None) -> World:
    """Load the world in `cache_dir` (default $SPYGLASS_WORLD or ~/.cache/spyglass/world-v1),
    generating it there first if absent. Generation goes to a temporary sibling directory that
    is renamed into place, so concurrent callers never see a partial world."""
    root = Path(cache_dir) if cache_dir is not None else default_world_dir()
    cfg = cfg or WorldConfig()
    if (root / "manifest.json").is_file():
        world = load_world(root)
        if world.manifest.get("config") == asdict(cfg):
            return world
        raise ValueError(f"the world at {root} was generated with a different config "
                         f"(seed {world.manifest.get('seed')}); use another directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_world(tmp, cfg)
        try:
            tmp.rename(root)
        except OSError:  # someone else finished first (or root exists and is empty)
            if not (root / "manifest.json").is_file():
                if root.exists() and not any(root.iterdir()):
                    root.rmdir()
                    tmp.rename(root)
                else:
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_world(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spyglass.engine.offline.world", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory to write the world into")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    w = generate_world(a.out, WorldConfig(seed=a.seed))
    size = sum(p.stat().st_size for p in Path(a.out).rglob("*") if p.is_file())
    print(f"wrote {w.manifest['counts']} to {a.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
