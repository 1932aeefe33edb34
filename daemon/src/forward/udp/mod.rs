//! UDP forwarding (`protocol = "udp"` on `[[forward]]` and `[[expose]]`).
//!
//! UDP has no connections, so a flow is made per local client address
//! ([`flows`]): the first datagram from an address opens a tunnel stream
//! to the peer's service, whose header (version 3, protocol UDP) passes the
//! same checks as a TCP stream's: the service must be exposed, as UDP, to
//! this peer. The exposing side then opens a UDP socket of its own toward
//! the target for that flow ([`expose`]), so replies find the client that
//! asked. Datagrams travel as QUIC datagrams on a QUIC tunnel, or
//! length-prefixed on the flow's stream on the TCP-mux and relayed paths
//! and for a datagram larger than the QUIC path takes ([`wire`],
//! [`carrier`]).
//!
//! Bounds: at most [`MAX_FLOWS`] flows per forward (a new client then
//! ends the flow of the client heard from longest ago); each flow ends
//! after [`FLOW_IDLE`] without a datagram either way; each direction of a
//! flow queues at most [`FLOW_QUEUE`] datagrams and drops (counted in the
//! forward's `datagrams_dropped`) beyond that: a slow tunnel loses
//! datagrams, as a congested link would, and never grows a buffer.

pub(crate) mod carrier;
pub(crate) mod expose;
pub(crate) mod flows;
pub(crate) mod listen;
pub(crate) mod wire;

use std::time::Duration;

pub(crate) use listen::run_udp_forward;

/// A flow ends after this long without a datagram either way. Longer than
/// Linux conntrack's 30 s for an unanswered UDP flow, shorter than its
/// 120 s for an answered one: a DNS query's flow is gone in a minute,
/// a game or VPN session that sends every few seconds stays.
pub(crate) const FLOW_IDLE: Duration = Duration::from_secs(60);

/// Flows one UDP forward carries at once. Each holds a tunnel stream (of
/// the tunnel's 1,024) and, on the exposing side, a socket.
pub(crate) const MAX_FLOWS: usize = 256;

/// Datagrams queued per flow and direction before new ones are dropped
/// (at most 128 × 64 KiB = 8 MiB for a flow of the largest datagrams,
/// 150 KiB for typical 1,200-byte ones).
pub(crate) const FLOW_QUEUE: usize = 128;

/// Datagrams written to a flow's stream in one write, at most.
pub(crate) const BATCH: usize = 64;

/// Receive buffer asked for on a UDP forward's socket and on each flow's
/// socket toward the target (the kernel caps it at `net.core.rmem_max`).
/// With the default (~208 KiB) a 100 Mbit/s `iperf3 -u` burst overflowed
/// the forward's socket while its task was busy on a loaded machine: in a
/// 5 s lab run about 2,700 of 52,000 datagrams never reached the forward
/// at all (its `datagrams_out` + `datagrams_dropped` fell short of what
/// iperf3 sent).
pub(crate) const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Asks for [`SOCKET_BUFFER`] on `socket`; a refusal only costs headroom.
pub(crate) fn enlarge_buffer(socket: &tokio::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    if let Err(e) = s.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
}
