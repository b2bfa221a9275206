//! A plain TCP upstream that answers each request with bytes a test chooses,
//! so answers can be what real servers send and what broken ones do, and
//! counts the connections it accepts.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// A request as the upstream read it.
pub struct Asked {
    /// As sent (`GET`).
    pub method: String,
    pub target: String,
    /// The whole head, lowercased, for looking up fields.
    pub head: String,
    /// Read by its `Content-Length`.
    pub body: Vec<u8>,
}

impl Asked {
    /// The first `name` field's value (`name` lowercase).
    #[must_use]
    pub fn field(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::trim)
        })
    }
}

/// What the upstream does after writing an answer.
#[derive(Clone, Copy, Debug)]
pub enum After {
    KeepOpen,
    Close,
    /// Keeps the connection open this long without reading, then closes it
    /// (an idle timeout).
    CloseIn(Duration),
    /// Writes these bytes this long after the answer, unasked (a body a
    /// broken server sends late), then serves the connection on.
    LateWrite(Duration, &'static [u8]),
}

/// Starts the upstream; `answer` is called for each request. Its address,
/// and the connections it accepted so far.
pub fn upstream(
    answer: impl Fn(&Asked) -> (Vec<u8>, After) + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            std::thread::spawn(move || {
                while let Some(asked) = read_request(&mut stream) {
                    let (bytes, after) = answer(&asked);
                    if stream.write_all(&bytes).is_err() {
                        return;
                    }
                    match after {
                        After::KeepOpen => {}
                        After::Close => return,
                        After::CloseIn(wait) => {
                            std::thread::sleep(wait);
                            return;
                        }
                        After::LateWrite(wait, bytes) => {
                            std::thread::sleep(wait);
                            if stream.write_all(bytes).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// One request off `stream`, `None` at its close.
fn read_request(stream: &mut std::net::TcpStream) -> Option<Asked> {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let raw = String::from_utf8_lossy(&head).into_owned();
    let mut line = raw.split(' ');
    let method = line.next().unwrap_or("").to_owned();
    let target = line.next().unwrap_or("").to_owned();
    let mut asked = Asked {
        method,
        target,
        head: raw.to_ascii_lowercase(),
        body: Vec::new(),
    };
    let length = asked
        .field("content-length")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    asked.body = vec![0; length];
    stream.read_exact(&mut asked.body).ok()?;
    Some(asked)
}
