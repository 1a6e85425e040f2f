// Drives `snapback mcp` with the official MCP TypeScript SDK
// (@modelcontextprotocol/sdk), which speaks the handshake revisions
// (2025-11-25). Usage: node sdk_client.mjs SNAPBACK SOCKET SANDBOX_DIR
// Takes a checkpoint, changes a file, reads the diff, dry-runs a rollback
// (the file must not move), confirms it (the file must come back), and
// prints what it saw as one JSON line.

import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const [snapback, socket, sandbox] = process.argv.slice(2);
const notes = join(sandbox, "notes.txt");
const transport = new StdioClientTransport({ command: snapback, args: ["--socket", socket, "mcp"], cwd: sandbox });
const seen = {};
// The SDK tells a transport the revision the handshake agreed on.
transport.setProtocolVersion = (version) => {
  seen.protocol = version;
};
const client = new Client({ name: "snapback-ts-test", version: "1.0.0" });
await client.connect(transport);
seen.server = client.getServerVersion()?.name;
const { tools } = await client.listTools();
seen.tools = tools.map((t) => t.name).sort();
seen.destructive = tools.filter((t) => t.annotations?.destructiveHint).map((t) => t.name).sort();

const call = async (name, args) => {
  const result = await client.callTool({ name, arguments: args });
  if (result.isError) throw new Error(`${name}: ${result.content[0].text}`);
  return result.structuredContent;
};
const { id } = await call("checkpoint", { reason: "before the edit" });
writeFileSync(notes, "one\nTWO\nthree\nfour\n");
const diff = await call("diff", { from: id });
seen.diff = diff.files.map((f) => [f.path, f.added, f.removed]);
const dry = await call("rollback", { checkpoint: id });
seen.dry_run = dry.dry_run;
seen.after_dry_run = readFileSync(notes, "utf8");
const done = await call("rollback", { checkpoint: id, confirm: true });
seen.confirmed = !done.dry_run;
seen.after_rollback = readFileSync(notes, "utf8");
const bad = await client.callTool({ name: "undo", arguments: { sandbox: "no-such-sandbox" } });
seen.error = { isError: bad.isError, text: bad.content[0].text };
await client.close();
console.log(JSON.stringify(seen));
