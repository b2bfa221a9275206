//! Canonicalises request paths the way an upstream router would see them.
//!
//! Security invariant: every spelling of a path that an upstream router could route to some
//! handler must canonicalise to the same string that router matched, or be rejected. Where
//! routers disagree (dot segments, `;` parameters, backslashes, encoded separators, whitespace at
//! a segment's edge, double encoding, Unicode), we refuse rather than guess. The canonical string
//! is a lookup key, not a path to forward: proxy the original target. Checked against real
//! routers (Express, Starlette, Flask, nginx) by `tests/tests/paths.rs`.

use std::borrow::Cow;

/// Longest request-target (in bytes) that [`canonicalize`] accepts.
pub const MAX_TARGET_LEN: usize = 8192;

/// How lenient the upstream's router is (config `[server] upstream_paths = "lenient" | "strict"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathPolicy {
    /// Assume the most lenient common router (Express, IIS, Django, nginx, Go, Tomcat).
    #[default]
    Lenient,
    /// The upstream matches byte-exactly after RFC 3986 normalisation only.
    Strict,
}

/// Why a request path was refused (the message is used as a 400 error body).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding")]
    InvalidEscape,
    /// `%2F` or `%5C`: routers disagree on whether they separate segments.
    #[error("encoded slash or backslash")]
    EncodedSeparator,
    /// `%3B`: routers disagree on whether it starts a path parameter.
    #[error("encoded semicolon")]
    EncodedSemicolon,
    /// `%3F` or `%23`: a stack that decodes before splitting would end the path there.
    #[error("encoded question mark or hash")]
    EncodedDelimiter,
    /// A decoded `%XX` sequence, which a stack that decodes twice would decode again.
    #[error("double percent-encoding")]
    DoubleEncoding,
    /// A raw or decoded byte in 0x00-0x1F or 0x7F.
    #[error("control character")]
    ControlChar,
    /// A `..` segment above the root.
    #[error("path escapes the root")]
    EscapesRoot,
    /// Decoded bytes that are not UTF-8.
    #[error("non-UTF-8 path")]
    NonUtf8,
    /// A raw or decoded non-ASCII character (routers may normalise or case-fold it).
    #[error("non-ASCII path")]
    NonAscii,
    /// The request-target exceeds [`MAX_TARGET_LEN`].
    #[error("path too long")]
    TooLong,
    /// Neither origin-form (`/...`), absolute-form (`scheme://host/...`) nor `*`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// A raw `\`: IIS separates segments with it, Express, Starlette, Flask and nginx on Linux
    /// keep it inside one (`/status/a\b` is one `:id` to them, two segments to IIS).
    #[error("backslash in path")]
    Backslash,
    /// Under [`PathPolicy::Lenient`], a dot segment (`.`, `..`, `%2e`…) below the root, or a
    /// segment of dots and spaces (`...`, `.. `): nginx resolves them, Express, Starlette and
    /// Flask match them as a segment (`/media/x/..` is media to the latter, `/media/` to nginx,
    /// and `/media/../../chat` is media or chat), IIS trims `.. ` into `..`.
    #[error("dot segment")]
    DotSegment,
    /// Under [`PathPolicy::Lenient`], a raw `;`: Tomcat and Jetty cut a path parameter there,
    /// other routers keep it in the segment (`/status/;1` is a `:id` to Express and nginx).
    #[error("semicolon in path")]
    Semicolon,
    /// Under [`PathPolicy::Lenient`], a segment that starts or ends with a space (`%20`) or ends
    /// with a dot: IIS trims them, other routers keep them (`/status/%20` is a `:id`).
    #[error("segment starts or ends with a space, or ends with a dot")]
    Trimmable,
}

