//! The local admin API: `GET /v1/status` (JSON), `GET /metrics`
//! (Prometheus), `GET /healthz`, and `POST /v1/peers/{name}/repunch` to drop
//! a peer's tunnel and punch again (for operators and the lab's timing
//! measurements). It listens on loopback unless the config says otherwise.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::peer::{PeerCmd, PeerHandle};
use crate::status::StatusBoard;

#[derive(Clone)]
struct Admin {
    board: Arc<StatusBoard>,
    peers: Arc<HashMap<String, PeerHandle>>,
}

/// Serves the admin API until cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    board: Arc<StatusBoard>,
    peers: HashMap<String, PeerHandle>,
    cancel: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/v1/status",
            get(|State(a): State<Admin>| async move { Json(a.board.snapshot()) }),
        )
        .route("/v1/peers/{name}/repunch", post(repunch))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Admin {
            board,
            peers: Arc::new(peers),
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "admin API stopped");
    }
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.board.render_metrics(),
    )
}

async fn repunch(State(a): State<Admin>, Path(name): Path<String>) -> impl IntoResponse {
    match a.peers.get(&name) {
        Some(p) => {
            p.send(PeerCmd::Repunch).await;
            (StatusCode::ACCEPTED, "re-punching\n".to_owned())
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("no peer named {name} in [[peers]]\n"),
        ),
    }
}
