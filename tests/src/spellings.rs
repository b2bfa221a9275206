//! Spellings of the reference tiers' paths for the differential suite
//! (`tests/tests/paths.rs`): case, repeated and trailing slashes, empty
//! wildcard remainders, dot and encoded-dot segments, `;` parameters, encoded
//! whitespace and NUL, percent-encoded letters in both cases, double encoding,
//! backslashes and encoded separators, queries, fragments, absolute-form, and
//! `..` walks from one tier into another. Hundreds per tier, each the bytes of
//! a request-target to send as is.

use std::collections::BTreeSet;

/// The reference tier table (`examples/concurred.toml`): a short name (what the
/// routers in `tests/routers/` answer) and the route.
pub const TIERS: [(&str, &str); 8] = [
    ("health", "/api/health"),
    ("completions", "/api/v1/chat/completions"),
    ("media", "/api/v1/media/*"),
    ("vision", "/api/v1/vision"),
    ("run", "/api/v1/fashion/run"),
    ("subscribe", "/api/v1/fashion/subscribe"),
    ("status", "/api/v1/fashion/status/:id"),
    ("chat", "/api/chat"),
];

/// Plain paths of each tier (index into [`TIERS`]) that every spelling starts from.
pub const BASES: &[(usize, &str)] = &[
    (0, "/api/health"),
    (1, "/api/v1/chat/completions"),
    (2, "/api/v1/media/x"),
    (2, "/api/v1/media/a/b.png"),
    (3, "/api/v1/vision"),
    (4, "/api/v1/fashion/run"),
    (5, "/api/v1/fashion/subscribe"),
    (6, "/api/v1/fashion/status/1"),
    (6, "/api/v1/fashion/status/abc"),
    (7, "/api/chat"),
];

/// One request-target and the tier whose path it was derived from (which is
/// not necessarily where a router sends it: that is what the suite finds out).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Spelling {
    pub from_tier: usize,
    pub target: String,
}

/// Rewrites of one segment.
const SEGMENT: &[fn(&str) -> String] = &[
    |s| s.to_ascii_uppercase(),
    |s| capitalised(s),
    |s| encode_at(s, 0, true),
    |s| encode_at(s, 0, false),
    |s| encode_at(s, s.len() - 1, false),
    |s| (0..s.len()).fold(s.to_owned(), |out, i| encode_at(&out, 3 * i, true)),
    |s| format!("%25{:02X}{}", s.as_bytes()[0], &s[1..]),
    |s| format!("%2525{:02x}{}", s.as_bytes()[0], &s[1..]),
    |s| format!("{s};"),
    |s| format!("{s};x=1"),
    |s| format!(";{s}"),
    |s| format!("{s}%3b"),
    |s| format!("{s}."),
    |s| format!("{s}.."),
    |s| format!("{s}%2e"),
    |s| format!("{s}%2E"),
    |s| format!("{s}%20"),
    |s| format!("%20{s}"),
    |s| format!("{s}%09"),
    |s| format!("{s}%00"),
    |s| format!("{s}%0a"),
    |s| format!("{s}%0D"),
    |s| format!("{s}+"),
    |s| format!("{s}%c2%a0"),
    |s| format!("{s}%C4%B1"),
    |s| format!("{s}~"),
    |s| format!("{s}%7e"),
    |s| format!("{s}::$DATA"),
    |s| format!("./{s}"),
    |s| format!("%2e/{s}"),
    |s| format!("%2E/{s}"),
    |s| format!("{s}/."),
    |s| format!("x/../{s}"),
    |s| format!("x/%2e%2e/{s}"),
    |s| format!("x/%2E%2e/{s}"),
    |s| format!("x/.%2e/{s}"),
    |s| format!("x/..;/{s}"),
    |s| format!("x/..;x/{s}"),
    |s| format!("x/..%00/{s}"),
    |s| format!("x/..%20/{s}"),
    |s| format!("x/.../{s}"),
    |s| format!("x/%252e%252e/{s}"),
    |s| format!("x/%c0%ae%c0%ae/{s}"),
    |s| format!("x%2f..%2f{s}"),
    |s| format!("{s}/x/.."),
    |s| format!("{s}/x/%2e%2e"),
];

/// Rewrites of the `/` before a segment.
const SEPARATOR: &[&str] = &[
    "//", "///", "\\", "/\\", "%2f", "%2F", "%5c", "%5C", "/./", "/%2e/", "\\.\\", "/;/", "/%20/",
];

