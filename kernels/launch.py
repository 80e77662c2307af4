"""Host-side launch configs: chosen from the shapes, cached, tuned values from JSON per GPU.

kernels/configs/<gpu name>.json (spaces -> '_', e.g. NVIDIA_H200.json) holds, per op, rules
{"max_tokens": 64, "min_rank": 16, ..., "block_n": 128, ...}: the first rule whose
min_<dim> / max_<dim> bounds all hold overrides the built-in defaults. "fused_when" (rules of
the same bounds; the first match decides, by its "fused" field, true when absent; no match:
the pair) picks the fused kernel over shrink+expand; its "slots" is
min(num_slots, num_tokens), a bound on the active adapters known without a device sync.
"records_when" / "pdl_when" (same form) switch on the kernel variants of `Variant`; absent,
the kernels run plain (bench/kernels_notes.md). Nothing is autotuned while serving.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kernels.meta import max_tiles

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_NUM_SMS = 132
FUSED_MAX_TOKENS = 64


@dataclass(frozen=True)
class Launch:
    block_m: int = 16
    block_k: int = 64
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    block_r: int = 0  # shrink: rank columns per program (0: the whole rank in one program)
    unroll: int = 8  # expand / fused: split-K partials loaded per step before they are summed
    b_first: int = 0  # expand: load B and y before the partials (1) or after them (0)


@dataclass(frozen=True)
class Variant:
    """Kernel variant: constexpr switches of the same kernels (plain = all off).

    records: tile prologue from one record row per tile (LoraBatchMeta.tile_records).
    pdl:     unfused pair only: programmatic dependent launch of the expand (Hopper+).
    table:   config table stem in kernels/configs/ used instead of the GPU's own (bench).
    """

    records: bool = False
    pdl: bool = False
    table: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """'plain', 'rec', 'pdl', 'rec+pdl', each optionally '@<table stem>'."""
        flags, _, table = spec.partition("@")
        parts = set(flags.split("+")) - {"plain", ""}
        if not parts <= {"rec", "pdl"}:
            raise ValueError(f"unknown kernel variant {spec!r}: use plain, rec, pdl, rec+pdl "
                             f"with an optional @<config table>")
        if table and not (CONFIG_DIR / f"{table}.json").is_file():
            raise ValueError(f"no config table kernels/configs/{table}.json")
        return cls(records="rec" in parts, pdl="pdl" in parts, table=table or None)

    def config_name(self, gpu_name: str) -> str:
        return self.table or gpu_name


def pdl_supported(device: torch.device) -> bool:
    """griddepcontrol needs a compiled kernel on compute capability >= 9.0."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def pick_variant(gpu_name: str, num_tokens: int, num_slots: int, rank: int,
                 hidden_in: int) -> Variant:
    """The variant the GPU's table picks ("records_when" / "pdl_when"); plain without rules."""
    table = tuned_table(gpu_name)
    shape = dict(tokens=num_tokens, slots=min(num_slots, num_tokens), rank=rank,
                 hidden_in=hidden_in)
    on = lambda key: any(_matches(rule, shape) for rule in table.get(key, []))  # noqa: E731
    return Variant(records=on("records_when"), pdl=on("pdl_when"))


