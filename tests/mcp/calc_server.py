"""A real MCP server (the `mcp` SDK's FastMCP over stdio) for the tests: a sum and a tool that hangs."""

from __future__ import annotations

import asyncio

from mcp.server.fastmcp import FastMCP

server = FastMCP("calc")


@server.tool()
def add(a: int, b: int) -> int:
    """The sum of two whole numbers."""
    return a + b


@server.tool()
async def slow() -> str:
    """Never answers in time (a hung backend)."""
    await asyncio.sleep(600)
    return "too late"


if __name__ == "__main__":
    server.run()
