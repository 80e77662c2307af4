"""Per-request token choice and text assembly: sampling, incremental detokenization, stops."""

from __future__ import annotations

import secrets

import torch

from server.engines.base import NonFiniteOutputError, SamplingOptions

# Prompt tokens decoded in front of the output so tokenizers that look at the previous token
# (leading-space rules) produce the same text as a full decode would.
_PREFIX_TOKENS = 5

# Temperatures below this are greedy, as in vLLM: dividing logits by a tiny temperature
# overflows to inf and the softmax becomes NaN.
MIN_TEMPERATURE = 1e-5


def check_finite(logits: torch.Tensor) -> None:
    """Raise NonFiniteOutputError if a row of logits [vocab] has NaN or inf entries."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError(
            "The model's output for this request is not finite (NaN or infinite logits); "
            "the composition's weights are likely too large.")


class TokenSampler:
    """Chooses the next token from one row of logits: greedy at temperature 0 (or below
    MIN_TEMPERATURE), otherwise temperature + top-p (nucleus) sampling with the request's own
    torch.Generator, so a seeded request draws the same tokens whatever else shares its batch."""

    def __init__(self, sampling: SamplingOptions) -> None:
        self.temperature = sampling.temperature
        self.top_p = sampling.top_p
        self.generator = None
        if self.temperature >= MIN_TEMPERATURE:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            # Modulo 2**64: torch takes seeds as uint64 (n > 1 choices use seed + j).
            self.generator = torch.Generator().manual_seed(seed % (1 << 64))

    @property
    def is_greedy(self) -> bool:
        return self.generator is None

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32 on the CPU -> a token id. Raises NonFiniteOutputError."""
        check_finite(logits)
        if self.is_greedy:
            return int(logits.argmax())
        # float64: finite logits over a temperature >= MIN_TEMPERATURE stay finite.
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p, and always the top token (a
            # top_p that underflows to 0 is top-1, not an empty distribution).
            mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs
            drop = mass_before >= self.top_p
            drop[0] = False
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character:
    text is held back while the decoded tail is an incomplete byte sequence (U+FFFD)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_PREFIX_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

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
    a stop string is held back; a found stop string and everything after it is cut."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.num_emitted = 0

    def feed(self, delta: str, *, final: bool = False) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit now, whether a stop string was hit)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            return self._emit_until(min(hits)), True
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
