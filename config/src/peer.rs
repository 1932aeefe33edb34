//! `peer.toml`: what one daemon is, whom it trusts, what it offers and what
//! it forwards. The schema follows DESIGN.md key for key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{ConfigError, KeySeg, Violation};
use crate::ports::PortRange;
use crate::types::{PeerName, PublicKeyBytes, Secret};

/// A daemon's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// This daemon's name on the rendezvous (unique there).
    pub name: PeerName,
    /// Identity file from `punchd keygen`. After [`PeerConfig::load`] it is
    /// resolved against the config file's folder.
    pub key_file: PathBuf,
    /// Where to register and how to authenticate to the server.
    pub rendezvous: RendezvousSection,
    /// Punching behaviour.
    #[serde(default)]
    pub punch: PunchSection,
    /// The local status/metrics endpoint.
    #[serde(default)]
    pub admin: AdminSection,
    /// Daemons we trust, each pinned by its public key.
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    /// Local services that listed peers may reach through us.
    #[serde(default)]
    pub expose: Vec<Expose>,
    /// Local listeners whose connections are carried to a peer's service.
    #[serde(default)]
    pub forward: Vec<Forward>,
}

/// `[rendezvous]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RendezvousSection {
    /// `http://host:port` or `https://host:port` of `punch-rendezvous`.
    /// Set this or `urls`, not both. Read through [`RendezvousSection::urls`].
    #[serde(default)]
    pub url: String,
    /// Several instances of one rendezvous cluster (sharing Redis), the
    /// alternative to `url`: the daemon uses one and fails over to the
    /// next when it dies. Read through [`RendezvousSection::urls`].
    #[serde(default, rename = "urls")]
    pub url_list: Vec<String>,
    /// Network token; must equal the server's when the server sets one.
    /// Prefer `token_file`: a config file is often more widely readable.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the network token (trailing newline ignored), the
    /// alternative to `token`. Relative to this file after
    /// [`PeerConfig::load`].
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify an `https://` rendezvous against,
    /// instead of the built-in (Mozilla) roots: for a private CA or a
    /// self-signed server. Relative to this file after [`PeerConfig::load`].
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The rendezvous server's Ed25519 public key (base64, printed by
    /// `punch-rendezvous pubkey` and at its start). When set, punch orders
    /// not signed by it are refused, so neither a TLS-terminating proxy nor
    /// anyone on a plain-http path can point our punches elsewhere.
    #[serde(default)]
    pub server_key: Option<PublicKeyBytes>,
}

impl RendezvousSection {
    /// The configured rendezvous URLs in order: `urls`, or `url` alone.
    /// Never empty after validation.
    pub fn urls(&self) -> Vec<&str> {
        if self.url_list.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.url_list.iter().map(String::as_str).collect()
        }
    }
}

/// Whether tunnel bytes may ever pass through the rendezvous server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PunchMode {
    /// Punch a direct path; if none can be made, relay through the server
    /// (still end-to-end encrypted).
    #[default]
    Auto,
    /// Never relay: a failed punch is a failure, reported as such.
    DirectOnly,
}

/// A direct path punchd can punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Timed TCP simultaneous open, TLS 1.3 and yamux on top.
    Tcp,
    /// UDP hole punching and QUIC (quinn), one QUIC stream per connection.
    Quic,
}

/// Congestion control for the QUIC path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicCongestion {
    /// Whatever the host's TCP uses (`net.ipv4.tcp_congestion_control`):
    /// BBR where that is `bbr`, else CUBIC. The default: the QUIC path
    /// then behaves toward other flows as the host's own TCP connections
    /// (and punchd's TCP path) do, and where an operator chose BBR for
    /// lossy or long paths, the QUIC path gets it too.
    #[default]
    System,
    /// CUBIC, quinn's default.
    Cubic,
    /// BBR: far better on paths with random loss (Wi-Fi, mobile); quinn
    /// still calls its implementation experimental.
    Bbr,
}

fn default_transports() -> Vec<TransportKind> {
    vec![TransportKind::Tcp, TransportKind::Quic]
}

