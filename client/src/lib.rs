//! snapback's client side: the wire protocol types ([`proto`]), a blocking
//! client for the daemon's Unix socket ([`Client`]), and the default
//! locations that the daemon and its clients agree on ([`defaults`]).
//!
//! The `snapback` CLI (`src/main.rs`) is a thin layer over this
//! library.

pub mod client;
pub mod defaults;
pub mod proto;

pub use client::{Client, ClientError, ConnectOptions, ProgressFn};
