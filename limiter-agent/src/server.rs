//! The listener: accepts connections (plain or TLS), enforces the connection
//! caps (in all and per source), the header and idle timeouts, and hands
//! requests to the [`Proxy`].

mod activity;
mod answer;
mod sources;

use std::{io::Write as _, net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;

use self::{
    activity::{Expiry, Timeouts, Tracker, Watched},
    answer::Tracked,
    sources::{Cap, Caps, Source, Sources},
};
use crate::{
    accept::accept_until,
    answers, front,
    proxy::{Peer, Proxy},
};

/// Longest TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads the certificate chain and key and offers h2 and http/1.1 by ALPN.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    tls_acceptor_with_alpn(cert, key, &[b"h2", b"http/1.1"])
}

/// As [`tls_acceptor`], offering the `alpn` protocols only (the admin
/// listener speaks HTTP/1.1).
///
/// # Errors
/// A file can't be read or holds no usable certificate or key.
pub fn tls_acceptor_with_alpn(
    cert: &std::path::Path,
    key: &std::path::Path,
    alpn: &[&[u8]],
) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificates from {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("reading the key from {}", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Raw response for a connection refused before HTTP starts (over a cap).
fn raw_response(status: &str, code: &str, message: &str) -> Vec<u8> {
    let body = answers::error_body(code, message);
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Accepts connections until `shutdown` completes, then stops accepting, asks
/// every open connection to finish its in-flight requests (HTTP/1 closes after
/// the current response, HTTP/2 sends GOAWAY) and waits up to `drain` for them.
///
/// Connection caps and timeouts are read from the config in force when each
/// connection is accepted, so a reload applies them to new connections; the
/// total cap (`max_connections`) is fixed at start.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()> {
    let (max_connections, max_header_bytes, max_streams) = {
        let state = proxy.state();
        let startup = &state.config.startup;
        (
            startup.max_connections,
            startup.max_header_bytes,
            startup.max_concurrent_streams,
        )
    };
    let slots = Arc::new(Semaphore::new(max_connections));
    let sources = Arc::new(Sources::default());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The header timeout is ours (`activity`): hyper's would also run
        // while a keep-alive connection waits for its next request, and
        // answer 408 to a client that did nothing wrong.
        .header_read_timeout(None)
        .max_buf_size(max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(max_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    // Every connection holds a receiver; the drain waits for the last one.
    let (stop, _) = watch::channel(());
    accept_until(&listener, "proxy", shutdown, |stream, addr| {
        let (source, timeouts) = {
            let state = proxy.state();
            let config = &state.config.live;
            (
                Source::of(
                    addr.ip(),
                    state.identity().is_trusted_peer(addr.ip()),
                    config.ipv6_prefix,
                    Caps {
                        per_source: config.max_connections_per_source,
                        per_proxy: config.max_connections_per_proxy,
                    },
                ),
                Timeouts {
                    header_read: config.header_read_timeout,
                    idle: config.idle_timeout,
                    send: config.send_timeout,
                },
            )
        };
        // The source's own cap first: a source over it is told so even when
        // the total is full too.
        let Some(source_slot) = source.acquire(&sources) else {
            refused(&proxy, stream, source.cap);
            return;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused(&proxy, stream, Cap::Total);
            return;
        };
        let proxy = proxy.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let stop = stop.subscribe();
        tokio::spawn(async move {
            let _slots = (permit, source_slot);
            connection(
                stream,
                addr,
                proxy,
                &builder,
                tls,
                timeouts,
                max_header_bytes,
                stop,
            )
            .await;
        });
    })
    .await;
    drop(listener);
    tracing::info!(deadline = ?drain, "draining open connections");
    stop.send_replace(());
    if tokio::time::timeout(drain, stop.closed()).await.is_err() {
        tracing::warn!("connections still open at the drain deadline; closing them");
    }
    Ok(())
}

/// Counts a connection refused by `cap` and answers it 503 in the background.
fn refused(proxy: &Proxy, mut stream: TcpStream, cap: Cap) {
    use tokio::io::AsyncWriteExt as _;
    proxy.metrics().connection_refused(cap.setting());
    let message = match cap {
        Cap::Total => "Too many connections; try again later.",
        Cap::PerSource | Cap::PerProxy => {
            "Too many connections from this address; try again later."
        }
    };
    let response = raw_response("503 Service Unavailable", "OVERLOADED", message);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&response)).await;
        let _ = stream.shutdown().await;
    });
}

/// How [`drive`] let go of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Closed by either side, or cut after the close grace.
    Closed,
    /// A request's headers (or the first request) did not arrive in time.
    HeaderTimeout,
    /// Cut with an answer unfinished: the client must not take it for whole.
    Cut,
}

