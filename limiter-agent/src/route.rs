//! Canonicalises request paths and matches them against route patterns to pick a rate-limit tier.
//!
//! Security invariant: every spelling of a path that an upstream router could route to some
//! handler must canonicalise to the same string that router matched, or be rejected. Where
//! routers disagree (dot segments, `;` parameters, backslashes, encoded separators, whitespace at
//! a segment's edge, double encoding, Unicode), we refuse rather than guess. The canonical string
//! is a lookup key, not a path to forward: proxy the original target. Checked against real
//! routers (Express, Starlette, Flask, nginx) by `tests/tests/paths.rs`.

use std::{cmp::Ordering, collections::HashMap};

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
    if target.len() > MAX_TARGET_LEN {
        return Err(PathError::TooLong);
    }
    let lenient = policy == PathPolicy::Lenient;
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
    let mut segs: Vec<String> = Vec::new();
    // Kept, so `*` can match an empty remainder. Per RFC 3986 a final `.` or `..` also leaves
    // one ("/a/b/.." -> "/a/"); only Strict gets that far with them.
    let mut trailing_slash = false;
    for raw in path.split('/') {
        let mut seg = decode(raw)?;
        trailing_slash = matches!(seg.as_str(), "" | "." | "..");
        match seg.as_str() {
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
            seg.make_ascii_lowercase();
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
fn decode(raw: &str) -> Result<String, PathError> {
    if !raw.contains('%') {
        return Ok(raw.to_owned());
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
    s.is_ascii().then_some(s).ok_or(PathError::NonAscii)
}

/// Why a route table could not be built (a configuration error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The pattern is malformed.
    #[error("route {pattern:?}: {reason}")]
    Invalid {
        pattern: String,
        reason: &'static str,
    },
    /// The pattern is not a valid path.
    #[error("route {pattern:?}: {source}")]
    Path { pattern: String, source: PathError },
    /// Two patterns have the same shape, so neither is more specific.
    #[error("routes {first:?} and {second:?} have the same shape")]
    Ambiguous { first: String, second: String },
}

/// One pattern segment. `Param` carries no name so that equal shapes compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Seg {
    Lit(String),
    Param,
    Wild,
}

impl Seg {
    /// Lower is more specific.
    fn rank(&self) -> u8 {
        match self {
            Seg::Lit(_) => 0,
            Seg::Param => 1,
            Seg::Wild => 2,
        }
    }
}

#[derive(Clone, Debug)]
struct Pattern {
    segs: Vec<Seg>,
    tier: usize,
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        let rest = path.strip_prefix('/').unwrap_or(path);
        let mut parts = (!rest.is_empty())
            .then(|| rest.split('/'))
            .into_iter()
            .flatten();
        for seg in &self.segs {
            let part = parts.next();
            let ok = match seg {
                // One or more segments; a trailing slash ("/media/") counts as one.
                Seg::Wild => return part.is_some(),
                Seg::Param => part.is_some_and(|p| !p.is_empty()),
                Seg::Lit(lit) => part == Some(lit.as_str()),
            };
            if !ok {
                return false;
            }
        }
        parts.next().is_none()
    }
}

/// Most specific first: segment by segment, literal > `:param` > `*`; then longer first.
/// Two patterns that match the same path and tie here have the same shape, which
/// [`RouteTable::new`] rejects, so the first match in this order is the most specific.
fn specificity(a: &[Seg], b: &[Seg]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.rank().cmp(&y.rank()))
        .find(|o| o.is_ne())
        .unwrap_or_else(|| b.len().cmp(&a.len()))
}

/// A compiled table of route patterns, each mapped to a tier index.
#[derive(Clone, Debug)]
pub struct RouteTable {
    /// All-literal patterns, keyed by canonical path: they beat any pattern matching the same path.
    exact: HashMap<String, usize>,
    /// Patterns with a `:param` or `*`, sorted by [`specificity`].
    patterns: Vec<Pattern>,
    /// Lenient routing: a trailing slash is optional, as in Express's default (non-strict)
    /// routing, except that it also lets `*` match an empty remainder (`/media/`).
    optional_slash: bool,
}

