//! The shared store: several instances, one Redis.
//!
//! # What lives where
//!
//! - **This instance's own daemons** stay in an in-process [`Registry`]
//!   (the same state machine as the in-memory store): their probes, RTTs,
//!   the punch sessions this instance coordinated and their relay pairing.
//!   Nothing a daemon does on its own instance waits on Redis except its
//!   registration, so when Redis is unreachable the instance keeps
//!   coordinating the daemons connected to it ("degraded").
//! - **Redis** holds one presence key per registered daemon,
//!   `punch:d:{name}` (key, instance, connection id, and a JSON record of
//!   its endpoints and RTT), with an expiry ([`PRESENCE_TTL`]) that the
//!   owning instance refreshes every [`REFRESH_EVERY`] while the daemon is
//!   connected: an instance that dies without cleaning up loses its
//!   entries within the TTL. Each instance also rewrites a liveness key
//!   every second (5 s expiry), and a lookup ignores the entries of an
//!   instance whose key is gone: a dead instance's daemons stop being
//!   punch targets within 5 s, and re-register elsewhere. Name rules are one Lua script, atomic across
//!   instances: the same key replaces (the old instance is told to drop
//!   its connection), another key is refused.
//! - **Signalling** is Redis pub/sub, one channel per instance
//!   (`punch:sig:{instance}`): punch orders and aborts for a daemon over
//!   there, "your connection was replaced", and a remote side's result or
//!   departure for the session's home. Pub/sub is fire-and-forget, which
//!   fits: an order that is lost is a punch that times out and is retried.
//!
//! # Sessions stay with the instance that coordinated them
//!
//! A `connect` is handled by the requester's instance; if the peer is on
//! another one its registration is read from Redis, the session is made
//! here, and the peer's order goes out through the peer's channel with
//! `relay_url` set to this instance's `public_url`. So both sides of a
//! relayed tunnel join the relay on one instance, and relay pairing is the
//! local, socket-handing one: no bytes are forwarded between instances
//! (which would double every relayed byte's path and cost).
//!
//! # Time
//!
//! Each instance measures its clock's offset to the Redis server's
//! (`TIME`, the sample with the smallest round trip of the last few), and a
//! punch order crossing instances carries `at_us` in that cluster clock:
//! the sender converts from its clock, the receiver to its own, and the
//! receiver's daemon converts with the offset it measured to its instance,
//! as on one instance. The coordinating instance adds the measured
//! publish → deliver latency ([`Clock::hop_margin_us`]) to `at`, so the
//! remote order is there in time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::memory::Registry;
use super::{
    Addressed, Probe, ProbeKey, ProbeRecorded, PunchLimits, Recipient, Registered, Registration,
    RelayAuth, RelayJoin, Store, StoreError, StoreFuture, SESSION_TTL,
};
use crate::protocol::{b64, decode_public_key, ErrorCode, ServerMsg};
use crate::server::auth::random_id;
use crate::server::lock::unpoisoned;

/// How long a presence key lives without a refresh.
pub(crate) const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// How often an instance refreshes its daemons' presence keys.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// A Redis command that has not answered in this long has failed: the
/// instance goes degraded rather than stall its daemons.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Signals waiting to be published; beyond, new ones are dropped.
const SIGNAL_QUEUE: usize = 4096;
/// Largest signal accepted from Redis (a punch order with 16 candidates is
/// about 1.5 KB).
pub(crate) const MAX_SIGNAL_BYTES: usize = 16 * 1024;
/// Largest presence record read back from Redis.
const MAX_RECORD_BYTES: usize = 4096;
/// Sessions of other instances' that this one's daemons are in, remembered
/// for reports and departures; beyond, new orders are refused.
const MAX_FOREIGN: usize = 65_536;
/// Presence keys refreshed per pipelined round trip.
const REFRESH_BATCH: usize = 500;
/// Signals published per pipelined round trip.
const PUBLISH_BATCH: usize = 128;
/// Local addresses kept from a presence record (a hello has at most 16).
const MAX_RECORD_ADDRS: usize = 16;

fn presence_key(name: &str) -> String {
    format!("punch:d:{name}")
}

/// An instance's liveness key, rewritten every second with a short expiry.
fn alive_key(instance: &str) -> String {
    format!("punch:i:{instance}")
}

/// How long an instance counts as alive after its last tick.
const ALIVE_TTL: Duration = Duration::from_secs(5);

/// The pub/sub channel of `instance`.
pub(crate) fn channel(instance: &str) -> String {
    format!("punch:sig:{instance}")
}

