//! A request's header fields as the decision core reads them, whoever parsed
//! them: hyper's `HeaderMap`, or the HTTP/1 front end's fields borrowed
//! from its read buffer. Every rule that reads a header (identity, bans,
//! framing) is written once, against [`Fields`].

use http::{HeaderMap, HeaderName};

/// Header fields to read by name.
pub trait Fields {
    /// Every value of the field `name`, in the order they came.
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]>;

    /// Every field, name (as it came) and value, in the order they came
    /// (hyper's `HeaderMap` keeps a name's lines together).
    fn each(&self) -> impl Iterator<Item = (&str, &[u8])>;

    /// Whether the field `name` is present at all.
    fn has(&self, name: &HeaderName) -> bool {
        self.values(name).next().is_some()
    }
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        self.get_all(name).iter().map(http::HeaderValue::as_bytes)
    }

    fn each(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
    }

    fn has(&self, name: &HeaderName) -> bool {
        self.contains_key(name)
    }
}

/// Fields parsed by `httparse`, borrowed from the buffer they were read into.
/// Names compare without regard to case, as HTTP's do.
#[derive(Clone, Copy)]
pub struct Raw<'h, 'b>(pub &'h [httparse::Header<'b>]);

impl Fields for Raw<'_, '_> {
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        let name = name.as_str();
        self.0
            .iter()
            .filter(move |field| field.name.eq_ignore_ascii_case(name))
            .map(|field| field.value)
    }

    fn each(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|field| (field.name, field.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_read_the_same_values_in_order() {
        let raw = [
            httparse::Header {
                name: "X-Api-Key",
                value: b"a",
            },
            httparse::Header {
                name: "accept",
                value: b"*/*",
            },
            httparse::Header {
                name: "x-api-key",
                value: b"b",
            },
        ];
        let mut map = HeaderMap::new();
        for field in &raw {
            map.append(
                HeaderName::from_bytes(field.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(field.value).unwrap(),
            );
        }
        let name = HeaderName::from_static("x-api-key");
        let raw = Raw(&raw);
        let want: [&[u8]; 2] = [b"a", b"b"];
        assert_eq!(raw.values(&name).collect::<Vec<_>>(), want);
        assert_eq!(Fields::values(&map, &name).collect::<Vec<_>>(), want);
        assert!(raw.has(&http::header::ACCEPT) && map.has(&http::header::ACCEPT));
        assert!(!raw.has(&http::header::HOST) && !map.has(&http::header::HOST));
    }
}
