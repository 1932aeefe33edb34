//! Port ranges on `[[forward]] listen` and `[[expose]] target`:
//! `"127.0.0.1:3000"` is one port, `"127.0.0.1:3000-3002"` three.
//!
//! A range forward and a range expose pair up by position: the n-th listen
//! port reaches the n-th target port (rathole#157's request, frp's
//! `local_port = "6000-6006"`). The forward still names only a *service*;
//! the position rides in the stream request and the exposer checks it
//! against its own target range, so a peer can never reach a port the
//! exposer did not list. A range is capped at [`MAX_RANGE_PORTS`] so one
//! line cannot ask for thousands of listeners.

use std::net::SocketAddr;

/// Most ports one `listen` or `target` range may name.
pub const MAX_RANGE_PORTS: u16 = 256;

/// A host and one port or a run of consecutive ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange {
    /// The host part as written (`127.0.0.1`, `[::1]`, `db.lan`).
    pub host: String,
    /// The first port.
    pub first: u16,
    /// How many ports, at least 1.
    pub len: u16,
}

impl PortRange {
    /// Parses `host:port` or `host:first-last`. The message says what is
    /// wrong, for a located config error.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some((host, ports)) = s.rsplit_once(':') else {
            return Err(format!("{s:?} is not host:port or host:first-last"));
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        check_host(s, host)?;
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("{s:?}: {p:?} is not a port number"))
        };
        let (first, last) = match ports.split_once('-') {
            None => {
                let p = port(ports)?;
                (p, p)
            }
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a == 0 || b < a {
                    return Err(format!(
                        "{s:?}: a range runs from a lower to a higher port, neither 0"
                    ));
                }
                (a, b)
            }
        };
        let len = u32::from(last) - u32::from(first) + 1;
        if len > u32::from(MAX_RANGE_PORTS) {
            return Err(format!(
                "{s:?} names {len} ports; a range may name at most {MAX_RANGE_PORTS}"
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            first,
            // len ≤ MAX_RANGE_PORTS, checked above.
            len: len as u16,
        })
    }

    /// Whether this names more than one port.
    pub fn is_range(&self) -> bool {
        self.len > 1
    }

    /// `host:port` of the n-th port (0-based), or `None` past the end.
    pub fn nth(&self, n: u16) -> Option<String> {
        (n < self.len).then(|| format!("{}:{}", self.host, self.first + n))
    }

    /// Every port as a socket address, when the host is an IP literal.
    pub fn socket_addrs(&self) -> Option<Vec<SocketAddr>> {
        (0..self.len)
            .map(|n| self.nth(n)?.parse().ok())
            .collect::<Option<Vec<_>>>()
    }
}

/// An IPv6 literal must be bracketed (`[::1]:22`): unbracketed, the last
/// `:` cannot be told from the port separator, and `::1:22` would be read
/// as a *host name* `::1` that no resolver knows, failing only at dial time.
fn check_host(s: &str, host: &str) -> Result<(), String> {
    match host.strip_prefix('[') {
        Some(inner) => match inner.strip_suffix(']') {
            Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => Ok(()),
            _ => Err(format!(
                "{s:?}: {host:?} is not a bracketed IPv6 address (write [2001:db8::1]:port)"
            )),
        },
        None if host.contains([':', '[', ']']) => Err(format!(
            "{s:?}: put an IPv6 address in brackets, e.g. [{host}]:port"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ports_and_ranges_parse() {
        let one = PortRange::parse("127.0.0.1:3000").unwrap();
        assert_eq!((one.first, one.len, one.is_range()), (3000, 1, false));
        let r = PortRange::parse("127.0.0.1:3000-3002").unwrap();
        assert_eq!((r.first, r.len, r.is_range()), (3000, 3, true));
        assert_eq!(r.nth(2).as_deref(), Some("127.0.0.1:3002"));
        assert_eq!(r.nth(3), None);
        let addrs = r.socket_addrs().unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(addrs[1].port(), 3001);
        let v6 = PortRange::parse("[2001:db8::5]:22").unwrap();
        assert_eq!(
            v6.socket_addrs().unwrap()[0].to_string(),
            "[2001:db8::5]:22"
        );
        let v6 = PortRange::parse("[::1]:9000-9001").unwrap();
        assert_eq!(v6.socket_addrs().unwrap()[1].to_string(), "[::1]:9001");
        let name = PortRange::parse("db.lan:5432").unwrap();
        assert_eq!(name.socket_addrs(), None);
        assert_eq!(name.nth(0).as_deref(), Some("db.lan:5432"));
        // Port 0 alone means "any free port" for a listener.
        assert_eq!(PortRange::parse("127.0.0.1:0").unwrap().first, 0);
    }

    #[test]
    fn bad_ranges_say_why() {
        for (bad, why) in [
            ("127.0.0.1", "not host:port"),
            (":80", "no host"),
            ("h:x", "not a port"),
            ("h:3002-3000", "lower to a higher"),
            ("h:0-2", "neither 0"),
            ("h:1-70000", "not a port"),
            ("h:1000-1256", "at most 256"),
            ("::1:22", "in brackets"),
            ("[::1:22", "bracketed IPv6"),
            ("[2001:db8::zz]:22", "bracketed IPv6"),
            ("[db.lan]:22", "bracketed IPv6"),
        ] {
            let e = PortRange::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(PortRange::parse("h:1000-1255").unwrap().len, 256);
        assert_eq!(PortRange::parse("h:65535-65535").unwrap().len, 1);
    }
}
