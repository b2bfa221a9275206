//! Real routers nobody here wrote, as upstreams for the path-spelling
//! differential suite (`tests/tests/paths.rs`): Express 5, Starlette (under
//! uvicorn), Flask (its Werkzeug server) and nginx, each with one handler per
//! reference tier that answers `route=<tier>` (`tests/routers/`). `cargo xtask
//! setup` installs them; a missing one is a panic that says so, never a skip.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::agent::{Process, free_port};

/// The router apps, their `package.json`, `requirements.txt` and what setup installs.
#[must_use]
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("routers")
}

/// The venv's Python, with every package of `requirements.txt` (`cargo
/// xtask setup` installs them); a panic that says so when it is missing.
#[must_use]
pub fn python() -> PathBuf {
    let python = dir().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup`",
        python.display()
    );
    python
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Router {
    Express,
    Starlette,
    Flask,
    Nginx,
}

impl Router {
    pub const ALL: [Router; 4] = [
        Router::Express,
        Router::Starlette,
        Router::Flask,
        Router::Nginx,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Router::Express => "express",
            Router::Starlette => "starlette",
            Router::Flask => "flask",
            Router::Nginx => "nginx",
        }
    }

    /// Starts the router on a free port of 127.0.0.1 and waits until it listens.
    #[must_use]
    pub fn start(self) -> Process {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let dir = dir();
        let setup = "run `cargo xtask setup` to install the routers of the path suite";
        let command = match self {
            Router::Express => {
                let express = dir.join("node_modules/express/package.json");
                assert!(
                    express.is_file(),
                    "{} is missing: {setup}",
                    express.display()
                );
                let mut command = Command::new("node");
                command.arg(dir.join("express.js")).arg(port.to_string());
                command
            }
            Router::Starlette | Router::Flask => {
                let python = dir.join(".venv/bin/python");
                assert!(python.is_file(), "{} is missing: {setup}", python.display());
                let app = match self {
                    Router::Starlette => "starlette_app.py",
                    _ => "flask_app.py",
                };
                let mut command = Command::new(python);
                command.arg(dir.join(app)).arg(port.to_string());
                command
            }
            Router::Nginx => nginx_command(port, setup),
        };
        Process::spawn_with_probe(command, addr, self.name(), serves_health)
    }
}

/// Whether the router at `addr` answers `GET /api/health` with its own
/// `route=health`: ready means the app serves, not merely that a port accepts
/// (a bare connect can reach another process on a reused port, or the probe's
/// own socket, see [`crate::agent::listening`]).
fn serves_health(addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(500);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let mut answer = Vec::new();
    stream.set_read_timeout(Some(timeout)).is_ok()
        && stream
            .write_all(b"GET /api/health HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
            .is_ok()
        && stream.read_to_end(&mut answer).is_ok()
        && answer.starts_with(b"HTTP/1.")
        && answer.windows(5).any(|w| w == b" 200 ")
        && answer.ends_with(b"route=health\n")
}

/// nginx in the foreground, one process, everything it writes in a fresh temporary directory.
fn nginx_command(port: u16, setup: &str) -> Command {
    let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("nginx is not installed: {setup}"));
    let temp = std::env::temp_dir().join(format!("limiter-nginx-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&temp).expect("nginx temp dir");
    let template =
        std::fs::read_to_string(dir().join("nginx.conf")).expect("tests/routers/nginx.conf");
    let config = template
        .replace("@PORT@", &port.to_string())
        .replace("@DIR@", temp.to_str().expect("UTF-8 temp dir"));
    let path = temp.join("nginx.conf");
    std::fs::write(&path, config).expect("writing nginx.conf");
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(&temp)
        .arg("-e")
        .arg(temp.join("error.log"))
        .arg("-c")
        .arg(&path);
    command
}
