"""Synthesis input: the MediaWiki XML converter and the link graph (redirects, exclusions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spyglass.engine.offline.world import WorldConfig, generate_world
from spyglass.trainer.synth.dump import convert_mediawiki, main as dump_main, parse_wikitext, read_pages
from spyglass.trainer.synth.graph import GraphConfig, build_graph

XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo><sitename>Testwiki</sitename></siteinfo>
  <page><title>Alice Smith</title><ns>0</ns><id>1</id><revision><id>11</id><text xml:space="preserve">
{{Infobox person
| name = Alice Smith
| image = Alice portrait.jpg
| birth_place = [[Springfield]], Testland
| employer = [[Acme Co|Acme]]
| born = 1950
| occupation = chemist
}}
'''Alice Smith''' is a chemist from [[Springfield]] who worked for [[Acme Corp]].
She lived on [[Earth]]. [[File:Alice at work.png|thumb|Alice at work]]
[[Category:Chemists]]
</text></revision></page>
  <page><title>Acme Corporation</title><ns>0</ns><id>2</id><revision><id>12</id><text>{{Infobox company
| logo = [[File:Acme logo.png|100px]]
| founder = [[Bob Jones]]
| headquarters = [[Springfield]]
| founded = 1901
| industry = [[Anvils]] and rockets
}}
'''Acme Corporation''' makes anvils. See [[Loop A]] and [[Earth]] and [[Talk:Acme]].</text></revision></page>
  <page><title>Acme Corp</title><ns>0</ns><id>3</id><redirect title="Acme Corporation" /><revision><text>#REDIRECT [[Acme Corporation]]</text></revision></page>
  <page><title>Acme Co</title><ns>0</ns><id>4</id><redirect title="Acme Corp" /><revision><text>#REDIRECT [[Acme Corp]]</text></revision></page>
  <page><title>Loop A</title><ns>0</ns><id>5</id><redirect title="Loop B" /><revision><text>#REDIRECT [[Loop B]]</text></revision></page>
  <page><title>Loop B</title><ns>0</ns><id>6</id><redirect title="Loop A" /><revision><text>#REDIRECT [[Loop A]]</text></revision></page>
  <page><title>Springfield</title><ns>0</ns><id>7</id><revision><text>{{Infobox settlement
| mayor = [[Bob Jones]]
| population = 30000
| image_skyline = Springfield skyline.jpg
}}
'''Springfield''' is a town on [[Earth]].</text></revision></page>
  <page><title>Bob Jones</title><ns>0</ns><id>8</id><revision><text>{{Infobox person
| birth_place = [[Springfield]]
| born = 1920
}}
'''Bob Jones''' founded [[Acme Corporation]] on [[Earth]].</text></revision></page>
  <page><title>Earth</title><ns>0</ns><id>9</id><revision><text>'''Earth''' is a planet.</text></revision></page>
  <page><title>Springfield (disambiguation)</title><ns>0</ns><id>10</id><revision><text>'''Springfield''' may refer to [[Springfield]]. {{disambiguation}}</text></revision></page>
  <page><title>Mercury</title><ns>0</ns><id>11</id><revision><text>'''Mercury''' may be [[Earth]] or [[Springfield]]. {{dab}}</text></revision></page>
  <page><title>List of companies</title><ns>0</ns><id>12</id><revision><text>* [[Acme Corporation]]</text></revision></page>
  <page><title>Talk:Acme</title><ns>1</ns><id>13</id><revision><text>Talk about [[Earth]].</text></revision></page>
  <page><title>Anvils</title><ns>0</ns><id>14</id><revision><text>Anvils are heavy.</text></revision></page>
</mediawiki>
"""


@pytest.fixture()
def pages_path(tmp_path: Path) -> Path:
    xml = tmp_path / "dump.xml"
    xml.write_text(XML, encoding="utf-8")
    out = tmp_path / "pages.jsonl"
    assert dump_main([str(xml), str(out)]) == 0
    return out


def _pages(path: Path) -> dict[str, dict]:
    return {p["title"]: p for p in read_pages(path)}


