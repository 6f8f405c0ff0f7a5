//! gRPC status codes as a type, with the one table of their canonical names
//! (the `grpc_code`/`code` labels of every metric, `meshctl`'s and the load
//! client's output).

/// A gRPC status code (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// Every code, in numeric order (`Code::ALL[n]` is code `n`).
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code numbered `n`; a number gRPC does not define is UNKNOWN, as
    /// gRPC clients treat it.
    pub fn from_i32(n: i32) -> Code {
        usize::try_from(n)
            .ok()
            .and_then(|i| Code::ALL.get(i).copied())
            .unwrap_or(Code::Unknown)
    }

    /// The code a `grpc-status` value (`0`..`16`) names; anything else is
    /// UNKNOWN.
    pub fn from_bytes(v: &[u8]) -> Code {
        match v {
            [d @ b'0'..=b'9'] => Code::ALL[usize::from(d - b'0')],
            [b'1', d @ b'0'..=b'6'] => Code::ALL[10 + usize::from(d - b'0')],
            _ => Code::Unknown,
        }
    }

    /// The canonical name (`DEADLINE_EXCEEDED`).
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_agree() {
        for (n, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, n);
            assert_eq!(Code::from_i32(n as i32), *code);
        }
        assert_eq!(Code::from_i32(4).name(), "DEADLINE_EXCEEDED");
        assert_eq!(Code::from_i32(16).to_string(), "UNAUTHENTICATED");
        assert_eq!(Code::from_i32(17), Code::Unknown);
        assert_eq!(Code::from_i32(-1), Code::Unknown);
        for (n, code) in Code::ALL.iter().enumerate() {
            assert_eq!(Code::from_bytes(n.to_string().as_bytes()), *code);
        }
        for bad in ["", "17", "01", "x", "1x", "100"] {
            assert_eq!(Code::from_bytes(bad.as_bytes()), Code::Unknown, "{bad:?}");
        }
    }
}
