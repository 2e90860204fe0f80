"""MCP tools from an inferlet: the servers its launch grants, their tools, and calls to them.

    tools = await mcp.tools("calc")                          # name, description, schema
    result = await mcp.call_tool("calc", "add", {"a": 1, "b": 2})  # .text, .data

Listing and calling are asynchronous: several calls may be in flight (`asyncio.gather`) while
the inferlet's contexts decode. A tool that fails, a server that is not granted, hangs past the
timeout, dies or answers garbage raises `PieError` with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pie.sdk._wit import call
from pie.sdk.loop import wait_host

# After `pie.sdk._wit`, which on the host installs the bindings this import finds.
from wit_world.imports import mcp as _mcp  # isort: skip


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]

    def signature(self) -> str:
        """One line for a prompt: `name(arg: type, ...)`, without the documentation."""
        props = self.input_schema.get("properties", {})
        args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class ToolResult:
    text: str  # the tool's text output
    data: Any  # its structured result (parsed JSON), or None


def servers() -> list[str]:
    """The MCP servers this instance may use."""
    return list(_mcp.servers())


def start_tools(server: str) -> int:
    """Starts listing `server`'s tools; returns the host future (`await take_tools(future)`)."""
    return int(call(_mcp.list_tools, server))


async def take_tools(future: int) -> list[Tool]:
    await wait_host(future)
    listed = call(_mcp.take_tools, future)
    return [Tool(t.name, t.description, json.loads(t.input_schema)) for t in listed]


async def tools(server: str) -> list[Tool]:
    """The tools `server` offers."""
    return await take_tools(start_tools(server))


def start_call(
    server: str, tool: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
) -> int:
    """Starts a call; returns its host future (`await take_result(future)`)."""
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return int(call(_mcp.call_tool, server, tool, json.dumps(arguments or {}), ms))


async def take_result(future: int) -> ToolResult:
    await wait_host(future)
    got = call(_mcp.take_result, future)
    return ToolResult(got.text, None if got.data is None else json.loads(got.data))


async def call_tool(
    server: str, tool: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
) -> ToolResult:
    """The result of calling `tool` on `server`; `timeout` in seconds (at most the launch's)."""
    return await take_result(start_call(server, tool, arguments, timeout))
