"""Train the skill lab: a small Llama base with partial competence on every task, then one
LoRA per skill trained on that skill's data. Deterministic for a given seed.

    python -m lab.train --out lab/assets            # GPU: about two minutes on one H200
    python -m lab.train --out /tmp/lab --quick      # CPU smoke run (tiny step counts)
    python -m lab.train --out lab/assets --mixes-only lab/assets/base
                                                    # only the data-mixing baselines (GPU: ~1 min)

Imports only torch, transformers, peft, tokenizers, safetensors and lab modules, so it runs on
a bare GPU machine. Writes out/base (model + tokenizer, bf16 weights) and out/skills/<task>
(PEFT adapters), out/train_report.json with the dev/test figures it measured and
out/train_log.txt; with --mixes-only, out/baselines/mix-<tasks> and out/baselines/report.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

import torch  # noqa: E402

from lab.data import mix_name  # noqa: E402
from lab.evaluate import score  # noqa: E402
from lab.tokenizer import build_tokenizer  # noqa: E402
from lab.world import ALL_TASKS, COMPOSITES, TASKS, dev_set, heldout_set, train_stream  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_MODEL_NAME = "loramix-skill-lab"
SKILL_RANKS = {"reverse": 8, "upper": 8, "sort": 8, "add": 16, "lookup": 16}
# Skills trained and shipped. A lookup LoRA was tried: the base never learns in-context
# retrieval beyond chance (about 0.4), and 1500 gentle LoRA steps left it there, so lookup
# stays a task of the world without a skill. Each skill's training depends only on the base
# and its own seeds, so this list does not change the other skills.
SHIPPED_SKILLS = ("reverse", "upper", "sort", "add")
# Data-mixing baselines (LoRA Soups' "data mixing"): one LoRA trained on the union of the
# skills' training data, for each merge bench/quality.py scores. Rank 16, the largest skill rank.
MIXES = (("reverse", "upper"), ("sort", "add"), ("reverse", "upper", "sort"), ("upper", "sort", "add"),
         SHIPPED_SKILLS)
MIX_RANK = 16


@dataclass
class Plan:
    """Step counts and rates; `quick` shrinks them for a CPU smoke run."""

    base_max_steps: int = 8000
    base_min_steps: int = 400
    base_batch: int = 128
    base_lr: float = 1e-3
    base_seconds: float = 240.0  # safety cap only; the step limit ends the run first
    eval_every: int = 100
    partial_low: float = 0.25   # stop the base once every skill task reaches this on dev
    hold_above: float = 0.4     # tasks at or above this get replay weight only
    freeze_above: float = 0.7   # tasks above this get no weight
    composite_weight: float = 0.03
    skill_max_steps: int = 1500
    skill_batch: int = 64
    skill_lr: float = 1e-3
    skill_target: float = 0.97  # stop a skill once its dev accuracy reaches this
    skill_eval_every: int = 50
    replay_fraction: float = 0.25
    replay_pool: int = 256
    eval_count: int = 200

    @classmethod
    def quick(cls) -> "Plan":
        return cls(base_max_steps=30, base_min_steps=10, base_batch=16, eval_every=10,
                   skill_max_steps=10, skill_batch=8, skill_eval_every=5, replay_pool=8,
                   eval_count=16, base_seconds=60.0)


class Batcher:
    """Turns examples into (input_ids, labels) with the loss on the answer and <|eos|> only."""

    def __init__(self, tokenizer, device):
        self.vocab = tokenizer.get_vocab()
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.device = device

    def __call__(self, pairs: list[tuple[str, str]]):
        rows, labels = [], []
        for prompt, answer in pairs:
            p = [self.bos] + [self.vocab[c] for c in prompt]
            a = [self.vocab[c] for c in answer] + [self.eos]
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, l) in enumerate(zip(rows, labels)):
            ids[i, :len(r)] = torch.tensor(r)
            lab[i, :len(l)] = torch.tensor(l)
        return ids.to(self.device), lab.to(self.device)


def build_base(tokenizer):
    """A randomly initialised Llama: 256 wide, 4 layers, 4 heads of 64, 2 KV heads."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"  # deterministic backward
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    return model


