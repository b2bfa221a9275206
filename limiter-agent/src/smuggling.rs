//! The framing rules of a request head, in one place: how its body is
//! delimited, or why the request is refused. Every rule hyper's parser
//! applies is here (the HTTP/1 front end must accept and refuse what hyper
//! does, so a request it hands over mid-connection is read the same way),
//! and a few stricter ones that cost nothing. Both readers apply the whole
//! set: the front end as it reads a head, `Proxy::handle` on what hyper
//! parsed (TLS, HTTP/2, a connection handed to hyper), so no head passes
//! one that the other refuses.
//!
//! - `Content-Length`: digits only (no list, as hyper's server reads it), no
//!   sign, no overflow; lines that differ are refused.
//! - `Transfer-Encoding`: only `chunked`, and last; never with
//!   `Content-Length` (RFC 9112 §6.1 lets a server refuse what smuggling
//!   is made of); never in HTTP/1.0, which has no chunked coding.
//! - Stricter than hyper: a second `Host`; framing field names spelled
//!   with `_` (`Content_Length`, which some servers read as the real one);
//!   a transfer coding beside `chunked`; both framings at once (hyper drops
//!   the length); and more than [`MAX_CONNECTION_OPTIONS`] options in
//!   `Connection`, each of which names a field to strip.

use crate::fields::Fields;

/// Most options `Connection` may list: each names a field to strip from the
/// request, looked for in every field.
pub const MAX_CONNECTION_OPTIONS: usize = 32;

/// The largest length hyper reads (`u64::MAX - 2`: two values mean
/// "chunked" and "close-delimited" in its decoder).
const MAX_LENGTH: u64 = u64::MAX - 2;

/// How a request's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: no framing field at all.
    None,
    /// `Content-Length` (0 included).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Why a head's framing is refused (all answered 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("invalid Content-Length")]
    BadLength,
    #[error("Content-Length lines differ")]
    DifferingLengths,
    #[error("unsupported Transfer-Encoding")]
    BadCoding,
    #[error("Transfer-Encoding in HTTP/1.0")]
    CodingInHttp10,
    /// Stricter than hyper (which drops the length).
    #[error("Content-Length and Transfer-Encoding together are ambiguous.")]
    BothFramings,
    /// Stricter than hyper.
    #[error("too many Connection options")]
    ConnectionOptions,
    /// Stricter than hyper: a coding beside `chunked`, or a second line.
    #[error("a transfer coding other than chunked alone")]
    ExtraCoding,
    /// Stricter than hyper.
    #[error("more than one Host")]
    TwoHosts,
    /// Stricter than hyper.
    #[error("a framing field name spelled with an underscore")]
    Underscore,
}

impl Refused {
    /// Refused by a rule hyper does not have (the differential fuzz target
    /// expects hyper to accept these).
    #[must_use]
    pub fn stricter_than_hyper(self) -> bool {
        matches!(
            self,
            Self::TwoHosts
                | Self::Underscore
                | Self::ExtraCoding
                | Self::BothFramings
                | Self::ConnectionOptions
        )
    }
}

/// The framing of a request with these fields; `http10` for an HTTP/1.0
/// request line.
///
/// # Errors
/// [`Refused`] when the framing is ambiguous or malformed.
pub fn framing<F: Fields + ?Sized>(http10: bool, fields: &F) -> Result<Framing, Refused> {
    let mut length: Option<u64> = None;
    // A length's fault is told only without a coding: with one, the
    // request is refused for carrying both, whatever the length says.
    let mut length_fault: Option<Refused> = None;
    let mut chunked = false;
    let mut coded = false;
    let mut host = false;
    let mut options = 0;
    for (name, value) in fields.each() {
        let name = name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match parse_length(value) {
                None => length_fault = length_fault.or(Some(Refused::BadLength)),
                Some(value) if length.is_some_and(|seen| seen != value) => {
                    length_fault = length_fault.or(Some(Refused::DifferingLengths));
                }
                Some(value) => length = Some(value),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if http10 {
                return Err(Refused::CodingInHttp10);
            }
            // `chunked` last, as hyper reads it (the last item of the last
            // line); alone, stricter: a body in another coding too is not
            // one the agent forwards.
            if coded {
                return Err(Refused::ExtraCoding);
            }
            coded = true;
            let mut codings = value.split(|b| *b == b',').map(<[u8]>::trim_ascii);
            chunked = codings
                .next_back()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            if chunked && codings.next().is_some() {
                return Err(Refused::ExtraCoding);
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            if host {
                return Err(Refused::TwoHosts);
            }
            host = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            options += value.split(|b| *b == b',').count();
            if options > MAX_CONNECTION_OPTIONS {
                return Err(Refused::ConnectionOptions);
            }
        } else if name.contains(&b'_') && underscored_framing(name) {
            return Err(Refused::Underscore);
        }
    }
    if coded && (length.is_some() || length_fault.is_some()) {
        return Err(Refused::BothFramings);
    }
    if let Some(fault) = length_fault {
        return Err(fault);
    }
    match (length, coded) {
        (Some(_), true) => Err(Refused::BothFramings),
        (None, true) if chunked => Ok(Framing::Chunked),
        (None, true) => Err(Refused::BadCoding),
        (Some(n), false) => Ok(Framing::Length(n)),
        (None, false) => Ok(Framing::None),
    }
}

/// A `Content-Length` value: digits only (no sign, no list: hyper's server
/// reads one number per line), at most [`MAX_LENGTH`]; `None` for anything
/// else.
fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .filter(|n| *n <= MAX_LENGTH)
}

