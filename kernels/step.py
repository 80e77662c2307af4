"""Per-step LoRA metadata in fixed buffers, for engines that capture CUDA graphs.

An engine knows the token -> slot mapping of a step before its forward pass, but a captured
graph replays the launches of its padded batch size with the addresses it saw at capture.
StepMeta keeps one LoraBatchMeta sized for the engine's largest batch; `update` refills it
in place (tokens past the step's own are slot -1), and `for_tokens(n)` hands a layer the
prefix meta of its padded batch size n, cached per n, so every step and every graph reads
the same tensors and the plans kept in each prefix (triton_ops) stay valid.
"""

from __future__ import annotations

import torch

from kernels.meta import LoraBatchMeta, LoraBatchMetaPrefix, build_meta, prefix_meta


class StepMeta:
    """Token -> slot metadata of the current step, at fixed addresses."""

    def __init__(self, max_num_tokens: int, num_slots: int, device: torch.device | str):
        self.max_num_tokens = max_num_tokens
        self.num_slots = num_slots
        self.num_tokens = 0  # tokens of the current step (the rest are slot -1)
        self._slot_ids = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        self.meta: LoraBatchMeta = build_meta(self._slot_ids, num_slots, check=False)
        self._prefixes: dict[int, LoraBatchMetaPrefix] = {}

    def update(self, slot_ids: torch.Tensor) -> None:
        """Refill for a step's slot ids ([num_tokens], -1 = no adapter). No host sync."""
        # slot_ids: [num_tokens] int
        num_tokens = slot_ids.numel()
        if num_tokens > self.max_num_tokens:
            raise ValueError(f"step has {num_tokens} tokens, buffers hold {self.max_num_tokens}")
        self._slot_ids[:num_tokens].copy_(slot_ids, non_blocking=True)
        self._slot_ids[num_tokens:].fill_(-1)
        build_meta(self._slot_ids, self.num_slots, out=self.meta, check=False)
        self.num_tokens = num_tokens

    def for_tokens(self, num_tokens: int) -> LoraBatchMetaPrefix | None:
        """The meta of a layer call on num_tokens rows (the step's tokens, then padding);
        None when the rows cannot hold the step's tokens or exceed the buffers."""
        if not self.num_tokens <= num_tokens <= self.max_num_tokens:
            return None
        meta = self._prefixes.get(num_tokens)
        if meta is None:
            meta = self._prefixes[num_tokens] = prefix_meta(self.meta, num_tokens)
        return meta
