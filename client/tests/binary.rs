//! Tests of the `snapback` binary itself. Having integration tests here
//! also makes `cargo test --workspace` build the binary that the
//! end-to-end suite in `tests/` runs.

use std::process::Command;

#[test]
fn help_lists_the_commands_of_the_contract() {
    let out = Command::new(env!("CARGO_BIN_EXE_snapback")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["sandbox", "checkpoint", "list", "show", "diff", "rollback", "status", "demo"] {
        assert!(text.contains(command), "--help does not mention {command}: {text}");
    }
}

#[test]
fn version_is_printed() {
    let out = Command::new(env!("CARGO_BIN_EXE_snapback")).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("snapback "));
}