/// Canonicalises the request-target's path (the query string, if any, is ignored).
///
/// Both policies percent-decode (refusing what decodes ambiguously), merge repeated slashes and
/// keep one trailing slash (so that `/media/*` can match `/media/`, an empty remainder, as nginx
/// and Starlette do). [`PathPolicy::Lenient`] also lowercases (Express is case-insensitive) and
/// refuses what the common routers disagree on: dot segments, `;`, and trimmable segment edges.
/// [`PathPolicy::Strict`] resolves dot segments per RFC 3986 and keeps everything else.
///
/// # Errors
/// Any [`PathError`]: the request should be answered with 400 rather than routed.
pub fn canonicalize(target: &str, policy: PathPolicy) -> Result<String, PathError> {
    canonical(target, policy).map(Cow::into_owned)
}

/// [`canonicalize`], borrowing from `target` when its path is already
/// canonical (the request path's common case: no copy).
///
/// # Errors
/// As [`canonicalize`].
pub fn canonical(target: &str, policy: PathPolicy) -> Result<Cow<'_, str>, PathError> {
    if target.len() > MAX_TARGET_LEN {
        return Err(PathError::TooLong);
    }
    let lenient = policy == PathPolicy::Lenient;
    if let Some(plain) = plain(target, lenient) {
        return Ok(plain);
    }
    whole(target, lenient).map(Cow::Owned)
}

/// [`canonicalize`] for every spelling.
fn whole(target: &str, lenient: bool) -> Result<String, PathError> {
    let path = origin_path(&target[..target.find(['?', '#']).unwrap_or(target.len())])?;
    for b in path.bytes() {
        if b.is_ascii_control() {
            return Err(PathError::ControlChar);
        } else if !b.is_ascii() {
            return Err(PathError::NonAscii);
        } else if b == b'\\' {
            return Err(PathError::Backslash);
        } else if b == b';' && lenient {
            return Err(PathError::Semicolon);
        }
    }
    let mut segs: Vec<Cow<'_, str>> = Vec::new();
    // Kept, so `*` can match an empty remainder. Per RFC 3986 a final `.` or `..` also leaves
    // one ("/a/b/.." -> "/a/"); only Strict gets that far with them.
    let mut trailing_slash = false;
    for raw in path.split('/') {
        let mut seg = decode(raw)?;
        trailing_slash = matches!(&*seg, "" | "." | "..");
        match &*seg {
            ".." if segs.is_empty() => return Err(PathError::EscapesRoot),
            "." | ".." if lenient => return Err(PathError::DotSegment),
            "" | "." => continue,
            ".." => {
                segs.pop();
                continue;
            }
            _ => {}
        }
        if lenient {
            if seg.bytes().all(|b| b == b'.' || b == b' ') && seg.contains('.') {
                return Err(PathError::DotSegment);
            }
            if seg.starts_with(' ') || seg.ends_with([' ', '.']) {
                return Err(PathError::Trimmable);
            }
            if seg.bytes().any(|b| b.is_ascii_uppercase()) {
                seg.to_mut().make_ascii_lowercase();
            }
        }
        segs.push(seg);
    }
    let mut out = String::with_capacity(path.len());
    for seg in &segs {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// The canonical form of the most common spelling, in one pass: an
/// origin-form path of letters, digits, `-`, `_` and `~` between single
/// slashes (query aside), which [`canonicalize`] would return as it is
/// (lowercased when lenient): borrowed unless it has to be lowercased.
/// `None` for anything else, which takes the whole algorithm.
fn plain(target: &str, lenient: bool) -> Option<Cow<'_, str>> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') {
        return None;
    }
    let mut end = bytes.len();
    let mut upper = false;
    let mut previous = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match PLAIN[usize::from(b)] {
            Plain::Kept => {}
            Plain::Upper => upper = true,
            Plain::Slash if previous != b'/' => {}
            Plain::End => {
                end = i;
                break;
            }
            Plain::Slash | Plain::Other => return None,
        }
        previous = b;
    }
    // ASCII only up to `end`, so it is a `str` boundary.
    let path = &target[..end];
    Some(if lenient && upper {
        Cow::Owned(path.to_ascii_lowercase())
    } else {
        Cow::Borrowed(path)
    })
}

/// What one byte is to [`plain`].
#[derive(Clone, Copy)]
enum Plain {
    /// A lowercase letter, a digit, `-`, `_` or `~`.
    Kept,
    /// An uppercase letter.
    Upper,
    Slash,
    /// `?` or `#`: the path ends before it.
    End,
    /// Anything else: not the plain spelling.
    Other,
}