/// Same key: take the name over (returning the previous holder); another
/// key: refuse. ARGV: key, instance, conn, record, ttl ms.
const REGISTER: &str = r"
local k = redis.call('HGET', KEYS[1], 'k')
if k and k ~= ARGV[1] then return {'taken'} end
local old = redis.call('HMGET', KEYS[1], 'i', 'c')
redis.call('HSET', KEYS[1], 'k', ARGV[1], 'i', ARGV[2], 'c', ARGV[3], 'v', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if old[1] then return {'replaced', old[1], old[2]} end
return {'new'}
";

/// Rewrite and extend an entry that is ours, or gone (Redis restarted, or
/// the key expired during an outage); 0 if another connection holds it.
/// ARGV as [`REGISTER`].
const REFRESH: &str = r"
local held = redis.call('HMGET', KEYS[1], 'i', 'c')
if held[1] and (held[1] ~= ARGV[2] or held[2] ~= ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'k', ARGV[1], 'i', ARGV[2], 'c', ARGV[3], 'v', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

/// A presence entry, only if its instance is alive: a dead instance's
/// daemons are nobody to punch within [`ALIVE_TTL`], long before their
/// entries expire (and they re-register elsewhere meanwhile).
const LOOKUP: &str = r"
local v = redis.call('HMGET', KEYS[1], 'k', 'i', 'c', 'v')
if not v[2] then return {} end
if redis.call('EXISTS', 'punch:i:' .. v[2]) == 0 then return {} end
return v
";

/// Delete the entry if it is still this connection's. ARGV: instance, conn.
const UNREGISTER: &str = r"
local held = redis.call('HMGET', KEYS[1], 'i', 'c')
if held[1] == ARGV[1] and held[2] == ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// What other instances need of a registration beyond key and connection.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    observed: SocketAddr,
    #[serde(default)]
    local_addrs: Vec<SocketAddr>,
    #[serde(default)]
    udp_port: Option<u16>,
    #[serde(default)]
    udp_observed: Option<SocketAddr>,
    #[serde(default)]
    rtt_us: u64,
    /// The router's mapping of its punch port (already checked against
    /// `observed` by its own instance).
    #[serde(default)]
    mapped_tcp: Option<SocketAddr>,
    #[serde(default)]
    mapped_udp: Option<SocketAddr>,
    /// Endpoints in the other address family (IPv6 beside IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alt_observed: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alt_udp_observed: Option<SocketAddr>,
    /// What the daemon measured of its NAT (picks the pair's strategy).
    #[serde(default)]
    nat: Option<crate::nat::NatSummary>,
}

impl Record {
    fn of(r: &Registration) -> String {
        let rec = Record {
            observed: r.observed,
            local_addrs: r.local_addrs.clone(),
            udp_port: r.udp_port,
            udp_observed: r.udp_observed,
            rtt_us: r.rtt_us,
            mapped_tcp: r.mapped_tcp,
            mapped_udp: r.mapped_udp,
            alt_observed: r.alt_observed,
            alt_udp_observed: r.alt_udp_observed,
            nat: r.nat,
        };
        serde_json::to_string(&rec).unwrap_or_default()
    }
}

/// A presence entry as read back, checked: anything that does not parse or
/// is out of bounds is no registration at all.
fn parse_entry(
    key: Option<String>,
    instance: Option<String>,
    conn: Option<String>,
    record: Option<String>,
) -> Option<Registration> {
    let (key, instance, conn, record) = (key?, instance?, conn?, record?);
    if record.len() > MAX_RECORD_BYTES || instance.is_empty() || instance.len() > 64 {
        return None;
    }
    let public_key = decode_public_key(&key).ok()?.to_bytes();
    let rec: Record = serde_json::from_str(&record).ok()?;
    if rec.local_addrs.len() > MAX_RECORD_ADDRS {
        return None;
    }
    Some(Registration {
        conn_id: conn.parse().ok()?,
        public_key,
        observed: rec.observed,
        local_addrs: rec.local_addrs,
        nonce: [0; 32],
        udp_port: rec.udp_port,
        udp_observed: rec.udp_observed,
        // Of the other family, as the record says, or nothing.
        alt_observed: rec
            .alt_observed
            .filter(|a| a.is_ipv4() != rec.observed.is_ipv4()),
        alt_udp_observed: rec
            .alt_udp_observed
            .filter(|a| a.is_ipv4() != rec.observed.is_ipv4()),
        probe_counter: 0,
        rtt_us: rec.rtt_us,
        // Another instance checked these on the observed IP; check again,
        // since a record is only as good as whoever wrote it.
        mapped_tcp: rec.mapped_tcp.filter(|m| m.ip() == rec.observed.ip()),
        mapped_udp: rec.mapped_udp.filter(|m| m.ip() == rec.observed.ip()),
        nat: rec.nat,
        instance: Some(instance),
    })
}

/// What instances tell each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
// `Deliver` carries a whole punch order; signals are queued at most 4,096
// at a time, so boxing it would save little and cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Signal {
    /// A message for a daemon connected there. A punch order's `at_us` is
    /// in cluster time on the way.
    Deliver {
        conn_id: u64,
        name: String,
        msg: ServerMsg,
    },
    /// That connection's name registered again elsewhere.
    Replace { conn_id: u64 },
    /// A side's result, for the session's home.
    Report {
        session: String,
        name: String,
        relayed: bool,
    },
    /// A side left while its session may still be punching.
    SideLeft { session: String, name: String },
    /// An instance's own echo, to measure publish → deliver latency.
    Echo { sent_us: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    from: String,
    sig: Signal,
}

/// What the server must do with an incoming signal (the parts that need
/// connection handles, which the store does not hold).
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Queue this for a local connection, or, if that fails, send the
    /// `SideLeft` for the session to its home.
    Deliver(Recipient, Box<ServerMsg>),
    /// Close that local connection: its name registered elsewhere.
    Replace(u64),
}

