"""Prometheus metrics, created once per process in the default registry (so an engine's own
metric families, e.g. vLLM's, appear on the same /metrics page)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_MERGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "loramix_requests", "HTTP requests by endpoint and HTTP status.", ["endpoint", "status"]
)
ERRORS = Counter(
    "loramix_errors", "Error responses (and in-stream errors) by endpoint and error code.", ["endpoint", "code"]
)
PROMPT_TOKENS = Counter("loramix_prompt_tokens", "Prompt tokens processed.")
COMPLETION_TOKENS = Counter("loramix_completion_tokens", "Completion tokens generated.")
TIME_TO_FIRST_TOKEN = Histogram(
    "loramix_time_to_first_token_seconds", "Time from request start to the first output token.",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "loramix_inter_token_latency_seconds", "Time between consecutive output deltas of one sequence.",
    buckets=_LATENCY_BUCKETS,
)
CACHE_HITS = Counter("loramix_composition_cache_hits", "Composition cache hits by tier.", ["tier"])
CACHE_MISSES = Counter("loramix_composition_cache_misses", "Compositions that had to be merged.")
CACHE_EVICTIONS = Counter("loramix_composition_cache_evictions", "Composition cache evictions by tier.", ["tier"])
CACHE_DISK_ERRORS = Counter(
    "loramix_composition_cache_disk_errors",
    "Failures of the composition cache's disk tier, by operation (new entries then stay in memory only).",
    ["operation"],
)
CACHE_CORRUPT_ENTRIES = Counter(
    "loramix_composition_cache_corrupt_entries", "Corrupt disk cache entries discarded (merged again when used)."
)
MERGES = Counter("loramix_merges", "Merges performed, by method.", ["method"])
MERGE_SECONDS = Histogram(
    "loramix_merge_seconds", "Wall time of one merge (including compression), by method.", ["method"],
    buckets=_MERGE_BUCKETS,
)
COMPRESSIONS = Counter(
    "loramix_rank_compressions", "Merged adapters compressed to the engine's max LoRA rank."
)
ABORTED_SEQUENCES = Counter(
    "loramix_aborted_sequences", "Sequences aborted in the engine (client gone or request failed)."
)
REJECTED_REQUESTS = Counter(
    "loramix_rejected_requests",
    "Requests refused by a server limit before doing the work, by the setting that refused them "
    "(max_request_bytes, max_prompts_per_request, max_sequences_per_request, merge_queue_size).",
    ["limit"],
)
MERGE_QUEUE_DEPTH = Gauge("loramix_merge_queue_depth", "Merges running or waiting for a worker, by lane.", ["lane"])
ENGINE_ADAPTER_LOADS = Counter("loramix_engine_adapter_loads", "Adapters registered with the engine.")
ENGINE_ADAPTER_REMOVALS = Counter("loramix_engine_adapter_removals", "Adapters removed from the engine.")


NUM_REQUESTS_RUNNING = Gauge(
    "loramix_num_requests_running",
    "Sequences the engine is decoding (under vLLM: vLLM's own vllm:num_requests_running).",
)
NUM_REQUESTS_WAITING = Gauge(
    "loramix_num_requests_waiting",
    "Sequences waiting for a place in the engine's batch (under vLLM: vllm:num_requests_waiting).",
)
# vLLM's adapter metric, for engines that do not export it themselves (the local engine), in
# a registry of its own: vLLM registers the same name in the default registry.
LORA_REGISTRY = CollectorRegistry()
LORA_REQUESTS_INFO = Gauge(
    "vllm:lora_requests_info", "Running stats on lora requests.",
    ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=LORA_REGISTRY,
)


def observe_engine(engine) -> None:
    """Read the engine's request counts and adapters into the gauges (at scrape time).

    vllm:lora_requests_info is one series, labelled with the adapter names (canonical
    composition strings) of running and waiting sequences, whose value is the time it was
    read, as vLLM sets it."""
    running, waiting = engine.request_counts()
    NUM_REQUESTS_RUNNING.set(running)
    NUM_REQUESTS_WAITING.set(waiting)
    LORA_REQUESTS_INFO.clear()
    info = engine.lora_requests_info()
    if info is not None:
        running_names, waiting_names, max_loras = info
        LORA_REQUESTS_INFO.labels(max_lora=str(max_loras), waiting_lora_adapters=",".join(waiting_names),
                                  running_lora_adapters=",".join(running_names)).set_to_current_time()


def render() -> tuple[bytes, str]:
    """The exposition text of the default registry (and of vLLM's adapter metric when
    loramix exports it) and its content type."""
    return generate_latest() + generate_latest(LORA_REGISTRY), CONTENT_TYPE_LATEST


def endpoint_label(scope: dict) -> str:
    """The route template of a request (bounded label values), or "unmatched"."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestMetricsMiddleware:
    """Pure ASGI middleware counting HTTP requests by route template and status."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_with_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            REQUESTS.labels(endpoint=endpoint_label(scope), status=str(status["code"])).inc()