def block_r(rank: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot's smallest inner size)."""
    return max(16, 1 << (rank - 1).bit_length())


def shrink_block_r(cfg: Launch, rank: int) -> int:
    """Rank columns per shrink program: the whole (padded) rank, or the config's block_r (a
    power of two >= 16) below it, which gives each tile's K chunk cdiv(rank, block_r)
    programs: more programs for few tiles (one adapter over a wide K), a re-read of x each."""
    whole = block_r(rank)
    if cfg.block_r <= 0:
        return whole
    if cfg.block_r < 16 or cfg.block_r & (cfg.block_r - 1):
        raise ValueError(f"shrink block_r must be a power of two >= 16, got {cfg.block_r}")
    return min(cfg.block_r, whole)


def sum_unroll(cfg: Launch, split_k: int) -> int:
    """Split-K partials the expand loads per step: the config's unroll, at most split_k rounded
    up to a power of two (fewer compiled variants; the rest are masked)."""
    if cfg.unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {cfg.unroll}")
    return min(cfg.unroll, 1 << max(0, split_k - 1).bit_length())


def device_key(device: torch.device) -> tuple[str, int]:
    """(GPU name, multiprocessor count) of a tensor's device; ('cpu', 132) elsewhere."""
    if device.type != "cuda":
        return "cpu", DEFAULT_NUM_SMS
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_props(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count


@functools.cache
def tuned_table(gpu_name: str) -> dict:
    path = CONFIG_DIR / f"{gpu_name.replace(' ', '_')}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _matches(rule: dict, shape: dict) -> bool:
    """All min_<dim> / max_<dim> bounds of a rule hold for the shape."""
    return all((shape[key[4:]] <= v) if key.startswith("max_") else (shape[key[4:]] >= v)
               for key, v in rule.items() if key.startswith(("max_", "min_")))


def _override(base: Launch, gpu_name: str, op: str, **shape: int) -> Launch:
    """First rule of the op whose bounds all hold for this shape; else base."""
    for rule in tuned_table(gpu_name).get(op, []):
        if _matches(rule, shape):
            fields = {k: v for k, v in rule.items() if k in Launch.__dataclass_fields__}
            return replace(base, **fields)
    return base


def default_block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 64 else 64


@functools.cache
def use_fused(gpu_name: str, num_tokens: int, num_slots: int, rank: int, hidden_in: int) -> bool:
    """Fused shrink+expand (one launch) at decode, the shrink+expand pair at prefill.

    At decode both halves move little and launches dominate, so one launch wins. At prefill
    the fused kernel's per-tile barrier serialises the two halves of each tile and its split-N
    expand re-reads the rank-space partials, so the pair (with tuned blocks) is faster.
    """
    table = tuned_table(gpu_name)
    rules = table.get("fused_when", [{"max_tokens": FUSED_MAX_TOKENS}])
    shape = dict(tokens=num_tokens, slots=min(num_slots, num_tokens), rank=rank,
                 hidden_in=hidden_in)
    return next((bool(rule.get("fused", True)) for rule in rules if _matches(rule, shape)), False)


@functools.cache
def shrink_launch(gpu_name: str, num_sms: int, num_tokens: int, num_slots: int, hidden_in: int,
                  rank: int, num_pieces: int) -> Launch:
    """split_k fills the GPU twice over, capped at prefill: every expand program re-reads
    split_k x rank float32 partials per row, which must stay below its y traffic."""
    is_decode = num_tokens <= 64
    base = Launch(block_m=16 if is_decode else 32, block_k=128, num_stages=3)
    cfg = _override(base, gpu_name, "shrink", tokens=num_tokens, slots=num_slots,
                    hidden_in=hidden_in, rank=rank)
    num_tiles = max_tiles(num_tokens, num_slots, cfg.block_m)
    k_blocks = -(-hidden_in // cfg.block_k)
    want = -(-2 * num_sms // max(1, num_tiles * num_pieces))
    cap = 32 if is_decode else max(1, 128 // block_r(rank))
    split = cfg.split_k if cfg.split_k > 1 else max(1, min(want, k_blocks // 2, cap))
    return replace(cfg, split_k=split)


@functools.cache
def expand_launch(gpu_name: str, num_tokens: int, hidden_out: int, rank: int) -> Launch:
    """At decode (<= 64 tokens) the partials are loaded 8 at a time, at prefill one at a
    time; B and y are loaded before the partials when B's tile is narrow (rank <= 32), after
    them at rank 64. Measured inside vLLM on an H200 (bench/RESULTS.md, seventh session):
    unrolled loads cut decode steps up to 17 % and slowed prefill steps of 8 rank-64
    adapters up to 20 % (their many programs need the registers); B first cut rank-16
    prefill steps 5-16 % and slowed rank-64 ones 5-14 % (a 64-row B tile held through the
    sum)."""
    base = Launch(block_m=default_block_m(num_tokens), block_n=128,
                  unroll=8 if num_tokens <= 64 else 1, b_first=int(block_r(rank) <= 32))
    return _override(base, gpu_name, "expand", tokens=num_tokens, hidden_out=hidden_out,
                      rank=rank)


@functools.cache
def fused_launch(gpu_name: str, num_sms: int, num_tokens: int, num_slots: int, hidden_in: int,
                 hidden_out: int, rank: int, num_pieces: int) -> Launch:
    """split_k = programs per tile: each shrinks a K chunk, then expands an N chunk."""
    base = Launch(block_m=16, block_k=128, block_n=128)
    cfg = _override(base, gpu_name, "fused", tokens=num_tokens, slots=num_slots,
                    hidden_in=hidden_in, hidden_out=hidden_out, rank=rank)
    num_tiles = max_tiles(num_tokens, num_slots, cfg.block_m)
    want = -(-2 * num_sms // max(1, num_tiles * num_pieces))
    k_blocks = -(-hidden_in // cfg.block_k)
    parts = cfg.split_k if cfg.split_k > 1 else max(1, min(want, k_blocks, 32))
    return replace(cfg, split_k=parts)