/// Why an incoming signal was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignalRefusal {
    TooLarge,
    Malformed,
    TooManySessions,
}

/// Counters of the shared store, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ClusterStats {
    /// Redis commands that failed (refused connection, timeout, error).
    pub(crate) redis_failures: AtomicU64,
    pub(crate) signals_sent: AtomicU64,
    pub(crate) signals_received: AtomicU64,
    /// Signals from Redis refused (too large, unparsable, over a bound).
    pub(crate) signals_refused: AtomicU64,
    /// Signals not sent: the queue was full or Redis failed.
    pub(crate) signals_dropped: AtomicU64,
    /// Names that another connection took over during an outage, seen at
    /// refresh.
    pub(crate) lost_names: AtomicU64,
}

/// The clock offset to Redis and the hop latency, as measured.
#[derive(Debug, Default)]
struct Clock {
    /// Cluster (Redis) clock minus this host's, µs.
    offset_us: AtomicI64,
    /// Recent `TIME` samples: (round trip, offset).
    samples: Mutex<VecDeque<(u64, i64)>>,
    /// Recent publish → deliver latencies, µs.
    hops: Mutex<VecDeque<u64>>,
}

const CLOCK_SAMPLES: usize = 8;
const HOP_SAMPLES: usize = 32;

impl Clock {
    fn add_time_sample(&self, rtt_us: u64, offset_us: i64) {
        let mut s = unpoisoned(&self.samples);
        if s.len() == CLOCK_SAMPLES {
            s.pop_front();
        }
        s.push_back((rtt_us, offset_us));
        // The fastest round trip bounds the error best.
        if let Some(&(_, best)) = s.iter().min_by_key(|(rtt, _)| *rtt) {
            self.offset_us.store(best, Ordering::Relaxed);
        }
    }

    fn add_hop(&self, us: u64) {
        let mut h = unpoisoned(&self.hops);
        if h.len() == HOP_SAMPLES {
            h.pop_front();
        }
        h.push_back(us.min(10_000_000));
    }

    /// The worst recent publish → deliver latency.
    fn hop_max_us(&self) -> u64 {
        unpoisoned(&self.hops).iter().copied().max().unwrap_or(0)
    }

    /// What `at` gets on top for an order crossing instances: twice the
    /// worst recent hop (jitter), at least 2 ms, at most 500 ms.
    fn hop_margin_us(&self) -> u64 {
        (2 * self.hop_max_us()).clamp(2_000, 500_000)
    }

    fn to_cluster(&self, local_us: u64) -> u64 {
        local_us.saturating_add_signed(self.offset_us.load(Ordering::Relaxed))
    }

    fn to_local(&self, cluster_us: u64) -> u64 {
        cluster_us.saturating_add_signed(-self.offset_us.load(Ordering::Relaxed))
    }
}

/// A session of another instance that one of this one's daemons is in.
#[derive(Debug)]
struct Foreign {
    home: String,
    name: String,
    created_us: u64,
}

/// The shared store. See the module doc.
pub(crate) struct RedisStore {
    /// This instance's id: its signal channel, and the `i` of its entries.
    instance: String,
    public_url: String,
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    mem: Mutex<Registry>,
    foreign: Mutex<HashMap<String, Foreign>>,
    outbox: mpsc::Sender<(String, String)>,
    outbox_rx: Mutex<Option<mpsc::Receiver<(String, String)>>>,
    up: AtomicBool,
    clock: Clock,
    register: redis::Script,
    refresh: redis::Script,
    unregister: redis::Script,
    lookup: redis::Script,
    pub(crate) stats: ClusterStats,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the client: its URL may hold a password.
        f.debug_struct("RedisStore")
            .field("instance", &self.instance)
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// A store for `url` (checked, not yet connected: [`RedisStore::connect`]
    /// does that, and the instance serves its own daemons meanwhile).
    pub(crate) fn new(url: &str, public_url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let (tx, rx) = mpsc::channel(SIGNAL_QUEUE);
        Ok(Self {
            instance: random_id(),
            public_url: public_url.trim_end_matches('/').to_owned(),
            client,
            conn: Mutex::new(None),
            mem: Mutex::new(Registry::default()),
            foreign: Mutex::new(HashMap::new()),
            outbox: tx,
            outbox_rx: Mutex::new(Some(rx)),
            up: AtomicBool::new(false),
            clock: Clock::default(),
            register: redis::Script::new(REGISTER),
            refresh: redis::Script::new(REFRESH),
            unregister: redis::Script::new(UNREGISTER),
            lookup: redis::Script::new(LOOKUP),
            stats: ClusterStats::default(),
        })
    }

    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn offset_us(&self) -> i64 {
        self.clock.offset_us.load(Ordering::Relaxed)
    }

