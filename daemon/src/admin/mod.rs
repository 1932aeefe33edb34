//! The local admin API: `GET /v1/status` (JSON), `GET /metrics`
//! (Prometheus), `GET /healthz`, and `POST /v1/peers/{name}/repunch` to drop
//! a peer's tunnel and punch again (for operators and the lab's timing
//! measurements), and `POST /v1/reload` to re-read `peer.toml`. It listens on loopback unless the config says otherwise.
//! Every request passes [`auth::decide`] first: reads are open on
//! loopback, anything else needs the admin token the daemon writes at
//! start, and the `Host` header must name this listener.
//!
//! Also the status model ([`status`]: what every task reports into and
//! `/v1/status` serves), its Prometheus rendering ([`metrics`](mod@metrics)) and the
//! CLI side of `punchd status` ([`client`]). The admin API reads the status
//! board and asks for re-punches over a channel; it never holds a peer
//! task's handle, so everything above can report into [`status`] without
//! an import cycle.

pub(crate) mod auth;
pub mod client;
pub(crate) mod metrics;
pub mod status;

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use punch_service::prometheus::CONTENT_TYPE;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use status::StatusBoard;

/// A request from the admin API to the rest of the daemon.
#[derive(Debug)]
pub(crate) enum AdminCmd {
    /// Drop this peer's tunnel and punch again.
    Repunch(String),
    /// Re-read the config file; the reply is the summary or the reason
    /// nothing changed.
    Reload(tokio::sync::oneshot::Sender<Result<String, String>>),
}

#[derive(Clone)]
struct Admin {
    board: Arc<StatusBoard>,
    cmds: mpsc::Sender<AdminCmd>,
}

/// Serves the admin API until cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    board: Arc<StatusBoard>,
    cmds: mpsc::Sender<AdminCmd>,
    policy: auth::Policy,
    cancel: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/v1/status",
            get(|State(a): State<Admin>| async move { Json(a.board.snapshot()) }),
        )
        .route("/v1/peers/{name}/repunch", post(repunch))
        .route("/v1/reload", post(reload))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Admin { board, cmds })
        .layer(middleware::from_fn_with_state(Arc::new(policy), guard));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "admin API stopped");
    }
}

/// Refuses what [`auth::decide`] refuses, before any handler runs.
async fn guard(State(policy): State<Arc<auth::Policy>>, req: Request, next: Next) -> Response {
    let verdict = {
        let value = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        auth::decide(
            &policy,
            req.method(),
            value(header::HOST),
            value(header::AUTHORIZATION),
        )
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err((status, why)) => {
            let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
            (status, challenge, why).into_response()
        }
    }
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        a.board.render_metrics(),
    )
}

async fn repunch(State(a): State<Admin>, Path(name): Path<String>) -> impl IntoResponse {
    if a.board.peers().iter().any(|p| p.name == name) {
        let _ = a.cmds.send(AdminCmd::Repunch(name)).await;
        (StatusCode::ACCEPTED, "re-punching\n".to_owned())
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("no peer named {name} in [[peers]]\n"),
        )
    }
}

/// `POST /v1/reload` (`punchd reload`, like `SIGHUP`): 200 with what
/// changed, or 422 with the located error while the running
/// configuration stays.
async fn reload(State(a): State<Admin>) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if a.cmds.send(AdminCmd::Reload(tx)).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down\n".to_owned(),
        );
    }
    match rx.await {
        Ok(Ok(summary)) => (StatusCode::OK, format!("reloaded: {summary}\n")),
        Ok(Err(why)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down\n".to_owned(),
        ),
    }
}