impl RouteTable {
    /// Compiles patterns (route, tier index). Patterns are canonicalised like paths (Lenient
    /// lowercases them) and must otherwise already be canonical.
    ///
    /// # Errors
    /// [`RouteError`] for a malformed pattern or two patterns of the same shape.
    pub fn new(routes: &[(&str, usize)], policy: PathPolicy) -> Result<Self, RouteError> {
        let mut shapes: HashMap<Vec<Seg>, &str> = HashMap::new();
        let mut table = RouteTable {
            exact: HashMap::new(),
            patterns: Vec::new(),
            optional_slash: policy == PathPolicy::Lenient,
        };
        for &(pattern, tier) in routes {
            let (canonical, segs) = parse_pattern(pattern, policy)?;
            if let Some(first) = shapes.insert(segs.clone(), pattern) {
                return Err(RouteError::Ambiguous {
                    first: first.to_owned(),
                    second: pattern.to_owned(),
                });
            }
            if segs.iter().all(|s| matches!(s, Seg::Lit(_))) {
                table.exact.insert(canonical, tier);
            } else {
                table.patterns.push(Pattern { segs, tier });
            }
        }
        table.patterns.sort_by(|a, b| specificity(&a.segs, &b.segs));
        Ok(table)
    }

    /// The tier index of the most specific route matching an already-canonical path.
    #[must_use]
    pub fn lookup(&self, canonical_path: &str) -> Option<usize> {
        let bare = match canonical_path.strip_suffix('/') {
            Some(bare) if self.optional_slash && !bare.is_empty() => bare,
            _ => canonical_path,
        };
        if let Some(&tier) = self.exact.get(bare) {
            return Some(tier);
        }
        // Most specific pattern first, with or without the slash: `/a/b/` is both `/a/:x` (the
        // slash dropped) and `/a/b/*` (an empty remainder), and the latter wins.
        self.patterns
            .iter()
            .find(|p| p.matches(bare) || p.matches(canonical_path))
            .map(|p| p.tier)
    }
}

/// Validates a pattern and returns its canonical form and segments.
fn parse_pattern(pattern: &str, policy: PathPolicy) -> Result<(String, Vec<Seg>), RouteError> {
    let invalid = |reason| RouteError::Invalid {
        pattern: pattern.to_owned(),
        reason,
    };
    if !pattern.starts_with('/') {
        return Err(invalid("must start with '/'"));
    }
    if pattern.contains("//") || (pattern.len() > 1 && pattern.ends_with('/')) {
        return Err(invalid("empty segment"));
    }
    let canonical = canonicalize(pattern, policy).map_err(|source| RouteError::Path {
        pattern: pattern.to_owned(),
        source,
    })?;
    // Only case may differ: a pattern that canonicalisation would otherwise rewrite (dot segments,
    // `;`, `%XX`, `?`, trailing dots) is almost certainly not what the operator meant.
    let expected = match policy {
        PathPolicy::Lenient => pattern.to_ascii_lowercase(),
        PathPolicy::Strict => pattern.to_owned(),
    };
    if canonical != expected {
        return Err(invalid("not in canonical form"));
    }
    let mut segs = Vec::new();
    let mut parts = canonical[1..]
        .split('/')
        .filter(|s| !s.is_empty())
        .peekable();
    while let Some(part) = parts.next() {
        segs.push(if part == "*" {
            if parts.peek().is_some() {
                return Err(invalid("'*' must be the last segment"));
            }
            Seg::Wild
        } else if part.contains('*') {
            return Err(invalid("'*' must be a whole segment"));
        } else if let Some(name) = part.strip_prefix(':') {
            if name.is_empty() {
                return Err(invalid("empty parameter name"));
            }
            Seg::Param
        } else {
            Seg::Lit(part.to_owned())
        });
    }
    Ok((canonical, segs))
}

