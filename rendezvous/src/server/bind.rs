//! Binding the server's sockets, one per configured `listen` address.
//!
//! An IPv6 address binds with `IPV6_V6ONLY` set, whatever the host's
//! `net.ipv6.bindv6only` says: `listen = ["0.0.0.0:8080", "[::]:8080"]`
//! then gives two sockets on one port, one per family, instead of the
//! second failing with "address in use" (Linux's default makes `[::]`
//! dual-stack). It also keeps what the server observes honest: an IPv4
//! daemon is seen on the IPv4 socket at its IPv4 address, never as an
//! IPv4-mapped IPv6 one.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

/// Pending connections the kernel queues per listener.
const BACKLOG: i32 = 1024;

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A TCP listener on `addr` (v6-only for IPv6), with `SO_REUSEADDR` as
/// `TcpListener::bind` sets it, so a restart does not wait out TIME_WAIT.
pub fn tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket(addr, Type::STREAM, Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A UDP socket on `addr` (v6-only for IPv6): the observation endpoint.
pub fn udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket(addr, Type::DGRAM, Protocol::UDP)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// How many ephemeral ports [`same_port`] tries before giving up.
const SAME_PORT_TRIES: usize = 32;

/// A TCP listener and a UDP socket on one port of `addr`'s address. With
/// port 0, the first ephemeral TCP port that is also free over UDP, both
/// held when this returns: a port found free and closed again can be taken
/// by anyone before the server binds it (on a busy host, a test run holds
/// thousands of sockets), and then the server would only warn.
pub fn same_port(addr: SocketAddr) -> io::Result<(TcpListener, UdpSocket)> {
    if addr.port() != 0 {
        return Ok((tcp(addr)?, udp(addr)?));
    }
    let mut last = io::Error::other("no port tried");
    for _ in 0..SAME_PORT_TRIES {
        let listener = tcp(addr)?;
        let port = listener.local_addr()?.port();
        match udp(SocketAddr::new(addr.ip(), port)) {
            Ok(socket) => return Ok((listener, socket)),
            Err(e) => last = e,
        }
    }
    Err(io::Error::new(
        last.kind(),
        format!(
            "no port on {} free over both TCP and UDP in {SAME_PORT_TRIES} tries: {last}",
            addr.ip()
        ),
    ))
}

/// Every listener of `addrs`, in order; the first that cannot bind fails
/// the lot with the address named.
pub fn tcp_all(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    addrs
        .iter()
        .map(|&a| {
            tcp(a).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {a}: {e}; is another server using it?"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_port_holds_one_port_over_both_transports() {
        let (l, u) = same_port("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert_eq!(u.local_addr().unwrap().port(), port);
        // Held: nobody else can have it over either transport meanwhile.
        assert!(udp(SocketAddr::from(([127, 0, 0, 1], port))).is_err());
        // A fixed port that is taken is an error, not another port.
        assert!(same_port(SocketAddr::from(([127, 0, 0, 1], port))).is_err());
    }

    #[tokio::test]
    async fn v4_and_v6_share_a_port_as_separate_listeners() {
        let v4 = tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        // The lab and CI hosts have ::1; a host without IPv6 skips.
        let Ok(v6) = tcp(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))) else {
            return;
        };
        assert_eq!(v6.local_addr().unwrap().port(), port);
        let u4 = udp(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        let u6 = udp(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))).unwrap();
        assert_ne!(u4.local_addr().unwrap(), u6.local_addr().unwrap());
        // v6-only: an IPv4 client reaches the IPv4 listener, seen as IPv4.
        let client = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let (accepted, _) = tokio::join!(v4.accept(), client);
        assert!(accepted.unwrap().1.is_ipv4());
        let client = tokio::net::TcpStream::connect(("::1", port));
        let (accepted, _) = tokio::join!(v6.accept(), client);
        assert!(accepted.unwrap().1.is_ipv6());
    }

    #[test]
    fn a_taken_address_is_named() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = tcp("127.0.0.1:0".parse().unwrap()).unwrap();
            let taken = first.local_addr().unwrap();
            let e = tcp_all(&[taken]).unwrap_err().to_string();
            assert!(e.contains(&taken.to_string()), "{e}");
        });
    }
}
