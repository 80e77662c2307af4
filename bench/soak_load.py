"""The client side of the soak bench (bench/soak.py): a mix of well-behaved, impatient and
hostile OpenAI-API clients, each outcome classified as ok, an expected refusal or an error.

An error is any 5xx, any status the request should not get, a transport failure the client
did not cause itself, or a stream that ends without a finish_reason (or with an error event)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

SKILLS = ("math", "code", "poetry", "lookup")
# Compositions every client reuses: merged once, then served from the cache.
CACHED = ("math+code", "math+poetry", "code+lookup", "poetry+lookup@lego", "math*0.7+code*0.3", "code+poetry")

# (behaviour, weight): how often a client picks each kind of request.
BEHAVIOURS = (
    ("stream", 60),
    ("complete", 14),
    ("stream_disconnect", 10),
    ("complete_disconnect", 6),
    ("new_composition", 6),
    ("hostile", 4),
)


@dataclass
class Tally:
    """Everything the clients observed; merged over all clients."""

    requests: Counter = field(default_factory=Counter)  # behaviour -> count
    outcomes: Counter = field(default_factory=Counter)  # "ok", "disconnected", "refused <status>"
    errors: Counter = field(default_factory=Counter)  # error kind -> count
    error_examples: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    new_compositions: int = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_examples) < 20:
            self.error_examples.append(f"{kind}: {detail[:300]}")


def pick_model(rng: random.Random) -> str:
    """A model for a well-behaved request: base, one skill or a cached two-skill composition."""
    roll = rng.random()
    if roll < 0.2:
        return "tiny"
    if roll < 0.45:
        return rng.choice(SKILLS)
    return rng.choice(CACHED)


def new_composition(rng: random.Random) -> str:
    """A composition no one asked for before: random weights (and 3-4 skills one time in five)."""
    count = rng.choice((3, 4)) if rng.random() < 0.2 else 2
    skills = rng.sample(SKILLS, count)
    weights = [round(rng.uniform(0.05, 1.0), 6) for _ in skills]
    method = rng.choice(("", "", "@lego", "@svd"))
    return "+".join(f"{s}*{w}" for s, w in zip(skills, weights)) + method


def request_body(rng: random.Random, model: str, stream: bool, max_tokens: int) -> tuple[str, dict]:
    """A chat or a plain completion request (half each)."""
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": stream, "seed": rng.randrange(2**31)}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": f"Tell me about {rng.choice(SKILLS)} number {rng.randrange(1000)}."}]
        return "/v1/chat/completions", body
    body["prompt"] = f"The {rng.choice(SKILLS)} of {rng.randrange(1000)} is"
    return "/v1/completions", body


def hostile_request(rng: random.Random, max_request_bytes: int) -> tuple[str, dict | bytes, int, str]:
    """(path, body, expected status, what it is) for a request the server must refuse."""
    kind = rng.choice(("bad_weight", "huge_seed", "oversize_body", "unknown_skill", "bad_method"))
    if kind == "bad_weight":
        model = rng.choice(("math*abc+code*1", "math*0+code*1", "math*inf+code*1"))
        return "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 4}, 400, kind
    if kind == "huge_seed":
        return "/v1/completions", {"model": "math", "prompt": "x", "max_tokens": 4, "seed": 2**64}, 400, kind
    if kind == "oversize_body":
        body = json.dumps({"model": "tiny", "prompt": "x" * (max_request_bytes + 1024), "max_tokens": 1})
        return "/v1/completions", body.encode(), 413, kind
    if kind == "unknown_skill":
        return "/v1/completions", {"model": "math+nosuchskill", "prompt": "x", "max_tokens": 4}, 404, kind
    return "/v1/completions", {"model": "math+code@nosuchmethod", "prompt": "x", "max_tokens": 4}, 400, kind


class Client:
    """One simulated client: loops over random behaviours until the deadline."""

    def __init__(self, http: httpx.AsyncClient, rng: random.Random, tally: Tally, *, max_tokens: int,
                 max_request_bytes: int) -> None:
        self.http = http
        self.rng = rng
        self.tally = tally
        self.max_tokens = max_tokens
        self.max_request_bytes = max_request_bytes

    async def run(self, deadline: float) -> None:
        names, weights = zip(*BEHAVIOURS)
        while time.monotonic() < deadline:
            behaviour = self.rng.choices(names, weights)[0]
            self.tally.requests[behaviour] += 1
            try:
                await getattr(self, behaviour)()
            except httpx.TimeoutException as exc:
                self.tally.error("timeout", f"{behaviour}: {exc!r}")
            except httpx.TransportError as exc:
                self.tally.error("transport", f"{behaviour}: {exc!r}")

    # ------------------------------------------------------------------ behaviours

    async def stream(self, model: str | None = None, disconnect_after: int | None = None) -> None:
        path, body = request_body(self.rng, model or pick_model(self.rng), True, self.max_tokens)
        started = time.monotonic()
        async with self.http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await self._unexpected(response, body["model"])
                return
            first, finish, done, events = None, None, False, 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    self.tally.error("stream_error_event", f"{body['model']}: {data}")
                    return
                events += 1
                if first is None and chunk.get("choices"):
                    first = time.monotonic()
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    self.tally.completion_tokens += chunk["usage"]["completion_tokens"]
                if disconnect_after is not None and events >= disconnect_after:
                    self.tally.outcomes["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
        if first is not None:
            self.tally.ttft_s.append(first - started)
        if finish is None or not done:
            self.tally.error("stream_without_finish", f"{body['model']}: finish={finish} done={done}")
        else:
            self.tally.outcomes["ok"] += 1

    async def stream_disconnect(self) -> None:
        await self.stream(disconnect_after=self.rng.randint(1, 3))

    async def new_composition(self) -> None:
        self.tally.new_compositions += 1
        await self.stream(model=new_composition(self.rng))

    async def complete(self) -> None:
        path, body = request_body(self.rng, pick_model(self.rng), False, self.max_tokens)
        response = await self.http.post(path, json=body)
        if response.status_code != 200:
            await self._unexpected(response, body["model"])
            return
        choices = response.json()["choices"]
        if not choices or any(c.get("finish_reason") is None for c in choices):
            self.tally.error("completion_without_finish", response.text)
            return
        self.tally.completion_tokens += response.json()["usage"]["completion_tokens"]
        self.tally.outcomes["ok"] += 1

    async def complete_disconnect(self) -> None:
        """A non-streaming request the client gives up on before the answer comes."""
        path, body = request_body(self.rng, pick_model(self.rng), False, self.max_tokens)
        try:
            response = await self.http.post(path, json=body, timeout=self.rng.uniform(0.02, 0.3))
        except httpx.TimeoutException:
            self.tally.outcomes["disconnected"] += 1
            return
        if response.status_code != 200:
            await self._unexpected(response, body["model"])
        else:
            self.tally.outcomes["ok"] += 1

    async def hostile(self) -> None:
        path, body, expected, kind = hostile_request(self.rng, self.max_request_bytes)
        if isinstance(body, bytes):
            response = await self.http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = await self.http.post(path, json=body)
        if response.status_code != expected:
            self.tally.error(f"hostile_{kind}_got_{response.status_code}", response.text)
        elif "error" not in response.json():
            self.tally.error(f"hostile_{kind}_no_envelope", response.text)
        else:
            self.tally.outcomes[f"refused {expected} ({kind})"] += 1

    async def _unexpected(self, response: httpx.Response, model: str) -> None:
        """A well-formed request that did not get 200: 429 is a documented refusal under
        load (merge queue full), anything else is an error."""
        text = (await response.aread()).decode(errors="replace")
        if response.status_code == 429:
            self.tally.outcomes["refused 429 (merge queue full)"] += 1
            return
        kind = "5xx" if response.status_code >= 500 else "unexpected_status"
        self.tally.error(kind, f"{response.status_code} {model}: {text}")


async def drive(url: str, *, num_clients: int, duration_s: float, max_tokens: int, max_request_bytes: int,
                seed: int, request_timeout_s: float = 120) -> Tally:
    """Run `num_clients` clients against `url` for `duration_s` seconds; their tally."""
    tally = Tally()
    limits = httpx.Limits(max_connections=num_clients * 2, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout_s, limits=limits) as http:
        deadline = time.monotonic() + duration_s
        clients = [
            Client(http, random.Random(seed * 1000 + i), tally, max_tokens=max_tokens,
                   max_request_bytes=max_request_bytes)
            for i in range(num_clients)
        ]
        await asyncio.gather(*(client.run(deadline) for client in clients))
    return tally
