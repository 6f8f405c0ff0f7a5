//! `grpc-timeout` header values: the parser accepts exactly what the gRPC
//! spec allows (1 to 8 digits, then one of `H M S m u n`), and what the
//! sidecar forwards (`encode_timeout`) parses back to no more than it was.
//!
//! Run with `scripts/fuzz.sh 60 grpc_timeout`.

#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use meshwire_sidecar::grpc::{encode_timeout, parse_timeout};

fn spec_allows(b: &[u8]) -> bool {
    match b.split_last() {
        Some((unit, digits)) => {
            (1..=8).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && b"HMSmun".contains(unit)
        }
        None => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let parsed = parse_timeout(&v);
    assert_eq!(parsed.is_some(), spec_allows(data), "{data:?}");
    if let Some(d) = parsed {
        let sent = encode_timeout(d);
        let back = parse_timeout(&sent).expect("what the sidecar sends parses");
        assert!(back <= d, "{d:?} sent as {sent:?} reads {back:?}");
    }
});
