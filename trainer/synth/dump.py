"""Pages JSONL (the synthesis pipeline's graph input) and a converter from a MediaWiki XML dump.

    python -m spyglass.trainer.synth.dump enwiki-pages-articles.xml pages.jsonl   # converter
    pages = list(read_pages("pages.jsonl"))

The pages JSONL format: one JSON object per line, a superset of the offline world's docs.jsonl
(engine/offline/world.py), so a world's docs.jsonl is read as it is.

    title          str, required: the page title; links and redirects name pages by title
    id             str, optional (default: the title); links may also name pages by id
    text           str, optional: page text; links written [[Target]] or [[Target|label]]
    links          [str], optional: link targets (titles or ids); default: the [[...]] in text
    infobox        {field: str | int | float}, optional: the page's infobox fields
    infobox_links  {field: [title]}, optional: pages an infobox value links to; without it a
                   value that is exactly a page title (or a redirect to one) is a link
    type           str, optional: entity type (default: from infobox_type, else "other")
    infobox_type   str, optional: the infobox template's name, e.g. "settlement"
    aliases        [str], optional: other names (redirects to the page are added as aliases)
    images         [str] or image: str | null, optional: image files / ids shown on the page
    redirect_to    str | null, optional: this page is a redirect to that title
    categories     [str], optional
    disambiguation bool, optional: a disambiguation page (also detected from the title)
    url            str, optional

The converter reads a MediaWiki export (`<mediawiki><page><title/><ns/><redirect title=.../>
<revision><text>wikitext</text></revision></page>...`, any export schema version) with
xml.etree's iterparse (constant memory; each page is cleared once read), keeps namespace 0,
and parses wikitext with mwparserfromhell: links (File:/Image: links become images,
Category: links categories, other namespaces and interwiki prefixes are dropped), the first
{{Infobox ...}} template's `| key = value` fields (plain text; the links inside a value go to
infobox_links; image fields go to images), disambiguation templates, and plain text.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable, Iterator

import mwparserfromhell

FILE_NS = ("file", "image")
CATEGORY_NS = ("category",)
OTHER_NS = ("wikipedia", "wp", "help", "template", "portal", "user", "talk", "draft", "module",
            "special", "mediawiki", "wiktionary", "wikt", "commons", "meta", "s", "q", "n", "b",
            "v", "voy", "d", "species", "simple")
DISAMBIG_TEMPLATES = {"disambiguation", "disambig", "dab", "disamb", "hndis", "geodis",
                      "surname", "given name", "set index article", "hospital disambiguation",
                      "school disambiguation", "mountainindex", "shipindex", "sia"}
IMAGE_FIELDS = ("image", "logo", "photo", "image_name", "image_file", "picture", "flag",
                "seal", "map_image", "image_skyline", "image_map")
# coarse entity types for common infobox template names (others keep their own name)
INFOBOX_TYPES = {
    "person": "person", "officeholder": "person", "scientist": "person", "artist": "person",
    "writer": "person", "musical artist": "person", "football biography": "person",
    "sportsperson": "person", "royalty": "person", "military person": "person",
    "settlement": "place", "city": "place", "country": "place", "town": "place",
    "village": "place", "river": "place", "mountain": "place", "island": "place",
    "company": "org", "organization": "org", "organisation": "org", "university": "org",
    "school": "org", "sports team": "org", "football club": "org", "political party": "org",
    "product": "product", "automobile": "product", "software": "product", "aircraft type": "product",
    "film": "work", "book": "work", "album": "work", "song": "work", "television": "work",
    "event": "event", "military conflict": "event", "election": "event",
    "sports event": "event", "festival": "event", "building": "place", "museum": "place",
}
_LINK_RE = re.compile(r"\[\[([^\[\]|#]*)(?:#[^\[\]|]*)?(?:\|[^\[\]]*)?\]\]")


def normalize_title(title: str) -> str:
    """MediaWiki title form: underscores as spaces, whitespace collapsed, first letter upper."""
    t = " ".join(str(title).replace("_", " ").split())
    return t[:1].upper() + t[1:] if t else t


def text_links(text: str) -> list[str]:
    """Targets of the [[Target]] / [[Target|label]] links in plain text or wikitext."""
    return [m.group(1).strip() for m in _LINK_RE.finditer(text or "") if m.group(1).strip()]


def _split_ns(target: str) -> tuple[str, str]:
    """('file', 'X.jpg') for 'File:X.jpg'; ('', title) for a main-namespace title."""
    t = target.strip().lstrip(":")
    if ":" in t:
        ns, rest = t.split(":", 1)
        if ns.strip().lower() in FILE_NS + CATEGORY_NS + OTHER_NS:
            return ns.strip().lower(), rest.strip()
    return "", t


def _template_name(tpl: Any) -> str:
    return " ".join(str(tpl.name).strip().replace("_", " ").split()).lower()


def _infobox(code: Any) -> tuple[str | None, dict[str, Any], dict[str, list[str]], list[str]]:
    """(infobox type, fields, links per field, image files) of the first Infobox template."""
    for tpl in code.filter_templates(recursive=True):
        name = _template_name(tpl)
        if not name.startswith("infobox"):
            continue
        kind = name[len("infobox"):].strip() or "generic"
        fields: dict[str, Any] = {}
        links: dict[str, list[str]] = {}
        images: list[str] = []
        for p in tpl.params:
            key = " ".join(str(p.name).split()).replace(" ", "_").lower()
            if not key or key.isdigit():
                continue
            value = p.value
            if key in IMAGE_FIELDS:
                raw = value.strip_code().strip() or str(value).strip()
                for ln in value.filter_wikilinks():
                    ns, rest = _split_ns(str(ln.title))
                    if ns in FILE_NS:
                        images.append(normalize_title(rest))
                if raw and not images and not raw.startswith("{{"):
                    ns, rest = _split_ns(raw)
                    images.append(normalize_title(rest))
                continue
            targets = [normalize_title(_split_ns(str(ln.title))[1]) for ln in value.filter_wikilinks()
                       if not _split_ns(str(ln.title))[0]]
            text = " ".join(value.strip_code().split())
            if text:
                fields[key] = int(text) if re.fullmatch(r"-?\d{1,12}", text) else text
            if targets:
                links[key] = targets
        return kind, fields, links, images
    return None, {}, {}, []


def parse_wikitext(title: str, wikitext: str) -> dict[str, Any]:
    """One page record (the pages JSONL format) from a title and its wikitext."""
    code = mwparserfromhell.parse(wikitext or "")
    links: list[str] = []
    images: list[str] = []
    categories: list[str] = []
    for ln in code.filter_wikilinks():
        ns, rest = _split_ns(str(ln.title))
        rest = rest.split("#", 1)[0].strip()
        if not rest:
            continue
        if ns in FILE_NS:
            images.append(normalize_title(rest))
        elif ns in CATEGORY_NS:
            categories.append(normalize_title(rest))
        elif not ns:
            links.append(normalize_title(rest))
    kind, fields, ib_links, ib_images = _infobox(code)
    disamb = any(_template_name(t) in DISAMBIG_TEMPLATES for t in code.filter_templates())
    for t in code.filter_templates(recursive=False):  # infoboxes and navboxes are not prose
        try:
            code.remove(t)
        except ValueError:
            pass
    text = "\n\n".join(p.strip() for p in code.strip_code(normalize=True, collapse=True).split("\n\n")
                       if p.strip())
    page: dict[str, Any] = {
        "title": normalize_title(title), "text": text, "links": sorted(set(links)),
        "infobox": fields, "infobox_links": ib_links,
        "images": list(dict.fromkeys(ib_images + images)), "categories": sorted(set(categories)),
        "disambiguation": disamb or title.strip().endswith("(disambiguation)")}
    if kind is not None:
        page["infobox_type"] = kind
        page["type"] = INFOBOX_TYPES.get(kind, kind)
    return page


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_mediawiki_xml(path: str | Path) -> Iterator[dict[str, Any]]:
    """Page records from a MediaWiki XML export, namespace 0 only, redirects as redirect_to."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MediaWiki XML dump {path} does not exist")
    try:
        for _event, elem in ET.iterparse(str(path), events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(c.tag): c for c in elem}
            title = (fields["title"].text or "").strip() if "title" in fields else ""
            ns = (fields["ns"].text or "0").strip() if "ns" in fields else "0"
            text = ""
            rev = fields.get("revision")
            if rev is not None:
                for c in rev:
                    if _local(c.tag) == "text":
                        text = c.text or ""
            redirect = fields.get("redirect")
            elem.clear()
            if not title:
                raise ValueError(f"{path}: a <page> without a <title>")
            if ns != "0":
                continue
            if redirect is not None:
                target = redirect.get("title") or (text_links(text) or [""])[0]
                if not target:
                    raise ValueError(f"{path}: redirect page {title!r} names no target")
                yield {"title": normalize_title(title),
                       "redirect_to": normalize_title(target.split("#", 1)[0])}
                continue
            yield parse_wikitext(title, text)
    except ET.ParseError as e:
        raise ValueError(f"{path} is not well-formed MediaWiki XML: {e}") from None


