"""A KV cache that grows by doubling and is edited in place: accepted entries move, the rest is cropped.

Hugging Face's DynamicLayer concatenates on every update (a full copy of the cache per step); this layer
writes into a preallocated buffer and hands attention views, so a decoding step costs O(new tokens).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class InPlaceLayer(CacheLayerMixin):
    """One layer's keys/values in a [batch, heads, capacity, head_dim] buffer; `keys`/`values` are views."""

    is_croppable = True

    def __init__(self, capacity: int = 256):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty(b, h, self.capacity, d)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity

    def _refresh_views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self._reserve(self.length + q)
        self._k[:, :, self.length : self.length + q] = key_states
        self._v[:, :, self.length : self.length + q] = value_states
        self.length += q
        self._refresh_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` entries (transformers' negative-count convention)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of entries to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self._refresh_views()

    def keep(self, start: int, sources: torch.Tensor) -> None:
        """Move the entries at indices `sources` (all >= start) to start.. in order and drop everything after."""
        n = sources.numel()
        if n and self.is_initialized:
            self._k[:, :, start : start + n] = self._k.index_select(2, sources)
            self._v[:, :, start : start + n] = self._v.index_select(2, sources)
        self.length = start + n
        if self.is_initialized:
            self._refresh_views()

    def entries(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of `count` consecutive entries from `start` (for sending them to other ranks)."""
        return self._k[:, :, start : start + count], self._v[:, :, start : start + count]

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite entries from `start` and set the length to end there (entries received from a peer)."""
        n = keys.shape[-2]
        self._reserve(start + n)
        self._k[:, :, start : start + n] = keys
        self._v[:, :, start : start + n] = values
        self.length = start + n
        self._refresh_views()


class InPlaceCache(Cache):
    """A transformers Cache of InPlaceLayer, one per decoder layer, created lazily on first update."""

    def __init__(self, capacity: int = 256):
        super().__init__(layer_class_to_replicate=lambda: InPlaceLayer(capacity))

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def crop_to(self, length: int) -> None:
        for layer in self.layers:
            layer.crop(min(0, length - layer.length))

    def keep(self, start: int, sources: torch.Tensor) -> None:
        """In every layer, keep entries [0, start) plus `sources` moved to start.., drop the rest."""
        for layer in self.layers:
            layer.keep(start, sources)
