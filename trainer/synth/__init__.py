"""Data synthesis (OpenSearch-VL's curation pipeline): multi-hop visual questions from an entity
link graph, and teacher trajectories for them.

    python -m spyglass.trainer.synth --world DIR --out DIR     # offline world -> questions + trajectories
    python -m spyglass.trainer.synth.dump dump.xml pages.jsonl # MediaWiki XML -> pages JSONL

Modules: dump (pages format + MediaWiki converter), graph (link graph), paths (path sampling),
questions (canonical question, fuzzy rewriting, uniqueness, leaks), grounding (anchor image,
degradations), filters (difficulty filter), trajectories (teacher rollouts), pipeline (all of it).
Tests: `.venv/bin/python -m pytest -q tests/test_synth_*.py`.
"""
from .dump import convert_mediawiki, iter_mediawiki_xml, parse_wikitext, read_pages
from .filters import Difficulty, EngineSolver, LLMSolver, difficulty_filter, is_correct
from .graph import GraphConfig, LinkGraph, Node, build_graph
from .grounding import (DEGRADATIONS, FIX_TOOL, Grounding, ImageCatalog, OCRScorer, Ungrounded,
                        degrade, ground_anchor, pick_degraded)
from .paths import GraphPath, Hop, PathConfig, PathStats, sample_paths
from .pipeline import SynthConfig, make_questions, run_pipeline
from .questions import (Clue, QuestionDraft, Rejected, RewriteConfig, answer_set, is_unique, leaked,
                        template_question, write_question)
from .trajectories import TeacherConfig, teacher_rollouts

__all__ = ["convert_mediawiki", "iter_mediawiki_xml", "parse_wikitext", "read_pages", "Difficulty",
           "EngineSolver", "LLMSolver", "difficulty_filter", "is_correct", "GraphConfig", "LinkGraph",
           "Node", "build_graph", "DEGRADATIONS", "FIX_TOOL", "Grounding", "ImageCatalog", "OCRScorer",
           "Ungrounded", "degrade", "ground_anchor", "pick_degraded", "GraphPath", "Hop", "PathConfig",
           "PathStats", "sample_paths", "SynthConfig", "make_questions", "run_pipeline", "Clue",
           "QuestionDraft", "Rejected", "RewriteConfig", "answer_set", "is_unique", "leaked",
           "template_question", "write_question", "TeacherConfig", "teacher_rollouts"]
