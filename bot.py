"""DESK TOP entry point: composes the services and runs one mode (polling, console, traces, ...)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

# numpy's BLAS threads spin against the event loop on a small machine: one thread scores
# a 10,000-memory matrix faster here under load (bench/retrieval.py). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from graph.agent import Agent
    from memory.base import MemoryStore

log = logging.getLogger("desktop")

MODES = {
    "polling": "run the Telegram bot with long polling (the default)",
    "webhook": "run the Telegram bot behind a webhook (the default when WEBHOOK_URL is set)",
    "console": "chat with the agent in this terminal: roles, sessions and memory without Telegram",
    "traces": "list recent graph runs, or show one run as a tree: traces [RUN_ID]",
    "rotate-keys": "re-encrypt every stored value under the newest ENCRYPTION_KEY",
    "migrate": "apply database migrations and exit",
    "migrate-memory": "long-term memories: migrate-memory reembed | to-pinecone | to-local",
    "check": "validate the configuration and role files, then exit",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bot.py",
        description="DESK TOP: a personal AI agent in Telegram.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="modes:\n" + "\n".join(f"  {name:<12} {text}" for name, text in MODES.items())
        + "\n\nConfiguration comes from the environment and .env (see .env.example).",
    )
    parser.add_argument("mode", nargs="?", default=None, choices=list(MODES), metavar="MODE")
    parser.add_argument(
        "run_id", nargs="?",
        help="traces: the run to show (a prefix is enough); migrate-memory: reembed, to-pinecone or to-local",
    )
    return parser.parse_args(argv)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiogram prints an update of an unknown type whole, and it may hold a user's text.
    warnings.filterwarnings("ignore", message="Detected unknown update type")
    # Request-level DEBUG logs of these libraries carry URLs with the bot token and bodies.
    for noisy in ("httpx", "httpx2", "openai", "aiohttp.access", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@asynccontextmanager
async def composed(settings: Settings) -> AsyncIterator[Agent]:
    """Everything long-lived, built once: storage, encryption, roles, memory, models, agent."""
    from graph.agent import Agent
    from graph.context import Services
    from graph.model import ModelGateway
    from graph.roles import RoleRegistry
    from graph.tools import ToolBox
    from memory.embedders import build_embedder
    from storage import crypto
    from storage.db import create_engine, migrate, session_maker
    from storage.rotation import check_keys

    keys = crypto.load_or_create_keys(
        settings.encryption_key.get_secret_value() if settings.encryption_key else None,
        settings.data_dir,
    )
    try:
        crypto.configure(crypto.Cipher(keys))
    except ValueError as exc:
        raise ConfigError(f"ENCRYPTION_KEY: {exc}") from None
    engine = create_engine(settings.sqlalchemy_url)
    try:
        try:
            await migrate(engine)
        except (OSError, SQLAlchemyError) as exc:
            raise ConfigError(f"DATABASE_URL: cannot use the database ({type(exc).__name__})") from None
        sessions = session_maker(engine)
        models = ModelGateway.from_settings(settings)
        embedder = build_embedder(settings, models)
        memory = await build_memory(settings, sessions, embedder.space)
        try:
            await check_keys(sessions)
        except crypto.DecryptionError:
            raise ConfigError(
                "ENCRYPTION_KEY: the stored data does not decrypt with these keys "
                "(add the old key after the new one, then run: python bot.py rotate-keys)"
            ) from None
        roles = RoleRegistry(settings.prompts_dir)
        for problem in roles.errors():
            log.warning("role file problem: %s", problem)
        services = Services(
            settings=settings, sessions=sessions, roles=roles, memory=memory, models=models,
            embedder=embedder,
            tools=ToolBox.from_settings(settings.mcp_connections()),
        )
        try:
            agent = Agent(services)
            try:
                yield agent
            finally:
                await agent.aclose()
        finally:
            close = getattr(memory, "close", None)
            if close is not None:
                await close()
    finally:
        await engine.dispose()


async def build_memory(settings: Settings, sessions: Any, space: str) -> MemoryStore:
    """Pinecone when PINECONE_API_KEY is set, otherwise the local backend in the SQL database."""
    from memory.local import LocalMemory

    if settings.pinecone_api_key is None:
        return LocalMemory(sessions, space)
    from memory.pinecone import MemoryUnavailable, PineconeMemory

    if not (settings.pinecone_host or settings.pinecone_index):
        raise ConfigError("PINECONE_INDEX: required with PINECONE_API_KEY (or PINECONE_HOST)")
    memory = PineconeMemory.from_settings(settings, sessions, space)
    try:
        await memory.start()
    except MemoryUnavailable as exc:
        raise ConfigError(f"PINECONE_INDEX: the index cannot be reached ({exc})") from None
    return memory


@asynccontextmanager
async def background_jobs(agent: Agent, redis_url: str | None) -> AsyncIterator[None]:
    """APScheduler jobs, reminders sent through a Bot of their own; with REDIS_URL each run is
    claimed so the fleet runs it once."""
    from handlers.app import build_bot
    from handlers.i18n import Catalog
    from handlers.reminders import ReminderNotifier
    from ops.jobs import JobClaims, build_scheduler

    redis = None
    if redis_url:
        from redis.asyncio import Redis

        redis = Redis.from_url(redis_url)
    bot = build_bot(agent.services.settings)
    scheduler = build_scheduler(
        agent, claims=JobClaims(redis) if redis is not None else None,
        notify=ReminderNotifier(bot, Catalog.load()),
    )
    scheduler.start()
    try:
        yield
    finally:
        scheduler.shutdown(wait=False)
        await bot.session.close()
        if redis is not None:
            await redis.aclose()


async def migrate_memory(agent: Agent, direction: str | None) -> None:
    """Move memories: re-embed into the current space, or copy between SQL and Pinecone."""
    from memory.local import LocalMemory
    from memory.migrate import LocalSource, copy_memories, reembed
    from memory.pinecone import PineconeMemory

    services = agent.services
    memory, sessions = services.memory, services.sessions
    if direction == "reembed":
        done = await reembed(sessions, memory, services.embedder)
        print(f"{done} memories embedded again with {services.embedder.space}")
        return
    if not isinstance(memory, PineconeMemory):
        raise ConfigError("PINECONE_API_KEY: migrate-memory to-pinecone|to-local needs Pinecone")
    if direction == "to-pinecone":
        report = await copy_memories(LocalSource(sessions, memory.space), memory)
    elif direction == "to-local":
        # Summaries Pinecone held with their text (before units lived in SQL); their vectors
        # came from the provider's endpoint, so they are stored in that space.
        legacy_space = f"openai:{services.settings.embedding_model}"
        report = await copy_memories(memory, LocalMemory(sessions, legacy_space))
    else:
        raise ConfigError("migrate-memory: say reembed, to-pinecone or to-local")
    print(f"{report.copied} memories of {report.users} users copied ({report.skipped} skipped)")


def export_tracing_settings(settings: Settings) -> None:
    """LangSmith reads os.environ; values given only in .env are passed on here."""
    if settings.langsmith_tracing and settings.langsmith_api_key:
        os.environ.setdefault("LANGSMITH_TRACING", "true")
        os.environ.setdefault("LANGSMITH_API_KEY", settings.langsmith_api_key.get_secret_value())
    else:
        os.environ.setdefault("LANGSMITH_TRACING", "false")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    start_monitoring(settings)  # inside the loop: Sentry's asyncio integration hooks it
    mode = args.mode or ("webhook" if settings.webhook_url else "polling")
    if mode in ("polling", "webhook") and settings.telegram_token is None:
        raise ConfigError("TELEGRAM_TOKEN: required to run the Telegram bot (or run: python bot.py console)")
    if mode == "webhook" and settings.webhook_url is None:
        raise ConfigError("WEBHOOK_URL: required in webhook mode (the public https URL Telegram posts to)")
    if mode == "webhook" and settings.webhook_secret is None:
        # Without it anyone who finds the URL could post updates in any user's name.
        raise ConfigError(
            "WEBHOOK_SECRET: required in webhook mode (1-256 of A-Z a-z 0-9 _ -, the same on "
            "every replica; e.g. the output of: openssl rand -hex 32)"
        )
    async with composed(settings) as agent:
        if mode in ("polling", "webhook"):
            from ops.aiogram_lazy import import_aiogram

            import_aiogram()  # before the handlers import aiogram: its types are built on use
            if mode == "polling":
                import handlers.app
            else:
                import handlers.webhook  # noqa: F401
        settle_heap()
        if mode == "polling":
            from handlers.app import run_polling

            async with background_jobs(agent, None):
                await run_polling(agent)
        elif mode == "webhook":
            from handlers.webhook import run_webhook

            async with background_jobs(agent, settings.redis_url):
                await run_webhook(agent)
        elif mode == "console":
            from console import run_console

            await run_console(agent)
        elif mode == "traces":
            from console import show_traces

            await show_traces(agent, args.run_id)
        elif mode == "rotate-keys":
            from storage.rotation import rotate_all

            for column, count in (await rotate_all(agent.services.sessions)).items():
                print(f"{column}: {count} re-encrypted")
        elif mode == "migrate-memory":
            await migrate_memory(agent, args.run_id)
        elif mode == "check":
            print(f"configuration OK; roles: {', '.join(r.id for r in agent.services.roles.roles())}")
            for problem in agent.services.roles.errors():
                print(f"role file problem: {problem}")
        # "migrate" has nothing more to do: composing the services applied the migrations.
    return 0


# A young-generation collection every 10,000 container allocations instead of CPython's 700.
# A message allocates a few thousand containers (pydantic models, SQL parameters, HTTP
# headers, stream chunks) that reference counting frees; at 700 the collector runs several
# times per message and walks what the answers in flight hold: 1,000 users at once are
# answered ~13 % later (bench/README.md). Cyclic garbage waits a little longer: kilobytes.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def settle_heap() -> None:
    """Start-up is over: collect again, but never walk what start-up built.

    Start-up imports and builds ~300,000 objects that live as long as the process (modules,
    classes, functions, the roles, the engine) and almost no garbage (~2,500 objects). The
    collector, left on, walks that growing pile again and again while it is built, and every
    full collection afterwards walks all of it (~0.25 s each on a 2-core VPS). So main() starts
    with the collector off, and here the survivors move to the permanent generation
    (gc.freeze) before it is switched back on (bench/README.md, lean, has the figures).
    """
    gc.freeze()
    tune_gc()
    gc.enable()


def start_monitoring(settings: Settings) -> None:
    """Secrets masked in every log line; Sentry (scrubbed of user text) when a DSN is set."""
    from ops.monitoring import init_sentry, install_log_redaction

    install_log_redaction(settings.secret_values())
    if settings.sentry_dsn is not None:
        init_sentry(
            settings.sentry_dsn.get_secret_value(), release=settings.sentry_release,
            environment=settings.sentry_environment, secrets=settings.secret_values(),
        )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed, asyncio's otherwise (Windows).

    Every message is a dozen socket round trips (Telegram, the model, PostgreSQL) and a few
    hundred wake-ups: uvloop does that bookkeeping in C (bench/README.md has the figure).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gc.disable()  # until start-up is over: settle_heap
    try:
        settings = load_settings()
        configure_logging(settings)
        export_tracing_settings(settings)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(run(args, settings))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        gc.enable()  # when start-up failed before settle_heap


if __name__ == "__main__":
    sys.exit(main())
