"""The benchmark's model, built locally: a random Llama of the configured shape, a word-level
tokenizer and random non-zero adapters; and the environment it runs in."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

PROJECTIONS = {  # name -> (in_features, out_features) as functions of the model config
    "q_proj": lambda c: (c["hidden"], c["heads"] * c["head_dim"]),
    "k_proj": lambda c: (c["hidden"], c["kv_heads"] * c["head_dim"]),
    "v_proj": lambda c: (c["hidden"], c["kv_heads"] * c["head_dim"]),
    "o_proj": lambda c: (c["heads"] * c["head_dim"], c["hidden"]),
    "gate_proj": lambda c: (c["hidden"], c["intermediate"]),
    "up_proj": lambda c: (c["hidden"], c["intermediate"]),
    "down_proj": lambda c: (c["intermediate"], c["hidden"]),
}
FULL = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000,
            dtype="bfloat16", device="cuda", requests=32, prompt=128, new_tokens=128)
TINY = dict(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab=1000,
            dtype="float32", device="cpu", requests=32, prompt=16, new_tokens=8)
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer(vocab: int):
    """A word-level tokenizer whose vocabulary is exactly `vocab` ids (t4 ... t{vocab-1}), so
    every random prompt id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIAL)}
    words.update({f"t{i}": i for i in range(len(SPECIAL), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_base(out: Path, cfg: dict, seed: int = 0) -> Path:
    """Random LlamaForCausalLM of the configured shape (initialised on the target device),
    saved in the configured dtype with its tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
        max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(cfg["device"]):
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, cfg["dtype"]))
    model.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out)
    build_tokenizer(cfg["vocab"]).save_pretrained(out)
    del model
    return out


def build_adapters(root: Path, cfg: dict, count: int, rank: int, seed: int = 1) -> list[Path]:
    """`count` random PEFT adapters of rank `rank` on every projection of every layer:
    lora_a ~ N(0, 1/in), lora_b ~ N(0, 0.02²) (non-zero, so each adapter changes the output)."""
    from merging import LoraAdapter, LoraModule

    dtype = getattr(torch, cfg["dtype"])
    paths = []
    for index in range(count):
        gen = torch.Generator().manual_seed(seed + index)
        modules = {}
        for layer in range(cfg["layers"]):
            for name, dims in PROJECTIONS.items():
                n_in, n_out = dims(cfg)
                part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                modules[f"model.layers.{layer}.{part}.{name}"] = LoraModule(
                    lora_a=torch.randn(rank, n_in, generator=gen) / n_in ** 0.5,
                    lora_b=torch.randn(n_out, rank, generator=gen) * 0.02)
        adapter = LoraAdapter(modules, base_model="bench-llama", dtype=dtype)
        paths.append(adapter.save(root / f"skill{index}"))
    return paths



def environment(cfg: dict) -> dict:
    import peft
    import transformers

    from kernels import backend_for

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = cfg["device"]
    gpu = (torch.cuda.get_device_name(0) if device.startswith("cuda")
           else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    return {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "triton": triton_version, "python": platform.python_version(),
            "kernel_backend": backend_for(torch.empty(1, device=device))}
