//! End-to-end tests: each starts the real `snapbackd` on a temporary socket
//! and state directory and drives it with the real `snapback` CLI and
//! client library.
//!
//! Build the binaries first (`cargo test --workspace` does). Tests that
//! need root (loop-mounted filesystems) skip with a message for a normal
//! user and fail instead when `CI` is set.

mod fixture;
mod tree;

mod access;
mod agent;
mod cli;
mod collection;
mod confinement;
mod core;
mod crash;
mod diskfull;
mod load;
mod mcp;
mod model;
mod plans;
mod protocol;
mod python;
mod reflink;
mod review;
mod security;
mod setup;
mod systemd;
mod typescript;
mod watch;
