"""Path sampling: determinism, stratified seeds, constraints, hop lengths, roles, bounded retries."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest

from spyglass.engine.offline.world import WorldConfig, generate_world
from spyglass.trainer.synth.graph import build_graph
from spyglass.trainer.synth.paths import GraphPath, PathConfig, eligible_anchors, sample_paths


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    w = generate_world(tmp_path_factory.mktemp("w"), WorldConfig(seed=1, n_sign_images=24, n_scenes=0,
                                                                 n_emblem_queries=0))
    return build_graph(Path(w.root) / "docs.jsonl")


def test_deterministic_and_seed_dependent(graph) -> None:
    a, sa = sample_paths(graph, 30, PathConfig(seed=5))
    b, _ = sample_paths(graph, 30, PathConfig(seed=5))
    c, _ = sample_paths(graph, 30, PathConfig(seed=6))
    assert [p.key() for p in a] == [p.key() for p in b] and [p.key() for p in a] != [p.key() for p in c]
    assert sa.sampled == 30 and sa.failed == 0 and len({p.key() for p in a}) == 30


def test_paths_follow_edges_and_roles(graph) -> None:
    paths, _ = sample_paths(graph, 60, PathConfig(seed=0))
    for p in paths:
        a = graph.node(p.anchor)
        assert a.images and a.infobox
        cur, seen = p.anchor, {p.anchor}
        for i, h in enumerate(p.hops):
            if h.target is None:
                assert i == len(p.hops) - 1 and str(graph.literals[cur][h.relation]) == h.value
            else:
                assert h.target in graph.targets(cur, h.relation) and h.target not in seen
                assert h.value == graph.node(h.target).title
                cur = h.target
                seen.add(cur)
        roles = p.roles()
        assert roles[0] == ("anchor", p.anchor) and roles[-1][0] == "answer"
        assert [r for r, _ in roles[1:-1]] == ["bridge"] * (len(p.hops) - 1)
        assert GraphPath.from_json(p.to_json()).key() == p.key()


def test_stratified_over_types_and_hop_lengths(graph) -> None:
    paths, st = sample_paths(graph, 400, PathConfig(seed=0))
    types = collections.Counter(graph.node(p.anchor).type for p in paths)
    assert set(types) == set(eligible_anchors(graph, PathConfig()))
    # round-robin over types; a type whose anchors' distinct paths run out fails its turns
    assert max(types.values()) - min(types.values()) <= 1 + st.failed
    assert st.sampled + st.failed == 400
    lengths = collections.Counter(len(p.hops) for p in paths)
    assert lengths == collections.Counter(st.by_length)
    for k, prob in ((2, 0.4), (3, 0.4), (4, 0.2)):
        assert abs(lengths[k] / len(paths) - prob) < 0.07, lengths


def test_constraints_and_config(graph) -> None:
    cfg = PathConfig(seed=0, types=("org",), min_in_degree=3, hop_lengths=(2,), hop_probs=(1.0,),
                     literal_answers=False)
    paths, _ = sample_paths(graph, 10, cfg)
    assert paths and all(graph.node(p.anchor).type == "org" and graph.in_degree[p.anchor] >= 3 for p in paths)
    assert all(len(p.hops) == 2 and p.answer_node is not None for p in paths)
    with pytest.raises(ValueError, match=r"hop_probs must be 3 non-negative numbers summing to 1, got \(0.5, 0.5, 0.5\)"):
        PathConfig(hop_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="max_retries must be an int >= 1, got 0"):
        PathConfig(max_retries=0)
    with pytest.raises(ValueError, match="no eligible anchors"):
        sample_paths(graph, 3, PathConfig(types=("spaceship",)))


def test_bounded_retries_count_failures() -> None:
    # A -> B only: a 3-hop walk without literals dead-ends every time
    pages = [{"title": "A", "image": "a.png", "infobox": {"friend": "B"}},
             {"title": "B", "infobox": {"friend": "A", "age": 3}}]
    g = build_graph(pages)
    paths, st = sample_paths(g, 4, PathConfig(hop_lengths=(3,), hop_probs=(1.0,), max_retries=5))
    assert paths == [] and st.failed == 4 and st.retries == 20
    # with a literal last hop a 2-hop path exists (A -friend-> B -age-> 3), once (dedup)
    paths, st = sample_paths(g, 3, PathConfig(hop_lengths=(2,), hop_probs=(1.0,), max_retries=5))
    assert [p.roles() for p in paths] == [[("anchor", "A"), ("bridge", "B"), ("answer", "literal:3")]]
    assert st.failed == 2
