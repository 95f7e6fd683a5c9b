"""A real MCP server (the `mcp` SDK's FastMCP over stdio) for the tests: a sum, its pid, a hang."""

from __future__ import annotations

import asyncio
import os

from mcp.server.fastmcp import FastMCP

server = FastMCP("calc")


@server.tool()
def add(a: int, b: int) -> int:
    """The sum of two whole numbers."""
    return a + b


@server.tool()
def pid() -> int:
    """This server's process id (the tests tell a kept server from a new one)."""
    return os.getpid()


@server.tool()
async def slow() -> str:
    """Never answers in time (a hung backend)."""
    await asyncio.sleep(600)
    return "too late"


if __name__ == "__main__":
    server.run()
