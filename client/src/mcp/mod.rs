//! `snapback mcp`: a Model Context Protocol server on stdio, whose tools
//! are the daemon's checkpoints (see [`tools`]).
//!
//! Messages are JSON-RPC 2.0, one per line. Two revisions are spoken, each
//! client in the one it asks for:
//!
//! - 2026-07-28, stateless: `server/discover` says what the server speaks;
//!   every request names its revision (and the client's capabilities) in
//!   its `_meta`, and a revision the server does not speak is refused with
//!   `-32022` and the list it does. Results say `resultType: complete` and
//!   carry the server's identity in their `_meta`.
//! - 2025-11-25 (and the handshake revisions before it): `initialize`, then
//!   `notifications/initialized`, then requests.
//!
//! Nothing but protocol messages goes to stdout; logs go to stderr. A
//! tool's failure is a tool result with `isError`, never a crashed server.
//!
//! A tool given no sandbox asks a handshake client that offered `roots`
//! for them (`roots/list`), and takes the sandbox holding the first root
//! that is in one; else the one holding the server's working directory.

mod tools;

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

use serde_json::{Value, json};

/// The stateless revisions this server speaks, newest last.
const MODERN: &[&str] = &["2026-07-28"];

/// The handshake revisions this server speaks, newest last.
const HANDSHAKE: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

const VERSION_KEY: &str = "io.modelcontextprotocol/protocolVersion";
const SERVER_INFO_KEY: &str = "io.modelcontextprotocol/serverInfo";

/// The error code of a request in a revision the server does not speak.
const UNSUPPORTED_VERSION: i64 = -32022;

/// The longest line read from stdin: a larger message is refused, never
/// held.
const MAX_MESSAGE: u64 = 16 << 20;

/// Where the server's tools act.
pub struct Options {
    pub socket: Option<PathBuf>,
    /// The sandbox for tools not given one [default: the one holding the
    /// working directory].
    pub sandbox: Option<String>,
}

/// A JSON-RPC error.
struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }
}

/// What a connection settled so far.
#[derive(Default)]
struct Session {
    /// The handshake revision `initialize` agreed on.
    handshake: Option<String>,
    /// The client offered `roots` in its handshake: it answers `roots/list`.
    roots: bool,
}

/// The server's stdin: messages read, and those read while waiting for
/// the client's answer to a request of the server's, kept for after.
struct Incoming<R> {
    input: R,
    held: std::collections::VecDeque<Vec<u8>>,
    asked: u64,
}

/// How a line read ended.
enum Received {
    Line(Vec<u8>),
    End,
    TooLong,
    Failed(std::io::Error),
}

impl<R: BufRead> Incoming<R> {
    fn read(&mut self) -> Received {
        if let Some(line) = self.held.pop_front() {
            return Received::Line(line);
        }
        let mut line = Vec::new();
        match self.input.by_ref().take(MAX_MESSAGE).read_until(b'\n', &mut line) {
            Ok(0) => Received::End,
            Ok(_) if !line.ends_with(b"\n") && line.len() as u64 >= MAX_MESSAGE => Received::TooLong,
            Ok(_) => Received::Line(line),
            Err(e) => Received::Failed(e),
        }
    }

    /// Sends the client a request and returns its result, holding what
    /// else arrives meanwhile for later; `None` when it answers with an
    /// error, or not at all.
    fn ask(&mut self, method: &str) -> Option<Value> {
        self.asked += 1;
        let id = format!("snapback-{}", self.asked);
        send(&json!({"jsonrpc": "2.0", "id": id, "method": method}));
        let mut held = Vec::new();
        let answer = loop {
            let line = match self.input_line() {
                Some(l) => l,
                None => break None,
            };
            let message: Option<Value> = serde_json::from_slice(&line).ok();
            match message {
                Some(m) if m.get("id").and_then(Value::as_str) == Some(id.as_str()) && m.get("method").is_none() => {
                    break m.get("result").cloned();
                }
                _ => held.push(line),
            }
        };
        self.held.extend(held);
        answer
    }

    fn input_line(&mut self) -> Option<Vec<u8>> {
        let mut line = Vec::new();
        match self.input.by_ref().take(MAX_MESSAGE).read_until(b'\n', &mut line) {
            Ok(n) if n > 0 && line.ends_with(b"\n") => Some(line),
            _ => None,
        }
    }
}

fn server_info() -> Value {
    json!({"name": "snapback", "version": env!("CARGO_PKG_VERSION")})
}