    pub(crate) fn hop_max_us(&self) -> u64 {
        self.clock.hop_max_us()
    }

    fn mem(&self) -> MutexGuard<'_, Registry> {
        unpoisoned(&self.mem)
    }

    /// Opens the connection manager (it reconnects by itself afterwards).
    pub(crate) async fn connect(&self) -> Result<(), StoreError> {
        if unpoisoned(&self.conn).is_some() {
            return Ok(());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(1000);
        match ConnectionManager::new_with_config(self.client.clone(), config).await {
            Ok(m) => {
                *unpoisoned(&self.conn) = Some(m);
                Ok(())
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    fn conn(&self) -> Result<ConnectionManager, StoreError> {
        unpoisoned(&self.conn)
            .clone()
            .ok_or_else(|| StoreError::Unavailable("not connected to redis".to_owned()))
    }

    /// Counts a failure, marks Redis down, and says so as a store error.
    pub(crate) fn failed(&self, e: &redis::RedisError) -> StoreError {
        self.stats.redis_failures.fetch_add(1, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "redis unreachable: degraded, serving this instance's daemons only");
        }
        StoreError::Unavailable(e.to_string())
    }

    fn succeeded(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(instance = %self.instance, "redis reachable: registry shared again");
        }
    }

    /// One round trip: `TIME` (a clock offset sample, and the health
    /// check) and this instance's liveness key.
    pub(crate) async fn tick(&self) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("SET")
            .arg(alive_key(&self.instance))
            .arg(1)
            .arg("PX")
            .arg(u64::try_from(ALIVE_TTL.as_millis()).unwrap_or(5000))
            .ignore();
        let t0 = crate::protocol::unix_time_us();
        let r: Result<((u64, u64),), _> = pipe.query_async(&mut c).await;
        let t1 = crate::protocol::unix_time_us();
        let ((secs, us),) = r.map_err(|e| self.failed(&e))?;
        let redis_us = secs.saturating_mul(1_000_000).saturating_add(us);
        let mid = t0 / 2 + t1 / 2;
        let offset = i64::try_from(redis_us).unwrap_or(i64::MAX) - i64::try_from(mid).unwrap_or(0);
        self.clock.add_time_sample(t1.saturating_sub(t0), offset);
        self.succeeded();
        Ok(())
    }

    /// Rewrites every local daemon's presence entry and extends its
    /// expiry. Returns the connections whose name another connection holds
    /// now (taken over during an outage): they are to be closed.
    pub(crate) async fn refresh_all(&self) -> Result<Vec<u64>, StoreError> {
        let entries = self.mem().snapshot();
        let mut c = self.conn()?;
        self.refresh
            .load_async(&mut c)
            .await
            .map_err(|e| self.failed(&e))?;
        let mut lost = Vec::new();
        for chunk in entries.chunks(REFRESH_BATCH) {
            let mut pipe = redis::pipe();
            let invocations: Vec<_> = chunk
                .iter()
                .map(|(name, r)| self.invocation(&self.refresh, name, r))
                .collect();
            for inv in &invocations {
                pipe.invoke_script(inv);
            }
            let held: Vec<i64> = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.failed(&e))?;
            for ((name, r), ok) in chunk.iter().zip(held) {
                if ok == 0 {
                    tracing::warn!(name = %name, "name registered elsewhere meanwhile; closing this connection");
                    self.stats.lost_names.fetch_add(1, Ordering::Relaxed);
                    self.mem().unregister(name, r.conn_id);
                    lost.push(r.conn_id);
                }
            }
        }
        self.succeeded();
        Ok(lost)
    }

    fn invocation<'s>(
        &self,
        script: &'s redis::Script,
        name: &str,
        r: &Registration,
    ) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(presence_key(name))
            .arg(b64(&r.public_key))
            .arg(&self.instance)
            .arg(r.conn_id)
            .arg(Record::of(r))
            .arg(u64::try_from(PRESENCE_TTL.as_millis()).unwrap_or(u64::MAX));
        inv
    }

    /// Writes one local daemon's entry now (its UDP endpoint moved).
    async fn push_one(&self, name: &str) {
        let Some(r) = self.mem().get(name).cloned() else {
            return;
        };
        let Ok(mut c) = self.conn() else { return };
        let r: Result<i64, _> = self
            .invocation(&self.refresh, name, &r)
            .invoke_async(&mut c)
            .await;
        if let Err(e) = r {
            self.failed(&e);
        }
    }

    /// A daemon registered on another instance, if any.
    async fn lookup(&self, name: &str) -> Result<Option<Registration>, StoreError> {
        let mut c = self.conn()?;
        let fields: Vec<Option<String>> = self
            .lookup
            .key(presence_key(name))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.failed(&e))?;
        self.succeeded();
        let mut f = fields.into_iter();
        let mut next = || f.next().flatten();
        let entry = parse_entry(next(), next(), next(), next());
        // Our own entry that the registry no longer has (left, cleanup on
        // its way) is nobody to punch.
        Ok(entry.filter(|r| r.instance.as_deref() != Some(self.instance.as_str())))
    }

    /// Takes the queue of signals to publish (once: the publisher task).
    pub(crate) fn take_outbox(&self) -> Option<mpsc::Receiver<(String, String)>> {
        unpoisoned(&self.outbox_rx).take()
    }

    /// Publishes a batch of queued signals in one round trip.
    pub(crate) async fn publish(&self, batch: &[(String, String)]) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        let mut pipe = redis::pipe();
        for (chan, payload) in batch {
            pipe.cmd("PUBLISH").arg(chan).arg(payload).ignore();
        }
        match pipe.query_async::<()>(&mut c).await {
            Ok(()) => {
                self.stats
                    .signals_sent
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats
                    .signals_dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                Err(self.failed(&e))
            }
        }
    }

    /// Queues this instance's own echo, to time publish → deliver.
    pub(crate) fn echo(&self) {
        let sent_us = crate::protocol::unix_time_us();
        let me = self.instance.clone();
        let _ = self.send(&me, Signal::Echo { sent_us });
    }

    pub(crate) const PUBLISH_BATCH: usize = PUBLISH_BATCH;

    /// Handles one message from this instance's channel: the store's part
    /// here, the connections' part returned. Refused (and counted by the
    /// caller) if it is too large, does not parse, or would grow a table
    /// past its bound.
    pub(crate) fn receive(&self, payload: &[u8]) -> Result<Vec<Action>, SignalRefusal> {
        if payload.len() > MAX_SIGNAL_BYTES {
            return Err(SignalRefusal::TooLarge);
        }
        let env: Envelope =
            serde_json::from_slice(payload).map_err(|_| SignalRefusal::Malformed)?;
        if env.from.is_empty() || env.from.len() > 64 {
            return Err(SignalRefusal::Malformed);
        }
        self.stats.signals_received.fetch_add(1, Ordering::Relaxed);
        let now = crate::protocol::unix_time_us();
        Ok(match env.sig {
            Signal::Echo { sent_us } => {
                if env.from == self.instance {
                    self.clock.add_hop(now.saturating_sub(sent_us));
                }
                Vec::new()
            }
            Signal::Replace { conn_id } => vec![Action::Replace(conn_id)],
            Signal::Report {
                session,
                name,
                relayed,
            } => {
                self.mem().report(&session, &name, relayed);
                Vec::new()
            }
            Signal::SideLeft { session, name } => {
                match self.mem().side_left(&session, &name, now) {
                    Some(to) => vec![Action::Deliver(
                        to,
                        Box::new(ServerMsg::PunchAborted {
                            session,
                            peer: name,
                        }),
                    )],
                    None => Vec::new(),
                }
            }
            Signal::Deliver {
                conn_id,
                name,
                mut msg,
            } => {
                match &mut msg {
                    ServerMsg::Punch(order) => {
                        order.at_us = self.clock.to_local(order.at_us);
                        let mut f = unpoisoned(&self.foreign);
                        let ttl = micros(SESSION_TTL);
                        if f.len() >= MAX_FOREIGN {
                            f.retain(|_, s| now.saturating_sub(s.created_us) < ttl);
                        }
                        if f.len() >= MAX_FOREIGN {
                            return Err(SignalRefusal::TooManySessions);
                        }
                        f.insert(
                            order.session.clone(),
                            Foreign {
                                home: env.from.clone(),
                                name: name.clone(),
                                created_us: now,
                            },
                        );
                    }
                    ServerMsg::PunchAborted { session, .. } => {
                        unpoisoned(&self.foreign).remove(session.as_str());
                    }
                    _ => {}
                }
                let to = Recipient {
                    name,
                    conn_id,
                    instance: None,
                };
                vec![Action::Deliver(to, Box::new(msg))]
            }
        })
    }

    /// A punch order delivered from another instance could not be queued
    /// for its daemon: the session's home is told, so the other side stops.
    pub(crate) fn undeliverable(&self, session: &str, name: &str) {
        let home = unpoisoned(&self.foreign).remove(session).map(|f| f.home);
        if let Some(home) = home {
            self.send(
                &home,
                Signal::SideLeft {
                    session: session.to_owned(),
                    name: name.to_owned(),
                },
            );
        }
    }

    async fn register_shared(
        &self,
        name: &str,
        r: &Registration,
    ) -> Result<Option<(String, u64)>, StoreError> {
        let mut c = self.conn()?;
        let reply: Vec<String> = self
            .invocation(&self.register, name, r)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.failed(&e))?;
        self.succeeded();
        match reply.first().map(String::as_str) {
            Some("taken") => Err(StoreError::refused(
                ErrorCode::NameTaken,
                format!("the name {name} is registered with another key on another instance; pick another name or stop the other daemon"),
            )),
            Some("replaced") => {
                let inst = reply.get(1).cloned().unwrap_or_default();
                let conn = reply.get(2).and_then(|c| c.parse().ok()).unwrap_or(0);
                Ok(Some((inst, conn)))
            }
            _ => Ok(None),
        }
    }
}

