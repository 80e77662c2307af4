"""Small merges behind large ones: latency of a new 2-skill composition while six new
16-skill LEGO merges are running, with merges in loramix's merge pool (two lanes, bounded
queues) against the previous behaviour (every merge on Python's default thread pool).

The demo world (lab/assets) is served in process (local engine, fresh composition cache per
run) with 16 skills (four copies of each demo skill). Each request asks for max_tokens=1, so
its latency is almost all merge and wait.

    python -m bench.merge_queue
    python -m bench.merge_queue --large 6 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from lab.demo import LAB_ASSETS as ASSETS
from server.app import create_app
from server.settings import Settings

BASE_NAME = "loramix-demo"
COPIES = 4  # 4 demo skills x 4 copies = 16 skills


class DefaultPoolLane:
    """The previous behaviour: no lanes, no queue bound, Python's default thread pool."""

    name = "default"

    async def run(self, fn, *args):
        return await asyncio.to_thread(fn, *args)


def skills_dir(root: Path) -> tuple[Path, list[str]]:
    target = root / "skills"
    names = []
    for skill in sorted(p.name for p in (ASSETS / "skills").iterdir()):
        for copy in range(COPIES):
            name = f"{skill}{copy}"
            shutil.copytree(ASSETS / "skills" / skill, target / name)
            names.append(name)
    return target, names


async def one_run(pool: str, num_large: int, workers: int, root: Path) -> dict:
    skills, names = skills_dir(root)
    settings = Settings(base_model=ASSETS / "base", skills_dir=skills, served_model_name=BASE_NAME,
                        cache_dir=root / "cache", engine="local", merge_workers=workers,
                        merge_queue_size=max(8, num_large))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        composer = app.state.loramix.composer
        if pool == "default":
            composer.merge_pool.lane_for = lambda num_skills: DefaultPoolLane()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:

            async def timed(model: str) -> float:
                started = time.perf_counter()
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": "reverse: server =>", "max_tokens": 1, "temperature": 0})
                response.raise_for_status()
                return time.perf_counter() - started

            large_models = ["+".join(names) + f"@lego(seed={seed})" for seed in range(num_large)]
            large = [asyncio.create_task(timed(model)) for model in large_models]
            await asyncio.sleep(0.5)  # the large merges are under way
            small = await timed("reverse0+upper0")
            large_s = await asyncio.gather(*large)
    return {"small_s": small, "large_max_s": max(large_s), "large_median_s": sorted(large_s)[len(large_s) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=6, help="concurrent 16-skill LEGO merges")
    parser.add_argument("--workers", type=int, default=Settings.model_fields["merge_workers"].default,
                        help="merge pool workers per lane")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for pool in ["default", "lanes"]:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((pool, asyncio.run(one_run(pool, args.large, args.workers, Path(tmp)))))
    print(f"\n{args.large} x 16-skill lego merges + 1 x 2-skill cat merge; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}, merge_workers={args.workers}\n")
    print(f"| merges run on | 2-skill request (s) | 16-skill median (s) | 16-skill last (s) |")
    print("|---|---|---|---|")
    labels = {"default": "Python's default pool (before)", "lanes": "merge pool, two lanes (now)"}
    for pool, row in rows:
        print(f"| {labels[pool]} | {row['small_s']:.2f} | {row['large_median_s']:.2f} | {row['large_max_s']:.2f} |")


if __name__ == "__main__":
    main()