/// `[punch]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PunchSection {
    /// Local port bound for the rendezvous connection and every punch
    /// socket, so the NAT mapping the server observed is the one we punch
    /// from. `0` lets the OS pick one at start-up. Default 0.
    #[serde(default)]
    pub port: u16,
    /// Deadline for one punch attempt (all candidates, all retries).
    /// Default 10s.
    #[serde(default = "default_punch_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// `auto` (default) or `direct-only`.
    #[serde(default)]
    pub mode: PunchMode,
    /// Advertise this host's own address (the one it uses to reach the
    /// rendezvous) as a candidate, for peers on the same LAN. Default true.
    #[serde(default = "default_true")]
    pub local_candidates: bool,
    /// How often a keepalive ping crosses each tunnel (also its RTT
    /// measurement). Default 5s.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A ping unanswered this long marks the path dead; the daemon then
    /// punches again (or falls back). Default 10s, so a dead path is noticed
    /// within 15s.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Direct paths to try, raced on every punch; the first to authenticate
    /// is kept. Default `["tcp", "quic"]`. QUIC needs UDP from the same
    /// punch port number (or any free one when that is taken).
    #[serde(default = "default_transports")]
    pub transports: Vec<TransportKind>,
    /// Congestion control on the QUIC path: `system` (default: the host's
    /// TCP choice, BBR or else CUBIC), `cubic` or `bbr`.
    #[serde(default)]
    pub quic_congestion: QuicCongestion,
    /// Ask the default gateway (UPnP IGD, NAT-PMP, PCP) to map the punch
    /// port, TCP and UDP, and offer the mapped endpoint as a candidate: it
    /// makes this side reachable where the NAT randomizes ports. Default
    /// true; `false` sends nothing to the gateway.
    #[serde(default = "default_true")]
    pub port_mapping: bool,
}

fn default_keepalive_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_punch_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_true() -> bool {
    true
}

impl Default for PunchSection {
    fn default() -> Self {
        Self {
            port: 0,
            timeout: default_punch_timeout(),
            mode: PunchMode::default(),
            local_candidates: true,
            port_mapping: true,
            keepalive_interval: default_keepalive_interval(),
            keepalive_timeout: default_keepalive_timeout(),
            transports: default_transports(),
            quic_congestion: QuicCongestion::default(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Status/metrics listener. Default `127.0.0.1:7070`; keep it on
    /// loopback unless you mean to publish your peer list.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Allow a non-loopback `listen`. Then every request, reads too, needs
    /// the admin token. Default false.
    #[serde(default)]
    pub allow_remote: bool,
    /// Where the daemon writes its admin token (mode 0600) at start and
    /// where `punchd` CLI commands read it. Default: `admin-PORT.token` in
    /// `$RUNTIME_DIRECTORY`, else `$XDG_RUNTIME_DIR/punchd`, else
    /// `/run/punchd` (see [`AdminSection::token_path`]).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// The default admin address, shared with `punchd status`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7070";

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_owned()
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            allow_remote: false,
            token_file: None,
        }
    }
}

impl AdminSection {
    /// The parsed listen address (validated at load time).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// The admin token file: `token_file`, or the default for this listen
    /// port, so `punchd repunch` finds it knowing only the admin address.
    pub fn token_path(&self) -> PathBuf {
        match &self.token_file {
            Some(p) => p.clone(),
            None => default_token_path(self.listen_addr().map_or(7070, |a| a.port())),
        }
    }
}

/// The default admin token file for an admin API on `port`: in systemd's
/// `$RUNTIME_DIRECTORY` (`RuntimeDirectory=punchd`), else
/// `$XDG_RUNTIME_DIR/punchd`, else `/run/punchd`. Keyed by port so two
/// daemons on one host keep apart, and runtime (tmpfs) so a token never
/// outlives a boot.
pub fn default_token_path(port: u16) -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("punchd")))
        .unwrap_or_else(|| PathBuf::from("/run/punchd"));
    dir.join(format!("admin-{port}.token"))
}

