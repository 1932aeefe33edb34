//! The accept loop: our own, not `axum::serve`, because that runs hyper
//! without a timer, so a client that sends a request head one byte at a
//! time (slowloris) held its connection forever. Here every connection
//! gets hyper's `header_read_timeout`, and two caps decide at accept time:
//!
//! - `max_connections`: TCP connections held in every state, WebSockets
//!   included (the upgraded socket keeps its [`Permit`]), so descriptors
//!   stay under the process's limit;
//! - `max_http_per_ip`: connections from one IP that are still in the TLS
//!   handshake or HTTP phase. Registered daemons behind one NAT share an
//!   IP, so upgraded WebSockets do not count here; `max_clients` and the
//!   hello timeout bound those.
//!
//! A refused connection is closed at once, counted in
//! `punch_rendezvous_connection_refusals_total{reason}` and logged (debug:
//! a flood must not become a log flood).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::lock::unpoisoned;
use super::metrics::ConnRefusal;
use super::Shared;

/// A TLS client gets this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning about refused connections per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Descriptors kept for what is not a client connection (listeners, the
/// UDP socket, files, the runtime's own).
const FD_RESERVE: u64 = 64;

/// The connection cap to enforce: `configured`, but under the process's
/// descriptor limit, whose soft value is first raised to the hard one (a
/// server of thousands of sockets needs it, and the common soft 1,024
/// would otherwise make `accept` fail before any cap refuses). Without a
/// limit to read, `configured`.
pub(crate) fn connection_cap(configured: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return configured;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let room = usize::try_from(soft.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if room < configured {
        tracing::warn!(
            max_connections = configured,
            fd_limit = soft,
            using = room,
            "max_connections is above the descriptor limit; capping it (raise LimitNOFILE / ulimit -n)"
        );
    }
    configured.min(room).max(1)
}

/// Connection counts behind the two caps. Sans-IO: callers pass the
/// limits and release what they took.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    http_per_ip: HashMap<IpAddr, usize>,
}

impl Gate {
    /// Counts a new connection from `ip` if both caps allow it.
    pub(crate) fn admit(
        &self,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<(), ConnRefusal> {
        let mut s = unpoisoned(&self.state);
        if s.total >= max_total {
            return Err(ConnRefusal::Total);
        }
        let n = s.http_per_ip.entry(ip).or_default();
        if *n >= max_per_ip {
            return Err(ConnRefusal::PerIp);
        }
        *n += 1;
        s.total += 1;
        Ok(())
    }

    /// The connection from `ip` left the HTTP phase (upgraded or closed).
    pub(crate) fn leave_http(&self, ip: IpAddr) {
        let mut s = unpoisoned(&self.state);
        if let Some(n) = s.http_per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.http_per_ip.remove(&ip);
            }
        }
    }

    /// A connection closed.
    pub(crate) fn leave(&self) {
        let mut s = unpoisoned(&self.state);
        s.total = s.total.saturating_sub(1);
    }
}

/// One admitted connection's place under the caps, released on drop. It
/// rides in each request's extensions, so an upgraded WebSocket keeps it.
#[derive(Debug)]
pub(crate) struct Permit {
    shared: Arc<Shared>,
    ip: IpAddr,
    in_http: AtomicBool,
}

impl Permit {
    /// The connection became a WebSocket: it no longer counts against its
    /// IP's HTTP cap (it still counts in total).
    pub(crate) fn upgraded(&self) {
        if self.in_http.swap(false, Ordering::Relaxed) {
            self.shared.gate.leave_http(self.ip);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.upgraded();
        self.shared.gate.leave();
        self.shared
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What handlers extract to keep the connection's permit past the upgrade.
pub(crate) type ConnPermit = Extension<Arc<Permit>>;

/// Accepts on `listener` until the server's cancel token fires, then waits
/// for connections still in the HTTP phase (bounded by the header timeout).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let conns = TaskTracker::new();
    let cfg = shared.cfg();
    let limits = &cfg.limits;
    let mut last_warning = None;
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, typically: back off, keep serving.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if let Err(why) =
            shared
                .gate
                .admit(addr.ip(), limits.max_connections, limits.max_http_per_ip)
        {
            shared.metrics.conn_refused(why);
            // Each refusal at debug; at most one warning per interval, so
            // a flood shows in the log without becoming a log flood.
            if last_warning.is_none_or(|t: std::time::Instant| t.elapsed() >= WARN_EVERY) {
                last_warning = Some(std::time::Instant::now());
                tracing::warn!(%addr, reason = why.as_str(), "refusing connections (a connection bound is reached; counted in punch_rendezvous_connection_refusals_total)");
            } else {
                debug!(%addr, reason = why.as_str(), "connection refused");
            }
            drop(tcp);
            continue;
        }
        shared
            .metrics
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        let permit = Arc::new(Permit {
            shared: shared.clone(),
            ip: addr.ip(),
            in_http: AtomicBool::new(true),
        });
        // Punch orders are small and time-critical: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let (app, shared, tls) = (app.clone(), shared.clone(), tls.clone());
        conns.spawn(async move {
            match tls {
                None => serve_conn(tcp, addr, app, permit, &shared).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_conn(stream, addr, app, permit, &shared).await,
                        Ok(Err(e)) => {
                            shared.metrics.conn_refused(ConnRefusal::TlsHandshake);
                            debug!(%addr, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            shared.metrics.conn_refused(ConnRefusal::TlsHandshake);
                            debug!(%addr, "TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
    conns.close();
    conns.wait().await;
    Ok(())
}

/// HTTP/1.1 on one connection, with the header timeout and upgrades.
async fn serve_conn<I>(io: I, addr: SocketAddr, app: Router, permit: Arc<Permit>, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = app
        .layer(Extension(ConnectInfo(addr)))
        .layer(Extension(permit));
    let service = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.cfg().limits.header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            shared.metrics.conn_refused(ConnRefusal::HeaderTimeout);
            debug!(%addr, "no complete request head in time; closed");
        } else {
            debug!(%addr, error = %e, "HTTP connection ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_stays_under_the_descriptor_limit() {
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let cap = connection_cap(usize::MAX);
        assert!((cap as u64) < soft.max(FD_RESERVE + 1), "{cap} vs {soft}");
        assert_eq!(connection_cap(10), 10);
    }

    #[test]
    fn caps_hold_in_total_and_per_ip_until_released() {
        let gate = Gate::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(gate.admit(a, 3, 2), Ok(()));
        assert_eq!(gate.admit(a, 3, 2), Ok(()));
        assert_eq!(gate.admit(a, 3, 2), Err(ConnRefusal::PerIp));
        assert_eq!(gate.admit(b, 3, 2), Ok(()));
        assert_eq!(gate.admit(b, 3, 2), Err(ConnRefusal::Total));
        // An upgrade frees the IP's HTTP share but not the total.
        gate.leave_http(a);
        assert_eq!(gate.admit(a, 4, 2), Ok(()));
        assert_eq!(gate.admit(a, 4, 2), Err(ConnRefusal::Total));
        gate.leave();
        gate.leave_http(a);
        assert_eq!(gate.admit(a, 4, 2), Ok(()));
    }
}