#[cfg(test)]
mod tests {
    use super::{
        PathError as E,
        PathPolicy::{Lenient, Strict},
        *,
    };

    const REFERENCE: &[(&str, usize)] = &[
        ("/api/health", 0),
        ("/api/v1/chat/completions", 1),
        ("/api/v1/media/*", 2),
        ("/api/v1/vision", 3),
        ("/api/v1/fashion/run", 4),
        ("/api/v1/fashion/subscribe", 5),
        ("/api/v1/fashion/status/:id", 6),
        ("/api/chat", 7),
    ];

    fn lenient(target: &str) -> Result<String, PathError> {
        canonicalize(target, Lenient)
    }

    fn strict(target: &str) -> Result<String, PathError> {
        canonicalize(target, Strict)
    }

    fn tier(table: &RouteTable, target: &str, policy: PathPolicy) -> Option<usize> {
        table.lookup(&canonicalize(target, policy).unwrap())
    }

    /// Spellings that a lenient upstream routes like `path`. Dot segments, `;` parameters,
    /// backslashes, a trailing dot and `%20` at a segment's edge used to be here, resolved the
    /// way nginx, Tomcat or IIS would; Express, Starlette and Flask route them differently
    /// (`tests/tests/paths.rs` found `/media/x/..`, `/status/;1`, `/status/a\b`, `/status/%20`
    /// served unlimited), so they are refused now: see `routers_disagree_so_we_refuse`.
    fn spellings(path: &str) -> Vec<String> {
        let (stem, ch) = path.split_at(path.len() - 1);
        vec![
            path.to_owned(),
            path.to_ascii_uppercase(),
            format!("/{}/", path.replace('/', "//")),
            format!("{stem}%{:02X}", ch.as_bytes()[0]),
            format!("{stem}%{:02x}", ch.as_bytes()[0]),
            format!("{path}/"),
            format!("{path}?x=1"),
            format!("{path}?/../../x;y"),
            format!("{path}#frag"),
            format!("http://example.com{path}?q"),
        ]
    }

    #[test]
    fn every_lenient_spelling_maps_to_the_same_tier() {
        let table = RouteTable::new(REFERENCE, Lenient).unwrap();
        for (path, want) in [
            ("/api/health", 0),
            ("/api/v1/chat/completions", 1),
            ("/api/v1/media/x", 2),
            ("/api/v1/media/b/c", 2),
            ("/api/v1/vision", 3),
            ("/api/v1/fashion/run", 4),
            ("/api/v1/fashion/subscribe", 5),
            ("/api/v1/fashion/status/1", 6),
            ("/api/chat", 7),
        ] {
            for s in spellings(path) {
                assert_eq!(tier(&table, &s, Lenient), Some(want), "{s}");
            }
        }
    }

