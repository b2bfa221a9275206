//! The one accept loop every listener of the agent runs: the proxy, the rate
//! limit service, the admin listener and the demo upstream.
//!
//! An error that belongs to one connection (it was reset or aborted before
//! it was taken) is skipped at once. Any other (out of descriptors, out of
//! memory) would fail again straight away, so the loop pauses before the
//! next try, 5 ms at first, doubling up to 100 ms while the errors last,
//! and back to 5 ms after the next success: it neither spins on a full
//! descriptor table nor stays deaf long after one frees. A run of failures
//! is logged once as it starts and once as it ends. Once `stop` is ready,
//! no further connection is taken.

use std::{io, net::SocketAddr, pin::pin, time::Duration};

use tokio::net::{TcpListener, TcpStream};

/// The first pause after a failed accept.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause between two failed accepts.
const LONGEST_PAUSE: Duration = Duration::from_millis(100);

/// Accepts on `listener` until `stop` resolves, handing each connection
/// (`TCP_NODELAY` set) and its peer to `each`, which must not wait: it
/// spawns the connection's task or drops the stream. `name` labels the log
/// lines.
pub async fn accept_until(
    listener: &TcpListener,
    name: &'static str,
    stop: impl Future<Output = ()>,
    mut each: impl FnMut(TcpStream, SocketAddr),
) {
    let mut stop = pin!(stop);
    let mut pause = FIRST_PAUSE;
    let mut failures = 0u64;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if failures > 0 {
                    tracing::info!(listener = name, failures, "accepting again");
                    failures = 0;
                }
                pause = FIRST_PAUSE;
                let _ = stream.set_nodelay(true);
                each(stream, peer);
            }
            Err(e) if one_connection(&e) => {
                tracing::debug!(listener = name, error = %e, "connection gone before accept");
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(listener = name, error = %e, "accept failing; pausing between tries");
                } else {
                    tracing::debug!(listener = name, error = %e, pause = ?pause, "accept failed");
                }
                failures += 1;
                tokio::select! {
                    biased;
                    () = &mut stop => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

/// Errors of one connection, which say nothing about the next.
fn one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn hands_over_every_connection_and_returns_on_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let counted = seen.clone();
        let task = tokio::spawn(async move {
            accept_until(
                &listener,
                "test",
                async {
                    let _ = rx.await;
                },
                move |stream, _| {
                    assert!(stream.nodelay().unwrap());
                    counted.fetch_add(1, Ordering::SeqCst);
                },
            )
            .await;
        });
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        while seen.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stopped")
            .unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn only_a_connection_s_own_errors_skip_the_pause() {
        assert!(one_connection(&io::ErrorKind::ConnectionAborted.into()));
        assert!(!one_connection(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!one_connection(&io::Error::from_raw_os_error(
            libc::ENOBUFS
        )));
    }
}
