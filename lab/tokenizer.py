"""The skill lab's character-level tokenizer: one token per character of a fixed alphabet."""

from __future__ import annotations

from lab.world import ALPHABET

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# The lab model was trained on raw prompts ("reverse: abc =>"), so a chat renders as the last
# user message in that raw form; other turns carry no task and are dropped.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{% if users %}{{ users[-1]['content'] }}{% endif %}"
)


def build_tokenizer():
    """A PreTrainedTokenizerFast over ALPHABET: encode() prepends <|bos|>, decode() fuses."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    vocab = {token: i for i, token in enumerate([*specials, *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