    /// The spellings of the issue that real routers served as a tier while we counted none
    /// (or another), and their kin: all refused now.
    #[test]
    fn routers_disagree_so_we_refuse() {
        let cases: &[(E, &[&str])] = &[
            (
                E::DotSegment,
                &[
                    "/api/v1/media/.",
                    "/api/v1/media/x/..",
                    "/api/v1/media/../../chat",
                    "/api/v1/fashion/status/..",
                    "/api/v1/fashion/status/%2e",
                    "/api/v1/fashion/status/%2E%2e",
                    "/api/./chat",
                    "/api/x/../chat",
                    "/api/chat/.",
                ],
            ),
            (
                E::Semicolon,
                &[
                    "/api/v1/media/;x",
                    "/api/v1/fashion/status/;1",
                    "/api/chat;x=1",
                ],
            ),
            (
                E::Trimmable,
                &[
                    "/api/v1/media/%20",
                    "/api/v1/fashion/status/%20",
                    "/api/v1/fashion/status/1%20",
                    "/api/v1/fashion/status/%201",
                    "/api/chat.",
                    "/api/chat%2e",
                ],
            ),
            (
                E::Backslash,
                &["/api/v1/fashion/status/a\\b", "/api\\v1\\chat\\completions"],
            ),
        ];
        for (want, targets) in cases {
            for target in *targets {
                assert_eq!(lenient(target).as_ref(), Err(want), "{target:?}");
            }
        }
        // Inside a segment every router keeps a space or a dot: no disagreement there.
        let table = RouteTable::new(REFERENCE, Lenient).unwrap();
        for (path, want) in [
            ("/api/v1/media/my%20photo.jpg", 2),
            ("/api/v1/fashion/status/a%20b", 6),
            ("/api/v1/fashion/status/.a", 6),
            ("/api/v1/fashion/status/a%2eb", 6),
        ] {
            assert_eq!(tier(&table, path, Lenient), Some(want), "{path}");
        }
    }

    #[test]
    fn reference_table_semantics() {
        let table = RouteTable::new(REFERENCE, Lenient).unwrap();
        for (path, want) in [
            ("/api/v1/fashion/status", None),
            ("/api/v1/fashion/status/", None),
            ("/api/v1/fashion/status//", None),
            ("/api/v1/fashion/status/1/x", None),
            ("/api/v1/media", None),
            ("/api/v1/chat", None),
            ("/api/chat/x", None),
            ("/", None),
            ("/api/v1/fashion/status/1", Some(6)),
            ("/api/v1/fashion/status/2", Some(6)),
            ("/api/v1/fashion/status/1/", Some(6)),
            ("/api/v1/media/a", Some(2)),
            ("/api/v1/media/b/c", Some(2)),
            // An empty remainder: nginx (`location /api/v1/media/`) and Starlette
            // (`{rest:path}`) serve it as media, so it counts as media.
            ("/api/v1/media/", Some(2)),
            ("/api/v1/media//", Some(2)),
            ("/API/V1/MEDIA/", Some(2)),
            ("/api/chat/", Some(7)),
        ] {
            assert_eq!(tier(&table, path, Lenient), want, "{path}");
        }
    }

