"""Replicas sharing one composition cache directory: concurrent writes of one key, one
replica's eviction never breaking another's served entry, stale temp dirs of dead writers
(on this host or another) cleaned, live writers' temp dirs kept."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

from test_cache import SPEC, MergeBuilder, key_of, make_cache
from test_hostile_cache import serve, text_of

import merging
from server.disk_tier import HOST_ID, INFO_NAME, KEY_RE, TMP_PREFIX

OTHER_HOST = "0ther0st"  # a temp dir written by a process on another host


def _age(path, seconds: float) -> None:
    """Make `path` look untouched for `seconds`."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _entries(cache_dir) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def _stored_models(cache_dir) -> set[str]:
    """The compositions complete on disk (renamed into place), by canonical model string."""
    return {json.loads((p / INFO_NAME).read_text())["model"]
            for p in cache_dir.iterdir() if KEY_RE.fullmatch(p.name)}


def test_concurrent_writes_of_one_key_by_two_replicas_leave_one_complete_entry(skills_dir, tmp_path):
    builds = [MergeBuilder(skills_dir), MergeBuilder(skills_dir)]
    both_building = threading.Barrier(2, timeout=30)

    def build_in_step(builder):
        def build(spec, out_dir):
            both_building.wait()  # both replicas have merged into their temp dirs before either renames
            return builder(spec, out_dir)
        return build

    async def scenario():
        replicas = [make_cache(tmp_path, build=build_in_step(b)) for b in builds]
        return await asyncio.gather(*(r.acquire(key_of("a"), SPEC) for r in replicas))

    first, second = asyncio.run(scenario())
    assert [b.calls for b in builds] == [1, 1]
    assert _entries(tmp_path) == [key_of("a")]  # no temp dir left, no second copy
    assert first.path == second.path == tmp_path / key_of("a")
    assert first.info.created == second.info.created  # the loser adopted the winner's entry
    stored = merging.load_adapter(first.path)
    for name, module in first.adapter.modules.items():
        assert (stored.modules[name].lora_a == module.lora_a).all()
        assert (stored.modules[name].lora_b == module.lora_b).all()


def test_eviction_counts_every_replicas_entries_but_spares_recently_used_ones(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)

    async def scenario():
        writer = make_cache(tmp_path, disk_grace_s=60, build=build)
        for name in "abc":
            await writer.release(await writer.acquire(key_of(name), SPEC))
        _age(tmp_path / key_of("a"), 120)  # unused for longer than the grace period
        _age(tmp_path / key_of("b"), 120)
        evicting = make_cache(tmp_path, memory_bytes=0, disk_bytes=1, disk_grace_s=60, build=build)
        await evicting.release(await evicting.acquire(key_of("b"), SPEC))  # a disk hit touches b
        return evicting

    evicting = asyncio.run(scenario())
    assert build.calls == 3
    # a: another replica's, unused for 120 s: evicted. b, c: used within the grace: kept.
    assert _entries(tmp_path) == sorted([key_of("b"), key_of("c")])
    assert evicting.tier(key_of("a")) is None and evicting.tier(key_of("c")) == "disk"


def test_an_entry_evicted_by_another_replica_is_restored_from_memory(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)

    async def scenario():
        serving = make_cache(tmp_path, disk_grace_s=60, build=build)
        entry = await serving.acquire(key_of("a"), SPEC)
        await serving.release(entry)
        _age(entry.path, 120)  # then idle here for longer than the grace period ...
        entry.touched -= 120
        evicting = make_cache(tmp_path, memory_bytes=0, disk_bytes=1, disk_grace_s=60, build=build)
        await evicting.release(await evicting.acquire(key_of("b"), SPEC))
        assert not entry.path.exists()  # ... so the other replica evicted it
        again = await serving.acquire(key_of("a"), SPEC)  # a memory hit: written back
        return entry, again

    entry, again = asyncio.run(scenario())
    assert again is entry and build.calls == 2  # not merged again
    restored = merging.load_adapter(entry.path)
    assert restored.max_rank == entry.adapter.max_rank