#[expect(clippy::too_many_arguments, reason = "a connection's whole setting")]
async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    timeouts: Timeouts,
    max_header_bytes: usize,
    mut stop: watch::Receiver<()>,
) {
    let peer = Peer::new(addr, tls.is_some());
    if let Some(acceptor) = tls {
        let Ok(Ok(stream)) =
            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
        else {
            return;
        };
        // Header timeouts close TLS connections without a 408: the TLS
        // stream is gone with the connection.
        let tracker = Tracker::new(timeouts);
        drive(stream, &tracker, peer, proxy, builder, &mut stop).await;
        return;
    }
    // Plain HTTP/1 is the front end's; what it hands back is hyper's, with
    // the bytes it read first.
    let limits = front::Limits {
        header_read: timeouts.header_read,
        idle: timeouts.idle,
        send: timeouts.send,
        max_head: max_header_bytes,
    };
    let Some((stream, read)) = front::serve(stream, &peer, &proxy, limits, &mut stop).await else {
        return;
    };
    // A second handle on the socket, to answer 408 after the HTTP connection
    // is dropped for a client that never finished its headers.
    let spare = stream
        .into_std()
        .and_then(|std| Ok((std.try_clone()?, std)))
        .and_then(|(spare, std)| Ok((spare, TcpStream::from_std(std)?)));
    let Ok((mut spare, stream)) = spare else {
        return;
    };
    let tracker = Tracker::new(timeouts);
    let stream = front::Rewind::new(stream, read);
    let ended = drive(stream, &tracker, peer, proxy, builder, &mut stop).await;
    if ended == Ended::Cut {
        // A reset, not a FIN: an answer framed by the close (HTTP/1.0, no
        // length) would otherwise look whole.
        let _ = socket2::SockRef::from(&spare).set_linger(Some(Duration::ZERO));
        return;
    }
    if ended == Ended::HeaderTimeout && !tracker.is_h2() {
        let _ = spare.set_nonblocking(false);
        let _ = spare.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = spare.write_all(&raw_response(
            "408 Request Timeout",
            "REQUEST_TIMEOUT",
            "The request headers took too long.",
        ));
        let _ = spare.shutdown(std::net::Shutdown::Both);
    }
}

/// Serves HTTP on `io` until the connection closes, its timer cuts it, or the
/// agent stops. Idle connections and a stopping agent close gracefully (HTTP/2
/// GOAWAY); requests in flight, streams included, are never cut here.
async fn drive<I>(
    io: I,
    tracker: &Arc<Tracker>,
    peer: Peer,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    stop: &mut watch::Receiver<()>,
) -> Ended
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let requests = tracker.clone();
    let addr = peer.addr;
    let metrics = proxy.metrics().clone();
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = requests.request();
        let proxy = proxy.clone();
        let peer = peer.clone();
        async move {
            let (response, holds) = proxy.handle(req, &peer).await;
            Ok::<_, std::convert::Infallible>(
                response.map(|body| Tracked::new(body, in_flight, holds)),
            )
        }
    });
    let io = TokioIo::new(Watched::new(io, tracker.clone()));
    let mut connection = pin!(builder.serve_connection(io, service));
    loop {
        tokio::select! {
            // The connection first: it is what wakes the task nearly every time.
            biased;
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
                }
                return Ended::Closed;
            }
            // `Err` means the server is gone: stop all the same.
            _ = stop.changed(), if !tracker.is_closing() => {
                connection.as_mut().graceful_shutdown();
                tracker.closing();
            }
            expiry = tracker.expired() => match expiry {
                Expiry::Idle => {
                    connection.as_mut().graceful_shutdown();
                    tracker.closing();
                }
                Expiry::Headers => return Ended::HeaderTimeout,
                Expiry::Abort => return Ended::Closed,
                // HTTP/2: the stalled streams alone let go of what they hold
                // (a front proxy's other users share the connection).
                // HTTP/1: the answer is the connection's only one.
                Expiry::SendStalled if tracker.is_h2() => {
                    for _ in 0..tracker.cut_stalled() {
                        metrics.answer_cut("send_timeout");
                    }
                }
                Expiry::SendStalled => {
                    metrics.answer_cut("send_timeout");
                    tracing::debug!(peer = %addr, "an answer stalled on the client; connection cut");
                    return Ended::Cut;
                }
                Expiry::CutLingers => {
                    tracing::debug!(peer = %addr, "a cut answer lingers in a shut window; connection cut");
                    return Ended::Cut;
                }
            },
        }
    }
}
