//! The UDP observation endpoint: daemons send signed probes from their UDP
//! punch port, and the source address we see is their UDP mapping, the
//! QUIC path's counterpart of the WebSocket's observed address.
//!
//! One task owns the socket. Work per datagram is bounded and cheap checks
//! come first: parse, a store lookup, the counter, per-source rate limits
//! (per socket and per IP) and a server-wide one; then the signature; only a probe that
//! verifies spends its daemon's own budget. (The daemon's budget used to
//! come before the signature, so two forged probes a second naming a
//! daemon silenced its real ones.) The ack goes back to the address the
//! probe came from, so the NAT sees traffic both ways and keeps the
//! mapping. Each drop is counted in
//! `punch_rendezvous_udp_drops_total{reason}`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tracing::{debug, info};

use super::metrics::UdpDrop;
use super::ratelimit::TokenBucket;
use super::store::{Probe, ProbeRecorded};
use super::Shared;
use crate::datagram::{self, Datagram, ProbeBody};
use crate::protocol::decode_public_key;

/// Probes verified per second, server-wide (a probe costs one Ed25519
/// verification, ~50 µs). Daemons probe every 15 s, so this serves tens of
/// thousands of them while a flood costs at most a fraction of a core.
const PROBES_PER_SECOND: u32 = 2_000;
const PROBE_BURST: u32 = 4_000;
/// Probes checked per second from one source socket (address and port):
/// a daemon sends one every 15 s from its own port, so a forger gets no
/// more than this of the server-wide budget per socket it uses.
const PROBES_PER_SOCKET_PER_SECOND: u32 = 20;
const PROBE_BURST_PER_SOCKET: u32 = 40;
/// And from one IP address, all ports together: generous, since thousands
/// of daemons may share a carrier-grade NAT's address.
const PROBES_PER_IP_PER_SECOND: u32 = 500;
const PROBE_BURST_PER_IP: u32 = 1_000;
/// Sources tracked at once per table; buckets that refilled are forgotten
/// first (they hold nothing), and beyond this new sources are dropped.
const MAX_SOURCES: usize = 16_384;

/// Probe buckets per source, bounded in number.
#[derive(Debug)]
pub(crate) struct SourceBuckets<K> {
    rate: u32,
    burst: u32,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: std::hash::Hash + Eq> SourceBuckets<K> {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `source`; false when its rate is spent or the
    /// table is full of sources that are all still spending.
    pub(crate) fn allow(&mut self, source: K, now: Instant) -> bool {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_SOURCES {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= MAX_SOURCES {
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(source)
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .allow(now)
    }
}

/// The per-source limits a probe passes before its signature is checked.
#[derive(Debug)]
pub(crate) struct Sources {
    sockets: SourceBuckets<SocketAddr>,
    ips: SourceBuckets<IpAddr>,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            sockets: SourceBuckets::new(PROBES_PER_SOCKET_PER_SECOND, PROBE_BURST_PER_SOCKET),
            ips: SourceBuckets::new(PROBES_PER_IP_PER_SECOND, PROBE_BURST_PER_IP),
        }
    }
}

impl Sources {
    fn allow(&mut self, from: SocketAddr, now: Instant) -> bool {
        self.sockets.allow(from, now) && self.ips.allow(from.ip(), now)
    }
}

/// NAT discovery answers (`observe` datagrams, here and on
/// `observe_port`) per second from one IP, all ports: a netcheck asks 8
/// times.
pub(crate) const OBSERVE_PER_IP_PER_SECOND: u32 = 20;
pub(crate) const OBSERVE_BURST_PER_IP: u32 = 40;
/// And server-wide, per transport.
const OBSERVES_PER_SECOND: u32 = 2_000;
const OBSERVE_BURST: u32 = 4_000;

/// Rate limits for one transport's answers.
#[derive(Debug)]
pub(crate) struct ObserveLimits {
    ips: SourceBuckets<IpAddr>,
    all: TokenBucket,
}

impl ObserveLimits {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            ips: SourceBuckets::new(OBSERVE_PER_IP_PER_SECOND, OBSERVE_BURST_PER_IP),
            all: TokenBucket::new(OBSERVES_PER_SECOND, OBSERVE_BURST, now),
        }
    }

    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.ips.allow(ip, now) && self.all.allow(now)
    }
}

/// The answer to an `observe` datagram from `from`, if `buf` is one and
/// the limits allow it; `None` when `buf` is something else.
pub(crate) fn answer_observe(
    shared: &Shared,
    limits: &mut ObserveLimits,
    buf: &[u8],
    from: SocketAddr,
) -> Option<Option<Vec<u8>>> {
    let Some(Datagram::Observe { nonce }) = datagram::parse(buf) else {
        return None;
    };
    let ok = limits.allow(from.ip(), Instant::now());
    shared.observe.count_udp(ok);
    Some(ok.then(|| datagram::observed(nonce, from)))
}