    #[test]
    fn literal_beats_param_beats_wildcard() {
        // Deliberately listed least specific first: order in the config must not matter.
        let routes = [("/a/*", 2), ("/a/:x", 1), ("/a/b", 0), ("/:x/b/c", 3)];
        let routes = [&routes[..], &[("/a/:x/c", 4), ("/a/b/*", 5), ("/", 6)]].concat();
        let table = RouteTable::new(&routes, Lenient).unwrap();
        for (path, want) in [
            ("/a/b", Some(0)),
            ("/a/z", Some(1)),
            ("/a/z/q", Some(2)),
            ("/b/b/c", Some(3)),
            ("/a/z/c", Some(4)),
            ("/a/b/c", Some(5)),
            ("/", Some(6)),
            ("/a", None),
            // A trailing slash is optional, and gives `*` an empty remainder. Where both apply
            // (`/a/b/`: `/a/b` or `/a/b/*`?) routers differ (Express: `/a/b`; nginx, Starlette:
            // the subtree); the literal wins, as everywhere else. The reference table has no such
            // pair.
            ("/a/z/", Some(1)),
            ("/a/b/", Some(0)),
            ("/a/b/c/", Some(5)),
            ("/a/", Some(2)),
        ] {
            assert_eq!(table.lookup(path), want, "{path}");
        }
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

    #[test]
    fn strict_differences() {
        for (target, want) in [
            ("/API/Chat", "/API/Chat"),
            ("/a;b=c", "/a;b=c"),
            ("/a.", "/a."),
            ("/a%20", "/a "),
            ("/a/.../b", "/a/.../b"),
            ("/a/", "/a/"),
            ("//a//b/./c/../", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/%63", "/a/c"),
        ] {
            assert_eq!(strict(target).as_deref(), Ok(want), "{target:?}");
        }
        for (target, want) in [
            ("/a\\b", E::Backslash),
            ("/a/../..", E::EscapesRoot),
            ("/a%2Fb", E::EncodedSeparator),
            ("/a%252F", E::DoubleEncoding),
        ] {
            assert_eq!(strict(target), Err(want), "{target:?}");
        }
        let table = RouteTable::new(REFERENCE, Strict).unwrap();
        for (path, want) in [
            ("/api/chat", Some(7)),
            ("//api/./chat", Some(7)),
            ("/API/chat", None),
            ("/api/chat/", None),
            ("/api/chat.", None),
            ("/api/v1/media/", Some(2)),
            ("/api/v1/fashion/status/", None),
        ] {
            assert_eq!(tier(&table, path, Strict), want, "{path}");
        }
        assert!(RouteTable::new(&[("/A", 0), ("/a", 1)], Strict).is_ok());
    }

    #[test]
    fn ambiguity_errors() {
        let ambiguous = |routes: &[(&str, usize)], first: &str, second: &str| {
            let err = RouteTable::new(routes, Lenient).unwrap_err();
            let (first, second) = (first.to_owned(), second.to_owned());
            assert_eq!(err, RouteError::Ambiguous { first, second });
        };
        ambiguous(&[("/a/:x", 0), ("/a/:y", 1)], "/a/:x", "/a/:y");
        ambiguous(&[("/a/b", 0), ("/a/b", 0)], "/a/b", "/a/b");
        ambiguous(&[("/a/*", 0), ("/b", 1), ("/a/*", 2)], "/a/*", "/a/*");
        ambiguous(&[("/A/b", 0), ("/a/b", 1)], "/A/b", "/a/b");
        assert!(RouteTable::new(&[("/a/:x", 0), ("/a/*", 1), ("/:x/b", 2)], Lenient).is_ok());
    }

    #[test]
    fn invalid_patterns() {
        let reason = |pattern: &str| match RouteTable::new(&[(pattern, 0)], Lenient) {
            Err(RouteError::Invalid { reason, .. }) => reason,
            other => panic!("{pattern}: {other:?}"),
        };
        assert_eq!(reason("api/chat"), "must start with '/'");
        assert_eq!(reason("*"), "must start with '/'");
        assert_eq!(reason("/a//b"), "empty segment");
        assert_eq!(reason("/a/"), "empty segment");
        assert_eq!(reason("/a/*/b"), "'*' must be the last segment");
        assert_eq!(reason("/a/b*"), "'*' must be a whole segment");
        assert_eq!(reason("/a/:"), "empty parameter name");
        for pattern in ["/%61", "/a?x", "/a#x"] {
            assert_eq!(reason(pattern), "not in canonical form", "{pattern}");
        }
        // Refused by `canonicalize` itself now, like the requests that would spell them.
        for (pattern, want) in [
            ("/a/./b", E::DotSegment),
            ("/a/../b", E::DotSegment),
            ("/a;x", E::Semicolon),
            ("/a.", E::Trimmable),
            ("/a\\b", E::Backslash),
        ] {
            let err = RouteTable::new(&[(pattern, 0)], Lenient).unwrap_err();
            let pattern = pattern.to_owned();
            assert_eq!(
                err,
                RouteError::Path {
                    pattern,
                    source: want
                }
            );
        }
        let err = RouteTable::new(&[("/a%2F", 0)], Lenient).unwrap_err();
        let (pattern, source) = ("/a%2F".to_owned(), E::EncodedSeparator);
        let message = "route \"/a%2F\": encoded slash or backslash";
        assert_eq!(err.to_string(), message);
        assert_eq!(err, RouteError::Path { pattern, source });
    }
}