def _step(model, optimizer, batch, scheduler=None):
    ids, labels = batch
    loss = model(input_ids=ids, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()


def _mixture_weights(acc: dict[str, float], plan: Plan) -> dict[str, float]:
    weights = {}
    for task in TASKS:
        a = acc.get(task, 0.0)
        weights[task] = 1.0 if a < plan.hold_above else (0.05 if a <= plan.freeze_above else 0.0)
    for task in COMPOSITES:
        weights[task] = plan.composite_weight
    return weights


def train_base(model, tokenizer, batcher, plan: Plan, log) -> dict:
    """Pretrain on all tasks until each skill task is partly learned (see Plan).

    The mixture adapts: a task that reaches `hold_above` on dev is only replayed lightly and
    one above `freeze_above` not at all, so easy tasks stop short of mastery while hard ones
    catch up. That leaves room for each skill LoRA to show what it adds.
    """
    rng = random.Random(0)
    streams = {t: train_stream(t, seed=0) for t in ALL_TASKS}
    dev = {t: dev_set(t, plan.eval_count) for t in ALL_TASKS}
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.base_lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    acc: dict[str, float] = {}
    weights = _mixture_weights(acc, plan)
    start, history, done = time.time(), [], False
    for step in range(1, plan.base_max_steps + 1):
        tasks = [t for t, w in weights.items() if w > 0]
        chosen = rng.choices(tasks, weights=[weights[t] for t in tasks], k=plan.base_batch)
        examples = [next(streams[t]) for t in chosen]
        model.train()
        loss = _step(model, optimizer, batcher([(e.prompt, e.answer) for e in examples]), warmup)
        if step % plan.eval_every == 0:
            model.eval()
            acc = score(model, tokenizer, dev)
            weights = _mixture_weights(acc, plan)
            history.append({"step": step, "loss": round(loss, 4), **{t: round(a, 3) for t, a in acc.items()}})
            log(f"base step {step} loss {loss:.3f} dev " + " ".join(f"{t}={a:.2f}" for t, a in acc.items()))
            done = min(acc[t] for t in TASKS) >= plan.partial_low and step >= plan.base_min_steps
            if done or time.time() - start > plan.base_seconds:
                break
    stopped = "partial" if done else ("steps" if step == plan.base_max_steps else "time")
    return {"steps": step, "stopped": stopped, "seconds": round(time.time() - start, 1), "history": history}


def round_to_bf16(model) -> None:
    """Round the weights to bfloat16 values (kept in float32) so the shipped bf16 file is
    exactly the model the skills were trained on."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def replay_pool(model, tokenizer, tasks: tuple[str, ...], plan: Plan) -> list[tuple[str, str]]:
    """The base model's own greedy answers on other tasks' training prompts (no labels from
    those tasks): replaying them keeps a skill from overwriting the base elsewhere."""
    from lab.evaluate import greedy_answers

    prompts = []
    for other in TASKS:
        if other not in tasks:
            stream = train_stream(other, seed=99)
            prompts += [next(stream).prompt for _ in range(plan.replay_pool)]
    model.eval()
    answers = greedy_answers(model, tokenizer, prompts)
    return [(p, a) for p, a in zip(prompts, answers) if a and a.strip() and len(a) <= 10]


def train_lora(base, tokenizer, batcher, tasks: tuple[str, ...], rank: int, seed: int, plan: Plan, log):
    """A LoRA on `tasks`' own training data, equally mixed (+ base replay on the other tasks);
    early stop once the mean dev accuracy over `tasks` reaches the plan's target."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1000 + seed)
    pool = replay_pool(base, tokenizer, tasks, plan)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    model = get_peft_model(copy.deepcopy(base), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.skill_lr, weight_decay=0.0)
    rng = random.Random(2000 + seed)
    streams = {task: train_stream(task, seed=1) for task in tasks}
    dev = {task: dev_set(task, plan.eval_count) for task in tasks}
    n_replay = int(plan.skill_batch * plan.replay_fraction) if pool else 0
    history, acc = [], 0.0
    for step in range(1, plan.skill_max_steps + 1):
        # (One task draws nothing from rng, so single skills reproduce the shipped ones.)
        chosen = [tasks[rng.randrange(len(tasks))] if len(tasks) > 1 else tasks[0]
                  for _ in range(plan.skill_batch - n_replay)]
        pairs = [(e.prompt, e.answer) for e in (next(streams[t]) for t in chosen)]
        pairs += rng.sample(pool, n_replay) if n_replay else []
        model.train()
        loss = _step(model, optimizer, batcher(pairs))
        if step % plan.skill_eval_every == 0:
            model.eval()
            accs = score(model, tokenizer, dev)
            acc = sum(accs.values()) / len(accs)
            history.append({"step": step, "loss": round(loss, 4), "dev": round(acc, 3)})
            if acc >= plan.skill_target:
                break
    log(f"lora {'+'.join(tasks)} r{rank}: {step} steps, dev {acc:.3f}")
    return model, {"rank": rank, "steps": step, "dev": acc, "history": history}


def train_skill(base, tokenizer, batcher, task: str, plan: Plan, log):
    """A LoRA for `task` on its own training data (+ base replay); early stop on dev."""
    return train_lora(base, tokenizer, batcher, (task,), SKILL_RANKS[task], ALL_TASKS.index(task), plan, log)


def train_mixes(base, tokenizer, batcher, plan: Plan, out: Path, log) -> dict:
    """The data-mixing baselines of MIXES, saved as out/baselines/mix-<tasks>; their reports."""
    test = {t: heldout_set(t, plan.eval_count) for t in ALL_TASKS}
    reports = {}
    for index, tasks in enumerate(MIXES):
        model, info = train_lora(base, tokenizer, batcher, tasks, MIX_RANK, 100 + index, plan, log)
        model.eval()
        info["test"] = score(model, tokenizer, test)
        log(f"test {mix_name(tasks)} " + json.dumps(info["test"]))
        save_skill(model, out / "baselines" / mix_name(tasks))
        reports[mix_name(tasks)] = info
        del model
    return reports


def save_base(model, tokenizer, out: Path) -> None:
    """bf16 safetensors with a float32 config: loaders upcast to float32 by default."""
    out.mkdir(parents=True, exist_ok=True)
    shipped = copy.deepcopy(model).to(torch.bfloat16)
    shipped.config._attn_implementation = None
    shipped.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_skill(model, out: Path) -> None:
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixes-only", type=Path, default=None, metavar="BASE_DIR",
                        help="train only the data-mixing baselines on the base model in BASE_DIR")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    device = torch.device(args.device)
    tokenizer = build_tokenizer()
    batcher = Batcher(tokenizer, device)
    if args.mixes_only is not None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            args.mixes_only, dtype=torch.float32, attn_implementation="eager").to(device).eval()
        report = {"plan": plan.__dict__, "mixes": train_mixes(base, tokenizer, batcher, plan, args.out, log)}
        (args.out / "baselines" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "baselines" / "train_log.txt").write_text("\n".join(lines) + "\n")
        return
    base = build_base(tokenizer).to(device)
    log(f"base parameters: {sum(p.numel() for p in base.parameters()):,}")
    report = {"plan": plan.__dict__, "base_training": train_base(base, tokenizer, batcher, plan, log)}
    round_to_bf16(base)
    base.eval()
    test = {t: heldout_set(t, plan.eval_count) for t in ALL_TASKS}
    report["test"] = {"base": score(base, tokenizer, test)}
    log("test base " + json.dumps(report["test"]["base"]))
    save_base(base, tokenizer, args.out / "base")
    report["skills"] = {}
    for task in SHIPPED_SKILLS:
        model, info = train_skill(base, tokenizer, batcher, task, plan, log)
        model.eval()
        report["test"][task] = score(model, tokenizer, test)
        log(f"test {task} " + json.dumps(report["test"][task]))
        report["skills"][task] = info
        save_skill(model, args.out / "skills" / task)
        del model
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "train_log.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
