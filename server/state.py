"""What the request handlers share: settings, engine, composer, prompt encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
import time

from fastapi import Request

from server.composer import Composer
from server.engines.base import Engine
from server.settings import Settings
from server.tokenization import PromptEncoder


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    composer: Composer
    encoder: PromptEncoder
    base_name: str
    started: float = field(default_factory=time.time)


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the running server's state."""
    return request.app.state.loramix
