"""Tokenizer endpoints, at the root as in vLLM: /tokenize, /detokenize, /tokenizer_info
(lm-eval's `tokenizer_backend=remote` probes and uses them). Behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.auth import require_api_key
from server.openapi import V1_ERRORS, error_responses
from server.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                             TokenizeResponse, TokenizerInfo)
from server.serving.tokenization import TokenizationService
from server.state import ServerState, get_state

router = APIRouter(dependencies=[Depends(require_api_key)])

# A bad body or token id (400), an unknown `model` (404), a body over the limit (413).
_ERRORS = error_responses(400, 401, 404, 413, 500)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(request: TokenizeRequest, state: ServerState = Depends(get_state)) -> TokenizeResponse:
    return await TokenizationService(state).tokenize(request)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(request: DetokenizeRequest, state: ServerState = Depends(get_state)) -> DetokenizeResponse:
    return await TokenizationService(state).detokenize(request)


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=error_responses(*V1_ERRORS))
async def tokenizer_info(state: ServerState = Depends(get_state)) -> TokenizerInfo:
    return TokenizationService(state).tokenizer_info()