impl Store for RedisStore {
    fn register<'a>(
        &'a self,
        name: &'a str,
        registration: Registration,
        max_clients: usize,
    ) -> StoreFuture<'a, Registered> {
        Box::pin(async move {
            let conn_id = registration.conn_id;
            let snapshot = registration.clone();
            let registered = self.mem().register(name, registration, max_clients)?;
            match self.register_shared(name, &snapshot).await {
                Ok(Some((inst, old))) if inst != self.instance => {
                    // Held on another instance with the same key: that
                    // connection must go.
                    self.send(&inst, Signal::Replace { conn_id: old });
                }
                Ok(_) => {}
                Err(e @ StoreError::Refused { .. }) => {
                    self.mem().unregister(name, conn_id);
                    return Err(e);
                }
                // Degraded: this instance's rules only; the refresh
                // writes the entry once Redis is back.
                Err(e) => tracing::debug!(error = %e, "registered locally only"),
            }
            Ok(registered)
        })
    }

    fn unregister<'a>(&'a self, name: &'a str, conn_id: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            if !self.mem().unregister(name, conn_id) {
                return Ok(false);
            }
            if let Ok(mut c) = self.conn() {
                let r: Result<i64, _> = self
                    .unregister
                    .key(presence_key(name))
                    .arg(&self.instance)
                    .arg(conn_id)
                    .invoke_async(&mut c)
                    .await;
                // If this fails the entry expires by itself.
                if let Err(e) = r {
                    self.failed(&e);
                }
            }
            Ok(true)
        })
    }

    fn set_rtt<'a>(&'a self, name: &'a str, rtt_us: u64) -> StoreFuture<'a, ()> {
        // Shared at the next refresh: RTTs move slowly.
        self.mem().set_rtt(name, rtt_us);
        Box::pin(std::future::ready(Ok(())))
    }

    fn probe_key<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<ProbeKey>> {
        let key = self.mem().probe_key(name);
        Box::pin(std::future::ready(Ok(key)))
    }

    fn record_probe<'a>(&'a self, name: &'a str, probe: Probe) -> StoreFuture<'a, ProbeRecorded> {
        Box::pin(async move {
            let recorded = self.mem().record_probe(name, probe);
            if recorded == (ProbeRecorded::Current { moved: true }) {
                // A peer elsewhere needs the UDP endpoint for its next punch.
                self.push_one(name).await;
            }
            Ok(recorded)
        })
    }

    fn observe_alt<'a>(
        &'a self,
        name: &'a str,
        public_key: [u8; 32],
        addr: SocketAddr,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let recorded = self.mem().observe_alt(name, public_key, addr);
            if recorded {
                // Peers on other instances punch it next time.
                self.push_one(name).await;
            }
            Ok(recorded)
        })
    }

    fn coordinate<'a>(
        &'a self,
        from: &'a str,
        peer: &'a str,
        now_us: u64,
        limits: PunchLimits,
    ) -> StoreFuture<'a, [Addressed; 2]> {
        Box::pin(async move {
            if from == peer || self.mem().get(peer).is_some() {
                return self.mem().coordinate(from, peer, now_us, limits);
            }
            let Some(remote) = self.lookup(peer).await? else {
                // Not here and not elsewhere: the same refusal as alone.
                return self.mem().coordinate(from, peer, now_us, limits);
            };
            let hop = self.clock.hop_margin_us();
            let mut orders =
                self.mem()
                    .coordinate_with(from, peer, Some(&remote), now_us, limits, hop)?;
            orders[1].order.relay_url = Some(self.public_url.clone());
            Ok(orders)
        })
    }

    fn withdraw<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        self.mem().withdraw(session);
        Box::pin(std::future::ready(Ok(())))
    }

    fn report<'a>(
        &'a self,
        session: &'a str,
        name: &'a str,
        relayed: bool,
    ) -> StoreFuture<'a, bool> {
        let known = self.mem().report(session, name, relayed) || {
            let mut f = unpoisoned(&self.foreign);
            // Reported: this side is done with it, so nothing is owed to
            // its home when the daemon leaves later (which would otherwise
            // send a `SideLeft` for every session of the last 30 s).
            let mine = f.get(session).is_some_and(|f| f.name == name);
            match mine.then(|| f.remove(session)).flatten() {
                Some(foreign) => {
                    let home = foreign.home;
                    drop(f);
                    let sig = Signal::Report {
                        session: session.to_owned(),
                        name: name.to_owned(),
                        relayed,
                    };
                    self.send(&home, sig);
                    true
                }
                None => false,
            }
        };
        Box::pin(std::future::ready(Ok(known)))
    }

    fn take_fresh_sessions_of<'a>(
        &'a self,
        name: &'a str,
        now_us: u64,
    ) -> StoreFuture<'a, Vec<(String, Recipient)>> {
        let local = self.mem().take_fresh_sessions_of(name, now_us);
        let window = micros(super::PUNCH_WINDOW);
        let mut gone = Vec::new();
        unpoisoned(&self.foreign).retain(|session, f| {
            let fresh = now_us.saturating_sub(f.created_us) < window;
            if f.name == name && fresh {
                gone.push((session.clone(), f.home.clone()));
                false
            } else {
                true
            }
        });
        for (session, home) in gone {
            self.send(
                &home,
                Signal::SideLeft {
                    session,
                    name: name.to_owned(),
                },
            );
        }
        Box::pin(std::future::ready(Ok(local)))
    }

    fn relay_auth<'a>(&'a self, session: &'a str, token: &'a str) -> StoreFuture<'a, RelayAuth> {
        let r = self.mem().relay_auth(session, token);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn relay_join<'a>(
        &'a self,
        session: &'a str,
        side: usize,
        joiner: u64,
    ) -> StoreFuture<'a, RelayJoin> {
        let r = self.mem().relay_join(session, side, joiner);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn relay_leave<'a>(&'a self, session: &'a str, joiner: u64) -> StoreFuture<'a, ()> {
        self.mem().relay_leave(session, joiner);
        Box::pin(std::future::ready(Ok(())))
    }

    fn send(&self, instance: &str, mut signal: Signal) -> bool {
        if let Signal::Deliver {
            msg: ServerMsg::Punch(order),
            ..
        } = &mut signal
        {
            order.at_us = self.clock.to_cluster(order.at_us);
        }
        let env = Envelope {
            from: self.instance.clone(),
            sig: signal,
        };
        let Ok(payload) = serde_json::to_string(&env) else {
            return false;
        };
        if payload.len() > MAX_SIGNAL_BYTES
            || self.outbox.try_send((channel(instance), payload)).is_err()
        {
            self.stats.signals_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::registration;
    use super::*;

    fn store() -> RedisStore {
        // Never connected: every shared operation is unavailable.
        RedisStore::new("redis://127.0.0.1:1", "http://203.0.113.1:8080").unwrap()
    }

    #[test]
    fn presence_records_parse_with_refusal() {
        let mut r = registration(1, "203.0.113.2:40000", &["192.0.2.2:40000"]);
        r.udp_port = Some(41000);
        let rec = Record::of(&r);
        let key = Some(b64(&r.public_key));
        let entry = |k: Option<String>, v: Option<String>| {
            parse_entry(k, Some("i1".into()), Some("7".into()), v)
        };
        let got = entry(key.clone(), Some(rec.clone())).unwrap();
        assert_eq!(
            (got.conn_id, got.observed, got.udp_port),
            (7, r.observed, Some(41000))
        );
        assert_eq!(got.instance.as_deref(), Some("i1"));
        assert!(entry(key.clone(), Some("{".into())).is_none());
        assert!(entry(Some("not a key".into()), Some(rec.clone())).is_none());
        assert!(entry(key.clone(), None).is_none());
        let many: Vec<String> = (0..17).map(|i| format!("\"192.0.2.{i}:1\"")).collect();
        let big = format!(
            "{{\"observed\":\"203.0.113.2:1\",\"local_addrs\":[{}]}}",
            many.join(",")
        );
        assert!(
            entry(key.clone(), Some(big)).is_none(),
            "too many addresses"
        );
        assert!(entry(key, Some("x".repeat(MAX_RECORD_BYTES + 1))).is_none());
    }

    #[test]
    fn both_families_travel_in_the_record_and_only_as_the_other_family() {
        let mut r = registration(1, "203.0.113.2:40000", &[]);
        r.alt_observed = Some("[2001:db8:a::2]:40000".parse().unwrap());
        r.alt_udp_observed = Some("[2001:db8:a::2]:40001".parse().unwrap());
        let key = Some(b64(&r.public_key));
        let got = parse_entry(
            key.clone(),
            Some("i1".into()),
            Some("7".into()),
            Some(Record::of(&r)),
        )
        .unwrap();
        assert_eq!(
            (got.alt_observed, got.alt_udp_observed),
            (r.alt_observed, r.alt_udp_observed)
        );
        // A record claiming an "other family" endpoint of the same family
        // as its observed one is not believed.
        let same = "{\"observed\":\"203.0.113.2:1\",\"alt_observed\":\"203.0.113.9:1\"}";
        let got = parse_entry(key, Some("i1".into()), Some("7".into()), Some(same.into())).unwrap();
        assert_eq!(got.alt_observed, None);
        // Without IPv6 the record is as before (no new keys).
        assert!(!Record::of(&registration(2, "203.0.113.3:1", &[])).contains("alt_"));
    }

    #[test]
    fn signals_are_size_limited_and_parsed_with_refusal() {
        let s = store();
        assert_eq!(
            s.receive(&vec![b' '; MAX_SIGNAL_BYTES + 1]),
            Err(SignalRefusal::TooLarge)
        );
        assert_eq!(
            s.receive(b"{\"from\":\"x\"}"),
            Err(SignalRefusal::Malformed)
        );
        assert_eq!(
            s.receive(b"{\"from\":\"\",\"sig\":{\"t\":\"replace\",\"conn_id\":1}}"),
            Err(SignalRefusal::Malformed)
        );
        assert_eq!(
            s.receive(b"{\"from\":\"x\",\"sig\":{\"t\":\"replace\",\"conn_id\":1}}"),
            Ok(vec![Action::Replace(1)])
        );
    }

    #[test]
    fn orders_cross_in_cluster_time_and_their_session_is_remembered() {
        let a = store();
        let b = store();
        // A's clock is 5 ms behind Redis, B's 3 ms ahead.
        a.clock.add_time_sample(100, 5_000);
        b.clock.add_time_sample(100, -3_000);
        let order = crate::protocol::PunchOrder {
            session: "s1".into(),
            peer: "alice".into(),
            public_key: String::new(),
            candidates: vec![],
            udp_candidates: vec![],
            at_us: 1_000_000,
            initiator: false,
            relay_token: "t".into(),
            relay_url: Some("http://203.0.113.1:8080".into()),
            strategy: None,
            signature: None,
        };
        let sig = Signal::Deliver {
            conn_id: 9,
            name: "bob".into(),
            msg: ServerMsg::Punch(order),
        };
        assert!(a.send(&b.instance, sig));
        let (chan, payload) = a.take_outbox().unwrap().try_recv().unwrap();
        assert_eq!(chan, channel(&b.instance));
        let actions = b.receive(payload.as_bytes()).unwrap();
        let [Action::Deliver(to, msg)] = &actions[..] else {
            panic!("{actions:?}")
        };
        let ServerMsg::Punch(got) = &**msg else {
            panic!("{msg:?}")
        };
        assert_eq!((to.conn_id, to.instance.as_ref()), (9, None));
        // The same instant: 1 s on A is 1.005 s in Redis, 1.008 s on B.
        assert_eq!(got.at_us, 1_008_000);
        // Only bob may report it; his result goes home to A, once.
        assert!(!futures::executor::block_on(b.report("s1", "eve", false)).unwrap());
        assert!(futures::executor::block_on(b.report("s1", "bob", false)).unwrap());
        assert!(!futures::executor::block_on(b.report("s1", "bob", false)).unwrap());
    }

    #[test]
    fn the_hop_margin_follows_the_worst_recent_hop() {
        let c = Clock::default();
        assert_eq!(c.hop_margin_us(), 2_000, "a floor before any sample");
        c.add_hop(300);
        c.add_hop(4_000);
        assert_eq!(c.hop_margin_us(), 8_000);
        c.add_hop(u64::MAX);
        assert_eq!(c.hop_margin_us(), 500_000, "capped");
    }

    #[test]
    fn without_redis_local_daemons_still_register_and_punch() {
        let s = store();
        futures::executor::block_on(async {
            let reg = |k, ip| registration(k, ip, &[]);
            s.register("alice", reg(1, "203.0.113.2:1"), 10)
                .await
                .unwrap();
            s.register("bob", reg(2, "203.0.113.3:1"), 10)
                .await
                .unwrap();
            let lim = PunchLimits {
                max_pending: 10,
                max_per_requester: 10,
            };
            let [a, b] = s.coordinate("alice", "bob", 0, lim).await.unwrap();
            assert_eq!(a.order.at_us, b.order.at_us);
            assert!(a.order.relay_url.is_none() && b.order.relay_url.is_none());
            // A peer that only Redis could know of: retryable, not unknown.
            let e = s.coordinate("alice", "carol", 0, lim).await.unwrap_err();
            assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        });
        assert!(!s.is_up());
    }
}
