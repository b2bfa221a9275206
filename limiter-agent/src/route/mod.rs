//! Matches canonical request paths against route patterns to pick a rate-limit tier.
//! Canonicalisation (the security-critical part) is in [`canonical`]; patterns in `pattern`.

mod canonical;
mod pattern;

use std::collections::HashMap;

pub use self::canonical::{MAX_TARGET_LEN, PathError, PathPolicy, canonical, canonicalize};
use self::pattern::{Pattern, Seg, parse_pattern, specificity};

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

/// A compiled table of route patterns, each mapped to a tier index.
#[derive(Clone, Debug)]
pub struct RouteTable {
    /// All-literal patterns, keyed by canonical path: they beat any pattern matching the same path.
    /// Looked up with every request's path (the table never grows after
    /// it is built).
    exact: HashMap<String, usize, foldhash::fast::RandomState>,
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
            exact: HashMap::default(),
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