/// Additions after the whole path.
const SUFFIX: &[&str] = &[
    "/",
    "//",
    "/.",
    "/..",
    "/./",
    "/%2e",
    "/%2E%2E",
    "/;",
    "/;x",
    "/%20",
    "/%09",
    "/%00",
    "/x/..",
    "/x/../",
    "?x=1",
    "?",
    "#",
    "#x",
    "?/../../chat",
    "#/../../chat",
    "%3f",
    "%3Fx=1",
    "%23",
    "%23x",
    "\\",
    "/\\",
    ";",
    ";jsessionid=1",
    "%3b",
    "/*",
    "/%2a",
    ".",
    "%2e",
    ".json",
    "%20",
    "%00",
    "/?",
    "/#",
    "/?x",
];

/// What stands in for a `:id` or a `*` remainder (the last segment of a
/// status or media base).
const VALUE: &[&str] = &[
    "",
    ".",
    "..",
    "...",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2E",
    "%2e.",
    "..;",
    ";",
    ";x",
    ";1",
    "%3b",
    "%20",
    "%20%20",
    ".%20",
    "%20.",
    "%09",
    "%00",
    "%0a",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "x\\y",
    "%3f",
    "%23",
    "?",
    "#",
    "~",
    "%7e",
    "x.",
    "+",
    "*",
    ":",
    "@",
    "!",
    "$",
    "&",
    "'",
    "(",
    ")",
    ",",
    "=",
    "-",
    "_",
    "%25",
    "%252e",
    "%252e%252e",
    "%c0%ae",
    "%c3%a9",
    "%ff",
    "x//y",
    "x/./y",
    "x/../y",
    "x/..",
    "x/.",
    "x/",
    "/",
    "//",
    "1/",
    "1/.",
    "1/..",
    "1;x",
    "1%20",
    "%201",
    "1.",
];

/// Every spelling, deduplicated (each spelling once, attributed to the first
/// tier that produced it).
#[must_use]
pub fn all() -> Vec<Spelling> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |from_tier: usize, target: String| {
        if seen.insert(target.clone()) {
            out.push(Spelling { from_tier, target });
        }
    };
    for &(tier, path) in BASES {
        let segs: Vec<&str> = path[1..].split('/').collect();
        add(tier, path.to_owned());
        add(tier, path.to_ascii_uppercase());
        add(tier, format!("{}/", path.to_ascii_uppercase()));
        add(tier, path.replace('/', "\\"));
        add(tier, path.replace('/', "//"));
        add(tier, path.replace('/', "%2f"));
        for prefix in [
            "//",
            "/./",
            "/../",
            "/%2e%2e/",
            "/x/../",
            "/%2e/",
            "\\",
            "http://127.0.0.1/",
            "http://127.0.0.1:80/",
            "HTTP://X/",
            "https://x/",
        ] {
            add(tier, format!("{prefix}{}", &path[1..]));
        }
        for i in 0..segs.len() {
            for rewrite in SEGMENT {
                let mut s = segs.clone();
                let new = rewrite(s[i]);
                s[i] = &new;
                add(tier, format!("/{}", s.join("/")));
            }
            for sep in SEPARATOR {
                let (before, after) = segs.split_at(i);
                let head = if before.is_empty() {
                    String::new()
                } else {
                    format!("/{}", before.join("/"))
                };
                add(tier, format!("{head}{sep}{}", after.join("/")));
            }
        }
        for suffix in SUFFIX {
            add(tier, format!("{path}{suffix}"));
            add(tier, format!("{}{suffix}", path.to_ascii_uppercase()));
        }
        // The wildcard remainder and the parameter's value.
        if matches!(TIERS[tier].0, "media" | "status") {
            let dir = &path[..path.rfind('/').expect("a segment")];
            for value in VALUE {
                add(tier, format!("{dir}/{value}"));
                add(tier, format!("{dir}/{value}/"));
                add(tier, format!("{dir}/x/{value}"));
                add(tier, format!("{dir}//{value}"));
            }
        }
        // Walks from this tier's path into every other tier's.
        for &(other, other_path) in BASES {
            if other == tier {
                continue;
            }
            for up in ["..", "%2e%2e", "%2E.", "..;", ".%2e;x"] {
                for depth in 1..=segs.len() {
                    let walk = format!("{up}/").repeat(depth);
                    add(tier, format!("{path}/{walk}{}", &other_path[1..]));
                }
            }
        }
    }
    out
}

fn capitalised(s: &str) -> String {
    let mut out = s.to_owned();
    out[..1].make_ascii_uppercase();
    out
}

/// `s` with the byte at `at` percent-encoded, in upper- or lowercase hex.
fn encode_at(s: &str, at: usize, upper: bool) -> String {
    let b = s.as_bytes()[at];
    let escape = if upper {
        format!("%{b:02X}")
    } else {
        format!("%{b:02x}")
    };
    format!("{}{escape}{}", &s[..at], &s[at + 1..])
}
