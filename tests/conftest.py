"""Shared fixtures: encryption, and storage on both SQLite and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from bot import new_event_loop
from storage import crypto
from storage.db import create_engine, migrate, session_maker
from storage.models import Base

if TYPE_CHECKING:
    from graph.agent import Agent
    from settings import Settings
    from tests.fakes.openai import FakeOpenAI

# Tests never reach the network; LangSmith must not try.
os.environ["LANGSMITH_TRACING"] = "false"
os.environ.pop("LANGCHAIN_TRACING_V2", None)

PG_ADMIN_URL = os.environ.get(
    "DESKTOP_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_PG = os.environ.get("DESKTOP_REQUIRE_PG") == "1"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Async tests run on the event loop the bot runs on in production (uvloop's)."""
    return {"bot_loop": new_event_loop}


@pytest.fixture(autouse=True)
def cipher() -> Iterator[crypto.Cipher]:
    """Every test runs with its own fresh key installed."""
    installed = crypto.Cipher([Fernet.generate_key().decode()])
    crypto.configure(installed)
    yield installed


async def _create_pg_database(name: str) -> None:
    admin = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()


async def _drop_pg_database(name: str) -> None:
    admin = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated once, dropped at the end."""
    name = f"desktop_test_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_create_pg_database(name))
    except (OSError, Exception) as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (DESKTOP_REQUIRE_PG=1) but unreachable: {exc!r}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc!r}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    async def _migrate() -> None:
        engine = create_engine(url)
        await migrate(engine)
        await engine.dispose()

    asyncio.run(_migrate())
    yield url
    asyncio.run(_drop_pg_database(name))


async def _truncate(engine: AsyncEngine) -> None:
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    if engine.dialect.name == "postgresql":
        await _truncate(engine)
    else:
        await migrate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_maker(engine)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "postgresql" in item.nodeid:
            item.add_marker(pytest.mark.postgres)


_postgres_passed = 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _postgres_passed
    if report.when == "call" and report.passed and "postgres" in report.keywords:
        _postgres_passed += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With DESKTOP_REQUIRE_PG=1 (CI), a run in which no PostgreSQL test passed is a failure."""
    if REQUIRE_PG and exitstatus == 0 and session.testscollected and _postgres_passed == 0:
        print("\nFAILED: DESKTOP_REQUIRE_PG=1 but no PostgreSQL test passed")
        session.exitstatus = 1


# --- the agent over real HTTP to the fake OpenAI server ---------------------------------

PROJECT_PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    from tests.fakes.openai import FakeOpenAI

    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
def prompts_dir(tmp_path: Path) -> Path:
    """A private copy of the role files, so a test may edit or break them."""
    target = tmp_path / "prompts"
    shutil.copytree(PROJECT_PROMPTS, target)
    return target


def make_settings(tmp_path: Path, base_url: str, db_url: str, prompts: Path, **overrides: object) -> Settings:
    from settings import Settings

    values: dict[str, object] = dict(
        openai_api_key="sk-test", openai_base_url=base_url, database_url=db_url,
        data_dir=tmp_path / "data", prompts_dir=prompts, daily_token_limit=100_000,
        model_timeout=2.0, model_max_attempts=3, model_retry_base_delay=0.01,
        chat_model="gpt-4o", summary_model="gpt-4o-mini", telegram_token=None,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def make_agent(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> Agent:
    from graph.agent import Agent
    from graph.context import Services
    from graph.model import ModelGateway
    from graph.roles import RoleRegistry
    from graph.tools import ToolBox
    from memory.embedders import build_embedder
    from memory.local import LocalMemory

    models = ModelGateway.from_settings(settings)
    embedder = build_embedder(settings, models)
    services = Services(
        settings=settings, sessions=sessions,
        roles=RoleRegistry(settings.prompts_dir, check_interval=0),
        memory=LocalMemory(sessions, embedder.space), models=models, embedder=embedder,
        tools=ToolBox.from_settings(settings.mcp_connections()),
    )
    return Agent(services)


@pytest.fixture
async def agent_factory(
    tmp_path: Path, fake_openai: FakeOpenAI, db_url: str, sessions: async_sessionmaker[AsyncSession],
    prompts_dir: Path,
) -> AsyncIterator[Callable[..., Agent]]:
    built: list[Agent] = []

    def build(**overrides: object) -> Agent:
        settings = make_settings(tmp_path, fake_openai.base_url, db_url, prompts_dir, **overrides)
        built.append(make_agent(settings, sessions))
        return built[-1]

    yield build
    for agent in built:  # as at shutdown: traces written, connections closed on this loop
        await agent.aclose()


@pytest.fixture
def agent(agent_factory: Callable[..., Agent]) -> Agent:
    return agent_factory()


@pytest.fixture
def start_bot(
    tmp_path: Path, db_url: str, sessions: async_sessionmaker[AsyncSession], prompts_dir: Path,
    fake_openai: FakeOpenAI,
) -> Callable[..., Any]:
    """The whole bot on the fakes, with settings overridden: `async with start_bot(**kw) as h:`."""
    from tests.harness import running_bot

    def start(**overrides: object) -> Any:
        return running_bot(tmp_path, db_url, sessions, prompts_dir, fake_openai, **overrides)

    return start
