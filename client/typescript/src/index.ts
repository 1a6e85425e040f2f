// A client for snapbackd over its Unix socket, with Node's standard library
// only: connect (hello/welcome), then one request at a time, each method
// resolving to the daemon's answer. A long answer that comes in `part`
// lines is put back together, or handed part by part to a callback; an
// error answer rejects with a SnapbackError carrying the protocol's code.

import { createConnection, type Socket } from "node:net";
import { join } from "node:path";

import {
  type Answers,
  type Change,
  type CheckpointKind,
  type DiffDetail,
  type ErrorBody,
  MAX_LINE,
  PROTOCOL,
  type ProgressReport,
  type Request,
  type WirePath,
} from "./protocol.js";

export * from "./protocol.js";

/** The daemon refused a request, or the exchange failed. */
export class SnapbackError extends Error {
  /** The protocol's stable code (`not_found`, `plan_applied`, `conflict`, ...). */
  readonly code: string;
  /** The paths the error is about (a refused revert's conflicts). */
  readonly paths: Buffer[];
  /** What the user may do about it, when the daemon says. */
  readonly hint?: string;

  constructor(body: ErrorBody) {
    super(body.message);
    this.name = "SnapbackError";
    this.code = body.code;
    this.paths = (body.paths ?? []).map(pathBytes);
    this.hint = body.hint;
  }
}

/** Nothing answers on the socket: the daemon is not running there. */
export class DaemonUnreachable extends SnapbackError {
  readonly socket: string;

  constructor(socket: string, cause: Error) {
    super({ code: "unreachable", message: `cannot reach snapbackd at ${socket} (${cause.message}); start it with snapbackd` });
    this.name = "DaemonUnreachable";
    this.socket = socket;
  }
}

/** The socket the daemon uses by default, as the CLI finds it. */
export function defaultSocket(): string {
  const env = process.env;
  if (env.SNAPBACK_SOCKET) return env.SNAPBACK_SOCKET;
  if (env.XDG_RUNTIME_DIR) return join(env.XDG_RUNTIME_DIR, "snapback", "snapbackd.sock");
  if (process.geteuid?.() === 0) return "/run/snapback/snapbackd.sock";
  throw new SnapbackError({ code: "invalid_request", message: "no socket path: pass one, or set SNAPBACK_SOCKET or XDG_RUNTIME_DIR" });
}

/** Encodes a path (a string, or bytes) for the wire. */
export function wirePath(path: string | Buffer): WirePath {
  const bytes = typeof path === "string" ? Buffer.from(path, "utf8") : path;
  const text = bytes.toString("utf8");
  return Buffer.from(text, "utf8").equals(bytes) ? { text } : { bytes: bytes.toString("base64") };
}

/** Decodes a path (or a piece of a patch) the daemon sent. */
export function pathBytes(wire: WirePath): Buffer {
  return "text" in wire ? Buffer.from(wire.text, "utf8") : Buffer.from(wire.bytes, "base64");
}

export interface ConnectOptions {
  /** Ask for progress lines of long operations and hand each here. */
  onProgress?: (report: ProgressReport) => void;
}

/** A part of a long answer: items of the list `field`, in order. */
export type OnPart = (field: string, items: unknown[]) => void;

type Pending = { resolve: (line: string) => void; reject: (e: Error) => void };

