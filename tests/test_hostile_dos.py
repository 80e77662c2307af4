"""Denial of service, as a hostile client tries it: oversized bodies, requests for thousands
of sequences, a flood of merges, a long tokenization, and clients that hang up on a
non-streaming request. Through the real app (local engine, tiny model), in process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import httpx
import pytest
from prometheus_client import REGISTRY

import merging
from server.app import create_app
from server.engines.local import LocalEngine, LocalSettings
from server.settings import Settings

BASE = "tiny"
WAIT_S = 60  # readiness waits only; nothing here asserts a duration


def rejected(limit: str) -> float:
    return REGISTRY.get_sample_value("loramix_rejected_requests_total", {"limit": limit}) or 0.0


@contextlib.asynccontextmanager
async def serving(tiny_base, skills_dir, tmp_path, **limits):
    """The app with its lifespan running, and an httpx client talking to it over ASGI."""
    settings = Settings(base_model=tiny_base, skills_dir=skills_dir, served_model_name=BASE,
                        cache_dir=tmp_path / "cache", **limits)
    app = create_app(settings, engine=LocalEngine(tiny_base, LocalSettings(max_lora_rank=16)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://loramix", timeout=WAIT_S) as client:
            yield app, client


def check_envelope(response: httpx.Response, status: int, type_: str, code: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)


# ---------------------------------------------------------------- request body size


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("num_bytes, status", [(4096, 413), (900, 200)])
def test_body_over_the_limit_is_413_before_it_is_parsed(tiny_base, skills_dir, tmp_path, chunked, num_bytes, status):
    # Padded with spaces, so the body is valid JSON of the wanted size: a 413 is the size
    # check, not a parse error.
    body = json.dumps({"model": BASE, "prompt": "Once", "max_tokens": 1, "temperature": 0}).encode()
    body = body[:-1] + b" " * (num_bytes - len(body)) + b"}"

    async def chunks():
        for start in range(0, len(body), 256):
            yield body[start:start + 256]

    async def run():
        before = rejected("max_request_bytes")
        async with serving(tiny_base, skills_dir, tmp_path, max_request_bytes=2048) as (_, client):
            content = chunks() if chunked else body
            response = await client.post("/v1/completions", content=content,
                                         headers={"Content-Type": "application/json"})
            assert ("content-length" in response.request.headers) is not chunked
        if status == 413:
            check_envelope(response, 413, "invalid_request_error", "request_too_large", None)
            assert rejected("max_request_bytes") == before + 1
        else:
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 1

    asyncio.run(run())


# ---------------------------------------------------------------- sequences per request


@pytest.mark.parametrize(
    "endpoint, num_prompts, n, param, limit",
    [
        ("/v1/completions", 5, 1, "prompt", "max_prompts_per_request"),
        ("/v1/completions", 3, 3, "n", "max_sequences_per_request"),
        ("/v1/chat/completions", 1, 9, "n", "max_sequences_per_request"),
        ("/v1/completions", 4, 2, None, None),  # exactly at both limits: served
    ],
)
def test_prompts_times_n_over_the_limit_is_400_naming_the_param(
    tiny_base, skills_dir, tmp_path, endpoint, num_prompts, n, param, limit
):
    body = {"model": BASE, "max_tokens": 1, "temperature": 0, "n": n}
    if endpoint == "/v1/completions":
        body["prompt"] = ["Once"] * num_prompts
    else:
        body["messages"] = [{"role": "user", "content": "Once"}]

    async def run():
        before = rejected(limit) if limit else 0.0
        async with serving(tiny_base, skills_dir, tmp_path,
                           max_prompts_per_request=4, max_sequences_per_request=8) as (_, client):
            response = await client.post(endpoint, json=body)
        if param is None:
            assert response.status_code == 200, response.text
            assert len(response.json()["choices"]) == num_prompts * n
        else:
            check_envelope(response, 400, "invalid_request_error", "invalid_request_error", param)
            assert rejected(limit) == before + 1

    asyncio.run(run())


# ---------------------------------------------------------------- the merge pool


def test_merge_queue_full_is_429_and_small_merges_have_their_own_lane(tiny_base, skills_dir, tmp_path, monkeypatch):
    """One worker per lane, no queue. A merge blocked in the small lane makes the next new
    small composition a 429, while a request for the same composition joins the running
    merge and a large composition merges in its own lane."""
    release, blocked = threading.Event(), threading.Event()
    real_merge = merging.merge

    def merge_blocking_small(adapters, *args, **kwargs):
        if len(adapters) <= 2:
            blocked.set()
            release.wait(WAIT_S)
        return real_merge(adapters, *args, **kwargs)

    monkeypatch.setattr(merging, "merge", merge_blocking_small)

    def complete(model):
        return {"model": model, "prompt": "Once", "max_tokens": 1, "temperature": 0}

    async def run():
        before = rejected("merge_queue_size")
        async with serving(tiny_base, skills_dir, tmp_path, merge_workers=1, merge_queue_size=0,
                           small_merge_max_skills=2) as (_, client):
            first = asyncio.create_task(client.post("/v1/completions", json=complete("math+code")))
            assert await asyncio.to_thread(blocked.wait, WAIT_S)
            same = asyncio.create_task(client.post("/v1/completions", json=complete("code+math")))
            other = await client.post("/v1/completions", json=complete("code+poetry"))
            check_envelope(other, 429, "rate_limit_error", "merge_queue_full", None)
            large = await client.post("/v1/completions", json=complete("math+code+poetry"))
            assert large.status_code == 200, large.text
            assert not first.done()
            release.set()
            assert (await first).status_code == 200
            assert (await same).status_code == 200
            retried = await client.post("/v1/completions", json=complete("code+poetry"))
            assert retried.status_code == 200, retried.text
        assert rejected("merge_queue_size") == before + 1

    try:
        asyncio.run(run())
    finally:
        release.set()


# ---------------------------------------------------------------- tokenization off the loop


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_health_answers_while_a_large_prompt_is_tokenized(tiny_base, skills_dir, tmp_path, endpoint):
    """The encoder is held mid-tokenization; /health must answer meanwhile. On the event loop,
    the encoder would have to finish first."""
    prompt = "reverse the words " * 20_000  # 360 kB, far over the model's context
    if endpoint == "/v1/completions":
        body, method = {"model": BASE, "prompt": prompt, "max_tokens": 1}, "text"
    else:
        body, method = {"model": BASE, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}, "chat"
    inside, release, finished = threading.Event(), threading.Event(), threading.Event()

    async def run():
        async with serving(tiny_base, skills_dir, tmp_path) as (app, client):
            encoder = app.state.loramix.encoder
            encode = getattr(encoder, method)

            def held_encode(*args, **kwargs):
                ids = encode(*args, **kwargs)
                inside.set()
                release.wait(WAIT_S)
                finished.set()
                return ids

            setattr(encoder, method, held_encode)
            request = asyncio.create_task(client.post(endpoint, json=body))
            assert await asyncio.to_thread(inside.wait, WAIT_S)
            health = await client.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert not finished.is_set()  # answered while the tokenization was still in flight
            release.set()
            response = await request
        prompt_param = "prompt" if endpoint == "/v1/completions" else "messages"
        check_envelope(response, 400, "invalid_request_error", "context_length_exceeded", prompt_param)

    try:
        asyncio.run(run())
    finally:
        release.set()


# ---------------------------------------------------------------- client disconnects


@pytest.mark.parametrize("model", [BASE, "math"])
def test_non_streaming_client_disconnect_aborts_the_engine_sequences(tiny_base, skills_dir, tmp_path, model):
    """A raw ASGI call: the client sends its body, waits until its sequences are decoding,
    then hangs up. Every sequence is aborted in the engine and the batch empties."""
    n = 3
    body = json.dumps({"model": model, "prompt": "Once", "max_tokens": 1000, "ignore_eos": True,
                       "n": n}).encode()

    async def run():
        async with serving(tiny_base, skills_dir, tmp_path) as (app, _):
            engine = app.state.loramix.engine
            aborted: list[str] = []
            real_abort = engine.abort

            async def spy_abort(request_id):
                aborted.append(request_id)
                await real_abort(request_id)

            engine.abort = spy_abort
            hang_up = asyncio.Event()
            sent: list[dict] = []
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop(0)
                await hang_up.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                "query_string": b"", "root_path": "", "server": ("loramix", 80), "client": ("test", 1),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())],
            }
            call = asyncio.create_task(app(scope, receive, send))
            assert await wait_until(lambda: engine.health()["num_running"] == n)
            hang_up.set()
            await asyncio.wait_for(call, WAIT_S)
            # One request id per choice: "<request id>-<choice index>".
            assert len({request_id.rsplit("-", 1)[0] for request_id in aborted}) == 1
            assert sorted(int(request_id.rsplit("-", 1)[1]) for request_id in aborted) == list(range(n))
            assert await wait_until(lambda: engine.health()["num_running"] == 0
                                    and engine.health()["num_waiting"] == 0)
            assert sent[0]["status"] == 499

    asyncio.run(run())


async def wait_until(condition, limit_s: float = WAIT_S) -> bool:
    """Poll `condition` on the event loop until it holds (a readiness wait, not a timing check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


def test_sse_events_hold_no_raw_line_separators():
    """Generated text may hold U+0085, U+2028 or U+2029: JSON leaves them raw, and line readers
    built on str.splitlines (httpx's aiter_lines) would cut the `data:` line (found by the soak
    bench). The event escapes them; the decoded JSON is unchanged."""
    import json

    from server.serving.completions import _sse

    payload = json.dumps({"text": "a\u2028b\u2029c\x85d\n"}, ensure_ascii=False)
    event = _sse(payload)
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):-2]) == {"text": "a\u2028b\u2029c\x85d\n"}
