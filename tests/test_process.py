"""Process-wide settings the bot applies at the end of start-up."""

from __future__ import annotations

import gc
from pathlib import Path

import bot


def test_the_collector_runs_at_the_bot_thresholds() -> None:
    before = gc.get_threshold()
    try:
        bot.tune_gc()
        assert gc.isenabled()
        assert gc.get_threshold() == (bot.GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)


def test_start_up_ends_with_the_collector_on_and_what_it_built_frozen() -> None:
    before = gc.get_threshold()
    gc.disable()  # as main() starts
    built_at_start_up = [object() for _ in range(3)]
    try:
        bot.settle_heap()
        assert gc.isenabled()
        assert gc.get_threshold()[0] == bot.GC_YOUNG_THRESHOLD
        assert gc.get_freeze_count() >= len(built_at_start_up)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        gc.enable()


def test_a_start_up_that_fails_leaves_the_collector_on(monkeypatch) -> None:
    monkeypatch.setenv("DAILY_TOKEN_LIMIT", "not a number")
    monkeypatch.chdir(Path(__file__).resolve().parent)  # no .env of the developer's

    assert bot.main(["check"]) == 2
    assert gc.isenabled()


async def test_the_tests_run_on_the_bot_event_loop():
    import asyncio

    import uvloop

    made_by_the_bot = bot.new_event_loop()
    try:
        assert type(asyncio.get_running_loop()) is type(made_by_the_bot) is uvloop.Loop
    finally:
        made_by_the_bot.close()
