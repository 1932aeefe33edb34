//! `GET /v1/relay/{session}?token=…`: the fallback byte relay.
//!
//! Only the two daemons of a punch session the server itself created can
//! join: each presents the per-side token it got in its punch order, so a
//! third party that learns the session id still cannot join. The first side
//! waits (bounded) for the second; the second hands its socket to the first,
//! whose task then pumps binary frames both ways. The daemons run their
//! end-to-end TLS inside, so this code only ever sees ciphertext.
//!
//! Bounds, each refusing with a logged reason and a count in
//! `punch_rendezvous_relay_refusals_total{reason}`:
//! - relay sockets held: `max_relays` sessions' worth in total (503,
//!   `server_cap`) and `max_relays_per_daemon` per daemon (429,
//!   `daemon_cap`); both sides of a paired session hold their slot until
//!   the relay ends;
//! - a lone side waits [`PAIR_TIMEOUT`] for the other, then is closed
//!   (1013, `pair_timeout`);
//! - the same side joining twice: the newer socket waits, the older is
//!   closed (1008, `replaced`);
//! - `relay_bytes_per_second` per session and direction, with a one-second
//!   burst; every frame a side sends is charged (binary, text, ping and
//!   pong, plus its header), so no kind of frame is free;
//! - `relay_total_bytes_per_second` for the whole server, paced the same
//!   way after the session's own budget;
//! - a paired relay that carries no frame either way for
//!   `relay_idle_timeout`, or that has lived `relay_max_lifetime`, is
//!   closed (`idle_timeout`, `max_lifetime`);
//! - [`MAX_RELAY_FRAME`] per frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::accept::{ConnPermit, Permit};
use super::local::{Handoff, RelayCap};
use super::metrics::RelayRefusal;
use super::store::{RelayAuth, RelayJoin};
use super::Shared;

/// How long the first side waits for the second. Both sides fall back to
/// the relay at the same deadline, so a partner that is not here within
/// seconds is not coming; the bound keeps a lone waiter from holding its
/// slot for long.
pub(crate) const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest relayed frame.
pub(crate) const MAX_RELAY_FRAME: usize = 256 * 1024;
/// What a frame costs beyond its payload: the smallest header a client
/// frame has (2 bytes, plus its 4-byte mask), so even empty frames spend
/// budget.
const FRAME_COST: u64 = 6;
/// Close code for "try again later" (RFC 6455 §7.4.1 / IANA registry).
const CLOSE_TRY_AGAIN: u16 = 1013;
/// Close code for a policy violation (RFC 6455 §7.4.1).
const CLOSE_POLICY: u16 = 1008;

/// Query string of a relay request.
#[derive(Debug, Deserialize)]
pub(crate) struct RelayQuery {
    token: String,
}

/// Holds a relay slot for a daemon; released on drop.
struct DaemonSlot {
    shared: Arc<Shared>,
    name: String,
}

/// What one relay side holds while it lives: its daemon's relay slot and
/// its connection's place under `max_connections`.
struct Slot {
    _inner: Option<DaemonSlot>,
    _permit: Option<Arc<Permit>>,
}

impl Drop for DaemonSlot {
    fn drop(&mut self) {
        self.shared.local.release_relay(&self.name);
    }
}

/// Refuses a request before the upgrade, with a reason in the body.
fn refuse(shared: &Shared, status: StatusCode, why: RelayRefusal, message: &str) -> Response {
    shared.metrics.relay_refused(why);
    info!(reason = why.as_str(), message, "relay refused");
    (status, format!("{message}\n")).into_response()
}

