"""Broken skill adapters, at start and appearing while serving: the broken skill is unusable
with a path-free reason (a 400 with a string code for a request naming it), every other skill
keeps serving; a skill copied in while the server scans is picked up once complete; links out
of the skills directory and names with a trailing newline are refused."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.app import create_app
from server.composition import is_valid_name
from server.engines.local import LocalEngine, LocalSettings
from server.settings import Settings

BASE = "tiny"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps({**config, **changes}))


def _rank_zero(path):
    _edit_config(path, r=0)
    tensors = load_file(path / WEIGHTS)
    zero = {k: (t[:0] if ".lora_A." in k else t[:, :0]).contiguous() for k, t in tensors.items()}
    save_file(zero, str(path / WEIGHTS))


def _weights_dir(path):
    (path / WEIGHTS).unlink()
    (path / WEIGHTS).mkdir()


def _dangling(path):
    (path / WEIGHTS).unlink()
    os.symlink(path / "gone.safetensors", path / WEIGHTS)


# kind -> (how to break a copy of a good skill, the code a request naming it gets)
BROKEN = {
    "config_is_a_list": (lambda p: (p / CONFIG).write_text("[]"), "invalid_adapter"),
    "alpha_is_a_string": (lambda p: _edit_config(p, lora_alpha="32"), "invalid_adapter"),
    "alpha_is_null": (lambda p: _edit_config(p, lora_alpha=None), "invalid_adapter"),
    "bad_target_pattern": (lambda p: _edit_config(p, target_modules="q_proj("), "invalid_adapter"),
    "bad_rank_pattern": (lambda p: _edit_config(p, rank_pattern={"(q_proj": 4}), "invalid_adapter"),
    "missing_weights": (lambda p: (p / WEIGHTS).unlink(), "skill_unavailable"),
    "weights_is_a_dir": (_weights_dir, "invalid_adapter"),
    "dangling_symlink": (_dangling, "skill_unavailable"),
    "rank_zero": (_rank_zero, "invalid_adapter"),
}


def make_broken(skills_dir, root, kind):
    shutil.copytree(skills_dir / "math", root / kind)
    BROKEN[kind][0](root / kind)


def serve(tiny_base, skills, tmp_path) -> TestClient:
    settings = Settings(base_model=tiny_base, skills_dir=skills, served_model_name=BASE, cache_dir=tmp_path / "cache")
    return TestClient(create_app(settings, engine=LocalEngine(tiny_base, LocalSettings(max_lora_rank=16))),
                      raise_server_exceptions=False)


def complete(client, model):
    return client.post("/v1/completions", json={"model": model, "prompt": "The sum of", "max_tokens": 4,
                                                 "temperature": 0})


def unusable_skills(client) -> dict:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    base = response.json()["data"][0]
    assert base["id"] == BASE
    return {item["name"]: item for item in base["loramix"]["unusable_skills"]}


def assert_refused(client, model, code, tmp_path):
    response = complete(client, model)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "model"
    assert str(tmp_path) not in error["message"] and "/" not in error["message"]
    return error


def assert_serving(client):
    for model in ("math", "code+poetry"):
        assert complete(client, model).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


# ---------------------------------------------------------------- broken at start


@pytest.fixture(scope="module")
def started_broken(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-at-start")
    skills = root / "skills"
    shutil.copytree(skills_dir, skills)
    for kind in BROKEN:
        make_broken(skills_dir, skills, kind)
    with serve(tiny_base, skills, root) as client:
        yield client, root


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_adapter_at_start_leaves_the_rest_serving(started_broken, kind):
    client, root = started_broken
    code = BROKEN[kind][1]
    assert_refused(client, kind, code, root)
    assert_refused(client, f"math+{kind}", code, root)
    listed = unusable_skills(client)
    assert listed[kind]["code"] == code and "/" not in listed[kind]["reason"]
    assert kind not in [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert kind in client.get("/health").json()["unusable_skills"]
    assert_serving(client)


# ---------------------------------------------------------------- broken while serving


@pytest.fixture(scope="module")
def serving(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-at-run-time")
    skills = root / "skills"
    shutil.copytree(skills_dir, skills)
    with serve(tiny_base, skills, root) as client:
        assert_serving(client)
        yield client, skills, root


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_adapter_appearing_while_serving_is_refused_alone(serving, skills_dir, kind, caplog):
    client, skills, root = serving
    with caplog.at_level(logging.WARNING, logger="loramix.skills"):
        make_broken(skills_dir, skills, kind)
        assert kind in unusable_skills(client)
    assert any(kind in record.getMessage() and "not usable" in record.getMessage() for record in caplog.records)
    assert_refused(client, kind, BROKEN[kind][1], root)
    assert_serving(client)


def test_skill_copied_while_serving_is_picked_up_once_complete(serving, skills_dir):
    client, skills, root = serving
    expected = complete(client, "math").json()["choices"][0]["text"]
    incoming = skills / "arriving"
    incoming.mkdir()
    assert complete(client, "arriving").status_code == 404  # no config yet: not a skill
    shutil.copy(skills_dir / "math" / CONFIG, incoming / CONFIG)
    assert_refused(client, "arriving", "skill_unavailable", root)  # weights not there yet
    weights = (skills_dir / "math" / WEIGHTS).read_bytes()
    (incoming / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    assert_refused(client, "arriving", "invalid_adapter", root)  # half written
    (incoming / WEIGHTS).write_bytes(weights)
    response = complete(client, "arriving")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected
    assert "arriving" not in unusable_skills(client)


def test_links_out_of_the_skills_directory_are_refused(serving, skills_dir, tmp_path):
    client, skills, root = serving
    outside = tmp_path / "elsewhere"
    shutil.copytree(skills_dir / "math", outside)
    os.symlink(outside, skills / "linked-out")
    (skills / "file-linked-out").mkdir()
    shutil.copy(skills_dir / "math" / CONFIG, skills / "file-linked-out" / CONFIG)
    os.symlink(outside / WEIGHTS, skills / "file-linked-out" / WEIGHTS)
    os.symlink(skills / "code", skills / "linked-in")  # inside the skills directory: fine
    for name in ("linked-out", "file-linked-out"):
        error = assert_refused(client, name, "skill_unavailable", root)
        assert "outside the skills directory" in error["message"]
        assert str(tmp_path) not in unusable_skills(client)[name]["reason"]
    assert complete(client, "linked-in").status_code == 200
    assert_serving(client)


def test_names_with_a_trailing_newline_are_refused(serving, skills_dir):
    client, skills, _ = serving
    assert not is_valid_name("math\n") and is_valid_name("math")
    shutil.copytree(skills_dir / "math", skills / "newline\n")
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert "newline\n" not in ids and "newline" not in ids
    assert complete(client, "newline\n").status_code == 404
    bad = complete(client, "math\n+code")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_composition"
    named = client.post("/v1/compositions", json={"name": "mc\n", "model": "math+code"})
    assert named.status_code == 400 and named.json()["error"]["param"] == "name"
