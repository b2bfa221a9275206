//! The front end's reading of a request head against hyper's, on the same
//! bytes: the same accept or refuse decision, and for a head both accept,
//! the same method, target, version, fields and body framing. Refusals by
//! the front end's stricter rules (`Refused::stricter_than_hyper`) are the
//! one allowed difference. hyper runs its real HTTP/1 server over an
//! in-memory pipe.
#![no_main]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{body::Body as _, server::conn::http1, service::service_fn};
use libfuzzer_sys::fuzz_target;
use limiter_agent::{
    front::{self, Read, Refusal},
    smuggling::Framing,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What hyper made of the first request.
#[derive(Debug)]
struct Seen {
    method: String,
    target: String,
    http10: bool,
    fields: Vec<(String, Vec<u8>)>,
    /// The body's length when known, `None` for chunked.
    length: Option<u64>,
}

/// hyper's reading of `bytes`: the request it handed to the service, and
/// the status line it answered.
fn hyper_reads(bytes: &[u8]) -> (Option<Seen>, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
        let record = seen.clone();
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut slot = record.lock().unwrap();
            if slot.is_none() {
                *slot = Some(Seen {
                    method: req.method().to_string(),
                    target: req.uri().to_string(),
                    http10: req.version() == hyper::Version::HTTP_10,
                    fields: req
                        .headers()
                        .iter()
                        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                        .collect(),
                    length: req.body().size_hint().exact(),
                });
            }
            async { Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new())) }
        });
        let serving = tokio::spawn(
            http1::Builder::new()
                .max_buf_size(8192)
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        let (mut read, mut write) = tokio::io::split(client);
        let _ = write.write_all(bytes).await;
        let _ = write.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read.read_to_end(&mut answer),
        )
        .await;
        serving.abort();
        let seen = seen.lock().unwrap().take();
        (seen, answer)
    })
}

fuzz_target!(|bytes: &[u8]| {
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; front::MAX_HEADERS];
    let ours = front::read_head(bytes, true, 8192, &mut fields);
    let (seen, answer) = hyper_reads(bytes);
    match ours {
        Read::Partial => {}
        Read::Refused(Refusal::Framing(refused)) if refused.stricter_than_hyper() => {}
        // Refused by both: hyper handed nothing to the service (its answer,
        // a 4xx or a close without a word, is its own).
        Read::Refused(refusal) => assert!(
            seen.is_none(),
            "refused here ({refusal:?}), hyper read {seen:?} and answered {:?}",
            String::from_utf8_lossy(&answer)
        ),
        // The HTTP/2 preface: hyper's HTTP/2 side, not compared here.
        Read::Handoff(None) => {}
        // hyper serves what is handed to it, and its answer stands
        // (refusals included); what it accepts, it frames as read here.
        Read::Handoff(framing) => {
            if let Some(seen) = seen {
                match framing {
                    Some(Framing::Length(n)) => assert_eq!(seen.length, Some(n)),
                    Some(Framing::Chunked) => assert_eq!(seen.length, None),
                    Some(Framing::None) => assert_eq!(seen.length, Some(0)),
                    None => unreachable!(),
                }
            }
        }
        Read::Serve(parsed) => {
            let seen = seen.unwrap_or_else(|| {
                panic!(
                    "served here, hyper refused it: {:?}",
                    String::from_utf8_lossy(&answer)
                )
            });
            assert_eq!(parsed.method, seen.method);
            assert_eq!(parsed.target, seen.target);
            assert_eq!(parsed.http10, seen.http10);
            assert_eq!(seen.length, Some(0), "a body hyper would read");
            // hyper's map keeps a name's lines together, names in the order
            // they first came.
            let mut ours: Vec<(String, Vec<u8>)> = Vec::new();
            for field in parsed.fields {
                let name = field.name.to_ascii_lowercase();
                // hyper keeps one `Content-Length` of equal repeats (the
                // front end forwards none: it writes the framing itself).
                if name == "content-length" && ours.iter().any(|(n, _)| *n == name) {
                    continue;
                }
                let at = ours
                    .iter()
                    .rposition(|(n, _)| *n == name)
                    .map_or(ours.len(), |i| i + 1);
                ours.insert(at, (name, field.value.to_vec()));
            }
            assert_eq!(ours, seen.fields);
        }
    }
});
