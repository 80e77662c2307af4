"""Batched logits processing with vLLM's semantics: each function takes one row of
parameters per sequence, so rows with different settings are processed in one tensor op.

Order, as in vLLM's sampler: stop tokens suppressed (min_tokens), penalties, then greedy
argmax or temperature -> min_p -> top_k -> top_p -> draw. Every function works in place on
`logits` and returns it.
"""

from __future__ import annotations

import torch


def token_counts(token_ids: list[list[int]], vocab_size: int) -> torch.Tensor:
    """counts[i, t] = how often token t occurs in token_ids[i]: [rows, vocab] int64."""
    counts = torch.zeros((len(token_ids), vocab_size + 1), dtype=torch.long)
    width = max((len(ids) for ids in token_ids), default=0)
    if width:
        padded = torch.full((len(token_ids), width), vocab_size, dtype=torch.long)  # pad: bin vocab_size
        for i, ids in enumerate(token_ids):
            padded[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_counts: torch.Tensor, output_counts: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties. logits, prompt_counts, output_counts: [rows, vocab]; presence,
    frequency, repetition: [rows].

    repetition: a token seen in prompt or output has its logit divided by the penalty if
    positive, multiplied if not. frequency: minus penalty x count in the output. presence:
    minus penalty once if in the output (OpenAI's definition)."""
    seen = (prompt_counts > 0) | (output_counts > 0)
    penalty = torch.where(seen, repetition.unsqueeze(1), torch.ones_like(logits))
    logits *= torch.where(logits > 0, 1.0 / penalty, penalty)
    logits -= frequency.unsqueeze(1) * output_counts
    logits -= presence.unsqueeze(1) * (output_counts > 0)
    return logits


def suppress_tokens(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]) -> torch.Tensor:
    """Set logits[rows[j], token_ids[j]] to -inf (min_tokens: no stop token yet)."""
    for row, ids in zip(rows, token_ids):
        logits[row, ids] = float("-inf")
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the top probability.
    logits: [rows, vocab] (temperature already applied); min_p: [rows], 0 = off."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the top_k largest logits of each row (ties at the k-th value are kept).
    logits: [rows, vocab]; top_k: [rows] int64, values < 1 or >= vocab mean off."""
    vocab = logits.shape[-1]
    k = torch.where((top_k < 1) | (top_k > vocab), vocab, top_k)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill_(logits < kth, float("-inf"))


def top_p_probs(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but the smallest set of likeliest tokens whose mass reaches top_p (always
    keeping the top token, so a top_p that underflows is top-1). probs: [rows, vocab];
    top_p: [rows], 1 = off."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop = mass_before >= top_p.unsqueeze(1).to(probs.dtype)
    drop[:, 0] = False
    sorted_probs[drop] = 0.0
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
