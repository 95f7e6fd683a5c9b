"""E7: the daily token ledger under random interleavings, on real SQLite and PostgreSQL.

A hypothesis state machine drives storage.repositories.Budget the way the bot does (reserve
before a call, settle after it) and the way failures do (a process dies holding a reservation,
the sweeper settles what expired, a restart settles every orphan, the day rolls over, an
embedding is charged when it fits), and compares the database with an exact model after
every step.

The invariants (for every day of the user):

* a reservation is admitted exactly when used + reserved + amount <= limit, so after an
  admission used + reserved <= limit;
* reserved >= 0, used >= 0, and reserved == the sum of the day's outstanding reservations;
* used + reserved <= limit, always: a settle charges at most its reservation, whatever usage a
  provider reports, and a direct charge (an embedding) is made only when it fits;
* a reservation is settled at most once: a second settle (a retry, the sweeper after a slow
  process, the process after the sweeper) returns None and changes nothing;
* a reservation is settled against its own day, even after midnight.

Plus, concurrently (asyncio.gather, a session each): the admitted total never exceeds the
limit, nothing is refused that would still have fitted, and a reservation settled twice at
once (the process and the sweeper) is charged exactly once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.db import create_engine, migrate, session_maker
from storage.models import Reservation, UsageDay
from storage.repositories import Budget, OverBudget, Reserved, Users, utc_day
from tests.seeding import reserve

# Every machine (and every concurrency example) gets users nobody else has: the PostgreSQL
# database is shared by the whole run and is not emptied between examples.
_user_ids = itertools.count(7_000_000_000_000)
T = TypeVar("T")

MACHINE_SETTINGS = settings(
    max_examples=30, stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass(frozen=True)
class Res:
    amount: int
    day: dt.date
    expires_at: dt.datetime


@dataclass
class Day:
    used: int = 0
    reserved: int = 0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database for a state machine that runs its own event loop."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"

    async def _migrate() -> None:
        engine = create_engine(url)
        await migrate(engine)
        await engine.dispose()

    asyncio.run(_migrate())
    return url


def ledger_machine(url: str) -> type[RuleBasedStateMachine]:
    class LedgerMachine(RuleBasedStateMachine):
        """One user's ledger; each rule is one transaction, as in the bot."""

        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.engine = create_engine(url)
            self.sessions: async_sessionmaker[AsyncSession] = session_maker(self.engine)
            self.user = next(_user_ids)
            self.limit = 0
            self.clock = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
            self.res: dict[str, Res] = {}
            self.open: set[str] = set()  # not yet settled in the database
            self.held: set[str] = set()  # held by a live process that will settle it
            self.days: dict[dt.date, Day] = {}

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            self.run(self.engine.dispose())
            self.loop.close()

        # --- steps ---------------------------------------------------------------------

        @initialize(
            limit=st.integers(1, 5_000),
            start=st.datetimes(dt.datetime(2026, 1, 1), dt.datetime(2026, 12, 31),
                               timezones=st.just(dt.UTC)),
        )
        def setup(self, limit: int, start: dt.datetime) -> None:
            self.limit = limit
            self.clock = start.replace(microsecond=0)

            async def create() -> None:
                async with self.sessions() as db:
                    await Users(db).ensure(self.user, "en")
                    await db.commit()

            self.run(create())

        @rule(data=st.data(), ttl=st.integers(10, 3_600))
        def reserve(self, data: st.DataObject, ttl: int) -> None:
            amount = data.draw(st.integers(1, max(1, self.limit * 3 // 2)), label="amount")
            day = self.days.setdefault(utc_day(self.clock), Day())
            fits = day.used + day.reserved + amount <= self.limit

            async def go() -> Reserved | OverBudget:
                async with self.sessions() as db:
                    outcome = await reserve(
                        db, self.user, amount, self.limit, ttl_seconds=ttl, now=self.clock
                    )
                    await db.commit()
                    return outcome

            outcome = self.run(go())
            if not fits:
                assert isinstance(outcome, OverBudget), f"{amount} admitted over the limit"
                assert (outcome.used, outcome.reserved, outcome.limit) == (
                    day.used, day.reserved, self.limit
                )
                return
            assert isinstance(outcome, Reserved), f"{amount} refused though it fits"
            assert outcome.amount == amount and outcome.day == utc_day(self.clock)
            day.reserved += amount
            assert day.used + day.reserved <= self.limit  # at every successful reserve
            self.res[outcome.id] = Res(amount, outcome.day, self.clock + dt.timedelta(seconds=ttl))
            self.open.add(outcome.id)
            self.held.add(outcome.id)

        def _pick(self, ids: set[str], pick: int) -> str:
            """By creation order, not by the random uuids: a replay must pick the same one."""
            ordered = [i for i in self.res if i in ids]
            return ordered[pick % len(ordered)]

        def _settle(self, reservation_id: str, actual: int | None) -> int | None:
            async def go() -> int | None:
                async with self.sessions() as db:
                    charged = await Budget(db).settle(reservation_id, actual)
                    await db.commit()
                    return charged

            return self.run(go())

        def _book(self, reservation_id: str, charged: int) -> None:
            res = self.res[reservation_id]
            day = self.days[res.day]  # its own day, whatever the clock says now
            day.reserved -= res.amount
            day.used += charged
            self.open.discard(reservation_id)

        @precondition(lambda self: self.held)
        @rule(pick=st.integers(0, 10**6), actual=st.one_of(st.none(), st.integers(0, 6_000)))
        def settle(self, pick: int, actual: int | None) -> None:
            """The process that reserved settles: usage known (any size) or unknown (None)."""
            reservation_id = self._pick(self.held, pick)
            self.held.discard(reservation_id)
            expected = None
            if reservation_id in self.open:  # else the sweeper got there first
                amount = self.res[reservation_id].amount
                expected = amount if actual is None else min(actual, amount)
            assert self._settle(reservation_id, actual) == expected
            if expected is not None:
                self._book(reservation_id, expected)

        @precondition(lambda self: len(self.res) > len(self.open))
        @rule(pick=st.integers(0, 10**6), actual=st.one_of(st.none(), st.integers(0, 6_000)))
        def settle_again(self, pick: int, actual: int | None) -> None:
            """A retry of a settle that went through: nothing is charged twice."""
            assert self._settle(self._pick(set(self.res) - self.open, pick), actual) is None

        @precondition(lambda self: self.held)
        @rule(pick=st.integers(0, 10**6))
        def crash(self, pick: int) -> None:
            """The process dies holding the reservation: nobody settles it but the sweeper."""
            self.held.discard(self._pick(self.held, pick))

        @rule()
        def sweep(self) -> None:
            """The sweeper (Agent.sweep_reservations): expired reservations charged in full."""

            async def go() -> list[str]:
                async with self.sessions() as db:
                    budget = Budget(db)
                    mine = [i for i in await budget.expired(now=self.clock) if i in self.res]
                    for reservation_id in mine:
                        assert await budget.settle(reservation_id, None) == self.res[reservation_id].amount
                    await db.commit()
                    return mine

            swept = self.run(go())
            due = {i for i in self.open if self.res[i].expires_at < self.clock}
            assert set(swept) == due
            for reservation_id in swept:
                self._book(reservation_id, self.res[reservation_id].amount)

        @rule()
        def restart(self) -> None:
            """Start-up (Agent.settle_orphaned_reservations): every reservation is an orphan."""

            async def go() -> list[str]:
                async with self.sessions() as db:
                    budget = Budget(db)
                    mine = [i for i in await budget.all_ids() if i in self.res]
                    for reservation_id in mine:
                        await budget.settle(reservation_id, None)
                    await db.commit()
                    return mine

            assert set(self.run(go())) == self.open
            for reservation_id in list(self.open):
                self._book(reservation_id, self.res[reservation_id].amount)
            self.held.clear()

        @rule(tokens=st.integers(0, 2_000), keep=st.integers(0, 2_000))
        def charge_if_room(self, tokens: int, keep: int) -> None:
            """An embedding: charged before it is made, when it and `keep` more still fit."""

            async def go() -> bool:
                async with self.sessions() as db:
                    charged = await Budget(db).charge_if_room(
                        self.user, tokens, self.limit, keep=keep, now=self.clock
                    )
                    await db.commit()
                    return charged

            day = self.days.setdefault(utc_day(self.clock), Day())
            fits = day.used + day.reserved + tokens + keep <= self.limit
            assert self.run(go()) == fits
            if fits:
                day.used += tokens

        @rule(seconds=st.integers(0, 3_600))
        def advance(self, seconds: int) -> None:
            self.clock += dt.timedelta(seconds=seconds)

        @rule(into=st.integers(0, 86_399))
        def next_day(self, into: int) -> None:
            midnight = dt.datetime.combine(utc_day(self.clock) + dt.timedelta(days=1), dt.time(),
                                           tzinfo=dt.UTC)  # fmt: skip
            self.clock = midnight + dt.timedelta(seconds=into)

        # --- after every step --------------------------------------------------------------

        @invariant()
        def ledger_matches_the_model(self) -> None:
            async def read() -> tuple[list[UsageDay], list[Reservation]]:
                async with self.sessions() as db:
                    days = (await db.execute(
                        select(UsageDay).where(UsageDay.user_id == self.user)
                    )).scalars().all()
                    held = (await db.execute(
                        select(Reservation).where(Reservation.user_id == self.user)
                    )).scalars().all()
                    return list(days), list(held)

            rows, reservations = self.run(read())
            assert {r.id for r in reservations} == self.open
            assert {r.day for r in rows} == set(self.days)
            for row in rows:
                model = self.days[row.day]
                outstanding = sum(r.amount for r in reservations if r.day == row.day)
                assert row.reserved >= 0 and row.used >= 0
                assert row.reserved == outstanding
                assert row.used + row.reserved <= self.limit
                assert (row.used, row.reserved) == (model.used, model.reserved)

    return LedgerMachine


def test_ledger_state_machine(ledger_url: str) -> None:
    run_state_machine_as_test(ledger_machine(ledger_url), settings=MACHINE_SETTINGS)


# --- concurrency --------------------------------------------------------------------------

@pytest.fixture
def fresh_users() -> Iterator[int]:
    return _user_ids


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    amounts=st.lists(st.integers(1, 600), min_size=2, max_size=16),
    limit=st.integers(1, 2_000),
    already=st.integers(0, 2_000),
)
async def test_concurrent_reservations_never_admit_more_than_the_limit(
    sessions: async_sessionmaker[AsyncSession], fresh_users: Iterator[int],
    amounts: list[int], limit: int, already: int,
) -> None:
    user = next(fresh_users)
    already = min(already, limit)
    now = dt.datetime.now(dt.UTC)  # one day for the whole example, even at midnight
    async with sessions() as db:
        await Users(db).ensure(user, "en")
        await db.commit()
    if already:  # part of the day is already spent
        async with sessions() as db:
            assert await Budget(db).charge_if_room(user, already, limit, keep=0, now=now)
            await db.commit()

    async def one(amount: int) -> Reserved | OverBudget:
        async with sessions() as db:
            return await reserve(db, user, amount, limit, ttl_seconds=600, now=now)

    outcomes = await asyncio.gather(*(one(a) for a in amounts))
    admitted = sum(o.amount for o in outcomes if isinstance(o, Reserved))
    assert already + admitted <= limit
    # Reservations only grow here, so one refused then would still be refused now.
    for amount, outcome in zip(amounts, outcomes, strict=False):
        if isinstance(outcome, OverBudget):
            assert already + admitted + amount > limit, f"{amount} refused though it fits"
    async with sessions() as db:
        day = await Budget(db).day(user, now)
        held = (await db.execute(select(Reservation).where(Reservation.user_id == user))).scalars().all()
    assert day is not None and (day.used, day.reserved) == (already, admitted)
    assert sum(r.amount for r in held) == admitted

    # The process and the sweeper settle the same reservation at the same time: one wins.
    async def settle(reservation_id: str, actual: int | None) -> int | None:
        async with sessions() as db:
            charged = await Budget(db).settle(reservation_id, actual)
            await db.commit()
            return charged

    won = [o for o in outcomes if isinstance(o, Reserved)]
    results = await asyncio.gather(*(
        settle(o.id, actual) for o in won for actual in (o.amount // 2, None)
    ))
    charged = 0
    for pair in zip(results[::2], results[1::2], strict=False):
        assert sum(r is not None for r in pair) == 1, f"settled {pair}: not exactly once"
        charged += next(r for r in pair if r is not None)
    async with sessions() as db:
        day = await Budget(db).day(user, now)
    assert day is not None and (day.used, day.reserved) == (already + charged, 0)
