"""The composition cache: single-flight builds, memory and disk LRU bounds, restart survival,
corrupted entries rebuilt, failures not cached."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest
import torch

import merging
from server.cache import CompositionCache
from server.composition import spec_from_model_string
from server.composition_info import CompositionInfo

SPEC = spec_from_model_string("math+code", default_method="cat")  # what MergeBuilder merges


class MergeBuilder:
    """A real merge of two demo skills (build function for the cache), counting its calls."""

    def __init__(self, skills_dir, names=("math", "code"), weights=(0.5, 0.5)):
        self.adapters = [merging.load_adapter(skills_dir / name) for name in names]
        self.weights = list(weights)
        self.calls = 0
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, spec, out_dir):
        with self._lock:
            self.calls += 1
        self.release.wait(timeout=60)
        result = merging.merge(self.adapters, self.weights, method="cat")
        result.adapter.save(out_dir)
        info = CompositionInfo(model=spec.model_string(), spec=spec.canonical_json(), method=result.info["method"],
                               rank=result.adapter.max_rank, num_bytes=result.adapter.num_bytes)
        return result.adapter, info


def never_build(spec, out_dir):
    raise AssertionError("this cache only reads what is on disk")


def key_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Hooks:
    def __init__(self):
        self.admitted: list[str] = []
        self.evicted: list[str] = []

    async def admit(self, entry):
        self.admitted.append(entry.key)

    async def evict(self, entry):
        self.evicted.append(entry.key)


def make_cache(path, hooks=None, memory_bytes=10**9, disk_bytes=10**9, disk_grace_s=0.0,
               build=never_build) -> CompositionCache:
    """A cache alone on its directory by default: no grace period, entries evictable at once."""
    hooks = hooks or Hooks()
    return CompositionCache(
        path, build=build, memory_bytes=memory_bytes, disk_bytes=disk_bytes, disk_grace_s=disk_grace_s,
        on_admit=hooks.admit, on_evict=hooks.evict,
    )


def test_concurrent_requests_for_a_missing_key_build_once(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    hooks = Hooks()

    async def scenario():
        cache = make_cache(tmp_path, hooks, build=build)
        build.release.clear()  # hold the build until every request is waiting on it
        tasks = [asyncio.create_task(cache.acquire(key_of("a"), SPEC)) for _ in range(16)]
        await asyncio.sleep(0.05)
        build.release.set()
        return await asyncio.gather(*tasks)

    entries = asyncio.run(scenario())
    assert build.calls == 1
    assert len({id(entry) for entry in entries}) == 1
    assert entries[0].in_use == 16
    assert hooks.admitted == [key_of("a")]


def test_merged_entry_is_a_loadable_peft_dir_equal_to_the_merge(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    entry = asyncio.run(make_cache(tmp_path, build=build).acquire(key_of("a"), SPEC))
    reloaded = merging.load_adapter(entry.path)
    expected = merging.merge(build.adapters, build.weights, method="cat").adapter
    assert set(reloaded.modules) == set(expected.modules)
    for name, module in expected.modules.items():
        torch.testing.assert_close(reloaded.modules[name].delta(), module.delta())


def test_disk_cache_survives_restart(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    first = asyncio.run(make_cache(tmp_path, build=build).acquire(key_of("a"), SPEC))
    second = asyncio.run(make_cache(tmp_path, build=build).acquire(key_of("a"), SPEC))
    assert build.calls == 1
    assert second.info.key == key_of("a")
    assert second.info.created == first.info.created


@pytest.mark.parametrize("damage", ["truncate_weights", "delete_config", "garbage_info"])
def test_corrupted_disk_entry_is_rebuilt(skills_dir, tmp_path, damage):
    build = MergeBuilder(skills_dir)
    entry = asyncio.run(make_cache(tmp_path, build=build).acquire(key_of("a"), SPEC))
    if damage == "truncate_weights":
        weights = entry.path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete_config":
        (entry.path / "adapter_config.json").unlink()
    else:
        (entry.path / "composition.json").write_text("{not json")
    rebuilt = asyncio.run(make_cache(tmp_path, build=build).acquire(key_of("a"), SPEC))
    assert build.calls == 2
    merging.load_adapter(rebuilt.path)  # valid again


def test_partial_writes_are_removed_at_start(tmp_path):
    leftover = tmp_path / ".tmp-0123456789abcdef-deadbeef"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"partial")
    make_cache(tmp_path)
    assert not leftover.exists()


def test_memory_tier_evicts_least_recently_used_unpinned(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    hooks = Hooks()

    async def scenario():
        size = sum(a.num_bytes for a in build.adapters)  # cat rank = sum of ranks
        cache = make_cache(tmp_path, hooks, memory_bytes=int(size * 1.5), build=build)
        a = await cache.acquire(key_of("a"), SPEC)
        b = await cache.acquire(key_of("b"), SPEC)  # a is pinned: nothing evicted yet
        assert hooks.evicted == []
        await cache.release(a)  # now a is over the bound and unpinned
        assert hooks.evicted == [key_of("a")]
        assert cache.tier(key_of("a")) == "disk" and cache.tier(key_of("b")) == "memory"
        await cache.release(b)
        again = await cache.acquire(key_of("a"), SPEC)  # back from disk, b evicted
        return again

    again = asyncio.run(scenario())
    assert build.calls == 2
    assert hooks.evicted == [key_of("a"), key_of("b")]
    assert hooks.admitted == [key_of("a"), key_of("b"), key_of("a")]
    assert again.in_use == 1


def test_disk_tier_evicts_oldest_entries_beyond_its_bound(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)

    async def scenario():
        cache = make_cache(tmp_path, memory_bytes=0, disk_bytes=1, build=build)
        for name in "abc":
            entry = await cache.acquire(key_of(name), SPEC)
            await cache.release(entry)
        return cache

    cache = asyncio.run(scenario())
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == [key_of("c")]
    assert cache.tier(key_of("a")) is None and cache.tier(key_of("c")) in ("memory", "disk")


def test_failed_build_reaches_every_waiter_and_is_not_cached(skills_dir, tmp_path):
    calls = []

    def failing(spec, out_dir):
        calls.append(out_dir)
        raise merging.IncompatibleAdaptersError("adapters cannot be combined")

    async def scenario():
        cache = make_cache(tmp_path, build=failing)
        results = await asyncio.gather(*(cache.acquire(key_of("x"), SPEC) for _ in range(4)), return_exceptions=True)
        assert all(isinstance(r, merging.IncompatibleAdaptersError) for r in results)
        with pytest.raises(merging.IncompatibleAdaptersError):
            await cache.acquire(key_of("x"), SPEC)
        return cache

    cache = asyncio.run(scenario())
    assert len(calls) == 2
    assert cache.tier(key_of("x")) is None
    assert [p.name for p in tmp_path.iterdir()] == []


def test_discard_removes_both_tiers_but_not_pinned(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    hooks = Hooks()

    async def scenario():
        cache = make_cache(tmp_path, hooks, build=build)
        entry = await cache.acquire(key_of("a"), SPEC)
        assert await cache.discard(key_of("a")) is False  # in use
        await cache.release(entry)
        assert await cache.discard(key_of("a")) is True
        return cache

    cache = asyncio.run(scenario())
    assert hooks.evicted == [key_of("a")]
    assert cache.tier(key_of("a")) is None and not (tmp_path / key_of("a")).exists()


def test_entry_the_engine_refuses_is_not_kept_in_memory(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    refusals = []

    async def refuse(entry):
        refusals.append(entry.key)
        raise RuntimeError("engine refused the adapter")

    async def scenario():
        cache = CompositionCache(tmp_path, build=build, memory_bytes=10**9, disk_bytes=10**9, on_admit=refuse)
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await cache.acquire(key_of("a"), SPEC)
        return cache

    cache = asyncio.run(scenario())
    assert refusals == [key_of("a"), key_of("a")]  # tried again, not served from memory
    assert build.calls == 1  # the merged adapter on disk is reused
    assert cache.tier(key_of("a")) == "disk"


def test_composition_info_reads_and_writes_composition_json_as_before():
    # composition.json as every earlier version wrote it (replicas may share a directory
    # across an upgrade): flat, merging's info plus the server's fields.
    stored = {
        "method": "svd", "rank": 8, "options": {"density": 0.5, "majority_sign_method": "total"},
        "weights": [0.7], "module_weights": 0, "num_modules": 4, "exact": False, "relative_error": 0.0,
        "seconds": 0.01, "compression_error": 0.25, "compressed": False, "model": "math*0.7@ties",
        "spec": "{}", "merge_seconds": 0.2, "num_bytes": 1024,
        "sources": [{"skill": "math", "weight": 0.7, "digest": "d" * 64, "rank": 8}],
        "key": key_of("a"), "created": 1.5,
    }
    info = CompositionInfo.from_json(stored, key_of("a"))
    assert (info.method, info.rank, info.num_module_weights, info.sources[0].skill) == ("svd", 8, 0, "math")
    assert info.to_json() == stored
