//! `GET /v1/relay/{session}?token=…`: the fallback byte relay.
//!
//! Only the two daemons of a punch session the server itself created can
//! join: each presents the per-side token it got in its punch order, so a
//! third party that learns the session id still cannot join. The first side
//! waits (bounded) for the second; the second hands its socket to the first,
//! whose task then pumps binary frames both ways. The daemons run their
//! end-to-end TLS inside, so this code only ever sees ciphertext.
//!
//! Bounds: relays in total and per daemon, bytes per second per session
//! and direction, frame size, and how long a lonely side waits.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tracing::{info, warn, Instrument};

use super::store::{RelayAuth, RelayJoin};
use super::Shared;
use crate::protocol::ErrorCode;

/// How long the first side waits for the second.
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest relayed frame.
pub(crate) const MAX_RELAY_FRAME: usize = 256 * 1024;

/// Query string of a relay request.
#[derive(Debug, Deserialize)]
pub(crate) struct RelayQuery {
    token: String,
}

/// Holds a relay slot for a daemon; released on drop.
struct Slot {
    shared: Arc<Shared>,
    name: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.local.release_relay(&self.name);
    }
}

fn refuse(shared: &Shared, status: StatusCode, why: &str) -> Response {
    shared.metrics.refused(ErrorCode::RelayRefused);
    info!(reason = why, "relay refused");
    (status, format!("{why}\n")).into_response()
}

pub(crate) async fn handler(
    ws: WebSocketUpgrade,
    Path(session): Path<String>,
    Query(q): Query<RelayQuery>,
    State(shared): State<Arc<Shared>>,
) -> Response {
    let limits = &shared.cfg.limits;
    // Authorize and take a slot before upgrading.
    let (side, name) = match shared.store.relay_auth(&session, &q.token).await {
        Ok(RelayAuth::Side { side, name }) => (side, name),
        Ok(RelayAuth::Unknown) => {
            return refuse(
                &shared,
                StatusCode::NOT_FOUND,
                "no such punch session (expired?)",
            )
        }
        Ok(RelayAuth::WrongToken) => {
            return refuse(
                &shared,
                StatusCode::FORBIDDEN,
                "wrong relay token for this session",
            )
        }
        Err(e) => {
            warn!(error = %e, "relay not authorized");
            return refuse(
                &shared,
                StatusCode::SERVICE_UNAVAILABLE,
                "the rendezvous registry is unavailable; retry shortly",
            );
        }
    };
    if !shared
        .local
        .claim_relay(&name, limits.max_relays * 2, limits.max_relays_per_daemon)
    {
        return refuse(
            &shared,
            StatusCode::TOO_MANY_REQUESTS,
            "relay capacity reached",
        );
    }
    let slot = Slot {
        shared: shared.clone(),
        name: name.clone(),
    };
    let tracker = shared.tracker.clone();
    let span = tracing::info_span!("relay", %session, %name, side);
    ws.max_message_size(MAX_RELAY_FRAME)
        .max_frame_size(MAX_RELAY_FRAME)
        .on_upgrade(move |socket| {
            tracker.track_future(join(socket, session, side, slot, shared).instrument(span))
        })
}

async fn join(socket: WebSocket, session: String, side: usize, slot: Slot, shared: Arc<Shared>) {
    let joiner = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    // Ready to receive before the store can name us to the other side.
    let partner = shared.local.await_partner(joiner);
    match shared.store.relay_join(&session, side, joiner).await {
        // Second side: hand our socket to the waiting first side.
        Ok(RelayJoin::Pair { partner }) => {
            shared.local.forget_partner(joiner);
            if !shared.local.hand_to_partner(partner, socket) {
                warn!("partner gave up just now");
            }
            return;
        }
        Ok(RelayJoin::Wait { displaced }) => {
            // The same side twice: keep the newer socket waiting.
            if let Some(older) = displaced {
                shared.local.forget_partner(older);
            }
        }
        Ok(RelayJoin::Gone) => {
            shared.local.forget_partner(joiner);
            info!("the punch session is gone (expired or already paired)");
            return;
        }
        Err(e) => {
            shared.local.forget_partner(joiner);
            warn!(error = %e, "cannot join the relay");
            return;
        }
    }
    let partner = tokio::select! {
        r = tokio::time::timeout(PAIR_TIMEOUT, partner) => r.ok().and_then(Result::ok),
        _ = shared.cancel.cancelled() => None,
    };
    let Some(partner) = partner else {
        shared.local.forget_partner(joiner);
        if let Err(e) = shared.store.relay_leave(&session, joiner).await {
            warn!(error = %e, "relay wait not cleared");
        }
        info!("the other side never joined the relay");
        return;
    };
    shared.metrics.relays.fetch_add(1, Ordering::Relaxed);

    shared.metrics.relays_active.fetch_add(1, Ordering::Relaxed);
    info!("relay paired");
    let started = Instant::now();
    let bytes = pump(socket, partner, &shared).await;
    shared.metrics.relays_active.fetch_sub(1, Ordering::Relaxed);
    info!(bytes, secs = started.elapsed().as_secs(), "relay ended");
    drop(slot);
}

/// Copies binary frames both ways until either side closes or the server
/// stops. Returns the bytes carried.
async fn pump(a: WebSocket, b: WebSocket, shared: &Shared) -> u64 {
    let rate = shared.cfg.limits.relay_bytes_per_second;
    let (a_tx, a_rx) = a.split();
    let (b_tx, b_rx) = b.split();
    let one_way = |mut rx: futures::stream::SplitStream<WebSocket>,
                   mut tx: futures::stream::SplitSink<WebSocket, Message>| async move {
        let mut limiter = ByteBudget::new(rate);
        let mut total = 0u64;
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Binary(data) => {
                    let n = data.len() as u64;
                    if let Some(wait) = limiter.take(n, Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                    total += n;
                    shared.metrics.relay_bytes.fetch_add(n, Ordering::Relaxed);
                    if tx.send(Message::Binary(data)).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = tx.close().await;
        total
    };
    tokio::select! {
        (x, y) = async { tokio::join!(one_way(a_rx, b_tx), one_way(b_rx, a_tx)) } => x + y,
        _ = shared.cancel.cancelled() => 0,
    }
}

/// A byte budget refilled at `rate` per second, allowing a one-second burst.
/// `take` says how long to wait so the average stays at the rate.
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
}
