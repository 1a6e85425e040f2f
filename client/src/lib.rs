//! snapback's client side: the wire protocol types ([`proto`]), a blocking
//! client for the daemon's Unix socket ([`Client`]), and the default
//! locations that the daemon and its clients agree on ([`defaults`]).
//!
//! The `snapback` CLI (`src/main.rs`) is a thin layer over this
//! library.

pub mod client;
pub mod defaults;
pub mod proto;

pub use client::{Answer, Client, ClientError, ConnectOptions, DiffItem, ProgressFn};

/// Formats milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` in UTC:
/// how times are shown to people, by the CLI and in the daemon's messages.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}