def test_converter_extracts_links_infobox_images(pages_path: Path) -> None:
    pages = _pages(pages_path)
    assert "Talk:Acme" not in pages and len(pages) == 13  # namespace 1 skipped
    alice = pages["Alice Smith"]
    assert alice["type"] == "person" and alice["infobox_type"] == "person"
    assert alice["infobox"]["born"] == 1950 and alice["infobox"]["occupation"] == "chemist"
    assert alice["infobox"]["birth_place"] == "Springfield, Testland"
    assert alice["infobox_links"] == {"birth_place": ["Springfield"], "employer": ["Acme Co"]}
    assert alice["images"] == ["Alice portrait.jpg", "Alice at work.png"]
    assert alice["categories"] == ["Chemists"]
    assert set(alice["links"]) == {"Springfield", "Acme Co", "Acme Corp", "Earth"}
    assert "Infobox" not in alice["text"] and "Alice Smith is a chemist" in alice["text"]
    acme = pages["Acme Corporation"]
    assert acme["type"] == "org" and acme["images"] == ["Acme logo.png"]
    assert "Talk:Acme" not in acme["links"] and acme["infobox_links"]["industry"] == ["Anvils"]
    assert pages["Acme Co"] == {"title": "Acme Co", "redirect_to": "Acme Corp"}
    assert pages["Springfield (disambiguation)"]["disambiguation"]
    assert pages["Mercury"]["disambiguation"] and not alice["disambiguation"]


def test_graph_resolves_redirects_and_excludes(pages_path: Path) -> None:
    g = build_graph(pages_path, GraphConfig(hub_in_degree=3))
    assert g.excluded == {"Springfield (disambiguation)": "disambiguation", "Mercury": "disambiguation",
                          "List of companies": "list", "Loop A": "redirect_cycle",
                          "Loop B": "redirect_cycle", "Earth": "hub"}
    assert set(g.nodes) == {"Alice Smith", "Acme Corporation", "Springfield", "Bob Jones", "Anvils"}
    # Acme Co -> Acme Corp -> Acme Corporation: the chain resolves; redirects become aliases
    assert g.targets("Alice Smith", "employer") == ["Acme Corporation"]
    assert set(g.node("Acme Corporation").aliases) == {"Acme Corp", "Acme Co"}
    assert g.targets("Alice Smith", "birth_place") == ["Springfield"]
    assert g.literals["Alice Smith"] == {"born": 1950, "occupation": "chemist"}
    assert g.literals["Springfield"] == {"population": 30000}
    assert g.node("Springfield").images == ["Springfield skyline.jpg"]
    # in-degree counts distinct linking pages after redirects (Alice links Acme Corp -> Acme Corporation)
    assert g.in_degree["Acme Corporation"] == 2 and g.in_degree["Springfield"] == 3
    assert g.stats()["excluded"] == {"disambiguation": 2, "hub": 1, "list": 1, "redirect_cycle": 2}
    # a higher hub threshold keeps Earth (in-degree 4 from content pages)
    assert "Earth" in build_graph(pages_path, GraphConfig(hub_in_degree=10_000)).nodes


def test_world_docs_are_a_graph(tmp_path: Path) -> None:
    w = generate_world(tmp_path / "w", WorldConfig(n_people=8, n_places=8, n_orgs=8, n_products=6,
                                                   n_events=6, n_sign_images=6, n_scenes=0,
                                                   n_emblem_queries=0))
    g = build_graph(w.root / "docs.jsonl")
    assert len(g.nodes) == len(w.docs) and not g.excluded
    for d in w.docs:
        for k, v in d["infobox"].items():
            linked = [x["id"] for x in w.docs if x["title"] == v]
            if linked:
                assert g.targets(d["id"], k) == linked
            else:
                assert g.literals[d["id"]][k] == v
        assert g.in_degree[d["id"]] == sum(d["id"] in x["links"] for x in w.docs)
    assert sum(bool(n.images) for n in g.nodes.values()) == 6


def test_bad_input_names_the_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "X", "links": "Y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 .*'links' must be a list of strings, got 'Y'"):
        list(read_pages(bad))
    bad.write_text(json.dumps({"title": ""}) + "\n")
    with pytest.raises(ValueError, match="'title' must be a non-empty string, got ''"):
        list(read_pages(bad))
    xml = tmp_path / "broken.xml"
    xml.write_text("<mediawiki><page><title>A</title>")
    with pytest.raises(ValueError, match="not well-formed"):
        convert_mediawiki(xml, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="duplicate page title 'A'"):
        build_graph([{"title": "A"}, {"title": "a"}])
    with pytest.raises(ValueError, match="hub_in_degree must be an int >= 1, got 0"):
        GraphConfig(hub_in_degree=0)


def test_parse_wikitext_plain_infobox_value_is_a_link_by_title() -> None:
    a = parse_wikitext("a", "{{Infobox company|founder=Bob|founded=1990}} [[b#History|the b]]")
    assert a["title"] == "A" and a["links"] == ["B"] and a["infobox"] == {"founder": "Bob", "founded": 1990}
    g = build_graph([a, {"title": "Bob", "infobox": {"x": 1}}])
    assert g.targets("A", "founder") == ["Bob"] and g.literals["A"] == {"founded": 1990}
