//! The Python client's own tests (`client/python/tests`), run against the
//! real daemon built with this workspace.

use std::path::Path;
use std::process::Command;

use crate::fixture::{binary, tool_or_skip};

#[test]
fn the_python_client_tests_pass_against_the_real_daemon() {
    let Some(python) = tool_or_skip("python3", "the_python_client_tests_pass_against_the_real_daemon") else {
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("client/python");
    let out = Command::new(python)
        .args(["-B", "-m", "unittest", "discover", "-v", "-s", "tests"])
        .current_dir(&dir)
        .env("SNAPBACKD", binary("snapbackd"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client tests failed:\n{report}");
    // unittest prints "OK" or "OK (skipped=N)": a skipped test is not a pass.
    assert!(report.contains("\nRan ") && report.trim_end().ends_with("\nOK"), "{report}");
}
