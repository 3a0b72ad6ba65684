"""A fixed-capacity KV cache for the compiled step: written at slot indices, compacted on the device.

Every layer owns [batch, heads, capacity, head_dim] buffers allocated once; a forward writes its rows at the
slots the decoder sets (`cache.slots`, a device tensor), and attention reads the whole buffer under a mask
of width `capacity`, so no shape depends on the context length. After verification the accepted rows are
moved down with one fixed-size gather per layer (`keep`), and `length` (a 0-d device tensor) moves on.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class SlotLayer(CacheLayerMixin):
    """One layer's keys/values in static buffers, written at `cache.slots`."""

    is_compileable = True
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: "SlotCache"):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        capacity = self.cache.capacity
        self.keys = key_states.new_zeros(b, h, capacity, d)
        self.values = value_states.new_zeros(b, h, capacity, value_states.shape[-1])
        if not _compiling():  # fixed addresses: compiled graphs and CUDA graphs mutate them in place
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.cache.slots
        if slots.dim() == 2:  # a batch [B, T]: each sequence writes at its own slots
            batch = torch.arange(slots.shape[0], device=slots.device)[:, None]
            self.keys[batch, :, slots] = key_states.transpose(1, 2).to(self.keys.dtype)
            self.values[batch, :, slots] = value_states.transpose(1, 2).to(self.values.dtype)
        else:
            self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.capacity, 0

    def get_seq_length(self):
        return self.cache.length

    def get_max_length(self) -> int:
        return self.cache.capacity

    def row(self, lane: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of batch row `lane` ([1, h, capacity, d] views), or of the whole batch for None."""
        if lane is None:
            return self.keys, self.values
        return self.keys[lane : lane + 1], self.values[lane : lane + 1]

    def keep(self, start: torch.Tensor, sources: torch.Tensor, lane: int | None = None) -> None:
        """Copy the entries at slot indices `sources` [K] to slots start..start+K-1 (a fixed-size move), in batch
        row `lane` (None: every row)."""
        targets = start + torch.arange(sources.numel(), device=sources.device)
        for t in self.row(lane):
            t.index_copy_(2, targets, t.index_select(2, sources))

    def write(self, start: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lane: int | None = None) -> None:
        """Overwrite K entries from slot `start` with entries received from a peer ([b, h, K, d] each)."""
        targets = start + torch.arange(keys.shape[-2], device=keys.device)
        mine_k, mine_v = self.row(lane)
        mine_k.index_copy_(2, targets, keys)
        mine_v.index_copy_(2, targets, values)


class SlotCache(Cache):
    """A transformers Cache of `layers` SlotLayers sharing one write-slot index and one length counter."""

    def __init__(self, layers: int, capacity: int, device: torch.device):
        self.capacity = capacity
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.zeros(1, dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.length)
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])

    @property
    def is_compileable(self) -> bool:
        return True

    def get_seq_length(self, layer_idx: int = 0):
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.capacity, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    def buffers(self) -> list[torch.Tensor]:
        """Every layer's key and value buffer (for checking that nothing was reallocated)."""
        return [t for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)]


class _LaneLayer(SlotLayer):
    """Row `lane` of a batch's SlotLayer as a one-sequence layer (eager use only: a prefill writes through it)."""

    def __init__(self, layer: SlotLayer, lane: int, cache: "LaneCache"):
        super().__init__(cache)
        self.keys, self.values = layer.row(lane)
        self.is_initialized = True


class LaneCache(SlotCache):
    """One sequence's view of batch row `lane` of a SlotCache, for prefilling that row alone (a finished
    sequence's row takes the next prompt while the others keep their entries). Writes at `slots`."""

    def __init__(self, batch: SlotCache, lane: int):
        if not all(layer.is_initialized for layer in batch.layers):
            raise RuntimeError("allocate the batch cache (one forward over every row) before prefilling a row")
        self.capacity = batch.capacity
        self.length = torch.zeros((), dtype=torch.long, device=batch.length.device)
        self.slots = torch.zeros(1, dtype=torch.long, device=batch.length.device)
        Cache.__init__(self, layers=[_LaneLayer(layer, lane, self) for layer in batch.layers])