/// [`Plain`] of each byte.
static PLAIN: [Plain; 256] = {
    let mut table = [Plain::Other; 256];
    let mut b = 0;
    while b < 256 {
        #[expect(clippy::cast_possible_truncation, reason = "b < 256")]
        let byte = b as u8;
        table[b] = match byte {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => Plain::Kept,
            b'A'..=b'Z' => Plain::Upper,
            b'/' => Plain::Slash,
            b'?' | b'#' => Plain::End,
            _ => Plain::Other,
        };
        b += 1;
    }
    table
};

/// The path part of an origin-form, absolute-form or asterisk-form target (query already cut).
fn origin_path(target: &str) -> Result<&str, PathError> {
    if target.is_empty() || target == "*" || target.starts_with('/') {
        return Ok(if target == "*" { "/" } else { target });
    }
    if let Some((scheme, rest)) = target.split_once("://")
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Ok(rest.find('/').map_or("/", |i| &rest[i..]));
    }
    Err(PathError::NotAbsolute)
}

/// Percent-decodes one raw (already ASCII-checked) segment, refusing ambiguous results.
fn decode(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    let hex = |b: &u8| {
        char::from(*b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).and_then(hex),
            bytes.get(i + 2).and_then(hex),
        ) else {
            return Err(PathError::InvalidEscape);
        };
        let b = (hi << 4) | lo;
        match b {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            b';' => return Err(PathError::EncodedSemicolon),
            b'?' | b'#' => return Err(PathError::EncodedDelimiter),
            _ if b.is_ascii_control() => return Err(PathError::ControlChar),
            _ => out.push(b),
        }
        i += 3;
    }
    // A raw `%` always starts an escape, so any `%` here came from `%25`.
    if out
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
    {
        return Err(PathError::DoubleEncoding);
    }
    let s = String::from_utf8(out).map_err(|_| PathError::NonUtf8)?;
    s.is_ascii()
        .then_some(Cow::Owned(s))
        .ok_or(PathError::NonAscii)
}

#[cfg(test)]
mod tests {
    use super::{PathError as E, PathPolicy::Lenient, *};

    fn lenient(target: &str) -> Result<String, PathError> {
        canonicalize(target, Lenient)
    }

    #[test]
    fn rejections() {
        let long = format!("/{}", "a".repeat(MAX_TARGET_LEN));
        let cases: &[(E, &[&str])] = &[
            (E::EncodedSeparator, &["/a%2Fb", "/a%2fb", "/a%5Cb"]),
            (E::EncodedSemicolon, &["/api/chat%3Bx", "/api/chat%3b"]),
            // Found by fuzzing: `%23` decoded into a segment made a canonical
            // path that a decode-then-split stack would cut at the `#`.
            (
                E::EncodedDelimiter,
                &["/api/%23ttp:/", "/api/v1/media%3Fx", "/api/v1/media%23/a"],
            ),
            (E::ControlChar, &["/a%00", "/a%7f", "/a\0", "/\tb"]),
            (E::InvalidEscape, &["/%zz", "/%4", "/a%", "/%G1", "/%u00"]),
            (E::DoubleEncoding, &["/a%252F", "/%2561", "/%25%36%31"]),
            // `..` below the root is a `DotSegment` (`routers_disagree_so_we_refuse`).
            (E::EscapesRoot, &["/..", "/../api/chat", "/%2e%2e/x"]),
            (E::NonAscii, &["/api/caf\u{e9}", "/api/caf%C3%A9"]),
            (E::NonUtf8, &["/api/%FF", "/%C0%AF"]),
            (E::NotAbsolute, &["api/chat", "\\api\\chat", "://x/a"]),
            (E::DotSegment, &["/a/.../b", "/a/x/.. /b", "/a/.%20/b"]),
            (E::TooLong, &[long.as_str()]),
        ];
        for (want, targets) in cases {
            for target in *targets {
                assert_eq!(lenient(target).as_ref(), Err(want), "{target:?}");
            }
        }
        let limit = lenient(&long[..MAX_TARGET_LEN]);
        assert_eq!(limit.map(|s| s.len()), Ok(MAX_TARGET_LEN));
        let message = E::EncodedSeparator.to_string();
        assert_eq!(message, "encoded slash or backslash");
    }