/// `[[peers]]`: one trusted daemon.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// The peer's rendezvous name.
    pub name: PeerName,
    /// The peer's Ed25519 public key (base64), pinned for TLS.
    pub public_key: PublicKeyBytes,
}

/// What a `[[forward]]` or `[[expose]]` carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP connections, one tunnel stream each (the default).
    #[default]
    Tcp,
    /// UDP datagrams, one flow per local client address.
    Udp,
}

impl Protocol {
    /// The config spelling (`tcp`, `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `[[expose]]`: a service peers may reach.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expose {
    /// Service name that forwards refer to.
    pub name: PeerName,
    /// `host:port` this daemon connects to for each stream, or
    /// `host:first-last`: a range forward's n-th port reaches the n-th
    /// port here ([`crate::ports`]).
    pub target: String,
    /// Peers allowed to use it; anyone else is refused.
    #[serde(default)]
    pub allow: Vec<PeerName>,
    /// `tcp` (default) or `udp`; a forward must ask for the same.
    #[serde(default)]
    pub protocol: Protocol,
}

impl Expose {
    /// The target's port range (validated at load time).
    pub fn target_range(&self) -> Option<PortRange> {
        PortRange::parse(&self.target).ok()
    }
}

/// `[[forward]]`: a local listener relayed to a peer's service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// Local `ip:port` to listen on, or `ip:first-last` for one listener
    /// per port ([`crate::ports`]).
    pub listen: String,
    /// Which peer offers the service.
    pub peer: PeerName,
    /// The service name the peer exposes.
    pub service: PeerName,
    /// `tcp` (default) or `udp`: what `listen` accepts, and what the
    /// peer's service must expose.
    #[serde(default)]
    pub protocol: Protocol,
}

impl Forward {
    /// The parsed listen range (validated at load time).
    pub fn listen_range(&self) -> Option<PortRange> {
        PortRange::parse(&self.listen).ok()
    }

    /// Every listen address, one per port of the range (validated at load
    /// time).
    pub fn listen_addrs(&self) -> Option<Vec<SocketAddr>> {
        self.listen_range()?.socket_addrs()
    }
}

impl PeerConfig {
    /// Reads, parses and validates a `peer.toml`, resolving `key_file`
    /// relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse_str(path, &text)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.key_file);
        let rv = &mut cfg.rendezvous;
        for p in [
            &mut rv.token_file,
            &mut rv.ca_file,
            &mut cfg.admin.token_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        Ok(cfg)
    }

