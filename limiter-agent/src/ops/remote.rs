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
        let mut stream =
            TcpStream::connect_timeout(&self.admin, Duration::from_secs(5)).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(unreachable)?;
        let body = body.map(ToString::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.admin,
            self.token,
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(unreachable)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map_err(unreachable)?;
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

/// A network as a path segment (`/` as `%2F`).
#[must_use]
pub fn net_segment(net: &str) -> String {
    net.replace('/', "%2F")
}
