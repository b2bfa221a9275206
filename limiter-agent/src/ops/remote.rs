//! `limiter-agent override …`, and `ban`/`unban` given a token: calls to a
//! running agent's admin API (plain HTTP/1.1 on its admin listener, usually
//! loopback), so the change reaches every host sharing its store.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use super::OpsError;

/// Where the admin API is and the token to use.
#[derive(Debug, Clone)]
pub struct ApiTarget {
    pub admin: SocketAddr,
    pub token: String,
    /// Over TLS: the name the certificate must carry and the roots to trust.
    pub tls: Option<(String, PathBuf)>,
}

/// `--admin`: `IP:PORT` (plain HTTP, loopback), or `https://HOST:PORT`.
///
/// # Errors
/// Neither form, or a host that does not resolve.
pub fn admin_address(text: &str) -> Result<(SocketAddr, Option<String>), OpsError> {
    use std::net::ToSocketAddrs as _;
    let bad = || {
        OpsError::Usage(format!(
            "--admin: `{text}` is not IP:PORT or https://HOST:PORT"
        ))
    };
    let Some(rest) = text.strip_prefix("https://") else {
        let addr: SocketAddr = text.parse().map_err(|_| bad())?;
        if !addr.ip().to_canonical().is_loopback() {
            return Err(OpsError::Usage(format!(
                "--admin {text}: off this host, use https://HOST:PORT (the token must not cross the network in clear)"
            )));
        }
        return Ok((addr, None));
    };
    let rest = rest.trim_end_matches('/');
    let addr = rest
        .to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)?;
    let host = rest
        .rsplit_once(':')
        .map_or(rest, |(host, _)| host)
        .trim_matches(['[', ']']);
    Ok((addr, Some(host.to_owned())))
}

impl ApiTarget {
    /// The API at `admin` with the first token of `token_file` (`name:token`
    /// or a bare token per line, as `[admin] token_file` holds them).
    ///
    /// # Errors
    /// The file cannot be read or holds no token.
    pub fn new(admin: SocketAddr, token_file: &Path) -> Result<Self, OpsError> {
        let text = std::fs::read_to_string(token_file)
            .map_err(|e| OpsError::Usage(format!("--token-file {}: {e}", token_file.display())))?;
        let token = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| line.split_once(':').map_or(line, |(_, token)| token))
            .ok_or_else(|| {
                OpsError::Usage(format!(
                    "--token-file {}: no token in it",
                    token_file.display()
                ))
            })?;
        Ok(Self {
            admin,
            token: token.to_owned(),
            tls: None,
        })
    }

    /// `--token-file`, else `$LIMITER_ADMIN_TOKEN_FILE`.
    #[must_use]
    pub fn token_file(given: Option<&Path>) -> Option<PathBuf> {
        given
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("LIMITER_ADMIN_TOKEN_FILE").map(PathBuf::from))
    }

    /// One call: (status, JSON body).
    ///
    /// # Errors
    /// The agent could not be reached or answered something that is not HTTP.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), OpsError> {
        let unreachable =
            |e: std::io::Error| OpsError::Api(format!("admin API at {}: {e}", self.admin));
        let stream =
            TcpStream::connect_timeout(&self.admin, Duration::from_secs(5)).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(unreachable)?;
        let body = body.map(ToString::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.tls
                .as_ref()
                .map_or_else(|| self.admin.to_string(), |(host, _)| host.clone()),
            self.token,
            body.len()
        );
        let mut answer = Vec::new();
        match &self.tls {
            None => {
                let mut stream = stream;
                stream.write_all(request.as_bytes()).map_err(unreachable)?;
                stream.read_to_end(&mut answer).map_err(unreachable)?;
            }
            Some((host, ca_file)) => {
                let mut tls = tls_client(host, ca_file)?;
                let mut stream = stream;
                let mut tls_stream = rustls::Stream::new(&mut tls, &mut stream);
                tls_stream
                    .write_all(request.as_bytes())
                    .map_err(unreachable)?;
                // A peer closing without close_notify still ends the answer.
                if let Err(e) = tls_stream.read_to_end(&mut answer)
                    && answer.is_empty()
                {
                    return Err(unreachable(e));
                }
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| OpsError::Api("the admin API's answer has no head".into()))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| OpsError::Api("the admin API's answer has no status".into()))?;
        let json = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into()));
        Ok((status, json))
    }

    /// A call that must succeed: its JSON, or the API's error message.
    ///
    /// # Errors
    /// The call failed or was refused.
    pub fn expect_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, OpsError> {
        let (status, json) = self.call(method, path, body)?;
        if status == 200 {
            return Ok(json);
        }
        let message = json["error"]["message"]
            .as_str()
            .map_or_else(|| json.to_string(), str::to_owned);
        Err(if status == 400 || status == 404 {
            OpsError::Usage(message)
        } else {
            OpsError::Api(format!("{status}: {message}"))
        })
    }
}

/// A TLS client for `host`, trusting the certificates in `ca_file`.
fn tls_client(host: &str, ca_file: &Path) -> Result<rustls::ClientConnection, OpsError> {
    let usage = |e: String| OpsError::Usage(format!("--ca-file {}: {e}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    let file = std::fs::File::open(ca_file).map_err(|e| usage(e.to_string()))?;
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
        roots
            .add(cert.map_err(|e| usage(e.to_string()))?)
            .map_err(|e| usage(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| OpsError::Api(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| OpsError::Usage(format!("--admin: {host}: {e}")))?;
    rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| OpsError::Api(e.to_string()))
}

/// A network as a path segment (`/` as `%2F`).
#[must_use]
pub fn net_segment(net: &str) -> String {
    net.replace('/', "%2F")
}