    /// Parses and validates config text; `path` is used only in messages.
    pub fn parse_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, &e))?;
        if let Some(v) = cfg.violations().into_iter().next() {
            return Err(ConfigError::from_violation(path, text, v));
        }
        Ok(cfg)
    }

    /// The trusted peer with this name.
    pub fn peer(&self, name: &str) -> Option<&PeerEntry> {
        self.peers.iter().find(|p| p.name.as_str() == name)
    }

    /// Rules that span several keys. Returned in file order so the first
    /// error a user sees is the first one in the file.
    fn violations(&self) -> Vec<Violation> {
        use KeySeg::{Index, Key};
        let mut out = Vec::new();
        let rv = &self.rendezvous;
        let not_a_url = |url: &str| {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            match rest {
                Some(r) if !r.trim_end_matches('/').is_empty() => url_host_problem(url, r),
                _ => Some(format!(
                    "{url:?} is not an http:// or https:// URL of the rendezvous server"
                )),
            }
        };
        match (rv.url.is_empty(), rv.url_list.is_empty()) {
            (false, false) => out.push(Violation::new(
                vec![Key("rendezvous"), Key("urls")],
                "set url or urls, not both",
            )),
            (true, true) => out.push(Violation::new(
                vec![Key("rendezvous")],
                "set url (one rendezvous) or urls (instances of one cluster)",
            )),
            (false, true) => {
                if let Some(why) = not_a_url(&rv.url) {
                    out.push(Violation::new(vec![Key("rendezvous"), Key("url")], why));
                }
            }
            (true, false) => {
                for (i, u) in rv.url_list.iter().enumerate() {
                    if let Some(why) = not_a_url(u) {
                        out.push(Violation::new(
                            vec![Key("rendezvous"), Key("urls"), Index(i)],
                            why,
                        ));
                    }
                }
                if let Some(i) =
                    (1..rv.url_list.len()).find(|&i| rv.url_list[..i].contains(&rv.url_list[i]))
                {
                    out.push(Violation::new(
                        vec![Key("rendezvous"), Key("urls"), Index(i)],
                        "listed twice",
                    ));
                }
            }
        }
        if self.rendezvous.token.is_some() && self.rendezvous.token_file.is_some() {
            out.push(Violation::new(
                vec![Key("rendezvous"), Key("token_file")],
                "set token or token_file, not both",
            ));
        }
        if self.rendezvous.ca_file.is_some() && !rv.urls().iter().all(|u| u.starts_with("https://"))
        {
            out.push(Violation::new(
                vec![Key("rendezvous"), Key("ca_file")],
                "ca_file verifies an https:// server; the url is not https://",
            ));
        }
        if self.punch.keepalive_interval.is_zero() || self.punch.keepalive_timeout.is_zero() {
            out.push(Violation::new(
                vec![Key("punch"), Key("keepalive_interval")],
                "keepalive_interval and keepalive_timeout must be above zero",
            ));
        }
        if self.punch.timeout < Duration::from_millis(100) {
            out.push(Violation::new(
                vec![Key("punch"), Key("timeout")],
                "a punch needs at least 100ms; 10s is a good value",
            ));
        }
        let mut kinds = HashSet::new();
        if self.punch.transports.is_empty()
            || !self.punch.transports.iter().all(|t| kinds.insert(*t))
        {
            out.push(Violation::new(
                vec![Key("punch"), Key("transports")],
                "list each of \"tcp\" and \"quic\" at most once, and at least one of them",
            ));
        }
        match self.admin.listen_addr() {
            None => out.push(Violation::new(
                vec![Key("admin"), Key("listen")],
                format!("{:?} is not an ip:port address", self.admin.listen),
            )),
            Some(a) if !a.ip().is_loopback() && !self.admin.allow_remote => {
                out.push(Violation::new(
                    vec![Key("admin"), Key("listen")],
                    format!("{a} is not a loopback address: the admin API would publish peers and addresses; use 127.0.0.1, or set allow_remote = true (then every request needs the admin token)"),
                ))
            }
            Some(_) => {}
        }
        let mut seen = HashSet::new();
        let mut keys = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.name == self.name {
                out.push(Violation::new(
                    vec![Key("peers"), Index(i), Key("name")],
                    "a daemon cannot list itself as a peer",
                ));
            }
            if !seen.insert(&p.name) {
                out.push(Violation::new(
                    vec![Key("peers"), Index(i), Key("name")],
                    format!("peer {} is listed twice; keep one entry", p.name),
                ));
            }
            if !keys.insert(p.public_key) {
                out.push(Violation::new(
                    vec![Key("peers"), Index(i), Key("public_key")],
                    "this public key is already listed for another peer",
                ));
            }
        }
        let mut services = HashSet::new();
        for (i, e) in self.expose.iter().enumerate() {
            if !services.insert(&e.name) {
                out.push(Violation::new(
                    vec![Key("expose"), Index(i), Key("name")],
                    format!("service {} is exposed twice; names must be unique", e.name),
                ));
            }
            match PortRange::parse(&e.target) {
                Err(why) => out.push(Violation::new(
                    vec![Key("expose"), Index(i), Key("target")],
                    format!("not a host:port (or host:first-last) target: {why}"),
                )),
                Ok(r) if r.first == 0 => out.push(Violation::new(
                    vec![Key("expose"), Index(i), Key("target")],
                    format!("{:?}: a target needs a port other than 0", e.target),
                )),
                Ok(_) => {}
            }
            for (j, who) in e.allow.iter().enumerate() {
                if self.peer(who.as_str()).is_none() {
                    out.push(Violation::new(
                        vec![Key("expose"), Index(i), Key("allow"), Index(j)],
                        format!("{who} is not in [[peers]]; add it there or remove it here"),
                    ));
                }
            }
        }
        let mut listens = HashSet::new();
        for (i, f) in self.forward.iter().enumerate() {
            let listen = vec![Key("forward"), Index(i), Key("listen")];
            match PortRange::parse(&f.listen).map(|r| r.socket_addrs()) {
                Err(why) => out.push(Violation::new(listen, why)),
                Ok(None) => out.push(Violation::new(
                    listen,
                    format!(
                        "{:?} is not an ip:port (or ip:first-last) address",
                        f.listen
                    ),
                )),
                Ok(Some(addrs)) => {
                    // A TCP and a UDP forward may share an address (iperf3
                    // and DNS use both); two of one protocol may not.
                    if let Some(a) = addrs
                        .into_iter()
                        .find(|a| a.port() != 0 && !listens.insert((f.protocol, *a)))
                    {
                        out.push(Violation::new(
                            listen,
                            format!("{a} ({}) is used by two forwards", f.protocol.as_str()),
                        ));
                    }
                }
            }
            if self.peer(f.peer.as_str()).is_none() {
                out.push(Violation::new(
                    vec![Key("forward"), Index(i), Key("peer")],
                    format!("{} is not in [[peers]]; add it there first", f.peer),
                ));
            }
        }
        out
    }
}

