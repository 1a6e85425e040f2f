//! The daemon's request decoder: any line a client sends is decoded as a
//! `Request` (or refused with an error); a decoded one encodes again and
//! decodes to the same value. Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snapback::proto::{MAX_LINE, Request};

fuzz_target!(|line: &[u8]| {
    if line.len() >= MAX_LINE {
        return; // the server refuses such a line before decoding it
    }
    if let Ok(request) = serde_json::from_slice::<Request>(line) {
        let again = serde_json::to_vec(&request).expect("a decoded request encodes");
        let back: Request = serde_json::from_slice(&again).expect("an encoded request decodes");
        assert_eq!(back, request);
    }
});
