//! The bits of the gRPC-over-HTTP/2 protocol the sidecar itself speaks:
//! status codes, `grpc-timeout` and telling a gRPC call from plain HTTP.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};

pub(crate) const GRPC_STATUS: &str = "grpc-status";
pub(crate) const GRPC_MESSAGE: &str = "grpc-message";
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// gRPC status codes (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    pub(crate) fn header_value(self) -> HeaderValue {
        const DIGITS: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        HeaderValue::from_static(DIGITS[self as usize])
    }

    /// The HTTP status a plain HTTP caller gets for the same failure.
    pub(crate) fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Code::Ok => S::OK,
            Code::Cancelled => S::from_u16(499).unwrap_or(S::BAD_REQUEST),
            Code::Unknown | Code::Internal => S::BAD_GATEWAY,
            Code::InvalidArgument => S::BAD_REQUEST,
            Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
            Code::NotFound => S::NOT_FOUND,
            Code::PermissionDenied => S::FORBIDDEN,
            Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
            Code::Unimplemented => S::NOT_IMPLEMENTED,
            Code::Unavailable => S::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => S::UNAUTHORIZED,
        }
    }
}

/// A `grpc-status` value as a code (0..=16); anything else is UNKNOWN (2).
pub(crate) fn status_code(v: &HeaderValue) -> u8 {
    match v.as_bytes() {
        [d @ b'0'..=b'9'] => d - b'0',
        [b'1', d @ b'0'..=b'6'] => 10 + (d - b'0'),
        _ => Code::Unknown as u8,
    }
}

/// The status a plain HTTP call is counted with: OK unless the upstream
/// failed (5xx, the sidecar's notion of success for HTTP), then UNAVAILABLE
/// for 502-504 and UNKNOWN otherwise, as gRPC maps them.
pub(crate) fn code_of_http(status: http::StatusCode) -> u8 {
    match status.as_u16() {
        502..=504 => Code::Unavailable as u8,
        500..=599 => Code::Unknown as u8,
        _ => Code::Ok as u8,
    }
}

/// A request is gRPC when its content type is `application/grpc[+proto|...]`.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Parses `grpc-timeout` (`1*8DIGIT` followed by a unit `H M S m u n`);
/// `None` for anything else (a sign, more digits, another unit), which the
/// caller refuses as gRPC servers do (`proxy::call_timeout`).
#[doc(hidden)]
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    if b.len() < 2 || b.len() > 9 {
        return None;
    }
    let (digits, unit) = b.split_at(b.len() - 1);
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(d - b'0');
    }
    Some(match unit[0] {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a timeout in the finest unit that fits in 8 digits, formatted in
/// a stack buffer (this runs once per call with a deadline).
#[doc(hidden)]
pub fn encode_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let (value, unit) = if nanos <= MAX {
        (nanos, b'n')
    } else if nanos / 1_000 <= MAX {
        (nanos / 1_000, b'u')
    } else if nanos / 1_000_000 <= MAX {
        (nanos / 1_000_000, b'm')
    } else if nanos / 1_000_000_000 <= MAX {
        (nanos / 1_000_000_000, b'S')
    } else if nanos / 60_000_000_000 <= MAX {
        (nanos / 60_000_000_000, b'M')
    } else {
        ((nanos / 3_600_000_000_000).min(MAX), b'H')
    };
    // At most 8 digits and the unit.
    let mut buf = [0u8; 9];
    let mut at = buf.len() - 1;
    buf[at] = unit;
    let mut v = value as u32;
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // Digits and a unit letter are always a valid header value.
    HeaderValue::from_bytes(&buf[at..]).unwrap_or(HeaderValue::from_static("0n"))
}

/// Percent-encodes a `grpc-message` as the gRPC spec requires.
pub(crate) fn encode_message(msg: &str) -> HeaderValue {
    use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
    // Everything outside printable ASCII, plus '%' itself.
    const SET: &AsciiSet = &CONTROLS.add(b'%');
    let encoded = utf8_percent_encode(msg, SET).to_string();
    HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static("meshwire error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_round_trip() {
        let hv = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(parse_timeout(&hv("100m")), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(&hv("5S")), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout(&hv("2H")), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_timeout(&hv("99999999n")),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_timeout(&hv("123456789m")), None, "more than 8 digits");
        assert_eq!(parse_timeout(&hv("10x")), None);
        assert_eq!(parse_timeout(&hv("m")), None);
        assert_eq!(parse_timeout(&hv("1.5S")), None);
        assert_eq!(encode_timeout(Duration::ZERO), "0n");
        assert_eq!(encode_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(encode_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(encode_timeout(Duration::from_secs(86_400 * 3)), "259200S");
        assert_eq!(encode_timeout(Duration::MAX), "99999999H");
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(86_400 * 3),
        ] {
            let back = parse_timeout(&encode_timeout(d)).unwrap();
            assert!(
                back <= d && d - back < d / 1000 + Duration::from_nanos(1),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn message_is_percent_encoded() {
        assert_eq!(
            encode_message("no route to \"x\" 100%"),
            "no route to \"x\" 100%25"
        );
        assert_eq!(encode_message("héllo\n"), "h%C3%A9llo%0A");
    }
}
