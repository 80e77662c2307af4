"""Log-probabilities of chosen tokens and of the most likely alternatives, from raw logits.

They are vLLM's default `raw_logprobs`: log_softmax of the model's own logits, before the
temperature, top-p or any penalty shapes the sampling distribution."""

from __future__ import annotations

import torch

from server.engines.base import TokenLogprobs


def position_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprobs]:
    """The logprob of token_ids[i] under logits[i], and the `num_top` most likely tokens there.

    logits: [num_positions, vocab] (any float dtype, any device); len(token_ids) == num_positions.
    """
    if not token_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, ids).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0],) * 2
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(token_id, chosen[i], tuple(zip(top_ids[i], top_values[i])))
        for i, token_id in enumerate(token_ids)
    ]


def prompt_logprobs(logits: torch.Tensor, prompt_token_ids: list[int], num_top: int) -> list[TokenLogprobs | None]:
    """Logprobs of each prompt token given the ones before it (None for the first token).

    logits: [num_prompt_tokens, vocab], the prefill's logits at the prompt's positions."""
    return [None, *position_logprobs(logits[:-1], prompt_token_ids[1:], num_top)]
