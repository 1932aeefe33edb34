//! One punch session of a peer: race the direct paths, fall back to the
//! relay if allowed, and report the result to the rendezvous either way.

use std::net::SocketAddr;

use punch_config::PunchMode;
use punch_rendezvous::protocol::{PathKind, PunchResult};
use tokio::time::Instant;
use tracing::{info, warn};

use super::PeerContext;
use crate::admin::status::{LastPunch, PathState};
use crate::control::{PunchJob, RvCmd};
use crate::fallback::{self, Relayed};
use crate::race::{self, PunchError, Race};
use crate::tunnel::TunnelParts;

/// A successful punch.
pub(crate) struct Punched {
    pub(crate) parts: TunnelParts,
    pub(crate) remote: SocketAddr,
    pub(crate) attempts: u32,
    /// Direct, or relayed after the punch failed.
    pub(crate) path: PathState,
    /// When relayed: why the direct punch failed.
    pub(crate) relay_reason: Option<String>,
    /// When relayed: how long the punch ports should stay quiet before
    /// the first attempt to go direct ([`PunchError::quiet_for`]).
    pub(crate) quiet: Option<std::time::Duration>,
}

/// Punches (every allowed transport, raced: see [`crate::race`]), falls
/// back to the relay if allowed, and reports the result to the rendezvous
/// either way.
pub(crate) async fn run(
    ctx: &PeerContext,
    job: PunchJob,
    allow_relay: bool,
) -> Result<Box<Punched>, PunchError> {
    let PunchJob {
        order,
        fire_at,
        port,
        received,
        relay,
    } = job;
    let fire_at = Instant::from_std(fire_at);
    let received = Instant::from_std(received);
    let deadline = fire_at + ctx.punch_timeout;
    let race = Race {
        identity: &ctx.identity,
        key: &ctx.key,
        role: ctx.role,
        transports: &ctx.transports,
        quic: ctx.quic.as_ref(),
        quic_incoming: &ctx.quic_incoming,
        status: &ctx.status,
        syn_budget: &ctx.syn_budget,
    };
    let result = match relay_at_once(&order, allow_relay, ctx.mode) {
        Some(reason) => {
            info!(%reason, "both NATs are hard: going to the relay at once (direct keeps being retried in the background)");
            Err(PunchError::RelayFirst(reason))
        }
        None => race::punch_direct(&race, &order, fire_at, deadline, port).await,
    };
    let result = result.map(|d| {
        Box::new(Punched {
            parts: d.parts,
            remote: d.remote,
            attempts: d.attempts,
            path: PathState::Direct,
            relay_reason: None,
            quiet: None,
        })
    });
    let result = match result {
        Err(direct) if allow_relay && ctx.mode == PunchMode::Auto => {
            warn!(reason = %direct, "no direct path; falling back to the relay (end-to-end encrypted)");
            let relayed = Relayed {
                rendezvous: &relay,
                role: ctx.role,
                identity: &ctx.identity,
                peer: &ctx.key,
                status: &ctx.status,
            };
            match fallback::connect(relayed, &order).await {
                Ok((parts, remote)) => Ok(Box::new(Punched {
                    parts,
                    remote,
                    attempts: direct.attempts(),
                    path: PathState::Relayed,
                    relay_reason: Some(direct.to_string()),
                    quiet: direct.quiet_for(),
                })),
                Err(relay) => Err(PunchError::Relay {
                    direct: Box::new(direct),
                    relay,
                }),
            }
        }
        Err(direct) if ctx.mode == PunchMode::DirectOnly => {
            Err(PunchError::DirectOnly(Box::new(direct)))
        }
        other => other,
    };
    report(ctx, order.session, received, &result);
    result
}

/// The order's strategy sends this punch to the relay without a direct
/// try: only when the relay may be used now (the first path to the peer;
/// a relayed tunnel's background retries always punch) and the mode is
/// `auto`.
fn relay_at_once(
    order: &punch_rendezvous::protocol::PunchOrder,
    allow_relay: bool,
    mode: PunchMode,
) -> Option<punch_rendezvous::nat::RelayReason> {
    match order.strategy {
        Some(punch_rendezvous::nat::Strategy::RelayFirst { reason })
            if allow_relay && mode == PunchMode::Auto =>
        {
            Some(reason)
        }
        _ => None,
    }
}

/// Logs the outcome, records it in status and reports it to the rendezvous.
fn report(
    ctx: &PeerContext,
    session: String,
    received: Instant,
    result: &Result<Box<Punched>, PunchError>,
) {
    let elapsed = received.elapsed();
    let (path, attempts, reason) = match result {
        Ok(p) if p.path == PathState::Relayed => {
            (PathKind::Relayed, p.attempts, p.relay_reason.clone())
        }
        Ok(p) => (PathKind::Direct, p.attempts, None),
        Err(e) => (PathKind::None, e.attempts(), Some(e.to_string())),
    };
    match &reason {
        None => info!(
            elapsed_ms = elapsed.as_millis() as u64,
            attempts, "punch succeeded"
        ),
        Some(why) => {
            warn!(elapsed_ms = elapsed.as_millis() as u64, attempts, reason = %why, "punch failed; the peer may be offline or behind a NAT that cannot be punched")
        }
    }
    ctx.status.record_punch(LastPunch {
        result: if path == PathKind::Direct {
            "ok"
        } else {
            "failed"
        }
        .to_owned(),
        elapsed_ms: elapsed.as_millis() as u64,
        attempts,
        reason: reason.clone(),
        finished_unix_ms: punch_rendezvous::protocol::unix_time_us() / 1000,
    });
    let report = PunchResult {
        session,
        path,
        elapsed_ms: elapsed.as_millis() as u64,
        attempts,
        reason,
    };
    let _ = ctx.rendezvous.try_send(RvCmd::Report(report));
}

#[cfg(test)]
mod tests {
    use super::*;
    use punch_rendezvous::nat::{RelayReason, Strategy};

    #[test]
    fn relay_first_only_for_a_first_path_in_auto_mode() {
        let mut order = crate::control::order::blank_order();
        assert_eq!(relay_at_once(&order, true, PunchMode::Auto), None);
        order.strategy = Some(Strategy::RelayFirst {
            reason: RelayReason::BothUnpredictable,
        });
        assert_eq!(
            relay_at_once(&order, true, PunchMode::Auto),
            Some(RelayReason::BothUnpredictable)
        );
        // A relayed tunnel retrying direct in the background punches.
        assert_eq!(relay_at_once(&order, false, PunchMode::Auto), None);
        // direct-only never skips the punch.
        assert_eq!(relay_at_once(&order, true, PunchMode::DirectOnly), None);
    }
}
