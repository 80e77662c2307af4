"""The local engine's per-request text pieces: detokenization, stop strings, EOS, sampling."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from server.engines.base import SamplingOptions
from server.engines.local.sampling import IncrementalDetokenizer, StopChecker, TokenSampler
from server.engines.local.sequence import Sequence


def test_detokenizer_never_splits_a_character(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = "naïve café → 東京 😀 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens are partial characters
    detok = IncrementalDetokenizer(tok, tok.encode("hi", add_special_tokens=False))
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_stop_string_split_across_deltas_is_cut():
    checker = StopChecker(("END",))
    outputs = [checker.feed(piece) for piece in ("abc E", "N", "Dxyz")]
    assert outputs == [("abc ", False), ("", False), ("", True)]
    assert checker.text[:checker.num_emitted] == "abc "


def test_held_back_prefix_is_released_when_no_stop_follows():
    checker = StopChecker(("STOP", "ST!"))
    assert checker.feed("aST") == ("a", False)
    assert checker.feed("x") == ("STx", False)
    assert checker.feed("yS", final=True) == ("yS", False)


def _sequence(tokenizer, sampling, deltas):
    return Sequence("r", [1, 4, 5], sampling, None, deltas.append, max_total_len=1024,
                    tokenizer=tokenizer, eos_token_ids=frozenset({tokenizer.eos_token_id}))


def test_eos_finishes_unless_ignored(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    deltas = []
    seq = _sequence(tok, SamplingOptions(max_tokens=8), deltas)
    seq.append_token(60)
    seq.append_token(tok.eos_token_id)
    assert seq.is_finished and deltas[-1].finish_reason == "stop" and deltas[-1].text == ""
    assert deltas[-1].num_output_tokens == 2
    deltas.clear()
    seq = _sequence(tok, SamplingOptions(max_tokens=8, ignore_eos=True), deltas)
    seq.append_token(tok.eos_token_id)
    assert not seq.is_finished and deltas[-1].finish_reason is None


def test_tiny_top_p_is_greedy_and_seed_fixes_draws():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    nucleus = TokenSampler(SamplingOptions(temperature=1.0, top_p=1e-6, seed=3))
    assert {nucleus.sample(logits) for _ in range(20)} == {int(logits.argmax())}
    first, second = (TokenSampler(SamplingOptions(temperature=1.0, seed=5)) for _ in range(2))
    assert [first.sample(logits) for _ in range(10)] == [second.sample(logits) for _ in range(10)]
    spread = TokenSampler(SamplingOptions(temperature=5.0, seed=5))
    assert len({spread.sample(logits) for _ in range(50)}) > 5
