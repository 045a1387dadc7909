"""A preallocated key/value cache: GQA layout (KV heads only, never expanded), per-request write positions."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer: ``k, v: [num_layers, B, capacity, Hkv, d]``.

    Allocated once and written in place: the engine's decode slots (runtime/device_decoding.py) keep one
    for as long as the slots live, across requests and generate calls, and each new request overwrites
    its row from position 0. Positions past a request's length hold stale values that attention masks
    out by ``kv_lens``.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Index tensors of every write, made once: a decode step writes every layer, and building them
        # per write cost three small kernels each (108 of a Qwen3-8B step's launches).
        self._requests = torch.arange(batch, device=device)[:, None]  # [B, 1]
        self._positions = torch.arange(capacity, device=device)  # [capacity]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def rows(self, stop: int) -> KVCache:
        """The cache of requests ``[0, stop)``: a view sharing this cache's storage."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, :stop], self.v[:, :stop]
        view._requests, view._positions = self._requests[:stop], self._positions
        return view

    def copy_prefix(self, row: int, source: KVCache, source_row: int, length: int) -> None:
        """Copy positions ``[0, length)`` of ``source``'s request ``source_row`` into request ``row``."""
        self.k[:, row, :length] = source.k[:, source_row, :length]
        self.v[:, row, :length] = source.v[:, source_row, :length]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        """Store ``k, v: [B, T, Hkv, d]`` of request b at positions ``start[b] .. start[b] + T - 1``."""
        batch, length = k.shape[:2]
        if length == 0:
            return
        # [B, T]; a decode step (T = 1) writes at start itself, without an add.
        pos = start[:, None] if length == 1 else start[:, None] + self._positions[:length]
        rows = self._requests[:batch]
        self.k[layer, rows, pos] = k
        self.v[layer, rows, pos] = v
