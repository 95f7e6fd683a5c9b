"""Auto: the role best suited to a session, chosen once, from its first message.

Routing once per session (not per message) keeps its cost off the conversation: one small call
to the summary model, reserved from the user's daily allowance like any other, whose answer is
a role id. A user who wants a particular role pins it in /personalize.
"""

from __future__ import annotations

import logging
import re

from langchain_core.messages import HumanMessage, SystemMessage

from graph.context import Services
from graph.nodes import complete_within_allowance
from graph.roles import Role

log = logging.getLogger(__name__)

ROUTER_MAX_TOKENS = 8
ROUTER_TEXT_CHARS = 2000  # the start of the message is enough to tell a topic
ROUTER_PROMPT = (
    "You choose which assistant answers a user's message. The assistants:\n{roles}\n"
    "Reply with the id of the one best suited, and nothing else."
)


async def route(services: Services, user_id: int, text: str) -> tuple[Role | None, int]:
    """(the role for this message, tokens charged); None when the router could not choose
    (no room in the allowance, the provider failed, an answer naming no role)."""
    roles = services.roles.roles()
    listing = "\n".join(f"- {r.id}: {r.label('en')}. {r.describe('en')}" for r in roles)
    messages = [SystemMessage(ROUTER_PROMPT.format(roles=listing)), HumanMessage(text[:ROUTER_TEXT_CHARS])]
    result, charged = await complete_within_allowance(
        services, user_id, messages, model=services.settings.summary_model, temperature=0.0,
        max_tokens=ROUTER_MAX_TOKENS,
    )
    if result is None:
        return None, 0
    by_id = {r.id: r for r in roles}
    for word in re.findall(r"[a-z0-9_-]+", result.text.lower()):
        if word in by_id:
            return by_id[word], charged
    log.info("router named no role (%s)", result.fault or "unknown answer")
    return None, charged
