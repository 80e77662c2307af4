"""The error catalogue: exception → envelope mapping, strict rank mode, incompatible adapters
and internal errors, through the real server and the `openai` client."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from server_process import ServerProcess

import merging
from lab.demo import build_skill_adapter, build_tiny_base
from server.app import create_app
from server.engines.local import LocalEngine, LocalSettings
from server.errors import LoramixError, from_exception
from server.settings import Settings


@pytest.mark.parametrize(
    "exc, status, code, param",
    [
        (merging.IncompatibleAdaptersError("adapters cannot be combined"), 400, "incompatible_adapters", "model"),
        (merging.InvalidMergeOptions("bad density", param="density"), 400, "invalid_composition", "density"),
        (merging.NonFiniteResultError("non-finite values"), 400, "merge_failed", None),
        (merging.AdapterError("unsupported adapter"), 400, "invalid_adapter", "model"),
        (LoramixError(404, "model_not_found", "no such model", "model"), 404, "model_not_found", "model"),
    ],
)
def test_exceptions_map_to_string_codes(exc, status, code, param):
    err = from_exception(exc)
    assert (err.status, err.code, err.param) == (status, code, param)
    envelope = err.envelope()["error"]
    assert set(envelope) == {"message", "type", "param", "code"}
    assert envelope["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_option_param_is_placed_inside_the_request():
    err = from_exception(merging.InvalidMergeOptions("bad", param="density"), param_prefix="composition.options")
    assert err.param == "composition.options.density"


def test_unexpected_exception_is_500_without_details():
    err = from_exception(RuntimeError("failed reading /secret/path/model.bin"))
    assert err.status == 500 and err.code == "internal_error"
    assert "/" not in err.message and "secret" not in err.message


def test_internal_error_through_the_app_leaks_no_path(tiny_base, skills_dir, tmp_path):
    settings = Settings(base_model=tiny_base, skills_dir=skills_dir, cache_dir=tmp_path / "cache")
    app = create_app(settings, engine=LocalEngine(tiny_base, LocalSettings(max_lora_rank=16)))

    @app.get("/v1/explode")
    async def explode():
        raise OSError(f"cannot open {tmp_path}/weights.safetensors")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/explode")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert str(tmp_path) not in error["message"] and "/" not in error["message"]


# ---------------------------------------------------------------- a strict-rank server


@pytest.fixture(scope="module")
def strict_server(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    skills = root / "skills"
    shutil.copytree(skills_dir, skills)
    # A skill for a differently shaped base model (unusable), and one whose config names
    # another base model (usable alone, not combinable with the others).
    other_base = build_tiny_base(root / "other-base", hidden_size=256, num_heads=4, intermediate_size=384)
    build_skill_adapter(other_base, skills / "foreign", rank=4, seed=9, base_model_name="loramix-tiny-base")
    build_skill_adapter(tiny_base, skills / "elsewhere", rank=4, seed=10, base_model_name="another-base-model")
    proc = ServerProcess(
        root / "server.log", base_model=tiny_base, skills_dir=skills, served_model_name="tiny",
        cache_dir=root / "cache", max_lora_rank=16, strict_rank=True,
    )
    proc.skills_dir = skills
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def strict_client(strict_server):
    return openai.OpenAI(base_url=strict_server.url + "/v1", api_key="unused", max_retries=0)


def envelope_of(exc: openai.APIStatusError) -> dict:
    error = exc.response.json()["error"]
    assert isinstance(error["code"], str) and "/" not in error["message"]
    return error


def test_merged_rank_over_limit_is_rejected_in_strict_mode(strict_client):
    with pytest.raises(openai.BadRequestError) as caught:
        strict_client.completions.create(model="math+lookup", prompt="x", max_tokens=1)  # cat: 8 + 16
    error = envelope_of(caught.value)
    assert error["code"] == "rank_limit_exceeded" and error["param"] == "model"
    assert "16" in error["message"] and "24" in error["message"]


def test_requested_rank_over_limit_names_the_rank_field(strict_client):
    with pytest.raises(openai.BadRequestError) as caught:
        strict_client.completions.create(
            model="tiny", prompt="x", max_tokens=1,
            extra_body={"composition": {"skills": {"math": 0.5, "code": 0.5}, "method": "svd", "rank": 32}},
        )
    error = envelope_of(caught.value)
    assert error["code"] == "rank_limit_exceeded" and error["param"] == "composition.rank"


def test_within_limit_compositions_still_work_in_strict_mode(strict_client):
    result = strict_client.completions.create(model="math+code", prompt="x", max_tokens=2, temperature=0)
    assert result.usage.completion_tokens >= 1


def test_incompatible_adapters_are_a_bad_request(strict_client):
    alone = strict_client.completions.create(model="elsewhere", prompt="x", max_tokens=1)
    assert alone.usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError) as caught:
        strict_client.completions.create(model="math+elsewhere", prompt="x", max_tokens=1)
    error = envelope_of(caught.value)
    assert error["code"] == "incompatible_adapters"
    assert "another-base-model" in error["message"]


def test_skill_for_another_base_model_is_rejected_everywhere(strict_client):
    for model in ("foreign", "math+foreign"):
        with pytest.raises(openai.BadRequestError) as caught:
            strict_client.completions.create(model=model, prompt="x", max_tokens=1)
        error = envelope_of(caught.value)
        assert error["code"] == "invalid_adapter" and "does not fit the base model" in error["message"]
    assert "foreign" not in [m.id for m in strict_client.models.list()]


def test_rank_option_on_a_method_without_rank_is_invalid(strict_client):
    with pytest.raises(openai.BadRequestError) as caught:
        strict_client.completions.create(model="math+code@cat(rank=4)", prompt="x", max_tokens=1)
    error = envelope_of(caught.value)
    assert error["code"] == "invalid_composition" and error["param"] == "model"


def test_composition_field_requires_the_base_model_name(strict_client):
    with pytest.raises(openai.BadRequestError) as caught:
        strict_client.completions.create(
            model="math", prompt="x", max_tokens=1, extra_body={"composition": {"skills": {"code": 1.0}}}
        )
    assert envelope_of(caught.value)["param"] == "model"


def test_named_composition_cannot_shadow_a_skill(strict_server):
    response = httpx.post(strict_server.url + "/v1/compositions", json={"name": "math", "model": "math+code"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "name"


def test_skills_added_or_removed_while_serving_are_picked_up(strict_server, strict_client):
    with pytest.raises(openai.NotFoundError):
        strict_client.completions.create(model="math-copy", prompt="x", max_tokens=1)
    shutil.copytree(strict_server.skills_dir / "math", strict_server.skills_dir / "math-copy")
    copy = strict_client.completions.create(model="math-copy", prompt="The sum of", max_tokens=6, temperature=0)
    original = strict_client.completions.create(model="math", prompt="The sum of", max_tokens=6, temperature=0)
    assert copy.choices[0].text == original.choices[0].text
    assert "math-copy" in [m.id for m in strict_client.models.list()]
    shutil.rmtree(strict_server.skills_dir / "math-copy")
    with pytest.raises(openai.NotFoundError):
        strict_client.completions.create(model="math-copy", prompt="x", max_tokens=1)


def test_bad_module_weights_are_400_and_do_not_poison_the_cache(tiny_base, skills_dir, tmp_path):
    settings = Settings(base_model=tiny_base, skills_dir=skills_dir, cache_dir=tmp_path / "cache")
    app = create_app(settings, engine=LocalEngine(tiny_base, LocalSettings(max_lora_rank=16)))
    body = {"model": settings.served_model_name or tiny_base.name, "prompt": "The sum of", "max_tokens": 2,
            "temperature": 0}
    composition = {"skills": {"math": 0.5, "code": 0.5}, "method": "cat"}
    with TestClient(app, raise_server_exceptions=False) as client:
        for rows, param in [({"model.layers.0.no_such_proj": [0.5, 0.5]}, "module_weights"),
                            ({"model.layers.0.self_attn.q_proj": [1.0]}, "composition.module_weights")]:
            response = client.post("/v1/completions", json={**body, "composition": {**composition, "module_weights": rows}})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_composition", param)
            assert str(tmp_path) not in error["message"]
        ok = client.post("/v1/completions", json={**body, "composition": {
            **composition, "module_weights": {"model.layers.0.self_attn.q_proj": [0.9, 0.1]}}})
        assert ok.status_code == 200, ok.text
