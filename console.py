"""The terminal front end on the same graph: try roles and memory without Telegram."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from graph.agent import Agent, Answer, Delta, Duplicate, Failure, Refusal, Routed, SessionStarted
from storage.repositories import Traces

# The console speaks as one local user; its id cannot collide with Telegram's (always > 0).
CONSOLE_USER_ID = -1
CONSOLE_CHAT_ID = -1

HELP = """commands:
  /roles                 list the roles (from prompts/)
  /role NAME             switch role (auto: the best-suited role answers each session)
  /instructions TEXT     set your own instructions (/instructions with no text clears them)
  /start_session [TITLE] end the current session (with its summary) and start a new one
  /end_session           end the session and show its summary
  /list_sessions         list sessions with their summaries
  /usage                 tokens used today
  /help, /quit
anything else is a message to the agent."""

FAILURES = {
    "busy": "The model is busy right now; try again in a moment.",
    "unavailable": "The model provider is unavailable; try again shortly.",
    "timeout": "The model did not answer in time; try again.",
    "quota": "The provider's quota is exhausted; the operator must top it up.",
    "auth": "The provider rejected the API key (OPENAI_API_KEY).",
    "error": "Something went wrong; try again.",
    "deleted": "Your data was deleted while answering.",
}


async def run_console(agent: Agent, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    profile = await agent.profile(CONSOLE_USER_ID, "en")
    out.write(f"DESK TOP console. Role: {profile.role.label('en')}. Type /help.\n")
    while True:
        out.write("you> ")
        out.flush()
        line = await asyncio.to_thread(stdin.readline)
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/"):
            await _command(agent, line, out)
        else:
            await _chat(agent, line, out)
    out.write("bye\n")


async def _chat(agent: Agent, text: str, out: TextIO) -> None:
    speaking = False
    async for event in agent.handle_message(
        user_id=CONSOLE_USER_ID, chat_id=CONSOLE_CHAT_ID, text=text, update_id=None
    ):
        if isinstance(event, SessionStarted):
            out.write(f"(session {event.session_id} started)\n")
        elif isinstance(event, Routed):
            out.write(f"(Auto: {event.role.label('en')} answers)\n")
        elif isinstance(event, Delta):
            if not speaking:
                out.write("agent> ")
                speaking = True
            out.write(event.text)
            out.flush()
        elif isinstance(event, Answer):
            out.write("\n" if event.complete else "\n(the answer was cut short)\n")
        elif isinstance(event, Refusal):
            out.write(
                f"Daily limit reached: {event.used} of {event.limit} tokens used; "
                f"resets at {event.resets_at:%Y-%m-%d %H:%M} UTC.\n"
            )
        elif isinstance(event, Failure):
            out.write(f"\n{FAILURES[event.kind]}\n")
        elif isinstance(event, Duplicate):
            pass
    out.flush()


async def _command(agent: Agent, line: str, out: TextIO) -> None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/help":
        out.write(HELP + "\n")
    elif name == "/roles":
        for role in agent.services.roles.roles():
            out.write(f"  {role.id:<20} {role.describe('en')}\n")
        for problem in agent.services.roles.errors():
            out.write(f"  (broken) {problem}\n")
    elif name == "/role":
        role = await agent.set_role(CONSOLE_USER_ID, arg)
        out.write(f"role: {role.label('en')}\n" if role else f"no role {arg!r}; see /roles\n")
    elif name == "/instructions":
        await agent.set_instructions(CONSOLE_USER_ID, arg or None)
        out.write("instructions saved\n" if arg else "instructions cleared\n")
    elif name == "/start_session":
        ended, session = await agent.start_session(CONSOLE_USER_ID, CONSOLE_CHAT_ID, arg or None)
        if ended is not None and ended.summary:
            out.write(f"previous session summarised:\n{ended.summary}\n")
        out.write(f"session {session.id} started\n")
    elif name == "/end_session":
        ended = await agent.end_session(CONSOLE_USER_ID, CONSOLE_CHAT_ID)
        if ended is None:
            out.write("no open session\n")
        else:
            out.write(f"session ended ({ended.outcome})\n{ended.summary or ''}\n")
    elif name == "/list_sessions":
        sessions, total = await agent.list_sessions(CONSOLE_USER_ID, 0, 20)
        out.write(f"{total} sessions\n")
        for s in sessions:
            first_line = (s.summary or "").split("\n", 1)[0]
            out.write(f"  #{s.id} {s.started_at:%Y-%m-%d} {s.role} {s.status} {s.title or ''} {first_line}\n")
    elif name == "/usage":
        usage = await agent.usage(CONSOLE_USER_ID)
        used, limit = usage.used, usage.limit
        out.write(f"{used} of {limit} tokens used today\n")
    else:
        out.write(f"unknown command {name}; /help lists them\n")


async def show_traces(agent: Agent, run_id: str | None, out: TextIO = sys.stdout) -> None:
    async with agent.services.sessions() as db:
        if run_id is None:
            runs = await Traces(db).recent(20)
            out.write(f"{'run':<36}  {'when (UTC)':<19}  {'kind':<9} {'outcome':<14} {'ms':>8}  tokens\n")
            for t in runs:
                out.write(
                    f"{t.id}  {t.started_at:%Y-%m-%d %H:%M:%S}  {t.kind:<9} {t.outcome:<14} "
                    f"{t.duration_ms:>8.1f}  {t.input_tokens}+{t.output_tokens}\n"
                )
            return
        trace = await Traces(db).get(run_id)
    if trace is None:
        out.write(f"no single run matches {run_id!r}\n")
        return
    out.write(
        f"{trace.kind} {trace.id}  user {trace.user_id}  session {trace.session_id}\n"
        f"  outcome {trace.outcome}, {trace.duration_ms:.1f} ms, model {trace.model or '-'}, "
        f"tokens {trace.input_tokens} in / {trace.output_tokens} out\n"
    )
    if trace.error:
        out.write(f"  error {trace.error}\n")
    steps = [node for node in trace.nodes if "parent" not in node]
    for node in trace.nodes:
        # A call made inside a step (a consulted role) is drawn under that step.
        branch = "│  └─" if "parent" in node else "└─" if node is steps[-1] else "├─"
        hidden = ("node", "start_ms", "ms", "parent")
        extra = "".join(f" {k}={v}" for k, v in node.items() if k not in hidden)
        timing = f"+{node['start_ms']:>8.1f} ms  {node.get('ms', 0):>8.1f} ms"
        out.write(f"  {branch} {node['node']:<16} {timing}{extra}\n")