const INSTRUCTIONS: &str = "snapback keeps checkpoints of this sandbox. Take a checkpoint before a risky step; \
list_checkpoints shows the steps with what each changed; diff shows what changed (a stat, or a patch); \
rollback is a dry run unless confirm is true; revert_step undoes one step and keeps later ones; undo takes \
back the last rollback, revert or undo.";

/// Runs the server until stdin ends.
pub fn serve(options: Options) -> std::process::ExitCode {
    let tools = tools::Tools::new(options);
    let mut session = Session::default();
    let stdin = std::io::stdin();
    let mut incoming = Incoming { input: stdin.lock(), held: Default::default(), asked: 0 };
    loop {
        let line = match incoming.read() {
            Received::Line(line) => line,
            Received::End => return std::process::ExitCode::SUCCESS,
            Received::TooLong => {
                send(&error_reply(Value::Null, RpcError::new(-32600, "message longer than 16 MiB")));
                // The rest of that line cannot be trusted.
                return std::process::ExitCode::FAILURE;
            }
            Received::Failed(e) => {
                eprintln!("snapback mcp: reading stdin: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let roots = session.roots;
        let mut ask_roots = || match roots {
            true => incoming.ask("roots/list").map(|r| root_paths(&r)).unwrap_or_default(),
            false => Vec::new(),
        };
        if let Some(reply) = handle(&line, &mut session, &tools, &mut ask_roots) {
            send(&reply);
        }
    }
}

/// The local directories of a `roots/list` result (`file://` URIs).
fn root_paths(result: &Value) -> Vec<PathBuf> {
    let roots = result.get("roots").and_then(Value::as_array).into_iter().flatten();
    let uris = roots.filter_map(|r| r.get("uri").and_then(Value::as_str));
    uris.filter_map(|u| u.strip_prefix("file://")).map(|p| PathBuf::from(percent_decoded(p))).collect()
}

/// A URI path with its `%XX` escapes decoded (to bytes: a path need not be
/// UTF-8).
fn percent_decoded(path: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Writes one message on stdout; a closed stdout ends the server quietly.
fn send(message: &Value) {
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, message)
        .map_err(std::io::Error::other)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if written.is_err() {
        std::process::exit(0);
    }
}

fn error_reply(id: Value, e: RpcError) -> Value {
    let mut error = json!({"code": e.code, "message": e.message});
    if let Some(data) = e.data {
        error["data"] = data;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": error})
}

/// Answers one message; `None` for a notification. `roots` asks the
/// client for its roots, when a tool needs them.
fn handle(
    line: &[u8],
    session: &mut Session,
    tools: &tools::Tools,
    roots: &mut dyn FnMut() -> Vec<PathBuf>,
) -> Option<Value> {
    let message: Value = match serde_json::from_slice(line) {
        Ok(m) => m,
        Err(e) => return Some(error_reply(Value::Null, RpcError::new(-32700, format!("not JSON: {e}")))),
    };
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        // A response to a request this server never sends, or garbage.
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        return message.get("id").is_some().then(|| error_reply(id, RpcError::new(-32600, "not a request")));
    };
    let Some(id) = message.get("id").cloned() else {
        return None; // notifications/initialized, notifications/cancelled: nothing to answer
    };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    let asked = params.pointer("/_meta").and_then(|m| m.get(VERSION_KEY)).and_then(Value::as_str);
    let modern = match asked {
        Some(v) if MODERN.contains(&v) => true,
        Some(v) => {
            let supported: Vec<&str> = MODERN.iter().chain(HANDSHAKE).copied().collect();
            let mut e = RpcError::new(UNSUPPORTED_VERSION, format!("protocol version {v} is not supported"));
            e.data = Some(json!({"supported": supported, "requested": v}));
            return Some(error_reply(id, e));
        }
        None => false,
    };
    let result = match method {
        "initialize" if !modern => initialize(&params, session),
        "server/discover" if modern => Ok(json!({
            "supportedVersions": MODERN.iter().chain(HANDSHAKE).rev().collect::<Vec<_>>(),
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": server_info(),
            "instructions": INSTRUCTIONS,
            "ttlMs": 0,
            "cacheScope": "private",
        })),
        "server/discover" => {
            let mut e = RpcError::new(UNSUPPORTED_VERSION, "server/discover needs a 2026-07-28 request");
            e.data = Some(json!({"supported": MODERN.iter().chain(HANDSHAKE).collect::<Vec<_>>()}));
            Err(e)
        }
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({"tools": tools::Tools::list()})),
        "tools/call" => tools.call(&params, roots),
        _ if !modern && session.handshake.is_none() => {
            Err(RpcError::new(-32002, "send initialize (or a 2026-07-28 request) first"))
        }
        other => Err(RpcError::new(-32601, format!("no method {other}"))),
    };
    Some(match result {
        Ok(mut result) => {
            if modern && let Some(obj) = result.as_object_mut() {
                obj.insert("resultType".into(), "complete".into());
                if method == "tools/list" {
                    obj.insert("ttlMs".into(), 0.into());
                    obj.insert("cacheScope".into(), "private".into());
                }
                obj.insert("_meta".into(), json!({ SERVER_INFO_KEY: server_info() }));
            }
            json!({"jsonrpc": "2.0", "id": id, "result": result})
        }
        Err(e) => error_reply(id, e),
    })
}

/// The handshake: the client's revision if this server speaks it, else
/// the newest this server does (the client then decides).
fn initialize(params: &Value, session: &mut Session) -> Result<Value, RpcError> {
    let asked = params.get("protocolVersion").and_then(Value::as_str).unwrap_or_default();
    let newest = HANDSHAKE[HANDSHAKE.len() - 1];
    let agreed = if HANDSHAKE.contains(&asked) { asked } else { newest };
    session.handshake = Some(agreed.to_owned());
    session.roots = params.pointer("/capabilities/roots").is_some_and(|r| !r.is_null());
    Ok(json!({
        "protocolVersion": agreed,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": server_info(),
        "instructions": INSTRUCTIONS,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(session: &mut Session, message: Value) -> Value {
        let tools = tools::Tools::new(Options { socket: Some("/nonexistent/sock".into()), sandbox: None });
        handle(message.to_string().as_bytes(), session, &tools, &mut Vec::new).unwrap_or(Value::Null)
    }

    #[test]
    fn each_client_is_answered_in_its_revision() {
        let mut s = Session::default();
        let init = ask(
            &mut s,
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
        );
        assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
        let unknown = ask(
            &mut Session::default(),
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "1999-01-01"}}),
        );
        assert_eq!(unknown["result"]["protocolVersion"], "2025-11-25");
        let meta = |v: &str| json!({"_meta": {VERSION_KEY: v, "io.modelcontextprotocol/clientCapabilities": {}}});
        let discover = ask(
            &mut Session::default(),
            json!({"jsonrpc": "2.0", "id": 2, "method": "server/discover", "params": meta("2026-07-28")}),
        );
        assert_eq!(discover["result"]["resultType"], "complete");
        assert!(discover["result"]["supportedVersions"].as_array().unwrap().contains(&json!("2026-07-28")));
        let refused = ask(
            &mut Session::default(),
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": meta("2031-01-01")}),
        );
        assert_eq!(refused["error"]["code"], UNSUPPORTED_VERSION);
        assert!(refused["error"]["data"]["supported"].as_array().unwrap().contains(&json!("2026-07-28")));
        let listed = ask(
            &mut Session::default(),
            json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": meta("2026-07-28")}),
        );
        assert_eq!(listed["result"]["_meta"][SERVER_INFO_KEY]["name"], "snapback");
        assert!(ask(&mut s, json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).is_null());
        assert_eq!(ask(&mut s, json!({"jsonrpc": "2.0", "id": 5, "method": "nope"}))["error"]["code"], -32601);
        let tools = tools::Tools::new(Options { socket: None, sandbox: None });
        let garbage = handle(b"{not json", &mut s, &tools, &mut Vec::new).unwrap();
        assert_eq!(garbage["error"]["code"], -32700);
    }

    #[test]
    fn roots_are_local_directories_with_their_escapes_decoded() {
        let result =
            json!({"roots": [{"uri": "file:///home/a%20b/caf%C3%A9"}, {"uri": "https://x"}, {"name": "no uri"}]});
        assert_eq!(root_paths(&result), [PathBuf::from("/home/a b/café")]);
        assert_eq!(percent_decoded("/%ff%2"), std::ffi::OsString::from_vec_for_test(b"/\xff%2"));
    }

    trait FromVec {
        fn from_vec_for_test(v: &[u8]) -> Self;
    }

    impl FromVec for std::ffi::OsString {
        fn from_vec_for_test(v: &[u8]) -> Self {
            std::os::unix::ffi::OsStringExt::from_vec(v.to_vec())
        }
    }
}
