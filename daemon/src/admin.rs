//! The local admin API: `GET /v1/status` (JSON), `GET /metrics`
//! (Prometheus) and `GET /healthz`. Read-only; it listens on loopback unless
//! the config says otherwise.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::StatusBoard;

/// Serves the admin API until cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    board: Arc<StatusBoard>,
    cancel: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/v1/status",
            get(|State(b): State<Arc<StatusBoard>>| async move { Json(b.snapshot()) }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(board);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "admin API stopped");
    }
}

async fn metrics(State(b): State<Arc<StatusBoard>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        b.render_metrics(),
    )
}