/// Serves probes until the server shuts down.
pub(crate) async fn serve(socket: UdpSocket, shared: Arc<Shared>) {
    if let Ok(addr) = socket.local_addr() {
        info!(%addr, "UDP observation endpoint listening");
    }
    let mut buf = [0u8; datagram::MAX_LEN + 1];
    let mut bucket = TokenBucket::new(PROBES_PER_SECOND, PROBE_BURST, Instant::now());
    let mut sources = Sources::default();
    let mut observe_limits = ObserveLimits::new(Instant::now());
    loop {
        let (n, from) = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from earlier sends surface here; keep serving.
                Err(e) => { debug!(error = %e, "udp receive error"); continue }
            },
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        // NAT discovery's question, on the main endpoint.
        if let Some(answer) = answer_observe(&shared, &mut observe_limits, &buf[..n], from) {
            if let Some(reply) = answer {
                let _ = socket.send_to(&reply, from).await;
            }
            continue;
        }
        match observe(&shared, &mut bucket, &mut sources, &buf[..n], from).await {
            Ok(counter) => {
                shared.metrics.udp_probes.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(&datagram::ack(counter, from), from).await;
            }
            Err(why) => {
                shared.metrics.udp_drop(why);
                debug!(%from, reason = why.as_str(), "UDP datagram dropped");
            }
        }
    }
}

/// Checks one datagram; on a valid probe records `from` as the daemon's
/// UDP endpoint and returns the counter to acknowledge.
async fn observe(
    shared: &Shared,
    bucket: &mut TokenBucket,
    sources: &mut Sources,
    buf: &[u8],
    from: SocketAddr,
) -> Result<u64, UdpDrop> {
    let Some(Datagram::Probe {
        name,
        counter,
        local_port,
        signature,
    }) = datagram::parse(buf)
    else {
        return Err(UdpDrop::Malformed);
    };
    let body = ProbeBody {
        name,
        counter,
        local_port,
    };
    let now = Instant::now();
    let key = shared
        .store
        .probe_key(name)
        .await
        .ok()
        .flatten()
        .ok_or(UdpDrop::UnknownName)?;
    if counter <= key.counter {
        return Err(UdpDrop::Replay); // a replay, or reordered
    }
    if !sources.allow(from, now) {
        return Err(UdpDrop::SourceRate);
    }
    if !bucket.allow(now) {
        return Err(UdpDrop::ServerRate);
    }
    let vk = decode_public_key(&crate::protocol::b64(&key.public_key))
        .map_err(|_| UdpDrop::BadSignature)?;
    if !datagram::verify_probe(&vk, &key.nonce, &body, &signature) {
        return Err(UdpDrop::BadSignature);
    }
    // Only the daemon itself can spend its own budget.
    if !shared.local.allow_probe(key.conn_id, now) {
        return Err(UdpDrop::DaemonRate);
    }
    let probe = Probe {
        nonce: key.nonce,
        counter,
        local_port,
        from,
    };
    match shared.store.record_probe(name, probe).await {
        Ok(ProbeRecorded::Current { moved }) => {
            if moved {
                info!(daemon = name, udp = %from, "UDP endpoint observed");
            }
            Ok(counter)
        }
        Ok(ProbeRecorded::Stale) | Err(_) => Err(UdpDrop::Stale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sources_are_limited_each_and_the_table_stays_bounded() {
        let mut s = SourceBuckets::new(20, 40);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..100).filter(|_| s.allow(a, t0)).count();
        assert_eq!(allowed, 40);
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(s.allow(b, t0), "another source has its own budget");
        // Many sources: the table never grows past its bound.
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            s.allow(ip, t0);
        }
        assert!(s.buckets.len() <= MAX_SOURCES);
        // Once refilled they are forgotten to make room.
        let later = t0 + Duration::from_secs(10);
        assert!(s.allow("198.51.100.1".parse().unwrap(), later));
        assert!(s.buckets.len() <= MAX_SOURCES);
    }

    #[test]
    fn one_socket_is_held_to_its_rate_while_another_port_of_the_ip_is_not() {
        let mut s = Sources::default();
        let t0 = Instant::now();
        let forger: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let daemon: SocketAddr = "192.0.2.1:6000".parse().unwrap();
        let allowed = (0..200).filter(|_| s.allow(forger, t0)).count();
        assert_eq!(allowed, PROBE_BURST_PER_SOCKET as usize);
        assert!(s.allow(daemon, t0));
    }

    proptest::proptest! {
        /// Sources interleaved in any pattern: each one is held to its own
        /// `burst + rate × span` from any point on, whatever the others do.
        #[test]
        fn each_source_is_held_to_its_rate(
            events in proptest::collection::vec((0u8..4, 0u64..20_000), 1..200),
        ) {
            let (rate, burst) = (OBSERVE_PER_IP_PER_SECOND, OBSERVE_BURST_PER_IP);
            let mut s = SourceBuckets::new(rate, burst);
            let t0 = Instant::now();
            let mut now = t0;
            let mut seen: Vec<(u8, Instant, bool)> = Vec::new();
            for (who, gap) in events {
                now += Duration::from_micros(gap);
                let ip = IpAddr::from([192, 0, 2, who]);
                seen.push((who, now, s.allow(ip, now)));
            }
            for (i, (who, start, _)) in seen.iter().enumerate() {
                let mut admitted = 0u32;
                for (w, t, ok) in &seen[i..] {
                    if w != who {
                        continue;
                    }
                    admitted += u32::from(*ok);
                    let span = t.duration_since(*start).as_secs_f64();
                    proptest::prop_assert!(
                        f64::from(admitted) <= f64::from(burst) + f64::from(rate) * span + 1e-6
                    );
                }
            }
        }
    }
}