/// Closes an upgraded socket that will not be relayed, saying why.
async fn close(
    mut socket: WebSocket,
    shared: &Shared,
    code: u16,
    why: RelayRefusal,
    message: &str,
) {
    shared.metrics.relay_refused(why);
    info!(reason = why.as_str(), message, "relay closed unpaired");
    let frame = CloseFrame {
        code,
        reason: message.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

pub(crate) async fn handler(
    ws: WebSocketUpgrade,
    Path(session): Path<String>,
    Query(q): Query<RelayQuery>,
    permit: Option<ConnPermit>,
    State(shared): State<Arc<Shared>>,
) -> Response {
    let cfg = shared.cfg();
    let limits = &cfg.limits;
    // Authorize and take a slot before upgrading.
    let (side, name) = match shared.store.relay_auth(&session, &q.token).await {
        Ok(RelayAuth::Side { side, name }) => (side, name),
        Ok(RelayAuth::Unknown) => {
            return refuse(
                &shared,
                StatusCode::NOT_FOUND,
                RelayRefusal::UnknownSession,
                "no such punch session (expired?)",
            )
        }
        Ok(RelayAuth::WrongToken) => {
            return refuse(
                &shared,
                StatusCode::FORBIDDEN,
                RelayRefusal::WrongToken,
                "wrong relay token for this session",
            )
        }
        Err(e) => {
            warn!(error = %e, "relay not authorized");
            return refuse(
                &shared,
                StatusCode::SERVICE_UNAVAILABLE,
                RelayRefusal::StoreUnavailable,
                "the rendezvous registry is unavailable; retry shortly",
            );
        }
    };
    match shared
        .local
        .claim_relay(&name, limits.max_relays * 2, limits.max_relays_per_daemon)
    {
        Ok(()) => {}
        Err(RelayCap::Daemon) => {
            let message = format!(
                "relay capacity reached for this daemon ({} relays at once)",
                limits.max_relays_per_daemon
            );
            return refuse(
                &shared,
                StatusCode::TOO_MANY_REQUESTS,
                RelayRefusal::DaemonCap,
                &message,
            );
        }
        Err(RelayCap::Server) => {
            let message = format!(
                "relay capacity of this server reached ({} relays at once); retry shortly",
                limits.max_relays
            );
            return refuse(
                &shared,
                StatusCode::SERVICE_UNAVAILABLE,
                RelayRefusal::ServerCap,
                &message,
            );
        }
    }
    let slot = DaemonSlot {
        shared: shared.clone(),
        name: name.clone(),
    };
    let tracker = shared.tracker.clone();
    let span = tracing::info_span!("relay", %session, %name, side);
    ws.max_message_size(MAX_RELAY_FRAME)
        .max_frame_size(MAX_RELAY_FRAME)
        .on_upgrade(move |socket| {
            // The socket keeps its place in `max_connections` while it
            // lives; it rides with the slot to whichever task pumps it.
            let permit = permit.map(|Extension(p)| p);
            if let Some(p) = &permit {
                p.upgraded();
            }
            let slot = Slot {
                _inner: Some(slot),
                _permit: permit,
            };
            tracker.track_future(join(socket, session, side, slot, shared).instrument(span))
        })
}

async fn join(socket: WebSocket, session: String, side: usize, slot: Slot, shared: Arc<Shared>) {
    let joiner = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    // Ready to receive before the store can name us to the other side.
    let partner = shared.local.await_partner(joiner);
    match shared.store.relay_join(&session, side, joiner).await {
        // Second side: hand our socket, and our slot with it, to the
        // waiting first side, whose task runs the relay.
        Ok(RelayJoin::Pair { partner }) => {
            shared.local.forget_partner(joiner);
            if !shared
                .local
                .hand_to_partner(partner, socket, Box::new(slot))
            {
                warn!("partner gave up just now");
            }
            return;
        }
        Ok(RelayJoin::Wait { displaced }) => {
            // The same side twice: keep the newer socket waiting.
            if let Some(older) = displaced {
                shared.local.displace(older);
            }
        }
        Ok(RelayJoin::Gone) => {
            shared.local.forget_partner(joiner);
            let message = "the punch session is gone (expired or already paired)";
            close(
                socket,
                &shared,
                CLOSE_POLICY,
                RelayRefusal::UnknownSession,
                message,
            )
            .await;
            return;
        }
        Err(e) => {
            shared.local.forget_partner(joiner);
            warn!(error = %e, "cannot join the relay");
            let message = "the rendezvous registry is unavailable; retry shortly";
            close(
                socket,
                &shared,
                CLOSE_TRY_AGAIN,
                RelayRefusal::StoreUnavailable,
                message,
            )
            .await;
            return;
        }
    }
    let (partner, held) = match wait_for_partner(partner, PAIR_TIMEOUT, &shared.cancel).await {
        Waited::Paired { socket, held } => (socket, held),
        Waited::Displaced => {
            let message = "replaced by a newer join of the same side";
            close(
                socket,
                &shared,
                CLOSE_POLICY,
                RelayRefusal::Replaced,
                message,
            )
            .await;
            return;
        }
        Waited::TimedOut => {
            shared.local.forget_partner(joiner);
            if let Err(e) = shared.store.relay_leave(&session, joiner).await {
                warn!(error = %e, "relay wait not cleared");
            }
            let message = format!(
                "the other side did not join within {}s",
                PAIR_TIMEOUT.as_secs()
            );
            close(
                socket,
                &shared,
                CLOSE_TRY_AGAIN,
                RelayRefusal::PairTimeout,
                &message,
            )
            .await;
            return;
        }
        Waited::Stopped => {
            shared.local.forget_partner(joiner);
            return;
        }
    };
    shared.metrics.relays.fetch_add(1, Ordering::Relaxed);

    shared.metrics.relays_active.fetch_add(1, Ordering::Relaxed);
    info!("relay paired");
    let started = Instant::now();
    let (bytes, ended) = pump(socket, *partner, &shared).await;
    shared.metrics.relays_active.fetch_sub(1, Ordering::Relaxed);
    let secs = started.elapsed().as_secs();
    match ended {
        Ended::Idle => {
            shared.metrics.relay_refused(RelayRefusal::IdleTimeout);
            info!(
                bytes,
                secs,
                reason = "idle_timeout",
                "relay closed: nothing carried for relay_idle_timeout"
            );
        }
        Ended::Lifetime => {
            shared.metrics.relay_refused(RelayRefusal::MaxLifetime);
            info!(
                bytes,
                secs,
                reason = "max_lifetime",
                "relay closed: relay_max_lifetime reached"
            );
        }
        Ended::Closed | Ended::Stopped => info!(bytes, secs, "relay ended"),
    }
    drop((slot, held));
}

/// How a lone side's wait for the other ended.
enum Waited {
    /// The other side's socket, and its slot to keep while relaying.
    Paired {
        socket: Box<WebSocket>,
        held: Box<dyn Send>,
    },
    /// A newer join of this side took over.
    Displaced,
    /// Nobody came within the bound.
    TimedOut,
    /// The server is stopping.
    Stopped,
}

/// Waits up to `within` for the handoff; pure timing, no store or socket,
/// so its bound is unit-tested with paused time.
async fn wait_for_partner(
    handoff: oneshot::Receiver<Handoff>,
    within: Duration,
    cancel: &CancellationToken,
) -> Waited {
    tokio::select! {
        r = tokio::time::timeout(within, handoff) => match r {
            Ok(Ok(Handoff::Partner { socket, held })) => Waited::Paired { socket, held },
            Ok(Ok(Handoff::Displaced)) => Waited::Displaced,
            // Our sender went away without a word: only our own task
            // forgets it, so this is the server letting go.
            Ok(Err(_)) => Waited::Stopped,
            Err(_) => Waited::TimedOut,
        },
        _ = cancel.cancelled() => Waited::Stopped,
    }
}

/// What a received frame costs against the byte budget.
fn frame_cost(msg: &Message) -> u64 {
    let payload = match msg {
        Message::Binary(d) => d.len(),
        Message::Text(t) => t.len(),
        Message::Ping(d) | Message::Pong(d) => d.len(),
        Message::Close(_) => 0,
    };
    payload as u64 + FRAME_COST
}

/// Why a paired relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// A side closed or failed.
    Closed,
    /// No frame either way for `relay_idle_timeout`.
    Idle,
    /// `relay_max_lifetime` reached.
    Lifetime,
    /// The server is stopping.
    Stopped,
}

/// Copies binary frames both ways until either side closes, the relay is
/// idle or too old, or the server stops. Returns the bytes carried and
/// why it ended. Every frame received is paid for before the next is read,
/// from the session's budget and then the server-wide one: the daemons
/// only send binary frames, and a side that sends text or pings instead
/// still gets no more than its rate of the server's attention.
async fn pump(a: WebSocket, b: WebSocket, shared: &Shared) -> (u64, Ended) {
    let cfg = shared.cfg();
    let limits = &cfg.limits;
    let rate = limits.relay_bytes_per_second;
    let started = Instant::now();
    // Milliseconds since `started` of the last frame either way.
    let last_frame = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    let (a_tx, a_rx) = a.split();
    let (b_tx, b_rx) = b.split();
    let one_way = |mut rx: futures::stream::SplitStream<WebSocket>,
                   mut tx: futures::stream::SplitSink<WebSocket, Message>| {
        let (last_frame, total) = (&last_frame, &total);
        async move {
            let mut limiter = ByteBudget::new(rate);
            while let Some(Ok(msg)) = rx.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
                let now = Instant::now();
                let elapsed =
                    u64::try_from(now.duration_since(started).as_millis()).unwrap_or(u64::MAX);
                last_frame.store(elapsed, Ordering::Relaxed);
                let cost = frame_cost(&msg);
                let own = limiter.take(cost, now).unwrap_or_default();
                let global = shared.relay_budget.take(cost, now).unwrap_or_default();
                let wait = own.max(global);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                if let Message::Binary(data) = msg {
                    let n = data.len() as u64;
                    total.fetch_add(n, Ordering::Relaxed);
                    shared.metrics.relay_bytes.fetch_add(n, Ordering::Relaxed);
                    if tx.send(Message::Binary(data)).await.is_err() {
                        break;
                    }
                }
            }
            let _ = tx.close().await;
        }
    };
    let idle = limits.relay_idle_timeout;
    let watch_idle = async {
        // Checked a few times per bound: closes within 1.25x of it.
        let tick = (idle / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(tick).await;
            let last = Duration::from_millis(last_frame.load(Ordering::Relaxed));
            if started.elapsed().saturating_sub(last) >= idle {
                return;
            }
        }
    };
    let ended = tokio::select! {
        _ = async { tokio::join!(one_way(a_rx, b_tx), one_way(b_rx, a_tx)) } => Ended::Closed,
        _ = watch_idle => Ended::Idle,
        _ = tokio::time::sleep(limits.relay_max_lifetime) => Ended::Lifetime,
        _ = shared.cancel.cancelled() => Ended::Stopped,
    };
    (total.load(Ordering::Relaxed), ended)
}

