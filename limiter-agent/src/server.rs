//! The listener: accepts connections (plain or TLS), enforces the connection
//! cap and the header limits, and hands requests to the [`Proxy`].

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::{
    headers,
    proxy::{Peer, Proxy},
};

/// Loads the certificate chain and key and offers h2 and http/1.1 by ALPN.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Raw response for a connection refused before HTTP starts (over the cap).
fn raw_response(status: &str, code: &str, message: &str) -> Vec<u8> {
    let body = headers::error_body(code, message);
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Accepts connections until `shutdown` completes, then stops accepting, asks
/// every open connection to finish its in-flight requests (HTTP/1 closes after
/// the current response, HTTP/2 sends GOAWAY) and waits up to `drain` for them.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()> {
    let (max_connections, header_read_timeout, max_header_bytes) = {
        let state = proxy.state();
        (
            state.config.max_connections,
            state.config.header_read_timeout,
            state.config.max_header_bytes,
        )
    };
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            proxy.metrics().connections_refused.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        let proxy = proxy.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            connection(stream, addr, proxy, &builder, tls, watcher).await;
        });
    }
    drop(listener);
    tracing::info!(deadline = ?drain, "draining open connections");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the drain deadline; closing them");
    }
    Ok(())
}

async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let response = raw_response(
        "503 Service Unavailable",
        "OVERLOADED",
        "Too many connections; try again later.",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&response)).await;
    let _ = stream.shutdown().await;
}

async fn connection(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    watcher: Watcher,
) {
    let peer = Peer {
        addr,
        tls: tls.is_some(),
    };
    // Past hyper's own HTTP/1 header timeout (which answers 408), so this
    // catches what that one doesn't: HTTP/2 clients that never complete a request.
    let first_request_deadline = proxy.state().config.header_read_timeout + Duration::from_secs(1);
    let started = Arc::new(AtomicBool::new(false));
    let seen = started.clone();
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        seen.store(true, Ordering::Relaxed);
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, peer).await) }
    });
    let idle = no_request_by(first_request_deadline, started);
    if let Some(acceptor) = tls {
        let handshake_timeout = Duration::from_secs(10);
        let Ok(Ok(stream)) = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
        else {
            return;
        };
        tokio::select! {
            _ = watcher.watch(builder.serve_connection(TokioIo::new(stream), service)) => {}
            () = idle => {}
        }
    } else {
        {
            // A second handle on the socket, to answer 408 after hyper gives up
            // on a client that never finished its headers (hyper just closes).
            let spare = stream
                .into_std()
                .and_then(|std| Ok((std.try_clone()?, std)))
                .and_then(|(spare, std)| Ok((spare, tokio::net::TcpStream::from_std(std)?)));
            let Ok((mut spare, stream)) = spare else {
                return;
            };
            let result = tokio::select! {
                result = watcher.watch(builder.serve_connection(TokioIo::new(stream), service)) => result,
                () = idle => return,
            };
            if let Err(e) = result
                && is_header_timeout(&*e)
            {
                {
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
        }
    }
}

/// Resolves at `deadline` unless a request has started by then (then never).
async fn no_request_by(deadline: Duration, started: Arc<AtomicBool>) {
    tokio::time::sleep(deadline).await;
    if started.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}

fn is_header_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        current = e.source();
    }
    false
}
