//! Request paths put in one canonical spelling before routing and every rule,
//! so a rule written for `/admin` cannot be walked around as `//admin`,
//! `/./admin`, `/x/../admin`, `/%61dmin` or `/%2e%2e/admin`.
//!
//! In order (RFC 3986 §6.2.2): percent-encoded unreserved characters are
//! decoded (`%7e` → `~`, `%2E` → `.`), every other escape is upper-cased
//! (`%c3` → `%C3`), an escaped slash (`%2F`) is refused or decoded as the
//! config says, empty segments are merged (`//` → `/`) and dot segments
//! removed (`..` stops at the root). The query is left as it came. The
//! canonical path is also what the service receives, so the service and the
//! gateway's rules always see the same path.

use std::borrow::Cow;

use serde::Deserialize;

/// What to do with `%2F` (an escaped `/`) in a path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// 400: services disagree on whether `a%2Fb` is one segment or two.
    #[default]
    Reject,
    /// Decode to `/` (then merged and dot-resolved like any other slash).
    Unescape,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with /")]
    NotAbsolute,
    #[error("invalid percent-encoding in the path")]
    BadEscape,
    #[error("an escaped slash (%2F) in the path")]
    EscapedSlash,
    #[error("an escaped control character in the path")]
    EscapedControl,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The canonical form of `path` (no query); borrowed when already canonical.
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let b = path.as_bytes();
    // Fast path: nothing to decode and no empty or dot segment.
    let plain = !b.contains(&b'%')
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..");
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Escapes.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // Copy up to the next escape as it is (it may hold UTF-8).
            let end = path[i..].find('%').map_or(b.len(), |j| i + j);
            decoded.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let v = h << 4 | l;
        match v {
            b'/' => match slashes {
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                EscapedSlashes::Unescape => decoded.push('/'),
            },
            v if v < 0x20 || v == 0x7f => return Err(PathError::EscapedControl),
            v if unreserved(v) => decoded.push(v as char),
            v => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                decoded.push('%');
                decoded.push(HEX[usize::from(v >> 4)] as char);
                decoded.push(HEX[usize::from(v & 15)] as char);
            }
        }
        i += 3;
    }
    // 2. Empty and dot segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let n = segments.len();
    let mut trailing = false;
    for (k, seg) in segments.iter().enumerate() {
        let last = k + 1 == n;
        match *seg {
            "" => trailing = last,
            "." => trailing = last,
            ".." => {
                out.pop();
                trailing = last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut canonical = String::with_capacity(decoded.len());
    for s in &out {
        canonical.push('/');
        canonical.push_str(s);
    }
    if trailing || out.is_empty() {
        canonical.push('/');
    }
    Ok(Cow::Owned(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, EscapedSlashes::Reject).map(Cow::into_owned)
    }

    #[test]
    fn every_spelling_of_a_path_becomes_one() {
        for p in [
            "/admin",
            "//admin",
            "/./admin",
            "/x/../admin",
            "/%61dmin",
            "/%2e%2e/admin",
            "/%2E/admin",
            "/../../admin",
            "///x//..//admin",
        ] {
            assert_eq!(n(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(n("/a/b/").unwrap(), "/a/b/");
        assert_eq!(n("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/").unwrap(), "/");
        assert_eq!(n("/..").unwrap(), "/");
        assert_eq!(
            n("/caf%c3%a9").unwrap(),
            "/caf%C3%A9",
            "escapes upper-cased"
        );
        assert_eq!(n("/%7euser").unwrap(), "/~user");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert!(matches!(
            normalize("/plain/path", EscapedSlashes::Reject),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn escaped_slashes_and_bad_escapes() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EscapedSlash));
        assert_eq!(n("/a%2fb"), Err(PathError::EscapedSlash));
        assert_eq!(
            normalize("/x%2F..%2Fadmin", EscapedSlashes::Unescape).unwrap(),
            "/admin"
        );
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%00"), Err(PathError::EscapedControl));
        assert_eq!(n("a"), Err(PathError::NotAbsolute));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
    }
}
