//! Which congestion controller the QUIC path runs.
//!
//! The default follows the host's TCP (`net.ipv4.tcp_congestion_control`):
//! BBR where the host's TCP runs BBR, else CUBIC. Why: the two paths race
//! and either may carry the tunnel, and an operator who chose BBR for the
//! host's TCP chose it for long or lossy paths, where CUBIC on QUIC fell
//! far behind (issue 18's lab, BBR host: at 40 ms RTT and 1 % loss one
//! QUIC stream moved 0.006 Gbit/s under CUBIC, 0.306 under BBR; at 20 ms
//! without loss 0.59× plain TCP under CUBIC, 1.13× under BBR). A host on
//! CUBIC keeps CUBIC, so the QUIC path never competes harder with other
//! flows than the host's own TCP connections do.

use punch_config::QuicCongestion;

/// The controller the QUIC path is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Controller {
    Cubic,
    Bbr,
}

impl Controller {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Controller::Cubic => "cubic",
            Controller::Bbr => "bbr",
        }
    }
}

/// The decision, sans IO: `host_tcp` is the host's TCP congestion control
/// (`None` when it cannot be read, e.g. a hardened service without
/// `/proc/sys`).
pub(crate) fn choose(setting: QuicCongestion, host_tcp: Option<&str>) -> Controller {
    match setting {
        QuicCongestion::Cubic => Controller::Cubic,
        QuicCongestion::Bbr => Controller::Bbr,
        QuicCongestion::System => match host_tcp.map(str::trim) {
            Some("bbr") => Controller::Bbr,
            _ => Controller::Cubic,
        },
    }
}

/// The host's TCP congestion control, as the kernel names it.
pub(crate) fn host_tcp() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_follows_the_hosts_tcp() {
        let system = QuicCongestion::default();
        assert_eq!(system, QuicCongestion::System);
        assert_eq!(choose(system, Some("bbr\n")), Controller::Bbr);
        assert_eq!(choose(system, Some("cubic\n")), Controller::Cubic);
        // Anything quinn has no controller for, or nothing readable: CUBIC.
        assert_eq!(choose(system, Some("reno")), Controller::Cubic);
        assert_eq!(choose(system, None), Controller::Cubic);
    }

    #[test]
    fn an_explicit_choice_wins_over_the_host() {
        assert_eq!(
            choose(QuicCongestion::Cubic, Some("bbr")),
            Controller::Cubic
        );
        assert_eq!(choose(QuicCongestion::Bbr, Some("cubic")), Controller::Bbr);
    }

    #[test]
    fn this_hosts_choice_is_readable() {
        // Linux always has the sysctl; the lab and CI run BBR.
        let host = host_tcp().expect("/proc/sys/net/ipv4/tcp_congestion_control");
        assert!(!host.trim().is_empty());
    }
}
