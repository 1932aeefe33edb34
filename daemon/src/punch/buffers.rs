//! How large a tunnel socket's kernel buffers may grow, and how to get
//! them there.
//!
//! **TCP.** One punched TCP connection carries every stream of a tunnel,
//! so its congestion window must hold the bandwidth-delay product of all
//! of them together. Linux autotunes a socket's buffers, but only up to
//! the maximum of `net.ipv4.tcp_wmem` (4 MiB by default) and `tcp_rmem`
//! (6 MiB): about 3 MB in flight per connection, 0.6 Gbit/s at 40 ms RTT
//! and 0.12 at 200 ms, however fast the path. In issue 18's lab every
//! plain TCP flow stopped at 2.4–2.9 MB in flight, at every RTT, and eight
//! streams through one tunnel moved no more than one did. An application
//! with eight connections gets eight such windows; the tunnel must get
//! one large enough for all of its streams.
//!
//! **UDP** (the QUIC path's socket) has no autotuning: it receives into
//! `net.core.rmem_default`, 208 KiB, ~2 ms of datagrams at 0.5 Gbit/s.
//! Whenever the daemon's thread is off the CPU longer than that, the
//! kernel drops datagrams, and QUIC's congestion controller reads the
//! drops as congestion.
//!
//! So each asks for its [`Kind::target`] when the host's default would
//! stop below it: with `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE` when the
//! daemon may (`CAP_NET_ADMIN`), else with `SO_SNDBUF` / `SO_RCVBUF` when
//! `net.core.wmem_max` / `rmem_max` allow that much, else it keeps the
//! kernel's default and says once what to raise ([`describe`]). The
//! choice ([`choose`]) is made once, from what a scratch socket was
//! allowed ([`HostLimits::probe`]).
//!
//! Pinning a size turns the kernel's autotuning off for that socket. That
//! costs nothing here: the kernel takes buffer memory only as data waits
//! in it. On a TCP socket's send side what waits is what is in flight
//! (the congestion controller sizes that to the path) plus at most
//! [`super::TUNNEL_NOTSENT_LOWAT`] not yet sent; on a receive side it is
//! what the daemon has not read yet, and the daemon reads continuously
//! (a slow reader is held back by its stream's window, in the mux or in
//! QUIC).
//!
//! A TCP socket's receive size is set before `connect()`: Linux fixes a
//! connection's window scale from its receive buffer when it sends the
//! SYN, so a buffer raised afterwards could not be advertised.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;

/// What a socket carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A punched TCP connection: a whole tunnel. Both directions.
    Tcp,
    /// The QUIC path's UDP socket. Receive only: a full send buffer makes
    /// quinn wait, it loses nothing.
    Udp,
}

impl Kind {
    /// The most the kernel may hold for one such socket, each way it is
    /// sized, in the kernel's own accounting (what `tcp_wmem` and
    /// `SO_SNDBUF` count, per-packet overhead included). TCP: ~28 MB in
    /// flight, 1.1 Gbit/s at 200 ms. UDP: ~35 ms of datagrams at
    /// 1 Gbit/s.
    pub(crate) fn target(self) -> usize {
        match self {
            Kind::Tcp => 32 * 1024 * 1024,
            Kind::Udp => 8 * 1024 * 1024,
        }
    }

    fn directions(self) -> &'static [Direction] {
        match self {
            Kind::Tcp => &[Direction::Send, Direction::Receive],
            Kind::Udp => &[Direction::Receive],
        }
    }

    /// The sysctl that says what the kernel gives without being asked,
    /// and which of its fields.
    fn default_sysctl(self, direction: Direction) -> (&'static str, usize) {
        match (self, direction) {
            (Kind::Tcp, Direction::Send) => ("net.ipv4.tcp_wmem", 2),
            (Kind::Tcp, Direction::Receive) => ("net.ipv4.tcp_rmem", 2),
            (Kind::Udp, Direction::Send) => ("net.core.wmem_default", 0),
            (Kind::Udp, Direction::Receive) => ("net.core.rmem_default", 0),
        }
    }
}

/// How one direction's buffer gets its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sizing {
    /// Left to the kernel: its default already reaches the target, or
    /// nothing this process may do raises it.
    Default,
    /// `SO_*BUFFORCE`: the privileged option, not capped by `net.core`.
    Force,
    /// `SO_*BUF`: the host's `net.core.*mem_max` allows the target.
    Plain,
}

/// What the host allows one direction's buffer, as this process sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostLimits {
    /// What the kernel gives unasked (TCP: autotuning's ceiling; UDP: the
    /// fixed default), when readable (a hardened service may not see
    /// `/proc/sys`).
    pub(crate) default: Option<usize>,
    /// The privileged option worked on a scratch socket.
    pub(crate) can_force: bool,
    /// What the ordinary option gave a scratch socket asked for the
    /// target (the kernel caps it at `net.core.*mem_max`).
    pub(crate) plain_gets: Option<usize>,
}

