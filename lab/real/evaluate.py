"""Accuracy of the base model, or of the base with one adapter, on the real-model tasks:
greedy decoding through the chat template, exact checkers (checks.py), and a 95% Wilson
confidence interval per task.

    python -m lab.real.evaluate --device cuda                          # the base model, every task
    python -m lab.real.evaluate --adapter lab/real/assets/skills/words --tasks words arithmetic_words
    python -m lab.real.evaluate --adapter merged/ --out result.json   # e.g. a `loramix merge` output
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lab.real.checks import is_correct
from lab.real.data import EVAL_SIZE, TASKS, eval_set

MAX_NEW_TOKENS = 48  # the longest reference answer (a five-digit number in words) is ~25 tokens


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion correct/n (z = 1.96: 95%)."""
    if not 0 <= correct <= n or n == 0:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got {correct}/{n}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 64) -> list[str]:
    """The model's greedy reply to each prompt, sent as one user message (chat template)."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [r.strip() for r in replies]


def evaluate_tasks(model, tokenizer, tasks, *, size: int = EVAL_SIZE, batch_size: int = 64) -> dict:
    """{task: {"correct", "n", "accuracy", "ci95": [low, high], "samples": first replies}}."""
    model.eval()
    results = {}
    for task in tasks:
        examples = eval_set(task, size)
        replies = greedy_replies(model, tokenizer, [e.prompt for e in examples], batch_size=batch_size)
        correct = sum(is_correct(task, r, e.expected) for r, e in zip(replies, examples))
        results[task] = {"correct": correct, "n": len(examples), "accuracy": correct / len(examples),
                         "ci95": list(wilson_interval(correct, len(examples))),
                         "samples": [{"prompt": e.prompt, "reply": r} for e, r in zip(examples[:3], replies)]}
    return results


def format_table(results: dict) -> str:
    lines = [f"{'task':18} {'accuracy':>8}  95% CI          n"]
    for task, r in results.items():
        lines.append(f"{task:18} {r['accuracy']:8.3f}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  {r['n']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from lab.real.train import load_base

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None, help="default: the converted SmolLM2-135M-Instruct")
    parser.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter directory (default: none)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--size", type=int, default=EVAL_SIZE, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.base is None:
        from lab.real.base import ensure_base_model

        args.base = ensure_base_model()
    model, tokenizer = load_base(args.base, args.device)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter)).to(args.device)
    results = evaluate_tasks(model, tokenizer, args.tasks, size=args.size, batch_size=args.batch_size)
    print(format_table(results))
    if args.out is not None:
        args.out.write_text(json.dumps({"base": args.base.name, "adapter": str(args.adapter or ""),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
