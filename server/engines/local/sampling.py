"""Per-request token choice and text assembly: sampling, incremental detokenization, stops."""

from __future__ import annotations

import secrets

import torch

from server.engines.base import NonFiniteOutputError, SamplingOptions
from server.engines.local import logits as ops

# Prompt tokens decoded in front of the output so tokenizers that look at the previous token
# (leading-space rules) produce the same text as a full decode would.
_PREFIX_TOKENS = 5

# Temperatures below this are greedy, as in vLLM: dividing logits by a tiny temperature
# overflows to inf and the softmax becomes NaN.
MIN_TEMPERATURE = 1e-5


class TokenSampler:
    """One sequence's sampling settings and its own torch.Generator, so a seeded request draws
    the same tokens whatever else shares its batch. Greedy at temperature 0 (or below
    MIN_TEMPERATURE). `sample_rows` chooses the tokens of a whole batch."""

    def __init__(self, sampling: SamplingOptions, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.sampling = sampling
        self.temperature = sampling.temperature
        self.top_p = sampling.top_p
        # min_tokens holds back EOS (even with ignore_eos, as vLLM) and the stop token ids.
        self.stop_token_ids = sorted(set(eos_token_ids) | set(sampling.stop_token_ids))
        self.generator = None
        if self.temperature >= MIN_TEMPERATURE:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            # Modulo 2**64: torch takes seeds as uint64 (n > 1 choices use seed + j).
            self.generator = torch.Generator().manual_seed(seed % (1 << 64))

    @property
    def is_greedy(self) -> bool:
        return self.generator is None

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy on the raw logits: no penalty or min_tokens can move the argmax."""
        return self.is_greedy and not self.sampling.has_penalties and not self.sampling.min_tokens

    def sample(self, logits: torch.Tensor, prompt_token_ids: list[int] = (),
               output_token_ids: list[int] = ()) -> int:
        """logits: [vocab] float32 on the CPU -> a token id. Raises NonFiniteOutputError."""
        (token,) = sample_rows([self], logits.unsqueeze(0), [list(prompt_token_ids)],
                               [list(output_token_ids)])
        if isinstance(token, BaseException):
            raise token
        return token


def sample_rows(samplers: list[TokenSampler], logits: torch.Tensor, prompt_token_ids: list[list[int]],
                output_token_ids: list[list[int]]) -> list[int | BaseException]:
    """The next token of every row, or the row's own error (non-finite logits).

    logits: [rows, vocab] float32 on the CPU; row i has samplers[i] and its prompt and output
    so far. Each step runs once over the rows that need it (see logits.py for the order)."""
    is_finite = torch.isfinite(logits).all(dim=-1).tolist()
    results: list[int | BaseException] = [0] * len(samplers)
    for i, ok in enumerate(is_finite):
        if not ok:
            results[i] = _non_finite()
    if all(s.is_plain_greedy for s in samplers):
        greedy = logits.argmax(dim=-1).tolist()
        return [greedy[i] if is_finite[i] else results[i] for i in range(len(samplers))]
    live = [i for i, ok in enumerate(is_finite) if ok]
    rows = logits[live].clone()
    samplers = [samplers[i] for i in live]
    _suppress_early_stops(rows, samplers, [output_token_ids[i] for i in live])
    _penalize(rows, samplers, [prompt_token_ids[i] for i in live], [output_token_ids[i] for i in live])
    # A tiny repetition_penalty can push a logit past float32's range: the largest finite value
    # keeps its rank (several such tokens tie) and the softmax defined.
    rows.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(rows.dtype).max)
    greedy = rows.argmax(dim=-1).tolist()
    drawn = _draw(rows, samplers)
    for j, i in enumerate(live):
        results[i] = greedy[j] if samplers[j].is_greedy else drawn[j]
    return results


def _non_finite() -> NonFiniteOutputError:
    return NonFiniteOutputError(
        "The model's output for this request is not finite (NaN or infinite logits); "
        "the composition's weights are likely too large.")


def _select(samplers: list[TokenSampler], keep) -> list[int]:
    return [i for i, s in enumerate(samplers) if keep(s)]


def _suppress_early_stops(rows: torch.Tensor, samplers: list[TokenSampler],
                          outputs: list[list[int]]) -> None:
    early = [i for i, s in enumerate(samplers)
             if len(outputs[i]) < s.sampling.min_tokens and s.stop_token_ids]
    ops.suppress_tokens(rows, early, [samplers[i].stop_token_ids for i in early])


def _penalize(rows: torch.Tensor, samplers: list[TokenSampler], prompts: list[list[int]],
              outputs: list[list[int]]) -> None:
    chosen = _select(samplers, lambda s: s.sampling.has_penalties)
    if not chosen:
        return
    vocab = rows.shape[-1]
    index = torch.tensor(chosen)
    options = [samplers[i].sampling for i in chosen]
    penalized = ops.apply_penalties(
        rows[index],
        ops.token_counts([prompts[i] for i in chosen], vocab),
        ops.token_counts([outputs[i] for i in chosen], vocab),
        presence=torch.tensor([o.presence_penalty for o in options]),
        frequency=torch.tensor([o.frequency_penalty for o in options]),
        repetition=torch.tensor([o.repetition_penalty for o in options]))
    rows[index] = penalized


def _draw(rows: torch.Tensor, samplers: list[TokenSampler]) -> list[int | None]:
    """Temperature, min_p, top_k, top_p, then one draw per random row with its own generator
    (float64: finite logits over a temperature >= MIN_TEMPERATURE stay finite)."""
    drawn: list[int | None] = [None] * len(samplers)
    chosen = _select(samplers, lambda s: not s.is_greedy)
    if not chosen:
        return drawn
    subset = [samplers[i] for i in chosen]
    scaled = rows[torch.tensor(chosen)].double()
    scaled /= torch.tensor([s.temperature for s in subset], dtype=torch.float64).unsqueeze(1)
    _on_rows(scaled, subset, lambda s: s.sampling.min_p > 0, ops.apply_min_p,
             lambda ss: torch.tensor([s.sampling.min_p for s in ss], dtype=torch.float64))
    _on_rows(scaled, subset, lambda s: s.sampling.top_k > 0, ops.apply_top_k,
             lambda ss: torch.tensor([s.sampling.top_k for s in ss]))
    probs = torch.softmax(scaled, dim=-1)
    _on_rows(probs, subset, lambda s: s.top_p < 1.0, ops.top_p_probs,
             lambda ss: torch.tensor([s.top_p for s in ss], dtype=torch.float64))
    for j, i in enumerate(chosen):
        drawn[i] = int(torch.multinomial(probs[j], 1, generator=subset[j].generator))
    return drawn


def _on_rows(values: torch.Tensor, samplers: list[TokenSampler], keep, op, params) -> None:
    """values[rows that keep] = op(those rows, params(their samplers))."""
    chosen = _select(samplers, keep)
    if chosen:
        index = torch.tensor(chosen)
        values[index] = op(values[index], params([samplers[i] for i in chosen]))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character:
    text is held back while the decoded tail is an incomplete byte sequence (U+FFFD)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_PREFIX_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, *, final: bool = False) -> str:
        """Append a token; return the new text it completes ('' while a character is open).
        With final=True, flush whatever is left, even an incomplete character."""
        self.ids.append(token_id)
        return self.flush() if final else self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) and not final:
            return ""
        if new_text.endswith("\ufffd") and not final:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]


class StopChecker:
    """Finds stop strings in the generated text. Text that could still become the start of
    a stop string is held back; a found stop string and everything after it is cut (the stop
    string itself is kept with include_stop)."""

    def __init__(self, stop: tuple[str, ...], include_stop: bool = False) -> None:
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self.text = ""
        self.num_emitted = 0

    def feed(self, delta: str, *, final: bool = False, search: bool = True) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit now, whether a stop string was hit).
        With search=False (min_tokens not reached yet) no stop string can end in `delta`."""
        old_len = len(self.text)
        start = max(0, old_len - max((len(s) for s in self.stop), default=0))
        self.text += delta
        hits = [(i, i + len(s)) for s in self.stop
                if search and (i := self.text.find(s, start)) >= 0 and i + len(s) > old_len]
        if hits:
            begin, end = min(hits)
            return self._emit_until(end if self.include_stop else begin), True
        if final:
            return self._emit_until(len(self.text)), False
        return self._emit_until(len(self.text) - self._open_prefix_len()), False

    def _open_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit_until(self, end: int) -> str:
        out = self.text[self.num_emitted:end] if end > self.num_emitted else ""
        self.num_emitted = max(self.num_emitted, end)
        return out
