//! The UDP punch socket, shared by quinn and punchd's own datagrams.
//!
//! quinn owns the receive loop of its socket, so punchd's probes, acks and
//! punch datagrams ([`punch_rendezvous::datagram`]) cannot be read from it
//! directly. [`PunchSocket`] wraps quinn's tokio socket: every datagram
//! quinn receives passes through [`PunchSocket::poll_recv`], which hands
//! ours to the [`Demux`] and blanks them out (length 0) so quinn skips
//! them. One socket means one NAT mapping: the rendezvous observes, and the
//! peer punches to, exactly the mapping QUIC then runs on.
//!
//! The socket is dual-stack where the host allows it ([`bind`]): one
//! IPv6 socket with `IPV6_V6ONLY` off, so IPv4 peers and IPv6 peers reach
//! the same port and the same quinn endpoint, and a punch can race both
//! families the way the TCP path does. IPv4 addresses then travel as
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`) inside the socket only:
//! [`PunchSocket`] maps them on the way out and hands punchd plain IPv4
//! addresses on the way in, so nothing above it sees the difference.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use punch_rendezvous::datagram::{self, Datagram};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::punch::buffers;

/// Binds the UDP punch socket on `port` (0: any): dual-stack `[::]:port`
/// when this host has IPv6, else `0.0.0.0:port` (IPv6 disabled, or no
/// IPv6 at all). Plain bind semantics otherwise: no address or port reuse.
/// Its receive buffer is raised where the host allows
/// (`punch/buffers.rs`): the kernel's 208 KiB default dropped datagrams
/// whenever the daemon was briefly off the CPU.
pub(crate) fn bind(port: u16) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    });
    let socket = match dual {
        Ok(s) => s.into(),
        Err(e) => {
            tracing::debug!(port, error = %e, "no dual-stack UDP socket (IPv6 off?); QUIC runs over IPv4 only");
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port))?
        }
    };
    buffers::size(&socket, buffers::Kind::Udp);
    Ok(socket)
}

/// `addr` as the socket needs it: IPv4 as IPv4-mapped IPv6 on a
/// dual-stack socket, anything else as it is.
fn to_socket(addr: SocketAddr, dual_stack: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) if dual_stack => {
            SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        other => other,
    }
}

/// `addr` as punchd uses it: an IPv4-mapped IPv6 address as plain IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A rendezvous ack: the probe counter and the address the server saw.
pub(crate) type Ack = (u64, SocketAddr);

/// Where punchd's own datagrams go. Senders are bounded and used with
/// `try_send`: a flood of datagrams is dropped, never queued.
#[derive(Default)]
pub(crate) struct Demux {
    acks: Mutex<Option<(SocketAddr, mpsc::Sender<Ack>)>>,
    sessions: Mutex<HashMap<String, mpsc::Sender<SocketAddr>>>,
    /// Punch sessions begun so far: whether one began within a span of
    /// time (see `QuicPath::rebind_after_lost_path`).
    begun: AtomicU64,
}

impl fmt::Debug for Demux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Demux").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Demux {
    /// Acks from `server` (and only from it) go to the returned receiver.
    pub(crate) fn acks_from(&self, server: SocketAddr) -> mpsc::Receiver<Ack> {
        let (tx, rx) = mpsc::channel(4);
        *lock(&self.acks) = Some((server, tx));
        rx
    }

    /// Punch datagrams for `session` go to the returned receiver (the
    /// sender's address) until the guard is dropped.
    pub(crate) fn session(
        self: &Arc<Self>,
        session: &str,
    ) -> (SessionGuard, mpsc::Receiver<SocketAddr>) {
        let (tx, rx) = mpsc::channel(16);
        lock(&self.sessions).insert(session.to_owned(), tx);
        self.begun.fetch_add(1, Ordering::Relaxed);
        let guard = SessionGuard {
            demux: self.clone(),
            session: session.to_owned(),
        };
        (guard, rx)
    }

    /// Punch sessions begun so far on this socket's port.
    pub(crate) fn punches_begun(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    /// Whether a punch session is running.
    pub(crate) fn punching(&self) -> bool {
        !lock(&self.sessions).is_empty()
    }

    fn deliver(&self, buf: &[u8], from: SocketAddr) {
        match datagram::parse(buf) {
            Some(Datagram::Ack { counter, observed }) => {
                if let Some((server, tx)) = lock(&self.acks).as_ref() {
                    if *server == from {
                        let _ = tx.try_send((counter, observed));
                    }
                }
            }
            Some(Datagram::Punch { session }) => {
                if let Some(tx) = lock(&self.sessions).get(session) {
                    let _ = tx.try_send(from);
                }
            }
            // Probes are for the server; anything else is noise.
            Some(Datagram::Probe { .. } | Datagram::Observe { .. } | Datagram::Observed { .. })
            | None => {}
        }
    }
}

/// Unregisters a punch session from the demux when dropped.
#[derive(Debug)]
pub(crate) struct SessionGuard {
    demux: Arc<Demux>,
    session: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        lock(&self.demux.sessions).remove(&self.session);
    }
}

/// quinn's socket with punchd's datagrams taken out on the way in.
#[derive(Debug)]
pub(crate) struct PunchSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    demux: Arc<Demux>,
    /// An IPv6 socket taking IPv4 too (see [`bind`]).
    dual_stack: bool,
}

impl PunchSocket {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, demux: Arc<Demux>) -> Self {
        let dual_stack = inner.local_addr().is_ok_and(|a| a.is_ipv6());
        Self {
            inner,
            demux,
            dual_stack,
        }
    }

    /// Whether IPv6 peers can be reached from this socket.
    pub(crate) fn dual_stack(&self) -> bool {
        self.dual_stack
    }

    /// Sends one of our datagrams. A full socket buffer is waited out
    /// (briefly: these are a few small datagrams), other errors returned.
    pub(crate) async fn send_to(&self, contents: &[u8], destination: SocketAddr) -> io::Result<()> {
        let transmit = Transmit {
            destination: to_socket(destination, self.dual_stack),
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        };
        let mut poller = self.inner.clone().create_io_poller();
        for _ in 0..20 {
            match self.inner.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ready = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
                    let _ = tokio::time::timeout(Duration::from_millis(50), ready).await;
                }
                other => return other,
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "UDP socket stayed full",
        ))
    }
}

impl AsyncUdpSocket for PunchSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        for (m, buf) in meta.iter_mut().zip(bufs.iter()).take(n) {
            // Ours are single small datagrams; a GRO batch (len > stride)
            // is QUIC from one flow. Length 0 makes quinn skip the slot.
            if m.len == m.stride && datagram::is_ours(&buf[..m.len]) {
                self.demux.deliver(&buf[..m.len], canonical(m.addr));
                m.len = 0;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
