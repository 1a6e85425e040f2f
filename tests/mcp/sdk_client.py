"""Drives `snapback mcp` with the official MCP Python SDK (`mcp` on PyPI).

Usage: python sdk_client.py SNAPBACK SOCKET SANDBOX_DIR MODE ELSEWHERE

MODE is the SDK's connect mode: `auto` (probes `server/discover` and speaks
the newest revision, 2026-07-28; the server runs in the sandbox) or
`legacy` (the `initialize` handshake, 2025-11-25; the server runs in
ELSEWHERE, a directory in no sandbox, and finds the sandbox through the
client's roots). The script takes a checkpoint, changes a file, reads the diff,
dry-runs a rollback (the file must not move), confirms it (the file must
come back), and prints what it saw as one JSON line.
"""

import asyncio
import json
import os
import pathlib
import sys

import mcp_types as types
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters


async def main(snapback, socket, sandbox, mode, elsewhere):
    notes = os.path.join(sandbox, "notes.txt")
    if mode == "legacy":
        # The handshake revision has roots: the server runs elsewhere, and
        # finds the sandbox through the client's root.
        server = StdioServerParameters(command=snapback, args=["--socket", socket, "mcp"], cwd=elsewhere)

        async def roots(context):
            return types.ListRootsResult(roots=[types.Root(uri=pathlib.Path(sandbox).as_uri(), name="work")])

        client = Client(server, mode=mode, list_roots_callback=roots)
    else:
        server = StdioServerParameters(command=snapback, args=["--socket", socket, "mcp"], cwd=sandbox)
        client = Client(server, mode=mode)
    async with client:
        seen = {"protocol": client.protocol_version}
        tools = await client.list_tools()
        seen["tools"] = sorted(t.name for t in tools.tools)
        annotations = {t.name: t.annotations for t in tools.tools}
        seen["destructive"] = sorted(n for n, a in annotations.items() if a and a.destructive_hint)
        seen["read_only"] = sorted(n for n, a in annotations.items() if a and a.read_only_hint)

        taken = await client.call_tool("checkpoint", {"reason": "before the edit"})
        assert not taken.is_error, taken
        checkpoint = taken.structured_content["id"]

        with open(notes, "w") as f:
            f.write("one\nTWO\nthree\nfour\n")
        diff = await client.call_tool("diff", {"from": checkpoint})
        assert not diff.is_error, diff
        seen["diff"] = [(f["path"], f["added"], f["removed"]) for f in diff.structured_content["files"]]
        patch = await client.call_tool("diff", {"from": checkpoint, "patch": True, "paths": ["notes.txt"]})
        seen["patch_has_edit"] = "-two\n+TWO\n" in patch.structured_content["patch"]

        dry = await client.call_tool("rollback", {"checkpoint": checkpoint})
        assert dry.structured_content["dry_run"] is True, dry
        with open(notes) as f:
            seen["after_dry_run"] = f.read()
        done = await client.call_tool("rollback", {"checkpoint": checkpoint, "confirm": True})
        assert done.structured_content["dry_run"] is False, done
        with open(notes) as f:
            seen["after_rollback"] = f.read()

        bad = await client.call_tool("diff", {"from": "01NOSUCHCHECKPOINT"})
        seen["error"] = {"is_error": bad.is_error, "text": bad.content[0].text}
        listed = await client.call_tool("list_checkpoints", {"limit": 5})
        seen["listed"] = len(listed.structured_content["checkpoints"])
    print(json.dumps(seen))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