/// `Content_Length` or `Transfer_Encoding` in any case.
fn underscored_framing(name: &[u8]) -> bool {
    let same = |want: &[u8]| {
        name.len() == want.len()
            && name
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_ascii_lowercase() == *b || (*a == b'_' && *b == b'-'))
    };
    same(b"content-length") || same(b"transfer-encoding")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::Raw;

    fn fields<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<httparse::Header<'a>> {
        pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    type Case<'a> = (&'a [(&'a str, &'a str)], Result<Framing, Refused>);

    fn framed(pairs: &[(&str, &str)]) -> Result<Framing, Refused> {
        framing(false, &Raw(&fields(pairs)))
    }

    #[test]
    fn lengths_are_digits_and_agree() {
        let table: &[Case<'_>] = &[
            (&[], Ok(Framing::None)),
            (&[("content-length", "0")], Ok(Framing::Length(0))),
            (&[("Content-Length", " 42 ")], Ok(Framing::Length(42))),
            (&[("content-length", "5, 5")], Err(Refused::BadLength)),
            (&[("content-length", "000,0")], Err(Refused::BadLength)),
            (
                &[("content-length", "5"), ("content-length", "5")],
                Ok(Framing::Length(5)),
            ),
            (
                &[("content-length", "5"), ("content-length", "6")],
                Err(Refused::DifferingLengths),
            ),
            (&[("content-length", "5, 6")], Err(Refused::BadLength)),
            (&[("content-length", "-1")], Err(Refused::BadLength)),
            (&[("content-length", "+1")], Err(Refused::BadLength)),
            (&[("content-length", "abc")], Err(Refused::BadLength)),
            (&[("content-length", "")], Err(Refused::BadLength)),
            (&[("content-length", "0x10")], Err(Refused::BadLength)),
            (&[("content-length", "1 2")], Err(Refused::BadLength)),
            (
                &[("content-length", "99999999999999999999")],
                Err(Refused::BadLength),
            ),
            (
                &[("content-length", "18446744073709551613")],
                Ok(Framing::Length(u64::MAX - 2)),
            ),
            (
                &[("content-length", "18446744073709551614")],
                Err(Refused::BadLength),
            ),
        ];
        for (pairs, expected) in table {
            assert_eq!(framed(pairs), *expected, "{pairs:?}");
        }
    }

    #[test]
    fn codings_are_chunked_last_alone_and_never_in_http_1_0() {
        let table: &[Case<'_>] = &[
            (&[("transfer-encoding", "chunked")], Ok(Framing::Chunked)),
            (&[("Transfer-Encoding", "CHUNKED")], Ok(Framing::Chunked)),
            (&[("transfer-encoding", "gzip")], Err(Refused::BadCoding)),
            (
                &[("transfer-encoding", "gzip, chunked")],
                Err(Refused::ExtraCoding),
            ),
            (
                &[("transfer-encoding", "chunked, gzip")],
                Err(Refused::BadCoding),
            ),
            (
                &[("transfer-encoding", "chunked, chunked")],
                Err(Refused::ExtraCoding),
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                Err(Refused::ExtraCoding),
            ),
            (
                &[("transfer-encoding", "xchunked")],
                Err(Refused::BadCoding),
            ),
            (&[("transfer-encoding", "")], Err(Refused::BadCoding)),
            (
                &[("transfer-encoding", "chunked,")],
                Err(Refused::BadCoding),
            ),
            (
                &[("transfer-encoding", ", chunked")],
                Err(Refused::ExtraCoding),
            ),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "4")],
                Err(Refused::BothFramings),
            ),
            (
                &[("content-length", "0"), ("transfer-encoding", "chunked")],
                Err(Refused::BothFramings),
            ),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "x")],
                Err(Refused::BothFramings),
            ),
        ];
        for (pairs, expected) in table {
            assert_eq!(framed(pairs), *expected, "{pairs:?}");
        }
        assert_eq!(
            framing(true, &Raw(&fields(&[("transfer-encoding", "chunked")]))),
            Err(Refused::CodingInHttp10)
        );
        assert_eq!(
            framing(true, &Raw(&fields(&[("content-length", "3")]))),
            Ok(Framing::Length(3))
        );
    }

    #[test]
    fn stricter_than_hyper_where_it_is_cheap() {
        assert_eq!(
            framed(&[("host", "a"), ("Host", "a")]),
            Err(Refused::TwoHosts)
        );
        assert_eq!(framed(&[("content_length", "5")]), Err(Refused::Underscore));
        assert_eq!(
            framed(&[("Transfer_Encoding", "chunked")]),
            Err(Refused::Underscore)
        );
        assert_eq!(framed(&[("x_api_key", "k")]), Ok(Framing::None));
        let options = vec!["a"; MAX_CONNECTION_OPTIONS].join(",");
        assert_eq!(framed(&[("connection", &options)]), Ok(Framing::None));
        let options = format!("{options},b");
        assert_eq!(
            framed(&[("connection", &options)]),
            Err(Refused::ConnectionOptions)
        );
        assert!(Refused::TwoHosts.stricter_than_hyper());
        assert!(!Refused::BadLength.stricter_than_hyper());
    }
}
