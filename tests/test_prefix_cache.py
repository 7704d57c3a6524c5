"""The HF backend's KV prefix cache (engine/backends/prefix_cache.py) on its own."""
import numpy as np
import torch
from PIL import Image

from spyglass.engine.backends.prefix_cache import MIN_PREFIX_REUSE, PrefixCache, image_key


def _kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]


def test_palette_images_are_keyed_by_the_colours_the_model_sees() -> None:
    a, b = Image.new("P", (8, 8), 1), Image.new("P", (8, 8), 1)
    a.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)   # index 1: red
    b.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)   # index 1: blue
    assert a.tobytes() == b.tobytes() and image_key(a) != image_key(b)
    assert image_key(a) == image_key(a.convert("RGB"))  # the same pixels, whatever the mode


def test_the_longest_prefix_after_its_cut_wins() -> None:
    cache = PrefixCache(capacity=10_000)
    base = list(range(100))
    cache.store(base[:90] + [999] * 5, (b"other",), _kv(95))   # e2: shares 90, but its image differs
    cache.store(base[:60] + [7] * 3, (), _kv(63))              # e1: shares 60 tokens, kept whole
    cuts = {60: 60, 90: 40}                                    # e2 cut back before its image
    hit = cache.lookup(np.asarray(base), lambda m, e: (cuts[m], 0))
    assert hit is not None and hit[1] == 60 and len(hit[0].tokens) == 63
    assert cache.lookup(np.asarray(base), lambda m, e: (MIN_PREFIX_REUSE - 1, 0)) is None
