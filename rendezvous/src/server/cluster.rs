//! Several instances sharing one Redis: the tasks around
//! [`super::store::RedisStore`] and delivery to a daemon wherever it is.
//!
//! - `maintain` (every second): connects if not yet, samples the clock
//!   offset to Redis (`TIME`, also the health check), publishes an echo to
//!   time publish → deliver, and every [`REFRESH_EVERY`] (and at once when
//!   Redis comes back, which may have lost everything) rewrites this
//!   instance's presence entries;
//! - `publisher`: drains the bounded signal queue, a pipelined batch per
//!   round trip;
//! - `subscriber`: this instance's channel; each message is size-checked
//!   and parsed by the store, and what it asks of connections (deliver an
//!   order, close a replaced connection) is done here.
//!
//! None of them ever ends the server: a Redis failure is counted, logged
//! once per outage, and retried on the next tick; `/healthz` says
//! `degraded` meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use futures::StreamExt as _;
use punch_service::prometheus::{Exposition, Kind};
use tracing::{debug, warn};

use super::local::Undelivered;
use super::store::{channel, Action, Recipient, RedisStore, Signal, REFRESH_EVERY};
use super::Shared;
use crate::protocol::ServerMsg;

/// How often the maintenance tick runs.
const TICK: Duration = Duration::from_secs(1);
/// A subscription attempt that takes longer has failed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Queues `msg` for `to`: a local connection's outbox, or the signal queue
/// towards its instance.
pub(crate) fn deliver(shared: &Shared, to: &Recipient, msg: ServerMsg) -> Result<(), Undelivered> {
    match &to.instance {
        None => shared.local.deliver(to, msg),
        Some(instance) => {
            let signal = Signal::Deliver {
                conn_id: to.conn_id,
                name: to.name.clone(),
                msg,
            };
            if shared.store.send(instance, signal) {
                Ok(())
            } else {
                Err(Undelivered::Full)
            }
        }
    }
}

/// Starts the shared store's tasks; they stop with the server.
pub(crate) fn spawn(shared: &Arc<Shared>, store: Arc<RedisStore>) {
    shared
        .tracker
        .spawn(maintain(shared.clone(), store.clone()));
    shared
        .tracker
        .spawn(publisher(shared.clone(), store.clone()));
    shared.tracker.spawn(subscriber(shared.clone(), store));
}

async fn maintain(shared: Arc<Shared>, store: Arc<RedisStore>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refreshed: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if store.connect().await.is_err() || store.tick().await.is_err() {
            // Refresh everything as soon as it is back.
            refreshed = None;
            continue;
        }
        store.echo();
        if refreshed.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
            match store.refresh_all().await {
                Ok(lost) => {
                    refreshed = Some(Instant::now());
                    for conn_id in lost {
                        shared.local.replace(conn_id);
                    }
                }
                Err(e) => debug!(error = %e, "presence refresh failed"),
            }
        }
    }
}

async fn publisher(shared: Arc<Shared>, store: Arc<RedisStore>) {
    let Some(mut rx) = store.take_outbox() else {
        return;
    };
    let mut batch = Vec::with_capacity(RedisStore::PUBLISH_BATCH);
    loop {
        let n = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            n = rx.recv_many(&mut batch, RedisStore::PUBLISH_BATCH) => n,
        };
        if n == 0 {
            return;
        }
        if let Err(e) = store.publish(&batch).await {
            debug!(error = %e, dropped = n, "signals not published");
        }
        batch.clear();
    }
}

async fn subscriber(shared: Arc<Shared>, store: Arc<RedisStore>) {
    let chan = channel(store.instance());
    loop {
        let attempt = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
            let mut ps = store.client().get_async_pubsub().await?;
            ps.subscribe(&chan).await?;
            Ok::<_, redis::RedisError>(ps)
        })
        .await;
        match attempt {
            Ok(Ok(mut ps)) => {
                let mut messages = ps.on_message();
                loop {
                    tokio::select! {
                        _ = shared.cancel.cancelled() => return,
                        m = messages.next() => match m {
                            Some(m) => handle(&shared, &store, m.get_payload_bytes()),
                            None => break,
                        },
                    }
                }
                warn!("redis subscription lost; resubscribing");
            }
            Ok(Err(e)) => {
                store.failed(&e);
            }
            Err(_) => {
                store.stats.redis_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

fn handle(shared: &Shared, store: &RedisStore, payload: &[u8]) {
    let actions = match store.receive(payload) {
        Ok(a) => a,
        Err(why) => {
            store.stats.signals_refused.fetch_add(1, Ordering::Relaxed);
            warn!(reason = ?why, bytes = payload.len(), "signal from redis refused");
            return;
        }
    };
    for action in actions {
        match action {
            Action::Replace(conn_id) => shared.local.replace(conn_id),
            Action::Deliver(to, msg) => {
                let session = match &*msg {
                    ServerMsg::Punch(o) => Some(o.session.clone()),
                    _ => None,
                };
                if deliver(shared, &to, *msg).is_err() {
                    if let Some(session) = session {
                        store.undeliverable(&session, &to.name);
                    }
                }
            }
        }
    }
}

/// `GET /healthz`: 200 with `{"status":"ok"|"degraded", ...}`. Degraded
/// (Redis unreachable) still serves this instance's daemons, so it is
/// still healthy for a liveness probe.
pub(crate) async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let body = match &shared.cluster {
        None => serde_json::json!({"status": "ok", "registry": "memory"}),
        Some(s) => serde_json::json!({
            "status": if s.is_up() { "ok" } else { "degraded" },
            "registry": "redis",
            "redis": if s.is_up() { "up" } else { "unreachable" },
            "instance": s.instance(),
        }),
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
}

/// The shared store's metric families (only with `redis`).
pub(crate) fn render(store: &RedisStore) -> String {
    let c = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    let st = &store.stats;
    let mut out = Exposition::new();
    out.family(
        "punch_rendezvous_redis_up",
        Kind::Gauge,
        "1 if the last Redis command succeeded.",
    )
    .sample(&[], u8::from(store.is_up()));
    out.family(
        "punch_rendezvous_redis_failures_total",
        Kind::Counter,
        "Redis commands or connections that failed.",
    )
    .sample(&[], c(&st.redis_failures));
    out.family(
        "punch_rendezvous_cluster_signals_total",
        Kind::Counter,
        "Signals between instances, by direction.",
    )
    .sample(&[("direction", "sent")], c(&st.signals_sent))
    .sample(&[("direction", "received")], c(&st.signals_received));
    out.family(
        "punch_rendezvous_cluster_signals_refused_total",
        Kind::Counter,
        "Signals from Redis refused: too large, unparsable, or over a bound.",
    )
    .sample(&[], c(&st.signals_refused));
    out.family(
        "punch_rendezvous_cluster_signals_dropped_total",
        Kind::Counter,
        "Signals not sent: queue full or Redis failed.",
    )
    .sample(&[], c(&st.signals_dropped));
    out.family(
        "punch_rendezvous_cluster_names_lost_total",
        Kind::Counter,
        "Local registrations found taken over elsewhere at refresh.",
    )
    .sample(&[], c(&st.lost_names));
    out.family(
        "punch_rendezvous_cluster_clock_offset_microseconds",
        Kind::Gauge,
        "Redis clock minus this host's, as measured.",
    )
    .sample(&[], store.offset_us());
    out.family(
        "punch_rendezvous_cluster_hop_microseconds",
        Kind::Gauge,
        "Worst recent publish-to-deliver latency through Redis.",
    )
    .sample(&[], store.hop_max_us());
    out.finish()
}
