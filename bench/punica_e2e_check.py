"""Greedy tokens of vLLM with loramix's punica wrapper against vLLM's own, in one process,
with one of the wrapper's per-step mechanisms switched off per variant (issue 17: finds
which one a served mismatch comes from).

    PYTHONPATH=/tmp/site:$PWD python -m bench.punica_e2e_check --out "$OUT"   # GPU, vLLM 0.26

vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a variant
can switch a mechanism off by setting an attribute before the engine starts: `arrays`
(numpy grouping for every step), `no-skip` (a repeated mapping refilled anyway),
`vllm-meta` (vLLM's kernel metadata prepared every step), `no-warm-up` (no kernels of
smaller sizes compiled ahead). Same random 1B Llama and 8 rank-16 adapters as
bench/punica_gpu.py; 16 prompts x (base model, adapter a, adapter h), 16 greedy tokens.
Eager (--enforce-eager) unless --graphs. Writes e2e.json: per variant the first-token and
whole-sequence agreement with vLLM's kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

VARIANTS = ("loramix", "arrays", "no-skip", "vllm-meta", "no-warm-up")


_ORIGINALS: dict = {}


def switch(variant: str) -> None:
    """Undo the last variant's switch, then make this one's."""
    from kernels.step import StepMeta
    from server.engines.vllm import punica

    targets = {"update": StepMeta, "__init__": punica._KernelMetaOnDemand,
               "_warm_up": punica._LoramixPunica}
    if not _ORIGINALS:
        _ORIGINALS.update({name: owner.__dict__[name] for name, owner in targets.items()})
    for name, owner in targets.items():
        setattr(owner, name, _ORIGINALS[name])
    StepMeta.list_max_tokens = -1 if variant == "arrays" else 256
    if variant == "no-skip":
        def update(self, slot_ids, original=_ORIGINALS["update"]):
            self._last = None
            return original(self, slot_ids)

        StepMeta.update = update
    if variant == "vllm-meta":
        def eager_init(self, meta, original=_ORIGINALS["__init__"]):
            original(self, meta)
            self.asked = True

        punica._KernelMetaOnDemand.__init__ = eager_init
    if variant == "no-warm-up":
        punica._LoramixPunica._warm_up = lambda self, *args: None


def generate(work: Path, kernels: str, prompts, graphs: bool) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from server.engines.vllm import punica_plugin

    os.environ[punica_plugin.ENV] = kernels
    punica_plugin.register()
    llm = LLM(model=str(work / "base"), enable_lora=True, max_loras=8, max_lora_rank=16,
              max_model_len=1024, dtype="bfloat16", gpu_memory_utilization=0.3,
              enforce_eager=not graphs, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    requests = [None, LoRARequest("a", 1, str(work / "skills" / "a")),
                LoRARequest("h", 8, str(work / "skills" / "h"))]
    inputs, loras = [], []
    for lora in requests:
        for prompt in prompts:
            inputs.append(TokensPrompt(prompt_token_ids=prompt))
            loras.append(lora)
    outputs = llm.generate(inputs, params, lora_request=loras)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    del llm
    gc.collect()
    import torch

    torch.cuda.empty_cache()
    return tokens


def main() -> None:
    from bench.punica_gpu import ADAPTERS, _prompts
    from bench.vllm_gpu import build

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/punica-bench"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--graphs", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.work, "1b", ADAPTERS)
    vocab = json.loads((args.work / "base" / "config.json").read_text())["vocab_size"]
    prompts = _prompts(16, 64, vocab, seed=1)
    t0 = time.perf_counter()
    reference = generate(args.work, "vllm", prompts, args.graphs)
    result = dict(graphs=args.graphs, reference_s=time.perf_counter() - t0, variants={})
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        try:
            switch(variant)
            tokens = generate(args.work, "loramix", prompts, args.graphs)
            pairs = list(zip(reference, tokens))
            row = dict(first_token=[a[:1] == b[:1] for a, b in pairs].count(True) / len(pairs),
                       whole_sequence=[a == b for a, b in pairs].count(True) / len(pairs),
                       first_token_by_model=[sum(a[:1] == b[:1] for a, b in pairs[i:i + 16]) / 16
                                             for i in (0, 16, 32)])
        except Exception as exc:
            import traceback

            row = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        row["seconds"] = time.perf_counter() - t0
        result["variants"][variant] = row
        print(variant, json.dumps(row)[:400], flush=True)
        (args.out / "e2e.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
