//! Exposed services: a stream the peer opened asks for a service by name;
//! it is served only if that service is in our `[[expose]]` table and the
//! peer is in its `allow` list, and then only ever to its `target`.

use std::sync::Arc;
use std::time::Duration;

use punch_config::Expose;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::splice::{reset, splice, StreamGuard};
use super::udp;
use crate::admin::status::PeerStatus;
use crate::tunnel::header::{read_header, reply, HeaderError, StreamProtocol, PING_SERVICE};
use crate::tunnel::keepalive::echo_pings;
use crate::tunnel::StreamIo;

/// Time allowed to reach an exposed target.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles one stream the peer opened: the ping service, or an exposed
/// service the peer is allowed to use.
pub(crate) async fn serve_inbound(
    mut stream: StreamIo,
    peer_name: String,
    exposes: Arc<Vec<Expose>>,
    status: Arc<PeerStatus>,
    cancel: CancellationToken,
) {
    let header = match read_header(&mut stream).await {
        Ok(r) => r,
        Err(HeaderError::UnknownProtocol(p)) => {
            warn!(peer = %peer_name, protocol = p, "refused: stream asks for a protocol this daemon does not know (a newer peer?)");
            let _ = reply(
                &mut stream,
                Err(&format!(
                    "unknown stream protocol {p}; upgrade punchd on this side"
                )),
            )
            .await;
            return;
        }
        Err(e) => {
            warn!(peer = %peer_name, error = %e, "bad stream from peer");
            return;
        }
    };
    let request = header.service;
    if request == PING_SERVICE && header.protocol == StreamProtocol::Tcp {
        stream.uncount();
        if reply(&mut stream, Ok(())).await.is_ok() {
            echo_pings(&mut stream, &cancel).await;
        }
        return;
    }
    let Ok((service, index)) = super::ranges::parse(&request) else {
        warn!(peer = %peer_name, %request, "bad stream request from peer");
        let _ = reply(&mut stream, Err("malformed service request")).await;
        return;
    };
    let Some(expose) = exposes.iter().find(|e| e.name.as_str() == service) else {
        warn!(peer = %peer_name, %service, "refused: no such service exposed");
        let _ = reply(
            &mut stream,
            Err(&format!("service {service} is not exposed here")),
        )
        .await;
        return;
    };
    if !expose.allow.iter().any(|a| a.as_str() == peer_name) {
        warn!(peer = %peer_name, %service, "refused: peer not in allow list");
        let _ = reply(
            &mut stream,
            Err(&format!(
                "peer {peer_name} is not allowed to use service {service}"
            )),
        )
        .await;
        return;
    }
    if StreamProtocol::from(expose.protocol) != header.protocol {
        let (asked, is) = match header.protocol {
            StreamProtocol::Tcp => ("tcp", "udp"),
            StreamProtocol::Udp => ("udp", "tcp"),
        };
        warn!(peer = %peer_name, %service, asked, "refused: the service is exposed over the other protocol");
        let _ = reply(
            &mut stream,
            Err(&format!(
                "service {service} is exposed as {is}, not {asked}; set the same protocol on both sides"
            )),
        )
        .await;
        return;
    }
    // Checked after the allow list: a position never widens who may ask.
    let Some(target) = expose.target_range().and_then(|r| r.nth(index)) else {
        warn!(peer = %peer_name, %service, index, "refused: port position outside the target range");
        let _ = reply(
            &mut stream,
            Err(&format!(
                "service {service} has no port #{index}: its target is {}; a range forward needs a target range of the same length",
                expose.target
            )),
        )
        .await;
        return;
    };
    if header.protocol == StreamProtocol::Udp {
        let socket = match udp::expose::connect_target(&target).await {
            Ok(s) => s,
            Err(e) => return refuse_target(&mut stream, &peer_name, service, &e.to_string()).await,
        };
        let mut flow = udp::expose::AdmittedFlow::new(socket, stream);
        if reply(flow.stream(), Ok(())).await.is_err() {
            return;
        }
        let _guard = StreamGuard::new(&status);
        let (to_target, back, dropped) = udp::expose::serve_flow(flow, &cancel).await;
        debug!(peer = %peer_name, %service, to_target, back, dropped, "UDP flow done");
        return;
    }
    let target = match tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(&target))
        .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return refuse_target(&mut stream, &peer_name, service, &e.to_string()).await,
        Err(_) => return refuse_target(&mut stream, &peer_name, service, "timed out").await,
    };
    let _ = target.set_nodelay(true);
    if reply(&mut stream, Ok(())).await.is_err() {
        reset(target);
        return;
    }
    let _guard = StreamGuard::new(&status);
    match splice(target, stream, &cancel).await {
        Ok((up, down)) => debug!(peer = %peer_name, %service, down, up, "stream done"),
        Err(e) => info!(peer = %peer_name, %service, error = %e, "stream cut: target reset"),
    }
}

async fn refuse_target<S: AsyncWrite + Unpin>(
    stream: &mut S,
    peer: &str,
    service: &str,
    why: &str,
) {
    warn!(%peer, %service, error = %why, "cannot reach exposed target; is the service running?");
    let _ = reply(
        stream,
        Err(&format!(
            "service {service} is unavailable on the peer: {why}"
        )),
    )
    .await;
}
