"""The FastAPI application: routers, error envelope, metrics, and a lifespan that starts the
engine and builds the composition service."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from server import openapi
from server.builder import CompositionBuilder
from server.cache import CompositionCache
from server.composer import Composer
from server.engine_adapters import EngineAdapters
from server.engines import create_engine
from server.engines.base import Engine
from server.errors import register_exception_handlers
from server.limits import RequestBodyLimitMiddleware
from server.merge_pool import MergePool
from server.metrics import RequestMetricsMiddleware
from server.model_paths import resolve_model_paths
from server.named import NamedCompositions
from server.routers import compositions, openai_api, ops, tokenize
from server.settings import Settings
from server.skills import SkillRegistry, base_module_shapes
from server.state import ServerState
from server.tokenization import PromptEncoder

logger = logging.getLogger("loramix.app")


async def build_state(settings: Settings, engine: Engine | None) -> ServerState:
    """Start the engine and assemble registry, cache, named compositions and composer."""
    base_dir, skills_dir, base_name = resolve_model_paths(settings)
    engine = engine or create_engine(settings, base_dir)
    await engine.start()
    registry = SkillRegistry(skills_dir, base_module_shapes(base_dir))
    registry.scan()
    cache_dir = settings.resolved_cache_dir(base_dir, skills_dir)
    builder = CompositionBuilder(registry, max_lora_rank=engine.max_lora_rank, strict_rank=settings.strict_rank)
    adapters = EngineAdapters(engine)
    cache = CompositionCache(
        cache_dir, build=builder.build, memory_bytes=settings.memory_cache_bytes,
        disk_bytes=settings.disk_cache_bytes, disk_grace_s=settings.disk_cache_grace_seconds,
        on_admit=adapters.register, on_evict=adapters.unregister,
    )
    composer = Composer(
        base_name=base_name,
        registry=registry,
        cache=cache,
        adapters=adapters,
        engine=engine,
        named=NamedCompositions(cache_dir),
        default_method=settings.default_method,
        merge_pool=MergePool(
            num_workers=settings.merge_workers,
            queue_size=settings.merge_queue_size,
            small_max_skills=settings.small_merge_max_skills,
        ),
    )
    logger.info("serving %s with skills %s on engine %s", base_name, registry.names(), engine.name)
    return ServerState(settings, engine, composer, PromptEncoder(base_dir), base_name)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The loramix app. `engine` (not started) overrides the one `settings.engine` names."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await build_state(settings, engine)
        app.state.loramix = state
        try:
            yield
        finally:
            state.composer.merge_pool.shutdown()
            await state.engine.shutdown()

    app = FastAPI(title="loramix", version="0.1.0", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)  # openapi.install serves them
    app.state.settings = settings
    openapi.install(app, settings)
    register_exception_handlers(app)
    app.add_middleware(RequestBodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetricsMiddleware)  # outermost: counts the 413s too
    app.include_router(openai_api.router)
    app.include_router(compositions.router)
    app.include_router(ops.router)
    app.include_router(tokenize.router)
    return app
