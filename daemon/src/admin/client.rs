//! `punchd status` and `punchd repunch`: talk to a running daemon's admin
//! API, with its admin token when we have it (needed for anything that
//! changes state, and for every request to an `allow_remote` API).

use std::fmt::Write as _;
use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::admin::status::{StatusDoc, Transport};

/// Why the status could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// Nothing answered.
    #[error("cannot reach the daemon's admin API at {addr}: {source}; is punchd running, and is [admin] listen this address?")]
    Connect {
        /// Admin address tried.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("admin API at {0}: {1}")]
    Http(SocketAddr, String),
    /// The daemon refused the request's content (a reload's new file did
    /// not validate); the daemon's reason.
    #[error("{1}")]
    Refused(SocketAddr, String),
}

/// GETs the status document.
pub async fn fetch(addr: SocketAddr, token: Option<&str>) -> Result<StatusDoc, StatusError> {
    let body = request(addr, hyper::Method::GET, "/v1/status", token).await?;
    serde_json::from_slice::<StatusDoc>(&body)
        .map_err(|e| StatusError::Http(addr, format!("not a punchd status document: {e}")))
}

/// Asks the daemon to drop `peer`'s tunnel and punch again; returns its
/// answer.
pub async fn repunch(addr: SocketAddr, peer: &str, token: &str) -> Result<String, StatusError> {
    let path = format!("/v1/peers/{peer}/repunch");
    let body = request(addr, hyper::Method::POST, &path, Some(token)).await?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// Asks the daemon to re-read its config file; returns its answer (what
/// changed), or an error carrying why the new file was refused.
pub async fn reload(addr: SocketAddr, token: &str) -> Result<String, StatusError> {
    let body = request(addr, hyper::Method::POST, "/v1/reload", Some(token)).await?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// One request; a non-2xx answer is an error carrying the daemon's reason.
async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    token: Option<&str>,
) -> Result<Bytes, StatusError> {
    let http = |e: &dyn std::fmt::Display| StatusError::Http(addr, e.to_string());
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| StatusError::Connect { addr, source })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(t) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = request.body(Empty::new()).map_err(|e| http(&e))?;
    let fetch = async {
        let resp = sender.send_request(request).await.map_err(|e| http(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        if status == hyper::StatusCode::UNPROCESSABLE_ENTITY {
            let why = String::from_utf8_lossy(&body).trim().to_owned();
            return Err(StatusError::Refused(addr, why));
        }
        if !status.is_success() {
            let why = String::from_utf8_lossy(&body);
            return Err(http(&format!("HTTP {status}: {}", why.trim())));
        }
        Ok(body)
    };
    tokio::select! {
        r = fetch => r,
        r = conn => Err(http(&format!("connection ended early: {r:?}"))),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The status as a table.
pub fn render_table(doc: &StatusDoc) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{}  public {}  rendezvous {}  punch port {}",
        doc.name,
        doc.public_addr.as_deref().unwrap_or("-"),
        doc.rendezvous,
        doc.punch_port
    );
    if let Some(udp) = &doc.public_udp_addr {
        let _ = write!(out, "  public udp {udp}");
    }
    if let Some(url) = &doc.rendezvous_url {
        let _ = write!(out, "  via {url}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "\n{:<16} {:<8} {:<9} {:<22} {:>9} {:>10} {:>10} {:>7}  LAST PUNCH",
        "PEER", "PATH", "TRANSPORT", "REMOTE", "RTT", "IN", "OUT", "STREAMS"
    );
    for p in &doc.peers {
        let path = p.path.as_str();
        let transport = p.transport.map_or("-", Transport::as_str);
        let rtt = p.rtt_ms.map_or("-".to_owned(), |r| format!("{r:.2}ms"));
        let last = p.last_punch.as_ref().map_or("-".to_owned(), |l| {
            let mut s = format!(
                "{} in {}ms, {} attempt(s)",
                l.result, l.elapsed_ms, l.attempts
            );
            if let Some(r) = &l.reason {
                s.push_str(&format!(": {r}"));
            }
            s
        });
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<9} {:<22} {:>9} {:>10} {:>10} {:>7}  {}",
            p.name,
            path,
            transport,
            p.remote_addr.as_deref().unwrap_or("-"),
            rtt,
            human_bytes(p.bytes_in),
            human_bytes(p.bytes_out),
            p.streams,
            last
        );
    }
    if !doc.forwards.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<22} {:<16} {:<16} {:>6} {:>8}",
            "FORWARD", "PEER", "SERVICE", "ACTIVE", "TOTAL"
        );
        for f in &doc.forwards {
            let _ = writeln!(
                out,
                "{:<22} {:<16} {:<16} {:>6} {:>8}",
                f.listen, f.peer, f.service, f.active, f.total
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
