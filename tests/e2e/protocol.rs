//! The socket protocol spoken raw: hello, limits, garbage.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;

use crate::fixture::TestDaemon;

fn send(stream: &mut UnixStream, line: &str) -> serde_json::Value {
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

fn hello(stream: &mut UnixStream) {
    let w = send(stream, r#"{"type":"hello","protocol":1,"client":"raw test"}"#);
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["protocol"], 1);
}

#[test]
fn hello_comes_first_and_a_protocol_mismatch_is_a_clear_error() {
    let d = TestDaemon::start();
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let e = send(&mut s, r#"{"type":"status"}"#);
    assert_eq!(e["code"], "invalid_request");
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let e = send(&mut s, r#"{"type":"hello","protocol":999,"client":"future"}"#);
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "protocol_mismatch");
    assert!(e["message"].as_str().unwrap().contains("999"));
    d.json(&["status"]);
}

#[test]
fn garbage_and_unknown_requests_get_errors_on_a_live_connection() {
    let d = TestDaemon::start();
    let mut s = UnixStream::connect(&d.socket).unwrap();
    hello(&mut s);
    for line in ["not json", "{}", r#"{"type":"launch"}"#, r#"{"type":"checkpoint"}"#, "[1,2]", "\u{0}\u{1}"] {
        let e = send(&mut s, line);
        assert_eq!(e["type"], "error", "{line}: {e}");
        assert_eq!(e["code"], "invalid_request", "{line}: {e}");
    }
    let ok = send(&mut s, r#"{"type":"status"}"#);
    assert_eq!(ok["type"], "status");
    let paths =
        send(&mut s, r#"{"type":"rollback","checkpoint":"01ARZ3NDEKTSV4RRFFQ69G5FAV","paths":[{"bytes":"!!"}]}"#);
    assert_eq!(paths["code"], "invalid_request");
}

#[test]
fn an_oversized_line_is_refused_and_the_connection_closed() {
    let d = TestDaemon::start();
    let mut s = UnixStream::connect(&d.socket).unwrap();
    hello(&mut s);
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..64 {
                if w.write_all(&chunk).is_err() {
                    break; // the daemon closed its end
                }
            }
        })
    };
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    let e: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(e["code"], "invalid_request");
    assert!(e["message"].as_str().unwrap().contains("longer than"));
    let mut rest = Vec::new();
    assert_eq!(reader.read_to_end(&mut rest).unwrap_or(0), 0, "the connection stayed open");
    writer.join().unwrap();
    d.json(&["status"]);
}

#[test]
fn a_half_line_then_a_hang_does_not_block_other_clients() {
    let d = TestDaemon::start();
    let mut hanging = UnixStream::connect(&d.socket).unwrap();
    hello(&mut hanging);
    hanging.write_all(br#"{"type":"sta"#).unwrap();
    d.json(&["status"]);
    drop(hanging);
    d.json(&["status"]);
}

/// Raises this process's open-file limit to its hard limit (a test that
/// holds a thousand connections needs more than the usual 1,024).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Returns the resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Whether the daemon closed `stream` (after, at most, one error line).
fn closed_by_daemon(stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut reader = stream;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // the error line that precedes the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn a_thousand_idle_connections_neither_starve_clients_nor_grow_memory() {
    raise_fd_limit();
    let d = TestDaemon::start();
    let before = rss_kib(d.pid());
    let idle: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&d.socket).unwrap()).collect();
    // Another client of the same uid is served at once: the longest-idle
    // connections make room.
    let mut client = d.client();
    assert!(client.sandbox_list().unwrap().sandboxes.is_empty());
    let status = d.status();
    assert_eq!(status.pid, d.pid() as u32);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let closed = idle.iter().filter(|s| closed_by_daemon(s)).count();
    // 64 connections per uid: the client above, the CLI's (gone by now)
    // and at most 63 idle ones stay open.
    assert!(closed >= 1000 - 64, "only {closed} of 1,000 idle connections were closed");
    let after = rss_kib(d.pid());
    assert!(after < before + 64 * 1024, "resident memory grew from {before} KiB to {after} KiB");
}

#[test]
fn idle_and_silent_connections_are_closed_with_a_reason() {
    let d = TestDaemon::builder().config("idle_timeout_ms = 300\n").start();
    let mut greeted = UnixStream::connect(&d.socket).unwrap();
    hello(&mut greeted);
    let silent = UnixStream::connect(&d.socket).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    for (stream, why) in [(&greeted, "no request for 300 ms"), (&silent, "no hello for 300 ms")] {
        let mut text = String::new();
        let mut reader = stream;
        reader.read_to_string(&mut text).unwrap();
        assert!(text.contains(why) && text.contains("invalid_request"), "{text:?}");
    }
    // A connection in use is not idle.
    let mut busy = d.client();
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        busy.status().unwrap();
    }
}

#[test]
fn a_long_answer_comes_in_parts_and_a_protocol_1_client_is_told_why_not() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    std::fs::create_dir_all(&sb).unwrap();
    d.add_sandbox("sb", &sb, &[]);
    let empty = d.checkpoint("sb");
    for i in 0..12_000 {
        std::fs::write(sb.join(format!("{}-{i:05}", "n".repeat(100))), "").unwrap();
    }
    let diff = format!(r#"{{"type":"diff","from":"{empty}"}}"#);
    // Protocol 2: part lines, each within the limit, then the answer.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let w = send(&mut s, r#"{"type":"hello","protocol":2,"client":"raw test"}"#);
    assert_eq!(w["protocol"], 2);
    s.write_all(format!("{diff}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let (mut parts, mut items) = (0, 0);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.len() <= snapback::proto::MAX_LINE, "a line of {} bytes", line.len());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "part" {
            assert_eq!(v["field"], "changes");
            parts += 1;
            items += v["items"].as_array().unwrap().len();
            continue;
        }
        assert_eq!(v["type"], "diff", "{v}");
        items += v["changes"].as_array().unwrap().len();
        break;
    }
    assert!(parts >= 2, "{parts} parts");
    assert_eq!(items, 12_000);
    // Protocol 1 reads no parts: a clear error, within the limit.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    hello(&mut s);
    let e = send(&mut s, &diff);
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["message"].as_str().unwrap().contains("protocol 2"), "{e}");
}