/// The decision, sans IO: pin only when the kernel's default would stop
/// short of `target`, and only when the pin reaches it (a pin below the
/// autotuning ceiling would make things worse).
pub(crate) fn choose(limits: HostLimits, target: usize) -> Sizing {
    if limits.default.is_some_and(|max| max >= target) {
        Sizing::Default
    } else if limits.can_force {
        Sizing::Force
    } else if limits.plain_gets.is_some_and(|got| got >= target) {
        Sizing::Plain
    } else {
        Sizing::Default
    }
}

/// One direction of a socket's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Send,
    Receive,
}

impl Direction {
    fn options(self) -> (libc::c_int, libc::c_int) {
        match self {
            Direction::Send => (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
            Direction::Receive => (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        }
    }

    fn core_max(self) -> &'static str {
        match self {
            Direction::Send => "net.core.wmem_max",
            Direction::Receive => "net.core.rmem_max",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Receive => "receive",
        }
    }
}

impl HostLimits {
    /// Reads the kernel's default and tries both options on a scratch
    /// socket (never on a tunnel's: a pin cannot be undone).
    pub(crate) fn probe(kind: Kind, direction: Direction) -> Self {
        let (sysctl, field) = kind.default_sysctl(direction);
        let path = format!("/proc/sys/{}", sysctl.replace('.', "/"));
        let default = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(field)?.parse().ok());
        let (plain, force) = direction.options();
        let ty = match kind {
            Kind::Tcp => socket2::Type::STREAM,
            Kind::Udp => socket2::Type::DGRAM,
        };
        let scratch = || socket2::Socket::new(socket2::Domain::IPV4, ty, None);
        let target = kind.target();
        let can_force = scratch().is_ok_and(|s| set(s.as_raw_fd(), force, target).is_ok());
        let plain_gets = scratch().ok().and_then(|s| {
            set(s.as_raw_fd(), plain, target).ok()?;
            get(s.as_raw_fd(), plain)
        });
        Self {
            default,
            can_force,
            plain_gets,
        }
    }
}

/// One direction's limits and the choice made from them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Choice {
    pub(crate) direction: Direction,
    pub(crate) limits: HostLimits,
    pub(crate) sizing: Sizing,
}

/// The choices for `kind`, found once per process.
pub(crate) fn plan(kind: Kind) -> &'static [Choice] {
    static TCP: OnceLock<Vec<Choice>> = OnceLock::new();
    static UDP: OnceLock<Vec<Choice>> = OnceLock::new();
    let cell = match kind {
        Kind::Tcp => &TCP,
        Kind::Udp => &UDP,
    };
    cell.get_or_init(|| {
        kind.directions()
            .iter()
            .map(|&direction| {
                let limits = HostLimits::probe(kind, direction);
                Choice {
                    direction,
                    limits,
                    sizing: choose(limits, kind.target()),
                }
            })
            .collect()
    })
}

/// Sizes a socket's buffers as [`plan`] says (a TCP socket before
/// `connect()`). Errors are ignored: the socket then keeps the kernel's
/// default, as it would have anyway.
pub(crate) fn size(socket: &impl AsRawFd, kind: Kind) {
    for choice in plan(kind) {
        let (plain, force) = choice.direction.options();
        let option = match choice.sizing {
            Sizing::Default => continue,
            Sizing::Force => force,
            Sizing::Plain => plain,
        };
        let _ = set(socket.as_raw_fd(), option, kind.target());
    }
}

/// One line per direction for the start-up log, and whether it reached
/// the target: what a socket of `kind` gets, and when it stays below,
/// what the operator can raise.
pub(crate) fn describe(kind: Kind, choices: &[Choice]) -> Vec<(bool, String)> {
    let what = match kind {
        Kind::Tcp => "TCP tunnel socket",
        Kind::Udp => "QUIC's UDP socket",
    };
    let mib = |b: usize| b / (1024 * 1024);
    let target = kind.target();
    choices
        .iter()
        .map(|c| {
            let which = c.direction.name();
            let (sysctl, _) = kind.default_sysctl(c.direction);
            let core = c.direction.core_max();
            match (c.sizing, c.limits.default) {
                (Sizing::Force, _) => (true, format!("{what} {which} buffer: {} MiB (set with CAP_NET_ADMIN)", mib(target))),
                (Sizing::Plain, _) => (true, format!("{what} {which} buffer: {} MiB (within {core})", mib(target))),
                (Sizing::Default, Some(d)) if d >= target => (true, format!("{what} {which} buffer: the kernel's, up to {} MiB ({sysctl})", mib(d))),
                (Sizing::Default, d) => (false, format!(
                    "{what} {which} buffer stays at the kernel's {}: {}; for fast long paths raise {sysctl}{} or {core} to {target}, or give punchd CAP_NET_ADMIN",
                    d.map_or_else(|| "default".to_owned(), |d| format!("{} KiB", d / 1024)),
                    match kind {
                        Kind::Tcp => "one tunnel then carries ~3 MB in flight for all its streams together, 0.6 Gbit/s at 40 ms RTT",
                        Kind::Udp => "datagrams are dropped whenever the daemon is off the CPU for a few milliseconds at high rates",
                    },
                    if kind == Kind::Tcp { " (its third field)" } else { "" },
                )),
            }
        })
        .collect()
}

