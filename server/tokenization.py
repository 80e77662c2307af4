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

    def chat(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of `messages` rendered by the chat template, opening the assistant turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid_request("The base model has no chat template; use /v1/completions.", "messages")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens), or checked ids."""
        if isinstance(prompt, list):
            if any(not 0 <= token < self.vocab_size for token in prompt):
                raise invalid_request(f"Token ids must be in [0, {self.vocab_size}).", param)
            return list(prompt)
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise invalid_request("The prompt is empty.", param)
        return ids
