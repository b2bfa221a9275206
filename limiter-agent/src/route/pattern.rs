//! Route patterns: their segments, how specific each is, and what they match.

use std::cmp::Ordering;

use super::{PathPolicy, RouteError, canonicalize};

/// One pattern segment. `Param` carries no name so that equal shapes compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Seg {
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
pub(super) struct Pattern {
    pub(super) segs: Vec<Seg>,
    pub(super) tier: usize,
}

impl Pattern {
    pub(super) fn matches(&self, path: &str) -> bool {
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
pub(super) fn specificity(a: &[Seg], b: &[Seg]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.rank().cmp(&y.rank()))
        .find(|o| o.is_ne())
        .unwrap_or_else(|| b.len().cmp(&a.len()))
}

/// Validates a pattern and returns its canonical form and segments.
pub(super) fn parse_pattern(
    pattern: &str,
    policy: PathPolicy,
) -> Result<(String, Vec<Seg>), RouteError> {
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
