"""Prompt token ids from the base model's own tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

from server.errors import invalid_request
from server.protocol import ChatMessage


class PromptEncoder:
    """Turns chat messages or text prompts into token ids the engine can run."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab_size = len(self.tokenizer)

    def chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
             add_special_tokens: bool = False) -> list[int]:
        """Token ids of `messages` rendered by the chat template, opening the assistant turn
        (the template writes the special tokens it wants; `add_special_tokens` adds more)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid_request("The base model has no chat template; use /v1/completions.", "messages")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def text(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens), or checked ids."""
        if isinstance(prompt, list):
            return self.check_ids(list(prompt), param)
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise invalid_request("The prompt is empty.", param)
        return ids

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` as /tokenize answers them (an empty text has none)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_ids(self, token_ids: list[int], param: str) -> list[int]:
        """`token_ids`, after checking each lies in the vocabulary."""
        if any(not 0 <= token < self.vocab_size for token in token_ids):
            raise invalid_request(f"Token ids must be in [0, {self.vocab_size}).", param)
        return token_ids

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included (as vLLM's /detokenize)."""
        return self.tokenizer.decode(token_ids)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token decoded on its own: the `token` strings of logprobs (as vLLM's)."""
        return [self.tokenizer.decode([token]) for token in token_ids]

    def info(self) -> dict:
        """The tokenizer's class, special tokens, length limit and chat template (no paths)."""
        tokenizer = self.tokenizer
        info = {"tokenizer_class": type(tokenizer).__name__}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info[name] = getattr(tokenizer, name, None)
        info["model_max_length"] = tokenizer.model_max_length
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            info["chat_template"] = template
        return info
