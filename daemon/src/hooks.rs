//! Test hooks: what only tests may use (injected rescans, a stop after a
//! safety checkpoint, packs held open, a short pruning retry), on when the
//! daemon starts with `SNAPBACK_TEST_HOOKS=1`. The environment is read once,
//! by `snapbackd`'s `main` before any thread starts (or at the first
//! question, in a test of the library); every layer asks here.

use std::sync::OnceLock;

static ENABLED: OnceLock<bool> = OnceLock::new();

/// Reads `SNAPBACK_TEST_HOOKS` once; returns whether the hooks are on.
pub fn init() -> bool {
    *ENABLED.get_or_init(|| std::env::var_os("SNAPBACK_TEST_HOOKS").is_some_and(|v| v == "1"))
}

/// Whether the test hooks are on.
pub fn enabled() -> bool {
    init()
}
