"""The HF backend's KV prefix cache: finished rows' KV kept for later prompts that share a prefix.

Multi-turn agents resend the whole context every turn, and every request starts with the same
system prompt and tool schemas. An entry is the KV [1, H_kv, n, D] per layer of n fed tokens and
the content keys of the images among them. `lookup` finds the entry sharing the longest prefix
with a prompt (at least one prompt token left to feed); the caller's `cut` moves that length
back before an image it would split or that is not the same image (content hash, not only the
same placeholder tokens), and a prefix shorter than MIN_PREFIX_REUSE is not worth a forward of
its own. Entries stay after a hit (siblings share them); `store` drops kept entries the new one
extends and evicts the least recently used past `capacity` tokens.

    cache = PrefixCache(capacity=PREFIX_CACHE_BYTES // kv_bytes_per_token(model))
    cache.store(tokens, image_keys, layers)
    hit = cache.lookup(np.asarray(prompt_ids), cut)   # (entry, tokens reused, images in them) | None
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

PREFIX_CACHE_BYTES = 1 << 30  # the default budget
MIN_PREFIX_REUSE = 32  # shorter shared prefixes are prefilled with the batch instead (one forward)


@dataclass(eq=False)
class Prefix:
    tokens: np.ndarray                               # [n] int64: the fed tokens its KV covers
    image_keys: tuple[bytes, ...]                    # the images among them, in order
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer K, V [1, H_kv, n, D]


def image_key(im: Any) -> bytes:
    """What makes two images the same image for the KV cache: the RGB pixels the model sees (a
    palette image's bytes are indices: two palettes would hash alike)."""
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    h = hashlib.blake2b(f"{rgb.size}".encode(), digest_size=16)
    h.update(rgb.tobytes())
    return h.digest()


def common_prefix(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of K and V one token takes in `model`'s cache (every layer)."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    width = next(model.parameters()).element_size()
    return max(1, 2 * c.num_hidden_layers * kv_heads * head_dim * width)


class PrefixCache:
    """LRU of kept prefixes, at most `capacity` tokens in all (0: off); see the module docstring."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[bytes, Prefix] = OrderedDict()  # hash of tokens + images -> KV, LRU first
        self.size = 0  # tokens kept

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0

    def store(self, tokens: list[int], image_keys: tuple[bytes, ...],
              layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the KV of `tokens` (copied), drop kept entries it extends, evict past capacity."""
        n = len(tokens)
        if not self.capacity or n > self.capacity:
            return
        arr = np.asarray(tokens, dtype=np.int64)
        for key, e in list(self.entries.items()):
            if (len(e.tokens) <= n and e.image_keys == image_keys[:len(e.image_keys)]
                    and common_prefix(e.tokens, arr, n) == len(e.tokens)):
                del self.entries[key]
                self.size -= len(e.tokens)
        key = hashlib.blake2b(arr.tobytes() + b"".join(image_keys), digest_size=16).digest()
        if key in self.entries:
            self.size -= len(self.entries.pop(key).tokens)
        self.entries[key] = Prefix(arr, image_keys, [(k.clone(), v.clone()) for k, v in layers])
        self.size += n
        while self.size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= len(old.tokens)

    def lookup(self, ids: np.ndarray, cut: Callable[[int, Prefix], tuple[int, int]]
               ) -> tuple[Prefix, int, int] | None:
        """The entry sharing the longest prefix with `ids` (one token at least left to feed),
        that length after `cut(length, entry)` -> (length, images in it), or None when under
        MIN_PREFIX_REUSE tokens are reusable."""
        raw = [(common_prefix(e.tokens, ids, len(ids) - 1), key) for key, e in self.entries.items()]
        best, m, j = None, MIN_PREFIX_REUSE - 1, 0
        for c, key in sorted(raw, key=lambda x: -x[0]):  # the longest after its cut wins
            if c <= m:
                break
            cm, cj = cut(c, self.entries[key])
            if cm > m:
                best, m, j = key, cm, cj
        if best is None:
            return None
        self.entries.move_to_end(best)
        return self.entries[best], m, j
