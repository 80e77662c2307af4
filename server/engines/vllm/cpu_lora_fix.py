"""A fix for vLLM's CPU LoRA ops, installed in vLLM's worker processes on CPU hosts.

vLLM marks tokens of requests without an adapter with slot index -1. Its Triton kernels
(GPU) skip those tokens; the torch ops its CPU platform uses (vllm/lora/ops/torch_ops) do
`lora_weights[indices]`, and index -1 selects the LAST slot. Once all `max_loras` slots hold
adapters, a base-model request batched next to adapter requests silently gets the last
slot's adapter added to its output. (Upstream: vllm-project/vllm PRs #48421 and #49656, open
at vLLM 0.32.) The fix below zeroes the inputs of those tokens, so their LoRA delta is
exactly 0 and base-model outputs stay bit-identical to a batch without LoRA.

vLLM's `worker_extension_cls` option names a class that every worker process imports before
it loads the model: importing this module there installs the fix in that process.
"""

from __future__ import annotations

import functools

from server.engines.vllm.punica_plugin import PunicaStatsExtension

_PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _skip_no_lora_tokens(op):
    """Wrap a torch bgmv op so tokens with adapter index < 0 contribute exactly zero."""

    @functools.wraps(op)
    def run(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        # inputs: [num_tokens, in]; lora_indices_tensor: [num_tokens]
        no_lora = lora_indices_tensor < 0
        if inputs.shape[0] != lora_indices_tensor.shape[0] or not bool(no_lora.any()):
            return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        inputs = inputs.masked_fill(no_lora.unsqueeze(-1), 0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)

    run.loramix_no_lora_fix = True
    return run


def install() -> None:
    """Patch vLLM's torch LoRA ops (and the CPU punica wrapper's references to them).
    Idempotent. The sgmv_* prefill ops call the bgmv_* ops through the module, so they are
    covered too."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _PATCHED_OPS:
        original = getattr(lora_ops, name)
        if getattr(original, "loramix_no_lora_fix", False):
            continue
        fixed = _skip_no_lora_tokens(original)
        setattr(lora_ops, name, fixed)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fixed)


class CpuLoraFixExtension(PunicaStatsExtension):
    """vLLM worker extension: naming it in `worker_extension_cls` makes each worker process
    import this module, which installs the fix (and answers loramix_punica_stats)."""


install()
