"""POST /tokenize, POST /detokenize and GET /tokenizer_info, as vLLM's OpenAI server answers
them: the base model's tokenizer and chat template, the ones generation uses."""

from __future__ import annotations

import asyncio

from server.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                             TokenizeResponse, TokenizerInfo)
from server.state import ServerState


class TokenizationService:
    """Every served model (base, skill, composition) shares the base model's tokenizer; a
    `model` is only checked to name one of them."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        await self._check_model(request.model)
        encoder = self.state.encoder
        if request.messages is not None:
            tokens = await asyncio.to_thread(encoder.chat, request.messages, request.add_generation_prompt,
                                             bool(request.add_special_tokens))
        else:
            add_special_tokens = request.add_special_tokens is not False
            tokens = await asyncio.to_thread(encoder.tokenize, request.prompt, add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=self.state.engine.max_model_len, tokens=tokens)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        await self._check_model(request.model)
        tokens = self.state.encoder.check_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=await asyncio.to_thread(self.state.encoder.decode, tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        return TokenizerInfo(**self.state.encoder.info())

    async def _check_model(self, model: str | None) -> None:
        """404 model_not_found (or 400 for a malformed composition) unless `model` is served."""
        if model is not None:
            await self.state.composer.refresh_skills()
            self.state.composer.resolve(model)