/** A connection to snapbackd. Requests are answered in order. */
export class Client {
  /** The daemon's name and version, from its welcome. */
  daemon = "";
  private buffer = Buffer.alloc(0);
  private lines: string[] = [];
  private waiting: Pending[] = [];
  private failure: Error | null = null;
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly socket: Socket,
    private readonly options: ConnectOptions,
  ) {
    socket.on("data", (chunk: Buffer) => this.receive(chunk));
    const fail = (e: Error) => {
      this.failure ??= e;
      for (const w of this.waiting.splice(0)) w.reject(this.failure);
    };
    socket.on("error", fail);
    socket.on("close", () => fail(new SnapbackError({ code: "io", message: "the daemon closed the connection" })));
  }

  /** Connects to the daemon at `path` (default: {@link defaultSocket}) and says hello. */
  static async connect(path?: string, options: ConnectOptions = {}): Promise<Client> {
    const socketPath = path ?? defaultSocket();
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection(socketPath);
      s.once("connect", () => resolve(s));
      s.once("error", (e) => reject(new DaemonUnreachable(socketPath, e)));
    });
    const client = new Client(socket, options);
    const hello: Request = { type: "hello", protocol: PROTOCOL, client: "snapback-typescript", progress: options.onProgress !== undefined };
    const welcome = await client.ask("welcome", hello);
    if (welcome.protocol !== PROTOCOL) {
      client.close();
      throw new SnapbackError({ code: "protocol_mismatch", message: `the daemon speaks protocol ${welcome.protocol}` });
    }
    client.daemon = welcome.daemon;
    return client;
  }

  close(): void {
    this.socket.destroy();
  }

  private receive(chunk: Buffer): void {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    let at: number;
    while ((at = this.buffer.indexOf(10)) >= 0) {
      const line = this.buffer.subarray(0, at).toString("utf8");
      this.buffer = this.buffer.subarray(at + 1);
      const waiter = this.waiting.shift();
      if (waiter) waiter.resolve(line);
      else this.lines.push(line);
    }
    if (this.buffer.length >= MAX_LINE) {
      this.socket.destroy(new SnapbackError({ code: "io", message: `a line longer than ${MAX_LINE} bytes` }));
    }
  }

  private nextLine(): Promise<string> {
    const ready = this.lines.shift();
    if (ready !== undefined) return Promise.resolve(ready);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  /**
   * Sends `request` and resolves to the answer of kind `kind`. Parts of a
   * long answer are put back into it, or, with `onPart`, handed over as
   * they arrive and not kept.
   */
  ask<K extends keyof Answers>(kind: K, request: Request, onPart?: OnPart): Promise<Answers[K]> {
    const run = async (): Promise<Answers[K]> => {
      const line = JSON.stringify(request) + "\n";
      if (Buffer.byteLength(line) > MAX_LINE) {
        throw new SnapbackError({ code: "invalid_request", message: `request longer than ${MAX_LINE} bytes` });
      }
      this.socket.write(line);
      const parts: { field: string; items: unknown[] }[] = [];
      for (;;) {
        const response = JSON.parse(await this.nextLine()) as Record<string, unknown> & { type: string };
        if (response.type === "progress") {
          this.options.onProgress?.(response as unknown as ProgressReport);
          continue;
        }
        if (response.type === "part") {
          const part = response as unknown as { field: string; items: unknown[] };
          if (onPart) onPart(part.field, part.items);
          else parts.push(part);
          continue;
        }
        if (response.type === "error") throw new SnapbackError(response as unknown as ErrorBody);
        if (response.type !== kind) {
          throw new SnapbackError({ code: "internal", message: `expected ${kind}, got ${response.type}` });
        }
        for (const part of parts) {
          // A list left empty in the answer may be left out of it.
          const list = (response[part.field] ??= []) as unknown[];
          list.push(...part.items);
        }
        const { type: _type, ...payload } = response;
        return payload as unknown as Answers[K];
      }
    };
    const done = this.queue.then(run, run);
    this.queue = done.catch(() => undefined);
    return done;
  }

  // Sandboxes.

  sandboxAdd(path: string | Buffer, options: { name?: string; excludes?: string[]; store?: string } = {}) {
    const store = options.store === undefined ? null : wirePath(options.store);
    return this.ask("sandbox", { type: "sandbox_add", path: wirePath(path), name: options.name ?? null, excludes: options.excludes ?? [], store });
  }

  async sandboxList() {
    return (await this.ask("sandboxes", { type: "sandbox_list" })).sandboxes;
  }

  sandboxRemove(sandbox: string, purge = false) {
    return this.ask("sandbox", { type: "sandbox_remove", sandbox, purge });
  }

  // Checkpoints.

  checkpoint(
    sandbox: string,
    options: { plan?: string; reason?: string; tool?: string; phase?: string; labels?: Record<string, string>; pin?: boolean; kind?: CheckpointKind } = {},
  ) {
    return this.ask("checkpoint", { type: "checkpoint", sandbox, ...options });
  }

  async list(sandbox?: string, plan?: string) {
    return (await this.ask("checkpoints", { type: "list", sandbox: sandbox ?? null, plan: plan ?? null })).checkpoints;
  }

  show(checkpoint: string) {
    return this.ask("checkpoint", { type: "show", checkpoint });
  }

  /**
   * The changes from one checkpoint to another (the live tree when `to` is
   * absent); with `step`, what `from` recorded against its parent. With
   * `onChange` / `onPatch`, each change and each piece of the patch is
   * handed over as it arrives, and the answer holds none.
   */
  async diff(
    from: string,
    options: {
      to?: string;
      step?: boolean;
      detail?: DiffDetail;
      paths?: (string | Buffer)[];
      onChange?: (change: Change) => void;
      onPatch?: (piece: Buffer) => void;
    } = {},
  ) {
    const request: Request = {
      type: "diff",
      from,
      to: options.to ?? null,
      step: options.step ?? false,
      detail: options.detail ?? "paths",
      paths: (options.paths ?? []).map(wirePath),
    };
    const { onChange, onPatch } = options;
    if (!onChange && !onPatch) return this.ask("diff", request);
    const each: OnPart = (field, items) => {
      for (const item of items) {
        if (field === "changes") onChange?.(item as Change);
        else if (field === "patch") onPatch?.(pathBytes(item as WirePath));
      }
    };
    const report = await this.ask("diff", request, each);
    each("changes", report.changes);
    each("patch", report.patch ?? []);
    return { ...report, changes: [], patch: [] };
  }

  log(options: { sandbox?: string; plan?: string; limit?: number; stat?: boolean } = {}) {
    return this.ask("log", { type: "log", sandbox: options.sandbox ?? null, plan: options.plan ?? null, limit: options.limit ?? null, stat: options.stat ?? false });
  }

  rollback(checkpoint: string, options: { paths?: (string | Buffer)[]; dryRun?: boolean } = {}) {
    return this.ask("rollback", { type: "rollback", checkpoint, paths: (options.paths ?? []).map(wirePath), dry_run: options.dryRun ?? false });
  }

  revert(checkpoint: string, options: { force?: boolean; dryRun?: boolean } = {}) {
    return this.ask("rollback", { type: "revert", checkpoint, force: options.force ?? false, dry_run: options.dryRun ?? false });
  }

  undo(sandbox: string, options: { dryRun?: boolean } = {}) {
    return this.ask("rollback", { type: "undo", sandbox, dry_run: options.dryRun ?? false });
  }

  // Plans.

  planShow(plan: string) {
    return this.ask("plan", { type: "plan_show", plan });
  }

  /** Marks a plan applied: from then on it cannot be rolled back. */
  planApply(plan: string) {
    return this.ask("plan", { type: "plan_apply", plan });
  }

  planAbandon(plan: string) {
    return this.ask("plan", { type: "plan_abandon", plan });
  }

  planRollback(plan: string, checkpoint: string, options: { paths?: (string | Buffer)[]; dryRun?: boolean } = {}) {
    return this.ask("rollback", { type: "plan_rollback", plan, checkpoint, paths: (options.paths ?? []).map(wirePath), dry_run: options.dryRun ?? false });
  }

  // Retention, exports, the daemon.

  prune(sandbox: string, options: { keepLast?: number; keepWithinSecs?: number } = {}) {
    return this.ask("pruned", { type: "prune", sandbox, keep_last: options.keepLast ?? null, keep_within_secs: options.keepWithinSecs ?? null });
  }

  /** Writes a checkpoint out as a read-only tree in `dir`, which must not exist. */
  export(checkpoint: string, dir: string | Buffer) {
    return this.ask("exported", { type: "export", checkpoint, dir: wirePath(dir) });
  }

  status() {
    return this.ask("status", { type: "status" });
  }

  verify() {
    return this.ask("verified", { type: "verify" });
  }
}

/** Connects to the daemon: {@link Client.connect}. */
export function connect(path?: string, options?: ConnectOptions): Promise<Client> {
  return Client.connect(path, options);
}