def convert_mediawiki(xml_path: str | Path, out_jsonl: str | Path) -> int:
    """Write the pages JSONL for a MediaWiki XML dump; returns the number of pages written."""
    n = 0
    Path(out_jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(out_jsonl, "w", encoding="utf-8") as fh:
        for page in iter_mediawiki_xml(xml_path):
            fh.write(json.dumps(page, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_pages(path: str | Path) -> Iterator[dict[str, Any]]:
    """Page records from a pages JSONL (or a world's docs.jsonl); a bad line names its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pages file {path} does not exist")
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                page = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON: {e}") from None
            yield check_page(page, f"{path}:{i}")


def check_page(page: Any, where: str = "page") -> dict[str, Any]:
    """Validate one page record's shape; errors name the field and the value."""
    if not isinstance(page, dict):
        raise ValueError(f"{where}: a page must be a JSON object, got {type(page).__name__}")
    title = page.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"{where}: 'title' must be a non-empty string, got {title!r}")
    for key in ("links", "aliases", "images", "categories"):
        v = page.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ValueError(f"{where} ({title!r}): {key!r} must be a list of strings, got {v!r}")
    for key in ("infobox", "infobox_links"):
        v = page.get(key)
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{where} ({title!r}): {key!r} must be an object, got {v!r}")
    for key in ("redirect_to", "image", "type", "id", "text"):
        v = page.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where} ({title!r}): {key!r} must be a string or null, got {v!r}")
    return page


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spyglass.trainer.synth.dump",
                                 description="MediaWiki XML export -> pages JSONL")
    ap.add_argument("xml", help="MediaWiki XML export (pages-articles)")
    ap.add_argument("out", help="pages JSONL to write")
    a = ap.parse_args(list(argv) if argv is not None else None)
    n = convert_mediawiki(a.xml, a.out)
    print(f"wrote {n} pages to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
