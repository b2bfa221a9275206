//! An upstream of large answers that counts its own connections
//! (`tests/routers/bulk_upstream.py`), and the HTTP/2 client that shuts its
//! flow-control window (`tests/routers/h2_zero_window.py`): the real peers of
//! the suite of what a client can hold (`tests/tests/holds.rs`).

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

/// Starts the bulk upstream on a free port.
#[must_use]
pub fn upstream() -> Process {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut command = Command::new(routers::python());
    command
        .arg(routers::dir().join("bulk_upstream.py"))
        .arg(port.to_string());
    Process::spawn_with_probe(command, addr, "the bulk upstream", |addr| {
        listening(addr, Duration::from_millis(200))
    })
}

/// The upstream's own count: connections open now and the most at once.
#[must_use]
pub fn connections(upstream: &Process) -> (u64, u64) {
    let mut stream = TcpStream::connect(upstream.addr).expect("connect to the bulk upstream");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /__stats HTTP/1.1\r\nhost: u\r\nconnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    let stats: serde_json::Value = serde_json::from_str(body).expect("JSON stats");
    // This very request is one of the open connections.
    (
        stats["open"].as_u64().expect("open") - 1,
        stats["peak"].as_u64().expect("peak"),
    )
}

/// What the zero-window client saw.
#[derive(Debug)]
pub struct ZeroWindow {
    /// Response heads by status.
    pub statuses: serde_json::Map<String, serde_json::Value>,
    /// When the agent closed the connection, from the client's first request.
    pub closed_after: Option<Duration>,
}

impl ZeroWindow {
    /// Responses with `status`.
    #[must_use]
    pub fn count(&self, status: u16) -> u64 {
        self.statuses
            .get(&status.to_string())
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    }
}

/// Starts the zero-window client from `source`: `streams` GETs of `path` on
/// one connection to `agent`, held at most `hold`. Wait with [`finish`].
#[must_use]
pub fn zero_window(
    source: std::net::IpAddr,
    agent: SocketAddr,
    streams: u32,
    path: &str,
    hold: Duration,
) -> std::process::Child {
    Command::new(routers::python())
        .arg(routers::dir().join("h2_zero_window.py"))
        .arg(agent.ip().to_string())
        .arg(agent.port().to_string())
        .arg(source.to_string())
        .arg(streams.to_string())
        .arg(path)
        .arg(hold.as_secs_f64().to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the zero-window client")
}

/// Waits for the zero-window client and reads its report.
#[must_use]
pub fn finish(client: std::process::Child) -> ZeroWindow {
    let output = client.wait_with_output().expect("zero-window client");
    assert!(
        output.status.success(),
        "the zero-window client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the client's JSON report");
    ZeroWindow {
        statuses: report["headers"].as_object().cloned().unwrap_or_default(),
        closed_after: report["closed_after"].as_f64().map(Duration::from_secs_f64),
    }
}
