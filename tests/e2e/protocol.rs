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
