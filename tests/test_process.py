"""Process-wide settings the bot applies at the end of start-up."""

from __future__ import annotations

import gc

import bot


def test_start_up_ends_with_the_collector_running_at_the_bot_thresholds(monkeypatch):
    before = gc.get_threshold()
    monkeypatch.setattr(bot, "_GC_PAUSED", True)
    gc.disable()
    try:
        bot.resume_gc()
        assert gc.isenabled()
        assert gc.get_threshold() == (bot.GC_YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0  # the start-up objects are out of the collector's sight
        bot.resume_gc()  # a second call (main's finally) changes nothing
        assert gc.get_threshold()[0] == bot.GC_YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        gc.enable()


async def test_the_tests_run_on_the_bot_event_loop():
    import asyncio

    import uvloop

    made_by_the_bot = bot.new_event_loop()
    try:
        assert type(asyncio.get_running_loop()) is type(made_by_the_bot) is uvloop.Loop
    finally:
        made_by_the_bot.close()
