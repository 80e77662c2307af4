"""A preallocated KV cache for the running batch: the layout CUDA-graph decode needs.

The dynamic path (runner.ModelRunner) grows a DynamicCache by concatenation, so every decode
step allocates and no step can be captured in a CUDA graph. StaticKV keeps, per layer, keys and
values of shape [max_rows, kv_heads, max_len, head_dim] at fixed addresses, plus a boolean
attention mask [max_rows, max_len]. Rows occupy indices [0, num_rows) (compacted when rows
leave) and share one column frame: columns [0, length) hold tokens, every row left-padded, and
a decode step writes column `length` for all rows at once. Each row's first column is tracked
on the host (`starts`), so trimming leading padding needs no GPU round trip.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class StaticKV:
    """Keys, values and mask of up to max_rows rows and max_len columns; see the module doc."""

    def __init__(self, max_rows: int, max_len: int, device: torch.device) -> None:
        self.max_rows, self.max_len, self.device = max_rows, max_len, device
        self.keys: list[torch.Tensor] = []  # per layer [max_rows, kv_heads, max_len, head_dim]
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros(max_rows, max_len, dtype=torch.bool, device=device)
        self.length = 0  # columns in use, [0, length)
        self.starts: list[int] = []  # per row: its first real column

    @property
    def num_rows(self) -> int:
        return len(self.starts)

    def append(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
               lengths: list[int]) -> None:
        """Add freshly prefilled rows after the current ones.

        layers: per layer (keys, values) [m, kv_heads, p, head_dim], left-padded to p;
        mask: [m, p] (1 = real token); lengths: each new row's real token count."""
        num_new, width = mask.shape
        if self.num_rows + num_new > self.max_rows:
            raise ValueError(f"{self.num_rows} + {num_new} rows exceed max_rows={self.max_rows}")
        if width > self.max_len:
            raise ValueError(f"a prompt of {width} tokens exceeds max_len={self.max_len}")
        if not self.keys:
            self._allocate(layers)
        if width > self.length:
            self._shift_right(width - self.length)
        rows = slice(self.num_rows, self.num_rows + num_new)
        first = self.length - width
        for store, new in zip(self.keys + self.values, [k for k, _ in layers] + [v for _, v in layers]):
            # Zero the padding left by the row's previous occupant: a masked column still
            # multiplies its value by 0, and 0 * NaN (from a failed row) is NaN.
            store[rows, :, :first] = 0
            store[rows, :, first:self.length] = new
        self.mask[rows] = False
        self.mask[rows, first:self.length] = mask.bool()
        self.starts += [self.length - n for n in lengths]

    def keep(self, indices: list[int]) -> None:
        """Keep the rows at `indices` (ascending), moved down to [0, len(indices))."""
        moves = [(dst, src) for dst, src in enumerate(indices) if dst != src]
        if moves:
            dst = torch.tensor([d for d, _ in moves], device=self.device)
            src = torch.tensor([s for _, s in moves], device=self.device)
            for store in self.keys + self.values + [self.mask]:
                store[dst] = store[src]  # gathers first, so chained moves are safe
        self.starts = [self.starts[i] for i in indices]
        if not self.starts:
            self.length = 0
        elif min(self.starts) >= self.length // 2:
            self.trim()  # the longest-running rows left: halve the attended width (or better)

    def reserve_column(self) -> int:
        """Make room for one more column (trimming leading padding if full); returns its index."""
        if self.length >= self.max_len:
            self.trim()
        if self.length >= self.max_len:
            raise RuntimeError(f"a row holds {self.max_len} tokens; it should have finished")
        return self.length

    def trim(self) -> None:
        """Drop leading columns that are padding for every row."""
        cut = min(self.starts, default=self.length)
        if cut == 0:
            return
        rows, width = self.num_rows, self.length - cut
        for store in self.keys + self.values:
            store[:rows, :, :width] = store[:rows, :, cut:self.length].clone()
        self.mask[:rows, :width] = self.mask[:rows, cut:self.length].clone()
        self.mask[:rows, width:] = False
        self.length = width
        self.starts = [s - cut for s in self.starts]

    def reset(self) -> None:
        """Forget every row (after a failed step); the buffers stay allocated."""
        self.mask.zero_()
        self.length, self.starts = 0, []

    def _shift_right(self, by: int) -> None:
        rows, length = self.num_rows, self.length
        for store in self.keys + self.values:
            store[:rows, :, by:by + length] = store[:rows, :, :length].clone()
        self.mask[:rows, by:by + length] = self.mask[:rows, :length].clone()
        self.mask[:rows, :by] = False
        self.length += by
        self.starts = [s + by for s in self.starts]

    def _allocate(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for keys, values in layers:
            # keys, values: [m, kv_heads, p, head_dim]
            self.keys.append(keys.new_zeros(self.max_rows, keys.shape[1], self.max_len,
                                            keys.shape[3]))
            self.values.append(values.new_zeros(self.max_rows, values.shape[1], self.max_len,
                                                values.shape[3]))


class StaticKVView(Cache):
    """The `past_key_values` of one decode forward over rows [0, rows) and columns
    [0, width) of a StaticKV: each layer's update writes the new token at column `column`
    (a one-element device tensor, so a captured graph reads it at replay) and returns the
    whole window; the caller passes the matching 4-D attention mask, so transformers never
    asks this cache for lengths."""

    is_compileable = True

    def __init__(self, kv: StaticKV, rows: int, width: int, column: torch.Tensor) -> None:
        # Cache.__init__ is skipped on purpose: its signature changes between transformers
        # releases, and none of its per-layer machinery is used here.
        self.layers = []
        self._keys = [k[:rows, :, :width] for k in kv.keys]
        self._values = [v[:rows, :, :width] for v in kv.values]
        self._column = column

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [rows, kv_heads, 1, head_dim]
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        keys.index_copy_(2, self._column, key_states)
        values.index_copy_(2, self._column, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._keys[0].shape[2] if self._keys else 0
