// The TypeScript client against a real snapbackd: $SNAPBACKD names the
// binary (tests/e2e/typescript.rs sets it), started on a private socket and
// state directory. Every request the daemon answers is made at least once.

import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { Client, DaemonUnreachable, SnapbackError, connect, pathBytes, type Change } from "../index.js";

const daemonBinary = process.env.SNAPBACKD;
if (!daemonBinary) throw new Error("set SNAPBACKD to the snapbackd binary to run these tests");

const dir = mkdtempSync(join(tmpdir(), "snapback-ts-"));
const socket = join(dir, "run", "snapbackd.sock");
let daemon: ChildProcess;

before(async () => {
  daemon = spawn(daemonBinary, ["--socket", socket, "--state-dir", join(dir, "state")], {
    env: { ...process.env, SNAPBACK_LOG: "warn", HOME: "/nonexistent" },
    stdio: ["ignore", "ignore", "inherit"],
  });
  const deadline = Date.now() + 20_000;
  for (;;) {
    try {
      (await connect(socket)).close();
      return;
    } catch (e) {
      if (!(e instanceof DaemonUnreachable) || Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
});

after(async () => {
  daemon.kill("SIGTERM");
  await new Promise((r) => daemon.once("exit", r));
  rmSync(dir, { recursive: true, force: true });
});

let sandboxes = 0;

/** A new sandbox directory, registered; its name and root. */
async function sandbox(client: Client): Promise<[string, string]> {
  const root = join(dir, `sb-${++sandboxes}`);
  mkdirSync(root);
  const name = `ts-${sandboxes}`;
  await client.sandboxAdd(root, { name });
  return [name, root];
}

test("checkpoint, diff with stat and patch, dry run, rollback, undo", async () => {
  const client = await connect(socket);
  assert.match(client.daemon, /^snapbackd /);
  const [name, root] = await sandbox(client);
  const notes = join(root, "notes.txt");
  writeFileSync(notes, "one\ntwo\n");
  const first = await client.checkpoint(name, { tool: "Edit", phase: "pre", labels: { k: "v" } });
  writeFileSync(notes, "one\nTWO\nthree\n");
  const stat = await client.diff(first.id, { detail: "stat" });
  assert.deepEqual(stat.total, { files: 1, added: 2, removed: 1 });
  const pieces: Buffer[] = [];
  await client.diff(first.id, { detail: "patch", onPatch: (p) => pieces.push(p) });
  assert.match(Buffer.concat(pieces).toString(), /-two\n\+TWO\n\+three\n/);
  const dry = await client.rollback(first.id, { dryRun: true });
  assert.equal(dry.dry_run, true);
  assert.equal(readFileSync(notes, "utf8"), "one\nTWO\nthree\n");
  assert.equal(dry.preview?.[0]?.stat?.removed, 2);
  const done = await client.rollback(first.id);
  assert.equal(readFileSync(notes, "utf8"), "one\ntwo\n");
  assert.ok(done.safety_checkpoint);
  const undone = await client.undo(name);
  assert.equal(undone.dry_run, false);
  assert.equal(readFileSync(notes, "utf8"), "one\nTWO\nthree\n");
  client.close();
});

test("show, list, log, revert, plans, prune, export, status, verify, remove", async () => {
  const client = await connect(socket);
  const [name, root] = await sandbox(client);
  writeFileSync(join(root, "a.txt"), "1\n");
  const first = await client.checkpoint(name, { plan: "ts-plan" });
  writeFileSync(join(root, "a.txt"), "2\n");
  const second = await client.checkpoint(name, { plan: "ts-plan", tool: "Bash", reason: "echo 2 > a.txt" });
  assert.equal((await client.show(second.id.slice(0, 12))).id, second.id);
  assert.equal((await client.list(name, "ts-plan")).length, 2);
  const log = await client.log({ sandbox: name, limit: 1, stat: true });
  assert.equal(log.entries[0].checkpoint.id, second.id);
  assert.deepEqual(log.entries[0].total, { files: 1, added: 1, removed: 1 });
  assert.equal(log.more, 1);
  const step = await client.diff(second.id, { step: true, detail: "stat" });
  assert.equal(step.from, first.id);
  assert.equal((await client.revert(second.id, { dryRun: true })).dry_run, true);
  await client.revert(second.id);
  assert.equal(readFileSync(join(root, "a.txt"), "utf8"), "1\n");
  assert.equal((await client.planShow("ts-plan")).checkpoints.length, 2);
  assert.equal((await client.planRollback("ts-plan", first.id, { dryRun: true })).dry_run, true);
  assert.equal((await client.planApply("ts-plan")).state, "applied");
  await assert.rejects(client.planRollback("ts-plan", first.id), (e: SnapbackError) => e.code === "plan_applied");
  await client.checkpoint(name, { plan: "ts-other" });
  assert.equal((await client.planAbandon("ts-other")).state, "abandoned");
  const out = join(dir, `export-${name}`);
  const exported = await client.export(first.id, out);
  assert.equal(exported.files, 1);
  assert.equal(readFileSync(join(out, "a.txt"), "utf8"), "1\n");
  const pruned = await client.prune(name, { keepLast: 1 });
  assert.ok(pruned.pruned.length > 0);
  assert.ok((await client.status()).sandboxes.some((s) => s.name === name));
  assert.deepEqual((await client.verify()).missing, []);
  assert.equal((await client.sandboxRemove(name, true)).name, name);
  assert.ok(!(await client.sandboxList()).some((s) => s.name === name));
  client.close();
});

test("refusals carry the protocol's code, paths and hint", async () => {
  const client = await connect(socket);
  await assert.rejects(client.show("01ZZZZZZZZZZZZZZZZZZZZZZZZ"), (e: SnapbackError) => e.code === "not_found");
  const [name, root] = await sandbox(client);
  writeFileSync(join(root, "shared.txt"), "0");
  await client.checkpoint(name);
  writeFileSync(join(root, "shared.txt"), "1");
  const step = await client.checkpoint(name);
  writeFileSync(join(root, "shared.txt"), "2");
  await client.checkpoint(name);
  await assert.rejects(client.revert(step.id), (e: SnapbackError) => {
    assert.equal(e.code, "conflict");
    assert.deepEqual(e.paths.map(String), ["shared.txt"]);
    assert.match(e.hint ?? "", /--force/);
    return true;
  });
  await assert.rejects(connect(join(dir, "nothing.sock")), (e: unknown) => e instanceof DaemonUnreachable);
  client.close();
});

test("an answer longer than a line arrives whole, or streamed", async () => {
  const client = await connect(socket, { onProgress: () => {} });
  const [name, root] = await sandbox(client);
  const first = await client.checkpoint(name);
  mkdirSync(join(root, "many"));
  const names = Array.from({ length: 20000 }, (_, i) => `many/${"x".repeat(40)}-${String(i).padStart(5, "0")}`);
  for (const n of names) writeFileSync(join(root, n), "");
  const whole = await client.diff(first.id);
  assert.equal(whole.changes.length, names.length + 1);
  assert.ok(JSON.stringify(whole.changes).length > 1 << 20);
  const streamed: Change[] = [];
  const report = await client.diff(first.id, { onChange: (c) => streamed.push(c) });
  assert.equal(report.changes.length, 0);
  assert.deepEqual(streamed.map((c) => pathBytes(c.path).toString()), whole.changes.map((c) => pathBytes(c.path).toString()));
  client.close();
});