    /// The byte table is the rule it stands for, for each of the 256 bytes.
    #[test]
    fn the_plain_table_is_its_rule() {
        for b in 0..=u8::MAX {
            let kind = match PLAIN[usize::from(b)] {
                Plain::Kept => "kept",
                Plain::Upper => "upper",
                Plain::Slash => "slash",
                Plain::End => "end",
                Plain::Other => "other",
            };
            let rule = if b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_~".contains(&b) {
                "kept"
            } else if b.is_ascii_uppercase() {
                "upper"
            } else if b == b'/' {
                "slash"
            } else if b == b'?' || b == b'#' {
                "end"
            } else {
                "other"
            };
            assert_eq!(kind, rule, "byte {b:#04x}");
        }
    }

    /// The one-pass spelling agrees with the whole algorithm wherever it
    /// answers: every target of up to 5 characters over an alphabet of the
    /// characters that matter, and longer pseudo-random ones.
    #[test]
    fn the_plain_fast_path_agrees_with_the_whole_algorithm() {
        const ALPHABET: &[u8] = b"/aZ9-_~.%2f?#;\\ ";
        fn check(target: &str) {
            for lenient in [true, false] {
                if let Some(fast) = plain(target, lenient) {
                    assert_eq!(
                        Ok(fast.into_owned()),
                        whole(target, lenient),
                        "{target:?} lenient={lenient}"
                    );
                }
            }
        }
        fn every(prefix: &mut Vec<u8>, depth: usize) {
            check(std::str::from_utf8(prefix).unwrap());
            if depth > 0 {
                for &b in ALPHABET {
                    prefix.push(b);
                    every(prefix, depth - 1);
                    prefix.pop();
                }
            }
        }
        every(&mut Vec::new(), 5);
        // Every ASCII character between two letters, and the multibyte
        // spellings routers disagree on, in the path and in the query.
        for c in (0u8..0x80).map(char::from) {
            check(&format!("/x{c}y"));
            check(&format!("/x?{c}"));
        }
        for target in ["/é", "/\u{212A}", "/a\u{FF0F}b", "/a?é", "/A?é"] {
            check(target);
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed >> 40).unwrap()
        };
        for _ in 0..50_000 {
            let len = next() % 32;
            let target: String = std::iter::once('/')
                .chain((0..len).map(|_| char::from(ALPHABET[next() % ALPHABET.len()])))
                .collect();
            check(&target);
        }
        assert_eq!(
            plain("/API/v1/Chat?x=1", true).as_deref(),
            Some("/api/v1/chat")
        );
        assert_eq!(
            plain("/API/v1/Chat/", false).as_deref(),
            Some("/API/v1/Chat/")
        );
        assert_eq!(plain("/", true).as_deref(), Some("/"));
        assert!(
            matches!(
                plain("/api/v1/chat?x=1", true),
                Some(Cow::Borrowed("/api/v1/chat"))
            ),
            "a path already canonical is not copied"
        );
        assert!(
            matches!(plain("/API", false), Some(Cow::Borrowed("/API"))),
            "strict keeps the case, uncopied"
        );
        assert_eq!(plain("", true), None);
        assert_eq!(plain("/a//b", true), None);
        assert_eq!(plain("/a/./b", true), None);
    }

    #[test]
    fn target_forms() {
        for (target, want) in [
            ("", "/"),
            ("*", "/"),
            ("/?x", "/"),
            ("http://h", "/"),
            // The trailing slash is kept (it lets `*` match an empty remainder).
            ("https://h:8/A/b/?q", "/a/b/"),
            ("//a//b//", "/a/b/"),
            ("/a/b%25c", "/a/b%c"),
            ("/a/%7Euser", "/a/~user"),
        ] {
            assert_eq!(lenient(target).as_deref(), Ok(want), "{target:?}");
        }
    }
}
