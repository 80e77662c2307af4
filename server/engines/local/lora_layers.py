"""Multi-LoRA linear layers: every token of a batch may use a different adapter slot.

Each adapted projection keeps preallocated slot buffers, lora_a [max_loras, max_lora_rank, in]
and lora_b [max_loras, out, max_lora_rank] with the adapter's scaling folded into lora_b and
ranks below the maximum zero-padded (zero rows add nothing). The engine sets one
LoraBatchContext per forward pass (token -> slot map and the kernels' grouping metadata,
built once and shared by every layer); slot -1 leaves the base layer's output untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kernels import LoraBatchMeta, add_lora, add_lora_planned, backend_for, build_meta

# Eager decode is bound by the host, not the GPU: Triton's launcher costs tens of µs per launch
# against 5–8 µs of kernel time (bench/kernels_notes.md, runs 5–6), so one fused launch per
# layer can beat the shrink+expand pair the kernel-time rule picks. The engine_fused setting:
# "auto" = the GPU table's rule (kernel time), "decode" = fused up to FUSED_DECODE_TOKENS.
FUSED_DECODE_TOKENS = 64


def _engine_fused(mode: str, num_tokens: int) -> bool | None:
    """The planned path's forced kernel choice: True (fused) or None (the kernel-time rule)."""
    return True if mode == "decode" and num_tokens <= FUSED_DECODE_TOKENS else None


DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)


@dataclass
class LoraBatchContext:
    """Token -> adapter slot map of the current forward pass; shared by all LoRA layers.

    is_active is False when no token uses an adapter: the layers then run the base model only.
    single_slot is set when every token uses that one slot (one request, or one adapter).
    meta (the kernels' token grouping) is built only for the Triton backend; the torch
    reference groups tokens itself. The layers call kernels.add_lora_planned with it: checks
    and launch plans once per batch and layer shape (meta.plans), not once per layer.
    """

    is_active: bool = False
    slot_ids: torch.Tensor | None = None  # [num_tokens] int32
    single_slot: int | None = None
    meta: LoraBatchMeta | None = None
    engine_fused: str = "auto"  # the engine_fused setting (see _engine_fused)
    fused: bool | None = None  # forced kernel choice of the planned path (see _engine_fused)
    # (set_slots arguments, slot_ids, single_slot, meta) of the last active pass
    _last: tuple | None = field(default=None, repr=False)

    def set_slots(self, row_slots: list[int], tokens_per_row: int, num_slots: int,
                  device: torch.device) -> None:
        """Install the map for the next forward: every token of row i uses row_slots[i]
        (-1 = base model). Built on the host, so the GPU is never waited on here."""
        self.clear()
        if all(slot < 0 for slot in row_slots):
            return
        self.is_active = True
        self.fused = _engine_fused(self.engine_fused, len(row_slots) * tokens_per_row)
        is_triton = backend_for(torch.empty(0, device=device)) == "triton"
        key = (tuple(row_slots), tokens_per_row, num_slots, device, is_triton)
        if self._last is not None and self._last[0] == key:
            # Same slots as the last pass (decode steps of one batch): reuse the grouping and
            # its launch plans; they depend on slot ids only, not on the slots' contents.
            _, self.slot_ids, self.single_slot, self.meta = self._last
            return
        slots = set(row_slots)
        self.single_slot = row_slots[0] if len(slots) == 1 else None
        slot_ids = torch.tensor(row_slots, dtype=torch.int32).repeat_interleave(tokens_per_row)
        self.slot_ids = slot_ids.to(device, non_blocking=True)
        if is_triton:
            # The engine only hands out slots in [0, num_slots): skip the range check's sync.
            self.meta = build_meta(self.slot_ids, num_slots, check=False)
        self._last = (key, self.slot_ids, self.single_slot, self.meta)

    def set_meta(self, meta: LoraBatchMeta) -> None:
        """Use a caller-owned meta for the next forward: a CUDA-graph bucket's, whose tensors
        the caller refills in place when the rows' slots change (see static_decode.py)."""
        self.clear()
        self.is_active = True
        self.meta, self.slot_ids = meta, meta.slot_ids
        self.fused = _engine_fused(self.engine_fused, meta.num_tokens)

    def clear(self) -> None:
        self.is_active = False
        self.slot_ids = None
        self.single_slot = None
        self.meta = None


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear plus per-slot LoRA factors: y = base(x) + x @ lora_a[s].T @ lora_b[s].T."""

    def __init__(self, base: nn.Linear, context: LoraBatchContext, max_loras: int,
                 max_lora_rank: int) -> None:
        super().__init__()
        self.base = base
        self.context = context
        weight = base.weight
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer(
            "lora_a", torch.zeros(max_loras, max_lora_rank, self.in_features, **factory),
            persistent=False)
        self.register_buffer(
            "lora_b", torch.zeros(max_loras, self.out_features, max_lora_rank, **factory),
            persistent=False)

    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: float) -> None:
        """Write one adapter's factors (lora_a [r, in], lora_b [out, r]) into `slot`."""
        rank = lora_a.shape[0]
        self.clear_slot(slot)
        self.lora_a[slot, :rank].copy_(lora_a)
        self.lora_b[slot, :, :rank].copy_(lora_b.to(torch.float32) * scaling)

    def clear_slot(self, slot: int) -> None:
        """Zero `slot`, so an adapter that does not target this layer adds nothing here."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> y: [..., out_features]
        y = self.base(x)
        context = self.context
        if not context.is_active:
            return y
        y_rows, x_rows = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
        if context.single_slot is not None and context.meta is None:
            # One adapter for the whole batch on the torch path: two plain matmuls, with the
            # reference kernels' numerics (float32 accumulation, one rounding), and none of
            # the per-slot grouping that dominates small CPU batches.
            slot = context.single_slot
            delta = (x_rows.float() @ self.lora_a[slot].float().T) @ self.lora_b[slot].float().T
            if y_rows.dtype == torch.float32:
                y_rows.add_(delta)
            else:
                y_rows.copy_(y_rows.float() + delta)
            return y
        if context.meta is not None:  # Triton: checks and launch configs once per batch
            add_lora_planned(y_rows, x_rows, self.lora_a, self.lora_b, context.meta,
                             fused=context.fused)
        else:
            add_lora(y_rows, x_rows, self.lora_a, self.lora_b, context.slot_ids)
        return y


def install_lora_layers(model: nn.Module, context: LoraBatchContext, *, max_loras: int,
                        max_lora_rank: int,
                        target_modules=DEFAULT_TARGET_MODULES) -> dict[str, MultiLoraLinear]:
    """Replace every nn.Linear whose last name component is in target_modules by a
    MultiLoraLinear; returns module path (e.g. "model.layers.0.self_attn.q_proj") -> layer."""
    targets = set(target_modules)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    layers = {}
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MultiLoraLinear(linear, context, max_loras, max_lora_rank)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers
