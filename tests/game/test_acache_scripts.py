"""A match result's Redis steps in one pipeline, also with scripts the Redis does not know yet."""

from __future__ import annotations

import asyncio
import uuid

import redis

from pbgame.acache import Leaderboards, Profiles, connect, run_scripts
from pbgame.cache import INVALIDATE_PROFILE
from pbmigrate.cache.keys import leaderboard_key, profile_key


async def _invalidate_and_update(url: str) -> tuple[list, dict, list]:
    client = connect(url)
    try:
        async def no_row(_: str) -> None:
            return None

        async def no_board(_: str) -> list:
            return []

        profiles, boards = Profiles(client, no_row), Leaderboards(client, no_board)
        calls = [profiles.invalidate_call("p1"), profiles.invalidate_call("p2"),
                 boards.update_call("s1", {"p1": 1016.0})]
        first = await run_scripts(client, calls)
        # A script this Redis has never loaded (as after a restart; SCRIPT FLUSH would hit the
        # other users of a shared Redis): NOSCRIPT in the pipeline, then one by one, which loads it.
        profiles._invalidate = client.register_script(f"{INVALIDATE_PROFILE}\n-- {uuid.uuid4().hex}")
        await client.hset(profile_key("p1"), mapping={"xp": "10"})
        second = await run_scripts(client, [profiles.invalidate_call("p1"), calls[2]])
        return first, await client.hgetall(profile_key("p1")), second
    finally:
        await client.aclose()


def test_scripts_run_in_one_pipeline_and_survive_a_script_flush(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    sync.zadd(leaderboard_key("s1"), {"p1": 1000.0, "p9": 1200.0})
    sync.hset(profile_key("p1"), mapping={"xp": "0"})
    first, profile_after, second = asyncio.run(_invalidate_and_update(redis_url))
    assert len(first) == 3 and first[2] == 1  # both invalidations and the board update ran
    assert profile_after == {}  # the second run, after the flush, invalidated again
    assert second[1] == 1 and sync.zscore(leaderboard_key("s1"), "p1") == 1016.0
    assert sync.zrevrange(leaderboard_key("s1"), 0, -1) == ["p9", "p1"]