def test_stale_temp_dirs_are_swept_while_running_and_live_ones_kept(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)
    dead_elsewhere = tmp_path / f"{TMP_PREFIX}{key_of('x')[:16]}-{OTHER_HOST}-1-0badc0de"
    live_elsewhere = tmp_path / f"{TMP_PREFIX}{key_of('y')[:16]}-{OTHER_HOST}-1-0badc0df"
    live_here = tmp_path / f"{TMP_PREFIX}{key_of('z')[:16]}-{HOST_ID}-{os.getppid()}-0badc0de"

    async def scenario():
        cache = make_cache(tmp_path, disk_grace_s=60, build=build)
        for leftover in (dead_elsewhere, live_elsewhere, live_here):
            leftover.mkdir()
            (leftover / "adapter_model.safetensors").write_bytes(b"partial")
        _age(dead_elsewhere, 120)  # no heartbeat for longer than the grace period
        _age(live_here, 120)  # old, but its writer runs on this host
        await cache.release(await cache.acquire(key_of("a"), SPEC))  # a write sweeps the directory
        return cache

    cache = asyncio.run(scenario())
    assert not dead_elsewhere.exists()
    assert live_elsewhere.exists() and live_here.exists()
    assert cache.keys() == [key_of("a")]


def test_a_slow_writer_keeps_its_temp_dir_alive_with_a_heartbeat(skills_dir, tmp_path):
    build = MergeBuilder(skills_dir)

    async def scenario():
        writer = make_cache(tmp_path, disk_grace_s=1.0, build=build)  # touches its temp dir every 0.5 s
        sweeper = make_cache(tmp_path, disk_grace_s=1.0, build=build)
        build.release.clear()
        task = asyncio.create_task(writer.acquire(key_of("a"), SPEC))
        for _ in range(6):  # 3 s of building, swept every 0.5 s by the other replica
            await asyncio.sleep(0.5)
            await asyncio.to_thread(sweeper.disk.refresh)
        in_progress = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
        build.release.set()
        return in_progress, await task

    in_progress, entry = asyncio.run(scenario())
    assert len(in_progress) == 1
    assert entry.path == tmp_path / key_of("a") and entry.on_disk
    assert _entries(tmp_path) == [key_of("a")]


def test_two_servers_on_one_directory_serve_while_the_other_evicts(tiny_base, skills_dir, tmp_path):
    """Server A serves two compositions; server B, on the same directory with a 1-byte disk
    bound, keeps merging and evicting. A's entries stay on disk (restored when evicted while
    idle) and both serve the same answers."""
    cache_dir = tmp_path / "shared"
    models = ["math+code", "poetry+lookup"]
    with serve(tiny_base, skills_dir, cache_dir, disk_cache_grace_seconds=1.0) as a, \
            serve(tiny_base, skills_dir, cache_dir, disk_cache_bytes=1, disk_cache_grace_seconds=1.0) as b:
        expected = {model: text_of(a, model) for model in models}
        for round_ in range(3):
            time.sleep(1.2)  # A's entries are now older than the grace period
            text_of(b, f"math*0.{round_ + 2}+code*0.5")  # B merges a new composition and evicts
            assert {model: text_of(a, model) for model in models} == expected
            assert {"code*0.5+math*0.5@cat", "lookup*0.5+poetry*0.5@cat"} <= _stored_models(cache_dir)
            assert {model: text_of(b, model) for model in models} == expected


def test_a_temp_dir_this_process_is_writing_is_never_stale(tmp_path):
    """Found as a flaky test: with a zero grace period, one cache's sweep deleted a temp dir
    another cache in the same process was still writing (its pid is alive, its mtime old).
    A temp dir with this pid is stale only when this process is not writing it."""
    from server.disk_tier import _LIVE_TMPS, DiskTier, tmp_is_stale

    disk = DiskTier(tmp_path, grace_s=0.0, on_error=lambda *a: None)
    writing, leftover = disk.new_tmp(key_of("a")), disk.new_tmp(key_of("b"))
    for path in (writing, leftover):
        path.mkdir()
        _age(path, 60)
    _LIVE_TMPS.add(writing.name)
    try:
        assert not tmp_is_stale(writing, 0.0, time.time())
        assert tmp_is_stale(leftover, 0.0, time.time())  # an earlier process with this pid
    finally:
        _LIVE_TMPS.discard(writing.name)
