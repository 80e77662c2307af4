"""Greedy answers and exact-match scores of a causal LM on skill-lab examples."""

from __future__ import annotations

import torch

from lab.world import Example, exact_match

MAX_NEW_TOKENS = 12  # the longest answer (8 characters) plus its leading space and <|eos|>


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], *, batch_size: int = 1024) -> list[str]:
    """Greedy completions of `prompts` (the text after the prompt, up to <|eos|>).

    Prompts are sorted by length and left-padded in batches; the attention mask and explicit
    position ids make padding invisible, so an answer does not depend on its batch.
    """
    device = next(model.parameters()).device
    ids = [tokenizer(p).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    answers: list[str] = [""] * len(prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        seqs = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seqs[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        seqs, mask = seqs.to(device), mask.to(device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        new_tokens, cache, step_ids = [], None, seqs
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(MAX_NEW_TOKENS):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            new_tokens.append(token)
            done |= token == eos
            if bool(done.all()):
                break
            step_ids = token[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        generated = torch.stack(new_tokens, dim=1).tolist()
        for row, i in enumerate(chunk):
            tokens = generated[row]
            if eos in tokens:
                tokens = tokens[:tokens.index(eos)]
            answers[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return answers


def score(model, tokenizer, examples_by_task: dict[str, list[Example]]) -> dict[str, float]:
    """Exact-match accuracy per task, all tasks decoded in one pass."""
    flat = [ex for examples in examples_by_task.values() for ex in examples]
    answers = greedy_answers(model, tokenizer, [ex.prompt for ex in flat])
    result, start = {}, 0
    for task, examples in examples_by_task.items():
        result[task] = exact_match(answers[start:start + len(examples)], examples)
        start += len(examples)
    return result
