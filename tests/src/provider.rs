//! A stand-in LLM provider that answers chat completions like OpenAI's
//! (usage, event streams, `stream_options.include_usage`) and counts its
//! own requests in flight and the tokens it reported
//! (`tests/routers/provider.py`), and the official OpenAI Python SDK driving
//! requests through the agent (`tests/routers/openai_client.py`): the real
//! peers of the suite of unequal requests (`tests/tests/unequal.rs`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use crate::{
    agent::{Process, free_port, listening},
    routers,
};

/// Starts the provider on a free port; `delay_ms` between stream events.
#[must_use]
pub fn start(delay_ms: u64) -> Process {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut command = Command::new(routers::python());
    command
        .arg(routers::dir().join("provider.py"))
        .arg(port.to_string())
        .args(["--delay-ms", &delay_ms.to_string()]);
    Process::spawn_with_probe(command, addr, "the LLM provider", |addr| {
        listening(addr, Duration::from_millis(200))
    })
}

/// What the provider counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Chat requests in flight now, and the most at once.
    pub open: u64,
    pub peak: u64,
    /// Chat requests served.
    pub requests: u64,
    /// `total_tokens` of every usage it reported (sent to the client or not).
    pub tokens: u64,
}

fn call(provider: &Process, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(provider.addr).expect("connect to the provider");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(request).expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
}

/// The provider's counts, asked directly.
#[must_use]
pub fn stats(provider: &Process) -> Stats {
    let answer = call(
        provider,
        b"GET /__stats HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n",
    );
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    let stats: serde_json::Value = serde_json::from_str(body).expect("JSON stats");
    let field = |name: &str| {
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {body}"))
    };
    Stats {
        open: field("open"),
        peak: field("peak"),
        requests: field("requests"),
        tokens: field("tokens"),
    }
}

/// Zeroes the peak, request and token counts.
pub fn reset(provider: &Process) {
    let answer = call(
        provider,
        b"POST /__reset HTTP/1.1\r\nhost: p\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Runs `openai_client.py` against `base_url` (`http://agent/api/v1`) in
/// `mode`; its one line of JSON.
#[must_use]
pub fn sdk(base_url: &str, mode: &str) -> serde_json::Value {
    let output = Command::new(routers::python())
        .arg(routers::dir().join("openai_client.py"))
        .args([base_url, mode])
        .output()
        .expect("running the OpenAI SDK client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK client failed ({mode}): {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