/// The server-wide relay budget (`relay_total_bytes_per_second`), shared
/// by every pump; each frame takes from it after its session's own.
#[derive(Debug)]
pub(crate) struct GlobalBudget(std::sync::Mutex<ByteBudget>);

impl GlobalBudget {
    pub(crate) fn new(rate: u64) -> Self {
        Self(std::sync::Mutex::new(ByteBudget::new(rate)))
    }

    fn take(&self, n: u64, now: Instant) -> Option<Duration> {
        super::lock::unpoisoned(&self.0).take(n, now)
    }
}

/// A byte budget refilled at `rate` per second, allowing a one-second burst.
/// Takes may overdraw it: the taker then waits its share, so concurrent
/// takers are paced in turn to the rate.
/// `take` says how long to wait so the average stays at the rate.
#[derive(Debug)]
pub(crate) struct ByteBudget {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl ByteBudget {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    pub(crate) fn take(&mut self, n: u64, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens -= n as f64;
        (self.tokens < 0.0 && self.rate > 0.0)
            .then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut b = ByteBudget {
            rate: 1000.0,
            tokens: 1000.0,
            last: t0,
        };
        assert_eq!(b.take(1000, t0), None);
        let wait = b.take(500, t0).unwrap();
        assert_eq!(wait, Duration::from_millis(500));
    }

