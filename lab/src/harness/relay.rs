//! A bare TCP relay, the benchmark's floor for any port-relaying tunnel.
//!
//! Every tunnel the bench compares (punchd, `ssh -L`, rathole) adds four
//! process hops to a round trip: into and out of the program at each end.
//! This relay makes the same hops and nothing else: no encryption, no
//! multiplexing, no event loop. Each connection gets two threads blocked in
//! `read`, so the kernel wakes the copying thread directly when bytes
//! arrive (one system call fewer per hop than an epoll loop). What it
//! measures above plain TCP is what the hops themselves cost on this
//! machine; a tunnel's round trip can at best match it (within the
//! run-to-run noise). (`socat` was tried first: a 229 µs round trip at zero delay
//! where punchd took 137, so it is no floor; this relay takes 118–131.)

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};

/// Connections relayed at once (two threads each); more are closed at
/// once. iperf3 with 8 streams uses 9.
const MAX_CONNECTIONS: usize = 64;
/// Read size per direction.
const BUF: usize = 128 * 1024;

/// Serves until killed: each connection to `listen` is copied both ways
/// to a fresh connection to `to`, each end's EOF passed on as a
/// half-close.
pub fn relay(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("relay cannot listen on {listen}"))?;
    serve(&listener, to);
    Ok(())
}

/// [`relay`] on a bound listener, until the process is killed (a failed
/// accept is skipped).
fn serve(listener: &TcpListener, to: SocketAddr) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(near) = conn else { continue };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let open = open.clone();
        std::thread::spawn(move || {
            let _ = pipe(near, to);
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Connects to `to` and copies both ways until both directions ended.
fn pipe(near: TcpStream, to: SocketAddr) -> std::io::Result<()> {
    let far = TcpStream::connect(to)?;
    near.set_nodelay(true)?;
    far.set_nodelay(true)?;
    let (near_w, far_w) = (near.try_clone()?, far.try_clone()?);
    let up = std::thread::spawn(move || copy(near, far_w));
    copy(far, near_w);
    let _ = up.join();
    Ok(())
}

/// `from` → `to` until EOF or an error, then half-closes `to`.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; BUF];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Bytes go through both ways, and each side's EOF reaches the other.
    #[test]
    fn relays_both_ways_and_passes_each_end_on() {
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = service.local_addr().unwrap();
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = front.local_addr().unwrap();
        std::thread::spawn(move || serve(&front, to));
        let mut client = TcpStream::connect(listen).unwrap();
        let (mut server, _) = service.accept().unwrap();
        client.write_all(b"ping").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        server.write_all(b"pong").unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"pong");
    }
}
