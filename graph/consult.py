"""Consult: a role agent asks another role for a part of the work within one turn.

The Product manager asks the Coder for an estimate: a tool `ask_coder(question)` whose call is
one model call with the Coder's prompt and no history, reserved from the user's allowance
before it runs and settled after, like every call, shown as its own step under `run_tools` in
the run's trace. Depth is one: a consulted role is offered no tools, so it cannot consult in
turn; its answer is bounded by CONSULT_MAX_TOKENS.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import cache
from typing import TYPE_CHECKING, Any

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from graph.roles import Role
from graph.tools import ToolArgs, ToolRefused

if TYPE_CHECKING:
    from graph.context import TurnContext

CONSULT_MAX_TOKENS = 800
CONSULT_PREFIX = "ask_"


class ConsultArgs(ToolArgs):
    question: str = Field(min_length=1, max_length=4000, description=(
        "The question, with all the context the other role needs: it does not see this chat."
    ))


def consulted(ctx: TurnContext) -> list[Role]:
    """The roles this turn's role may consult (its `consult:` field) that exist now."""
    found = (ctx.services.roles.get(role_id) for role_id in ctx.role.consult)
    return [other for other in found if other is not None and other.id != ctx.role.id]


def consult_tools(ctx: TurnContext) -> list[BaseTool]:
    """One `ask_<role>` tool per role this turn's role may consult, bound to this turn."""
    tools: list[BaseTool] = []
    for other in consulted(ctx):

        async def ask(question: str, other: Role = other) -> str:
            return await consult(ctx, other, question)

        tools.append(_tool(other.id, other.label("en"), other.describe("en"), ask,
                           ctx.services.settings.model_timeout))
    return tools


def consult_schemas(ctx: TurnContext) -> tuple[dict[str, Any], ...]:
    """The `ask_<role>` tools as the provider sees them, built once per role text."""
    return tuple(_schema(o.id, o.label("en"), o.describe("en")) for o in consulted(ctx))


def _tool(
    role_id: str, label: str, description: str, ask: Callable[[str], Awaitable[str]],
    timeout: float,
) -> BaseTool:
    return StructuredTool.from_function(
        coroutine=ask, name=CONSULT_PREFIX + role_id.replace("-", "_"), args_schema=ConsultArgs,
        description=f"Ask the {label} ({description}) for part of the work; returns their answer.",
        # A model call, not a quick lookup: it gets the model's time, not the tool timeout.
        metadata={"timeout": timeout},
    )


@cache
def _schema(role_id: str, label: str, description: str) -> dict[str, Any]:
    async def unbound(question: str) -> str:
        raise NotImplementedError

    return convert_to_openai_tool(_tool(role_id, label, description, unbound, 0.0))


async def consult(ctx: TurnContext, other: Role, question: str) -> str:
    from graph.nodes import complete_within_allowance  # the nodes use these tools

    model = other.model or ctx.services.settings.chat_model
    step = ctx.trace.child(f"consult:{other.id}")
    began = time.perf_counter()
    try:
        result, charged = await complete_within_allowance(
            ctx.services, ctx.user_id,
            [SystemMessage(other.system_prompt), HumanMessage(question)], model=model,
            temperature=other.temperature,
            max_tokens=min(other.max_output_tokens, CONSULT_MAX_TOKENS),
        )
    finally:
        step["ms"] = round((time.perf_counter() - began) * 1000, 3)
    if result is None:
        raise ToolRefused("today's allowance has no room for asking another role")
    step.update(model=model, tokens=charged)
    if result.fault is not None or not result.text.strip():
        raise ToolRefused(f"the {other.label('en')} could not answer now")
    return result.text