    #[test]
    fn every_kind_of_frame_costs_its_payload_and_header() {
        let cost = |m: Message| frame_cost(&m);
        assert_eq!(cost(Message::Binary(vec![0; 100].into())), 100 + FRAME_COST);
        assert_eq!(
            cost(Message::Text("x".repeat(100).into())),
            100 + FRAME_COST
        );
        assert_eq!(cost(Message::Ping(vec![0; 100].into())), 100 + FRAME_COST);
        assert_eq!(cost(Message::Pong(Vec::new().into())), FRAME_COST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_side_waits_exactly_the_pairing_bound() {
        let cancel = CancellationToken::new();
        let (_tx, rx) = oneshot::channel::<Handoff>();
        let t0 = tokio::time::Instant::now();
        let waited = wait_for_partner(rx, PAIR_TIMEOUT, &cancel).await;
        assert!(matches!(waited, Waited::TimedOut));
        assert_eq!(t0.elapsed(), PAIR_TIMEOUT);

        // And not a moment before.
        let (_tx, rx) = oneshot::channel::<Handoff>();
        let early = PAIR_TIMEOUT - Duration::from_millis(1);
        assert!(
            tokio::time::timeout(early, wait_for_partner(rx, PAIR_TIMEOUT, &cancel))
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_displaced_or_stopped_wait_ends_at_once() {
        let cancel = CancellationToken::new();
        let t0 = tokio::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        tx.send(Handoff::Displaced).unwrap();
        let waited = wait_for_partner(rx, PAIR_TIMEOUT, &cancel).await;
        assert!(matches!(waited, Waited::Displaced));

        let (_tx, rx) = oneshot::channel::<Handoff>();
        cancel.cancel();
        let waited = wait_for_partner(rx, PAIR_TIMEOUT, &cancel).await;
        assert!(matches!(waited, Waited::Stopped));
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}
