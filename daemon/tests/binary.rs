//! Tests of the `snapbackd` binary itself. Having integration tests here
//! also makes `cargo test --workspace` build the binary that the
//! end-to-end suite in `tests/` starts.

use std::process::Command;

#[test]
fn help_names_the_socket_and_state_dir() {
    let out = Command::new(env!("CARGO_BIN_EXE_snapbackd")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--socket") && text.contains("--state-dir"), "{text}");
}

#[test]
fn an_unusable_state_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_snapbackd"))
        .arg("--state-dir")
        .arg(&file)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state directory") && err.contains("not-a-dir"), "{err}");
    assert!(!dir.path().join("s.sock").exists(), "a daemon that failed to start left a socket");
}
