"""Train skill LoRAs on the real base model, each on its own skill's data only.

LoRA rank 16 (alpha 32) on all seven projections; conversations rendered by the base model's
chat template; loss on the assistant's tokens only (its answer and the end-of-turn token).
On CUDA the forward and backward passes run in bf16 autocast (weights and optimizer stay fp32).

    python -m lab.real.train --device cuda --out lab/real/assets/skills            # every skill
    python -m lab.real.train --device cuda --out DIR --skill words --steps 400
    python -m lab.real.train --device cuda --out DIR --skill mixed --batch-size 160   # data-mixing baseline
    python -m lab.real.train --base DIR --out /tmp/s --skill upper --steps 3 --batch-size 2  # CPU smoke

Needs only torch, transformers and peft (and lab/), so it runs on a bare GPU machine. Writes
out/<skill> (a PEFT adapter) and out/<skill>/train_report.json (settings, losses, seconds, and
the accuracy on the skill's evaluation set unless --eval-size 0).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from lab.real.data import MIXED, SKILLS, Example, train_examples

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of tokens that carry no loss


@dataclass
class TrainConfig:
    """Hyper-parameters of one skill's LoRA training (every field is a flag of the CLI)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 20
    rank: int = 16
    alpha: int = 32
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 25
    eval_size: int = 200


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the conversation user: prompt / assistant: completion, rendered by
    the chat template. Labels are IGNORE on the prompt and after the end-of-turn token."""
    prompt = [{"role": "user", "content": example.prompt}]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": example.completion}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False).input_ids
    if tokenizer.eos_token_id in answer_ids:  # keep the end-of-turn token, drop what follows it
        answer_ids = answer_ids[:answer_ids.index(tokenizer.eos_token_id) + 1]
    else:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels ([batch, max_len] each)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at the last step (step counts from 0)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_base(base_dir: Path, device: str):
    """(model, tokenizer) from a model directory, float32, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
    return model, tokenizer


def with_new_lora(model, config: TrainConfig):
    """`model` wrapped by peft with a fresh LoRA on all projections (lora_B starts at zero)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                      target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def train_skill(model, tokenizer, skill: str, config: TrainConfig, log=print) -> dict:
    """Train the LoRA of a peft-wrapped `model` on `skill`'s data; return loss figures."""
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    examples = train_examples(skill, config.steps * config.batch_size, seed=config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(config.steps):
        chunk = examples[step * config.batch_size:(step + 1) * config.batch_size]
        batch = collate([encode_example(tokenizer, e) for e in chunk], tokenizer.pad_token_id)
        with autocast:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{skill}: loss is {loss.item()} at step {step + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            recent = losses[-config.log_every:]
            log(f"{skill} step {step + 1}/{config.steps} loss {sum(recent) / len(recent):.4f}")
    model.eval()
    tail = losses[-max(1, config.steps // 10):]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


def save_adapter(model, out_dir: Path, base_model_name: str) -> None:
    """Save the PEFT adapter with a config that does not depend on where it was trained."""
    model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's model card, with local paths
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_name
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_and_save(base_dir: Path, out_dir: Path, skill: str, config: TrainConfig, device: str, log=print) -> dict:
    """Train one skill from the base in `base_dir` and write out_dir/<skill>; return its report."""
    from lab.real.evaluate import evaluate_tasks

    model, tokenizer = load_base(base_dir, device)
    model = with_new_lora(model, config)
    report = {"skill": skill, "base_model": base_dir.name, "device": device, "config": asdict(config)}
    report["training"] = train_skill(model, tokenizer, skill, config, log)
    if config.eval_size and skill == MIXED:
        report["eval"] = evaluate_tasks(model, tokenizer, SKILLS, size=config.eval_size)
        log(f"{skill}: accuracy " + ", ".join(f"{t} {r['accuracy']:.3f}" for t, r in report["eval"].items()))
    elif config.eval_size:
        report["eval"] = evaluate_tasks(model, tokenizer, [skill], size=config.eval_size)[skill]
        log(f"{skill}: accuracy {report['eval']['accuracy']:.3f} on {report['eval']['n']} held-out examples")
    target = out_dir / skill
    save_adapter(model, target, base_dir.name)
    (target / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None,
                        help="base model directory (default: SmolLM2-135M-Instruct converted into the cache)")
    parser.add_argument("--out", type=Path, required=True, help="skills directory to write <skill>/ into")
    parser.add_argument("--skill", choices=(*SKILLS, MIXED, "all"), default="all",
                        help=f"one skill, every skill, or {MIXED}: one LoRA on all skills' data in equal shares "
                        "(the data-mixing baseline; give it the skills' total budget, e.g. --batch-size 160)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for field in fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if args.base is None:
        from lab.real.base import ensure_base_model

        args.base = ensure_base_model()
    skills = SKILLS if args.skill == "all" else (args.skill,)
    summary = {}
    for skill in skills:
        report = train_and_save(args.base, args.out, skill, config, args.device)
        accuracy = report.get("eval", {}).get("accuracy")
        if skill == MIXED and "eval" in report:
            accuracy = {task: r["accuracy"] for task, r in report["eval"].items()}
        summary[skill] = {"final_loss": report["training"]["final_loss"],
                          "seconds": report["training"]["seconds"], "accuracy": accuracy}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
