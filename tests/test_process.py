"""Process-wide settings the bot applies at the end of start-up."""

from __future__ import annotations

import gc

import bot


def test_the_collector_runs_at_the_bot_thresholds() -> None:
    before = gc.get_threshold()
    try:
        bot.tune_gc()
        assert gc.isenabled()
        assert gc.get_threshold() == (bot.GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)


async def test_the_tests_run_on_the_bot_event_loop():
    import asyncio

    import uvloop

    made_by_the_bot = bot.new_event_loop()
    try:
        assert type(asyncio.get_running_loop()) is type(made_by_the_bot) is uvloop.Loop
    finally:
        made_by_the_bot.close()
