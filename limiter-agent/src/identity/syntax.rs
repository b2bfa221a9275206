//! The grammar of the headers identity is read from: `Authorization: Bearer
//! <token68>`, plain key headers, address lists and RFC 7239 `Forwarded`.
//! Strict on purpose: a value another parser could read differently is
//! refused, never guessed.

use std::net::IpAddr;

use http::{HeaderName, header};

/// The one header a trusted proxy's client address is read from
/// (`[identity] client_ip_header`); every other forwarding header is ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientIpHeader {
    /// A comma-separated list of addresses, appended to by each proxy
    /// (`X-Forwarded-For`, or a header like `X-Real-IP` holding one address).
    List(HeaderName),
    /// RFC 7239 `Forwarded`, its `for=` parameters.
    Forwarded,
}

impl ClientIpHeader {
    /// `forwarded` is RFC 7239; any other header name is an address list.
    #[must_use]
    pub fn new(name: HeaderName) -> Self {
        if name == header::FORWARDED {
            Self::Forwarded
        } else {
            Self::List(name)
        }
    }

    #[must_use]
    pub fn name(&self) -> HeaderName {
        match self {
            Self::List(name) => name.clone(),
            Self::Forwarded => header::FORWARDED,
        }
    }
}

/// An `Authorization` credential.
pub(super) enum Credential<'a> {
    /// `Bearer <token68>`: an API key.
    Bearer(&'a [u8]),
    /// Any other scheme (Basic, Token, ApiKey…): not a key we count, but a
    /// credential the upstream may authenticate.
    Other,
}

/// Parses an `Authorization` value: `Bearer <token68>` (scheme in any case,
/// exactly one space) is a key; another scheme is [`Credential::Other`]; empty
/// is nothing. A Bearer credential that is not exactly that (a tab, two
/// spaces, two tokens) is malformed, since an upstream that splits it
/// differently would authenticate a key other than the one counted.
pub(super) fn authorization(value: &[u8]) -> Result<Option<Credential<'_>>, ()> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Ok(None);
    }
    let scheme_end = value
        .iter()
        .position(u8::is_ascii_whitespace)
        .unwrap_or(value.len());
    if !value[..scheme_end].eq_ignore_ascii_case(b"bearer") {
        return Ok(Some(Credential::Other));
    }
    let token = value
        .get(scheme_end..)
        .and_then(|rest| rest.strip_prefix(b" "))
        .ok_or(())?;
    is_token68(token)
        .then_some(Some(Credential::Bearer(token)))
        .ok_or(())
}

/// RFC 9110 token68: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(token: &[u8]) -> bool {
    let body = token.len() - token.iter().rev().take_while(|b| **b == b'=').count();
    body > 0
        && token[..body]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b))
}

/// A key header other than `Authorization`: one token of visible ASCII without
/// commas (a list would be read differently by different upstreams). Empty is
/// no key.
pub(super) fn plain_key(value: &[u8]) -> Result<Option<&[u8]>, ()> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Ok(None);
    }
    value
        .iter()
        .all(|b| b.is_ascii_graphic() && *b != b',')
        .then_some(Some(value))
        .ok_or(())
}

/// One hop of an address list: an address, optionally bracketed and with a port.
pub(super) fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim().trim_matches('"');
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

/// The `for=` address of one `Forwarded` element (RFC 7239). Obfuscated
/// identifiers, `unknown` and elements without `for=` are `None`.
pub(super) fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    element.split(|b| *b == b';').find_map(|pair| {
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (name, value) = (pair[..eq].trim_ascii(), &pair[eq + 1..]);
        if name.eq_ignore_ascii_case(b"for") {
            parse_hop(value)
        } else {
            None
        }
    })
}
