"""The composition cache against a failing disk, corrupt entries, vanished skills, two servers
on one machine, and a crash in the middle of a write."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from test_cache import SPEC, MergeBuilder, key_of, make_cache

import merging
from server.app import create_app
from server.cache import INFO_NAME
from server.disk_tier import HOST_ID
from server.engines.local import LocalEngine, LocalSettings
from server.settings import Settings

BASE = "tiny"


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def make_read_only(monkeypatch, directory):
    """Every write under `directory` fails as on a read-only file system (we run as root, so
    chmod would not stop us)."""
    root = os.path.realpath(directory)

    def refuse(real):
        def guarded(path, *args, **kwargs):
            if os.path.realpath(path).startswith(root):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *args, **kwargs)
        return guarded

    for name in ("mkdir", "rename", "replace", "utime"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    monkeypatch.setattr(pathlib.Path, "write_text", refuse(pathlib.Path.write_text))


def serve(tiny_base, skills, cache_dir, **settings) -> TestClient:
    settings = Settings(base_model=tiny_base, skills_dir=skills, served_model_name=BASE, cache_dir=cache_dir,
                        **settings)
    return TestClient(create_app(settings, engine=LocalEngine(tiny_base, LocalSettings(max_lora_rank=16))),
                      raise_server_exceptions=False)


def text_of(client, model: str) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": "The sum of", "max_tokens": 4,
                                                     "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# ---------------------------------------------------------------- a disk that cannot be written


def test_read_only_cache_dir_serves_from_memory(tiny_base, skills_dir, tmp_path, monkeypatch, caplog):
    with serve(tiny_base, skills_dir, tmp_path / "reference") as client:
        expected = {model: text_of(client, model) for model in ("math+code", "poetry")}
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    make_read_only(monkeypatch, cache_dir)
    errors = metric("loramix_composition_cache_disk_errors_total", operation="write")
    merges = metric("loramix_merges_total", method="cat")
    with caplog.at_level(logging.WARNING, logger="loramix"), serve(tiny_base, skills_dir, cache_dir) as client:
        for _ in range(2):
            assert {model: text_of(client, model) for model in expected} == expected
        created = client.post("/v1/compositions", json={"name": "mc", "model": "math+code"})
        assert created.status_code == 200, created.text
        assert text_of(client, "mc") == expected["math+code"]
        listed = {item["id"]: item for item in client.get("/v1/compositions").json()["data"]}
        assert listed["mc"]["cached"] == "memory" and listed["mc"]["usable"]
        assert metric("loramix_composition_cache_disk_errors_total", operation="write") - errors == 2
        assert metric("loramix_composition_cache_disk_errors_total", operation="named") >= 1
        assert metric("loramix_merges_total", method="cat") - merges == 2  # then served from memory
    warnings = [r for r in caplog.records if "disk tier failed" in r.getMessage()]
    assert len(warnings) == 1  # logged once, counted every time
    assert list(cache_dir.iterdir()) == []


def test_memory_only_entries_are_rebuilt_after_eviction_and_leave_no_files(skills_dir, tmp_path, monkeypatch):
    make_read_only(monkeypatch, tmp_path)
    build = MergeBuilder(skills_dir)

    async def scenario():
        cache = make_cache(tmp_path, memory_bytes=1, build=build)
        first = await cache.acquire(key_of("a"), SPEC)
        assert not first.on_disk and first.path.is_dir()
        await cache.release(first)
        assert not first.path.exists()  # evicted from memory: its scratch files are gone
        await cache.release(await cache.acquire(key_of("b"), SPEC))
        again = await cache.acquire(key_of("a"), SPEC)
        merging.load_adapter(again.path)
        return cache

    cache = asyncio.run(scenario())
    assert build.calls == 3 and cache.tier(key_of("a")) == "memory"
    assert list(tmp_path.iterdir()) == []


def test_disk_that_works_again_is_used_again(skills_dir, tmp_path, monkeypatch):
    build = MergeBuilder(skills_dir)
    with monkeypatch.context() as patch:
        make_read_only(patch, tmp_path)
        cache = make_cache(tmp_path, build=build)
        asyncio.run(cache.acquire(key_of("a"), SPEC))
    entry = asyncio.run(cache.acquire(key_of("b"), SPEC))
    assert entry.on_disk and (tmp_path / key_of("b") / INFO_NAME).is_file()


# ---------------------------------------------------------------- corrupt entries


def _write_info(path, info):
    (path / INFO_NAME).write_text(json.dumps(info))


DAMAGE = {
    "info_is_a_list": lambda p, key: _write_info(p, []),
    "info_truncated": lambda p, key: (p / INFO_NAME).write_text((p / INFO_NAME).read_text()[:20]),
    "created_is_a_string": lambda p, key: _write_info(p, {"key": key, "created": "yesterday"}),
    "rank_is_a_string": lambda p, key: _write_info(p, {"key": key, "created": 1.0, "rank": "8"}),
    "key_of_another_entry": lambda p, key: _write_info(p, {"key": key_of("other"), "created": 1.0}),
    "info_missing": lambda p, key: (p / INFO_NAME).unlink(),
    "weights_missing": lambda p, key: (p / "adapter_model.safetensors").unlink(),
    "config_is_a_list": lambda p, key: (p / "adapter_config.json").write_text("[]"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_entry_of_any_shape_is_discarded_and_merged_again(skills_dir, tmp_path, damage):
    build = MergeBuilder(skills_dir)
    entry = asyncio.run(make_cache(tmp_path, build=build).acquire(key_of("a"), SPEC))
    DAMAGE[damage](entry.path, key_of("a"))
    corrupt = metric("loramix_composition_cache_corrupt_entries_total")
    cache = make_cache(tmp_path, build=build)  # a restart
    assert cache.peek(key_of("a")) is None and key_of("a") not in cache.keys()
    rebuilt = asyncio.run(cache.acquire(key_of("a"), SPEC))
    assert build.calls == 2
    assert metric("loramix_composition_cache_corrupt_entries_total") - corrupt == 1
    merging.load_adapter(rebuilt.path)
    assert json.loads((rebuilt.path / INFO_NAME).read_text())["key"] == key_of("a")


@pytest.mark.parametrize("damage", ["info_is_a_list", "weights_missing", "config_is_a_list"])
def test_entry_corrupted_while_serving_is_merged_again(skills_dir, tmp_path, damage):
    build = MergeBuilder(skills_dir)

    async def scenario():
        cache = make_cache(tmp_path, memory_bytes=1, build=build)
        for name in ("a", "b"):  # "a" leaves the memory tier
            await cache.release(await cache.acquire(key_of(name), SPEC))
        DAMAGE[damage](tmp_path / key_of("a"), key_of("a"))
        if damage == "info_is_a_list":
            assert cache.peek(key_of("a")) is None
        return await cache.acquire(key_of("a"), SPEC)

    entry = asyncio.run(scenario())
    assert build.calls == 3
    merging.load_adapter(entry.path)


def test_corrupt_entry_does_not_break_the_server(tiny_base, skills_dir, tmp_path):
    with serve(tiny_base, skills_dir, tmp_path / "cache") as client:
        expected = text_of(client, "math+code")
        key = client.get("/v1/compositions").json()["data"][0]["key"]
    _write_info(tmp_path / "cache" / key, [])
    with serve(tiny_base, skills_dir, tmp_path / "cache") as client:
        assert client.get("/v1/compositions").status_code == 200
        assert client.get("/v1/models").status_code == 200
        assert text_of(client, "math+code") == expected


# ---------------------------------------------------------------- a skill vanishes


def test_compositions_whose_skill_vanished_are_listed_as_unusable(tiny_base, skills_dir, tmp_path):
    skills = tmp_path / "skills"
    shutil.copytree(skills_dir, skills)
    with serve(tiny_base, skills, tmp_path / "cache") as client:
        assert client.post("/v1/compositions", json={"name": "mc", "model": "math+code"}).status_code == 200
        text_of(client, "code+poetry")
        text_of(client, "math+lookup")
        shutil.rmtree(skills / "code")
        assert client.get("/v1/models").status_code == 200
        response = client.get("/v1/compositions")
        assert response.status_code == 200, response.text
        listed = {item["id"]: item for item in response.json()["data"]}
        for name in ("mc", "code*0.5+poetry*0.5@cat"):
            assert listed[name]["usable"] is False
            assert "code" in listed[name]["unusable_reason"] and str(tmp_path) not in listed[name]["unusable_reason"]
        assert listed["lookup*0.5+math*0.5@cat"]["usable"] is True
        assert client.get("/v1/compositions/mc").json()["usable"] is False
        refused = client.post("/v1/completions", json={"model": "mc", "prompt": "x", "max_tokens": 1})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "skill_unavailable"
        assert text_of(client, "math+lookup")


# ---------------------------------------------------------------- two servers, one machine


def test_default_cache_dir_is_per_base_model_and_skills_dir(tmp_path):
    settings = Settings()
    base, other_base, skills, other_skills = (tmp_path / n for n in ("base", "base2", "skills", "skills2"))
    dirs = {settings.resolved_cache_dir(b, s) for b in (base, other_base) for s in (skills, other_skills, None)}
    assert len(dirs) == 6
    assert settings.resolved_cache_dir(base, skills) == settings.resolved_cache_dir(base, skills)
    os.symlink(base, tmp_path / "link")
    base.mkdir()
    assert settings.resolved_cache_dir(tmp_path / "link", skills) == settings.resolved_cache_dir(base, skills)
    assert Settings(cache_dir=tmp_path / "mine").resolved_cache_dir(base, skills) == tmp_path / "mine"


def test_two_servers_on_one_machine_keep_their_compositions_apart(tiny_base, skills_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    other_skills = tmp_path / "other-skills"
    shutil.copytree(skills_dir, other_skills)
    with serve(tiny_base, skills_dir, None) as first, serve(tiny_base, other_skills, None) as second:
        created = first.post("/v1/compositions", json={"name": "mc", "model": "math+code"})
        key = created.json()["key"]
        assert second.get("/v1/compositions").json()["data"] == []
        assert "mc" not in [card["id"] for card in second.get("/v1/models").json()["data"]]
        assert second.delete(f"/v1/compositions/{key}").status_code == 404
        assert second.delete("/v1/compositions/mc").status_code == 404
        assert first.get("/v1/compositions/mc").json()["cached"] == "memory"
        assert first.get(f"/v1/compositions/{key}").status_code == 200
    roots = list((tmp_path / "home" / ".cache" / "loramix" / "compositions").iterdir())
    assert len(roots) == 2


# ---------------------------------------------------------------- a crash during a write


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_write_in_progress_is_never_visible(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)

    async def scenario():
        cache = make_cache(tmp_path, build=build)
        build.release.clear()
        task = asyncio.create_task(cache.acquire(key_of("a"), SPEC))
        await asyncio.sleep(0.1)
        visible = (cache.keys(), cache.peek(key_of("a")), sorted(p.name[:5] for p in tmp_path.iterdir()))
        build.release.set()
        await task
        return visible

    keys, info, names = asyncio.run(scenario())
    assert keys == [] and info is None and names == [".tmp-"]


def test_leftovers_of_a_killed_writer_are_not_served_and_are_removed(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    complete = asyncio.run(make_cache(tmp_path / "donor", build=build).acquire(key_of("a"), SPEC)).path
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    killed = cache_dir / f".tmp-{key_of('a')[:16]}-{HOST_ID}-{_dead_pid()}-0badc0de"  # all files, never renamed
    shutil.copytree(complete, killed)
    partial = cache_dir / key_of("b")  # a directory with some of an entry's files
    partial.mkdir()
    shutil.copy(complete / "adapter_model.safetensors", partial)
    live = cache_dir / f".tmp-{key_of('c')[:16]}-{HOST_ID}-{os.getppid()}-0badc0de"  # another live server's
    live.mkdir()
    cache = make_cache(cache_dir, build=build)
    assert cache.keys() == [] and cache.peek(key_of("a")) is None
    assert not killed.exists() and not partial.exists() and live.exists()
    asyncio.run(cache.acquire(key_of("a"), SPEC))
    assert build.calls == 2  # merged again, not taken from the leftover