/// What is wrong with the host of a rendezvous URL (`rest` is the part
/// after the scheme), if anything: an IPv6 literal must be bracketed
/// (`http://[2001:db8::10]:8080`) and valid, and a port must be a number.
/// Host names are not resolved here (the daemon resolves them to every A
/// and AAAA record when it connects).
fn url_host_problem(url: &str, rest: &str) -> Option<String> {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let Some((ip, after)) = v6.split_once(']') else {
                return Some(format!("{url:?}: the IPv6 address has no closing ]"));
            };
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Some(format!("{url:?}: [{ip}] is not an IPv6 address"));
            }
            match after {
                "" => return None,
                p => match p.strip_prefix(':') {
                    Some(port) => ("", port),
                    None => return Some(format!("{url:?}: expected :port after the ]")),
                },
            }
        }
        None => match authority.split_once(':') {
            None => (authority, ""),
            Some((h, p)) if !p.contains(':') => (h, p),
            Some(_) => {
                return Some(format!(
                    "{url:?}: put an IPv6 address in brackets, e.g. http://[2001:db8::10]:8080"
                ))
            }
        },
    };
    if !port.is_empty() && port.parse::<u16>().is_err() {
        return Some(format!("{url:?}: {port:?} is not a port number"));
    }
    if authority.is_empty() || (host.is_empty() && !authority.starts_with('[')) {
        return Some(format!("{url:?} has no host"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const KEY_B: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

    fn parse(text: &str) -> Result<PeerConfig, ConfigError> {
        PeerConfig::parse_str(Path::new("peer.toml"), text)
    }

    fn base() -> String {
        format!(
            "name = \"alice\"\nkey_file = \"alice.key\"\n\n[rendezvous]\nurl = \"http://127.0.0.1:8080\"\n\n\
             [[peers]]\nname = \"bob\"\npublic_key = \"{KEY_A}\"\n"
        )
    }

    fn err_text(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let cfg = parse(&base()).unwrap();
        assert_eq!(cfg.punch.port, 0);
        assert_eq!(cfg.punch.timeout, Duration::from_secs(10));
        assert_eq!(cfg.punch.mode, PunchMode::Auto);
        assert_eq!(cfg.admin.listen, "127.0.0.1:7070");
        assert!(cfg.rendezvous.token.is_none());
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let text = base().replace("[rendezvous]", "colour = \"red\"\n[rendezvous]");
        let e = err_text(&text);
        assert!(e.starts_with("peer.toml:4:1"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn port_mapping_defaults_on_and_can_be_turned_off() {
        assert!(parse(&base()).unwrap().punch.port_mapping);
        let cfg = parse(&format!("{}\n[punch]\nport_mapping = false\n", base())).unwrap();
        assert!(!cfg.punch.port_mapping);
        let e = err_text(&format!("{}\n[punch]\nport_mapping = \"yes\"\n", base()));
        assert!(e.contains("expected a boolean"), "{e}");
    }

    #[test]
    fn durations_are_humantime() {
        let cfg = parse(&format!("{}\n[punch]\ntimeout = \"1500ms\"\n", base())).unwrap();
        assert_eq!(cfg.punch.timeout, Duration::from_millis(1500));
        let e = err_text(&format!("{}\n[punch]\ntimeout = \"soon\"\n", base()));
        assert!(e.contains("peer.toml:12:11"), "{e}");
    }

    #[test]
    fn forward_to_unknown_peer_names_the_key_and_line() {
        let text = format!(
            "{}\n[[forward]]\nlisten = \"127.0.0.1:2222\"\npeer = \"carol\"\nservice = \"ssh\"\n",
            base()
        );
        let e = err_text(&text);
        assert!(e.contains("peer.toml:13:1: key `forward[0].peer`"), "{e}");
        assert!(e.contains("carol is not in [[peers]]"), "{e}");
    }

    #[test]
    fn allow_list_must_name_known_peers() {
        let text = format!(
            "{}\n[[expose]]\nname = \"ssh\"\ntarget = \"127.0.0.1:22\"\nallow = [\"bob\", \"mallory\"]\n",
            base()
        );
        let e = err_text(&text);
        assert!(e.contains("expose[0].allow[1]"), "{e}");
        assert!(e.contains("mallory"), "{e}");
    }

    #[test]
    fn duplicate_peers_keys_and_self_are_refused() {
        let dup = format!(
            "{}\n[[peers]]\nname = \"bob\"\npublic_key = \"{KEY_B}\"\n",
            base()
        );
        assert!(err_text(&dup).contains("listed twice"));
        let same_key = format!(
            "{}\n[[peers]]\nname = \"carol\"\npublic_key = \"{KEY_A}\"\n",
            base()
        );
        assert!(err_text(&same_key).contains("already listed"));
        let me = format!(
            "{}\n[[peers]]\nname = \"alice\"\npublic_key = \"{KEY_B}\"\n",
            base()
        );
        assert!(err_text(&me).contains("itself"));
    }

    #[test]
    fn bad_values_are_located() {
        let e = err_text(&base().replace("\"alice\"", "\"Alice\""));
        assert!(e.starts_with("peer.toml:1:"), "{e}");
        let e = err_text(&base().replace(KEY_A, "abc"));
        assert!(e.contains("public key"), "{e}");
        let e = err_text(&base().replace("http://127.0.0.1:8080", "ftp://x"));
        assert!(e.contains("key `rendezvous.url`"), "{e}");
        let e = err_text(&format!("{}\n[admin]\nlisten = \"localhost\"\n", base()));
        assert!(e.contains("key `admin.listen`"), "{e}");
        let e = err_text(&format!(
            "{}\n[[expose]]\nname = \"ssh\"\ntarget = \"nowhere\"\n",
            base()
        ));
        assert!(e.contains("expose[0].target"), "{e}");
    }

    #[test]
    fn ipv6_urls_forwards_and_exposes_parse_and_bad_ones_are_located() {
        let text = base().replace("http://127.0.0.1:8080", "http://[2001:db8::10]:8080")
            + "\n[[forward]]\nlisten = \"[::1]:2222\"\npeer = \"bob\"\nservice = \"ssh\"\n\
               \n[[expose]]\nname = \"ssh\"\ntarget = \"[2001:db8::22]:22\"\nallow = [\"bob\"]\n";
        let cfg = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.rendezvous.urls(), vec!["http://[2001:db8::10]:8080"]);
        assert_eq!(
            cfg.forward[0].listen_addrs().unwrap()[0].to_string(),
            "[::1]:2222"
        );
        assert_eq!(
            cfg.expose[0]
                .target_range()
                .unwrap()
                .socket_addrs()
                .unwrap()[0]
                .to_string(),
            "[2001:db8::22]:22"
        );
        for (url, want) in [
            ("http://2001:db8::10:8080", "in brackets"),
            ("http://[2001:db8::zz]:8080", "is not an IPv6 address"),
            ("http://[2001:db8::10:8080", "no closing ]"),
            ("http://[2001:db8::10]8080", "expected :port"),
            ("http://rv.example:80x", "not a port number"),
        ] {
            let e = err_text(&base().replace("http://127.0.0.1:8080", url));
            assert!(
                e.starts_with("peer.toml:")
                    && e.contains("key `rendezvous.url`")
                    && e.contains(want),
                "{url}: {e}"
            );
        }
        assert!(parse(&base().replace("http://127.0.0.1:8080", "https://[::1]/")).is_ok());
        let e = err_text(&format!(
            "{}\n[[forward]]\nlisten = \"::1:2222\"\npeer = \"bob\"\nservice = \"ssh\"\n",
            base()
        ));
        assert!(
            e.contains("forward[0].listen") && e.contains("brackets"),
            "{e}"
        );
        let e = err_text(&format!(
            "{}\n[[expose]]\nname = \"ssh\"\ntarget = \"2001:db8::22:22\"\n",
            base()
        ));
        assert!(
            e.contains("expose[0].target") && e.contains("brackets"),
            "{e}"
        );
    }

    #[test]
    fn urls_is_the_alternative_to_url() {
        let one = parse(&base()).unwrap();
        assert_eq!(one.rendezvous.urls(), vec!["http://127.0.0.1:8080"]);
        let list = "urls = [\"http://203.0.113.10:8080\", \"http://203.0.113.11:8080\"]";
        let many = parse(&base().replace("url = \"http://127.0.0.1:8080\"", list)).unwrap();
        assert_eq!(
            many.rendezvous.urls(),
            vec!["http://203.0.113.10:8080", "http://203.0.113.11:8080"]
        );
        let both = err_text(&base().replace("[rendezvous]", &format!("[rendezvous]\n{list}")));
        assert!(
            both.contains("key `rendezvous.urls`") && both.contains("not both"),
            "{both}"
        );
        let neither = err_text(&base().replace("url = \"http://127.0.0.1:8080\"", ""));
        assert!(neither.contains("set url"), "{neither}");
        let bad = err_text(&base().replace(
            "url = \"http://127.0.0.1:8080\"",
            "urls = [\"http://203.0.113.10:8080\", \"ftp://x\"]",
        ));
        assert!(bad.contains("key `rendezvous.urls[1]`"), "{bad}");
        let twice = err_text(&base().replace(
            "url = \"http://127.0.0.1:8080\"",
            "urls = [\"http://203.0.113.10:8080\", \"http://203.0.113.10:8080\"]",
        ));
        assert!(
            twice.contains("key `rendezvous.urls[1]`") && twice.contains("twice"),
            "{twice}"
        );
    }

    #[test]
    fn protocol_defaults_to_tcp_and_takes_udp() {
        let text = format!(
            "{}\n[[expose]]\nname = \"dns\"\ntarget = \"127.0.0.1:53\"\nprotocol = \"udp\"\n\
             \n[[forward]]\nlisten = \"127.0.0.1:5353\"\npeer = \"bob\"\nservice = \"dns\"\nprotocol = \"udp\"\n\
             \n[[forward]]\nlisten = \"127.0.0.1:5353\"\npeer = \"bob\"\nservice = \"dns-tcp\"\n",
            base()
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.expose[0].protocol, Protocol::Udp);
        assert_eq!(cfg.forward[0].protocol, Protocol::Udp);
        // One address, TCP and UDP: allowed; the default is TCP.
        assert_eq!(cfg.forward[1].protocol, Protocol::Tcp);
        let twice = text.replace(
            "service = \"dns-tcp\"",
            "service = \"dns-tcp\"\nprotocol = \"udp\"",
        );
        let e = err_text(&twice);
        assert!(e.contains("key `forward[1].listen`"), "{e}");
        assert!(e.contains("(udp) is used by two forwards"), "{e}");
        let bad = text.replacen("protocol = \"udp\"", "protocol = \"sctp\"", 1);
        let e = err_text(&bad);
        assert!(e.contains("peer.toml:14:12"), "{e}");
        assert!(e.contains("sctp"), "{e}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = err_text("name = \"alice\"\nkey_file = \n");
        assert!(e.starts_with("peer.toml:2:"), "{e}");
    }

    #[test]
    fn key_file_is_relative_to_the_config() {
        let dir = std::env::temp_dir().join(format!("punch-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peer.toml");
        std::fs::write(&path, base()).unwrap();
        let cfg = PeerConfig::load(&path).unwrap();
        assert_eq!(cfg.key_file, dir.join("alice.key"));
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = PeerConfig::load(&dir.join("nope.toml")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"));
    }

    #[test]
    fn a_remote_admin_listen_needs_allow_remote() {
        let text = format!("{}\n[admin]\nlisten = \"0.0.0.0:7070\"\n", base());
        let e = err_text(&text);
        assert!(e.contains("peer.toml:12:1: key `admin.listen`"), "{e}");
        assert!(e.contains("allow_remote"), "{e}");
        let ok = text.replace("[admin]", "[admin]\nallow_remote = true");
        assert!(parse(&ok).unwrap().admin.allow_remote);
        let v6 = format!("{}\n[admin]\nlisten = \"[::1]:7070\"\n", base());
        assert!(parse(&v6).is_ok());
    }

    #[test]
    fn trust_keys_parse_and_conflict_where_they_should() {
        let text = base().replace(
            "url = \"http://127.0.0.1:8080\"",
            &format!("url = \"https://rv.example:443\"\nca_file = \"ca.pem\"\nserver_key = \"{KEY_B}\"\ntoken_file = \"t\""),
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.rendezvous.server_key, Some(PublicKeyBytes([1; 32])));
        let both = text.replace("token_file", "token = \"x\"\ntoken_file");
        assert!(err_text(&both).contains("rendezvous.token_file"));
        let plain = text.replace("https://", "http://");
        assert!(err_text(&plain).contains("rendezvous.ca_file"));
    }

    #[test]
    fn port_ranges_parse_and_bad_ones_are_located() {
        let text = format!(
            "{}\n[[expose]]\nname = \"web\"\ntarget = \"127.0.0.1:9000-9002\"\nallow = [\"bob\"]\n\n\
             [[forward]]\nlisten = \"127.0.0.1:3000-3002\"\npeer = \"bob\"\nservice = \"web\"\n",
            base()
        );
        let cfg = parse(&text).unwrap();
        let addrs = cfg.forward[0].listen_addrs().unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(addrs[2].port(), 3002);
        assert_eq!(
            cfg.expose[0].target_range().unwrap().nth(1).as_deref(),
            Some("127.0.0.1:9001")
        );
        let e = err_text(&text.replace("3000-3002", "3000-4000"));
        assert!(e.contains("peer.toml:17:1: key `forward[0].listen`"), "{e}");
        assert!(e.contains("at most 256"), "{e}");
        let e = err_text(&text.replace("9000-9002", "9002-9000"));
        assert!(e.contains("key `expose[0].target`"), "{e}");
        let e = err_text(&text.replace("127.0.0.1:3000", "localhost:3000"));
        assert!(e.contains("forward[0].listen"), "{e}");
        // Two forwards may not share a port, also inside ranges.
        let overlap = format!(
            "{text}\n[[forward]]\nlisten = \"127.0.0.1:3002\"\npeer = \"bob\"\nservice = \"web\"\n"
        );
        let e = err_text(&overlap);
        assert!(
            e.contains("forward[1].listen") && e.contains("127.0.0.1:3002 (tcp) is used by two"),
            "{e}"
        );
    }

    #[test]
    fn token_is_masked_in_debug() {
        let text = base().replace(
            "url = \"http://127.0.0.1:8080\"",
            "url = \"http://127.0.0.1:8080\"\ntoken = \"s3cret\"",
        );
        let cfg = parse(&text).unwrap();
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }
}