#[allow(unsafe_code)]
fn set(fd: RawFd, option: libc::c_int, bytes: usize) -> std::io::Result<()> {
    // The kernel doubles what it is given (its accounting counts
    // per-packet overhead): ask for half of `bytes`.
    let value = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX);
    // SAFETY: the pointer and length describe `value`, alive for the call;
    // `fd` is borrowed from a live socket by the caller.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[allow(unsafe_code)]
fn get(fd: RawFd, option: libc::c_int) -> Option<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the pointers describe `value` and `len`, alive for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of_mut!(value).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| usize::try_from(value).ok()).flatten()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const T: usize = 32 * 1024 * 1024;

    fn limits(default: Option<usize>, can_force: bool, plain_gets: Option<usize>) -> HostLimits {
        HostLimits {
            default,
            can_force,
            plain_gets,
        }
    }

    #[test]
    fn a_host_whose_default_reaches_the_target_is_left_alone() {
        assert_eq!(choose(limits(Some(T), true, Some(T)), T), Sizing::Default);
        assert_eq!(choose(limits(Some(2 * T), false, None), T), Sizing::Default);
    }

    #[test]
    fn a_default_host_is_pinned_when_the_daemon_may() {
        // Linux's defaults: tcp_wmem max 4 MiB, wmem_max 208 KiB.
        let default = limits(Some(4 << 20), true, Some(425_984));
        assert_eq!(choose(default, T), Sizing::Force);
        // Unreadable /proc/sys (a hardened service) does not stop it.
        assert_eq!(choose(limits(None, true, None), T), Sizing::Force);
    }

    #[test]
    fn without_privilege_the_ordinary_option_is_used_only_if_it_reaches_the_target() {
        assert_eq!(
            choose(limits(Some(4 << 20), false, Some(T)), T),
            Sizing::Plain
        );
        // A pin at net.core's 4 MiB would lock the buffer where autotuning
        // already goes: keep autotuning.
        assert_eq!(
            choose(limits(Some(4 << 20), false, Some(4 << 20)), T),
            Sizing::Default
        );
        assert_eq!(choose(limits(None, false, None), T), Sizing::Default);
    }

    #[test]
    fn the_log_says_what_to_raise_only_when_the_buffer_stays_short() {
        let short = Choice {
            direction: Direction::Send,
            limits: limits(Some(4 << 20), false, Some(425_984)),
            sizing: Sizing::Default,
        };
        let plenty = Choice {
            direction: Direction::Receive,
            limits: limits(Some(T), false, None),
            sizing: Sizing::Default,
        };
        let lines = describe(Kind::Tcp, &[short, plenty]);
        assert!(!lines[0].0);
        assert!(
            lines[0].1.contains("net.ipv4.tcp_wmem") && lines[0].1.contains("CAP_NET_ADMIN"),
            "{}",
            lines[0].1
        );
        assert!(lines[1].0, "{}", lines[1].1);
    }

    /// On real sockets: with the plan applied, the kernel reports at least
    /// the target each way it was sized; with CAP_NET_ADMIN (root, CI) a
    /// short default is always overcome.
    #[test]
    fn sockets_get_the_planned_buffers() {
        for (kind, ty) in [
            (Kind::Tcp, socket2::Type::STREAM),
            (Kind::Udp, socket2::Type::DGRAM),
        ] {
            let s = socket2::Socket::new(socket2::Domain::IPV4, ty, None).unwrap();
            size(&s, kind);
            for c in plan(kind) {
                let got = get(s.as_raw_fd(), c.direction.options().0).unwrap();
                match c.sizing {
                    Sizing::Force | Sizing::Plain => {
                        assert!(got >= kind.target(), "{kind:?} {c:?}: {got} bytes");
                    }
                    Sizing::Default if has_net_admin() => assert!(
                        c.limits.default.is_some_and(|d| d >= kind.target()),
                        "{kind:?} {c:?}: left below the target with CAP_NET_ADMIN"
                    ),
                    Sizing::Default => {}
                }
            }
        }
    }

    fn has_net_admin() -> bool {
        const CAP_NET_ADMIN: u32 = 12;
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
                u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
            })
            .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
    }
}
