//! The TypeScript client's own tests (`client/typescript/src/test`),
//! compiled with `tsc` and run with Node's test runner against the real
//! daemon built with this workspace. `.ci/run` installs their compiler
//! (`npm ci --prefix client/typescript`).

use std::path::Path;
use std::process::Command;

use crate::fixture::{binary, installed_or_skip, tool_or_skip};

#[test]
fn the_typescript_client_tests_pass_against_the_real_daemon() {
    let test = "the_typescript_client_tests_pass_against_the_real_daemon";
    let Some(npm) = tool_or_skip("npm", test) else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("client/typescript");
    let compiler = dir.join("node_modules/typescript").is_dir();
    if !installed_or_skip(test, "the TypeScript compiler (npm ci --prefix client/typescript)", compiler) {
        return;
    }
    let out = Command::new(npm)
        .args(["test", "--silent"])
        .current_dir(&dir)
        .env("SNAPBACKD", binary("snapbackd"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "typescript client tests failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A skipped or cancelled test is not a pass.
    for line in ["# fail 0", "# skipped 0", "# cancelled 0"] {
        assert!(report.contains(line), "{line} missing:\n{report}");
    }
    assert!(!report.contains("# pass 0"), "{report}");
}
