"""The public surface and its contract: what answers without the API key, what the OpenAPI
document promises (statuses, envelope, content types), and a 500 that keeps the connection."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from server_process import free_port, metric_value

from server.app import create_app
from server.engines.local import LocalEngine, LocalSettings
from server.settings import Settings

API_KEY = "surface-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HEALTH_DETAIL = {"status", "model", "skills", "engine"}


def make_app(tiny_base, skills_dir, cache_dir, api_key=None):
    settings = Settings(base_model=tiny_base, skills_dir=skills_dir, served_model_name="tiny",
                        cache_dir=cache_dir, api_key=api_key)
    return create_app(settings, engine=LocalEngine(tiny_base, LocalSettings(max_lora_rank=16)))


@pytest.fixture(scope="module")
def keyed(tiny_base, skills_dir, tmp_path_factory):
    app = make_app(tiny_base, skills_dir, tmp_path_factory.mktemp("keyed"), api_key=API_KEY)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def open_server(tiny_base, skills_dir, tmp_path_factory):
    app = make_app(tiny_base, skills_dir, tmp_path_factory.mktemp("open"))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def error_code(response) -> str:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)
    return error["code"]


# ---------------------------------------------------------------- exposure under an API key


def test_health_without_the_key_is_only_a_status(keyed):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = keyed.get("/health", headers=headers)
        assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_health_with_the_key_has_the_details(keyed):
    health = keyed.get("/health", headers=AUTH).json()
    assert set(health) == HEALTH_DETAIL
    assert health["model"] == "tiny" and "math" in health["skills"]


def test_openapi_document_needs_the_key(keyed):
    response = keyed.get("/openapi.json")
    assert response.status_code == 401 and error_code(response) == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "loramix"


def test_docs_pages_are_off_under_a_key(keyed):
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        for headers in ({}, AUTH):
            response = keyed.get(path, headers=headers)
            assert response.status_code == 404 and error_code(response) == "not_found"


def test_metrics_stay_open_as_prometheus_text(keyed):
    response = keyed.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "loramix_requests_total" in response.text


def test_v1_routes_need_the_key(keyed):
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/compositions"), ("POST", "/v1/completions")):
        response = keyed.request(method, path, json={})
        assert response.status_code == 401 and error_code(response) == "invalid_api_key"


# ---------------------------------------------------------------- without a key


def test_without_a_key_health_and_docs_are_open(open_server):
    assert set(open_server.get("/health").json()) == HEALTH_DETAIL
    assert open_server.get("/openapi.json").status_code == 200
    for path in ("/docs", "/redoc"):
        response = open_server.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in response.text


# ---------------------------------------------------------------- the OpenAPI contract


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def test_openapi_declares_the_envelope_and_never_422(keyed):
    document = keyed.get("/openapi.json", headers=AUTH).json()
    assert "422" not in json.dumps(document["paths"])
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])
    envelope = "#/components/schemas/ErrorResponse"
    for label, operation in operations(document):
        errors = {status: r for status, r in operation["responses"].items() if status != "200"}
        assert "500" in errors, label
        for status, response in errors.items():
            assert response["content"]["application/json"]["schema"]["$ref"] == envelope, (label, status)
        if label.split()[1].startswith("/v1/"):
            assert "401" in errors and operation["security"] == [{"bearer": []}], label
    assert set(document["components"]["securitySchemes"]) == {"bearer"}


def test_openapi_statuses_per_route(keyed):
    document = keyed.get("/openapi.json", headers=AUTH).json()
    statuses = {label: set(op["responses"]) for label, op in operations(document)}
    assert statuses["POST /v1/chat/completions"] == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert statuses["GET /v1/compositions/{name}"] == {"200", "401", "404", "500"}
    assert statuses["GET /health"] == {"200", "500"}


def test_openapi_media_types_match_the_answers(keyed):
    document = keyed.get("/openapi.json", headers=AUTH).json()
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
    assert chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")


def test_openapi_without_a_key_declares_no_security(open_server):
    document = open_server.get("/openapi.json").json()
    assert "securitySchemes" not in document["components"]
    assert all("security" not in op for _, op in operations(document))


# ---------------------------------------------------------------- a 500 keeps the connection


@pytest.fixture
def exploding_server(tiny_base, skills_dir, tmp_path):
    """A real uvicorn server whose /v1/explode route fails with an unexpected exception."""
    app = make_app(tiny_base, skills_dir, tmp_path / "cache")

    @app.get("/v1/explode")
    async def explode():
        raise OSError(f"cannot open {tmp_path}/weights.safetensors")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield server
    server.should_exit = True
    thread.join(timeout=30)


def scrape(connection: http.client.HTTPConnection) -> str:
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200
    return response.read().decode()


def test_internal_error_keeps_the_connection_alive(exploding_server):
    connection = http.client.HTTPConnection("127.0.0.1", exploding_server.config.port, timeout=30)
    counted = {"requests": ("loramix_requests_total", {"status": "500"}),
               "errors": ("loramix_errors_total", {"code": "internal_error"})}

    def counts(text: str) -> dict[str, float]:
        return {key: metric_value(text, name, endpoint="/v1/explode", **labels)
                for key, (name, labels) in counted.items()}

    before = counts(scrape(connection))
    connection.request("GET", "/v1/explode")
    failed = connection.getresponse()
    body = json.loads(failed.read())
    assert failed.status == 500 and body["error"]["code"] == "internal_error"
    assert "/" not in body["error"]["message"]
    assert (failed.getheader("connection") or "").lower() != "close"
    socket_after_500 = connection.sock
    assert socket_after_500 is not None  # http.client drops a socket the server is closing

    after = counts(scrape(connection))
    assert connection.sock is socket_after_500
    assert {key: after[key] - before[key] for key in counted} == {"requests": 1, "errors": 1}
    connection.close()
