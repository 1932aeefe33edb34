//! `rendezvous.toml`: the server's listen address, network token and the
//! limits that keep one misbehaving daemon from hurting the others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::types::Secret;

/// The rendezvous server's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RendezvousConfig {
    /// Addresses to listen on, TCP (and UDP for the observation endpoint):
    /// one (`listen = "0.0.0.0:8080"`) or a list (`listen =
    /// ["0.0.0.0:8080", "[::]:8080"]`). An IPv6 address binds with
    /// `IPV6_V6ONLY`, so `[::]` and `0.0.0.0` on one port are two
    /// listeners, one per family, and daemons see the family they used.
    /// Default `0.0.0.0:8080`.
    #[serde(default = "default_listen", deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// UDP observation endpoint for the daemons' QUIC path. Default: the
    /// same address and port as `listen`, over UDP. Set it when that port
    /// is not reachable over UDP (the daemons learn the port from the
    /// server, the host from their `url`).
    #[serde(default)]
    pub udp_listen: Option<SocketAddr>,
    /// NAT discovery's second endpoint (TCP and UDP, on `listen`'s
    /// address): it answers every connection or `observe` datagram with
    /// the source address it saw, so a daemon comparing it with what
    /// `listen` saw learns whether its NAT maps endpoint-independently.
    /// Default: `listen`'s port + 1 (not bound, with a warning, if that is
    /// taken); 0 turns it off.
    #[serde(default)]
    pub observe_port: Option<u16>,
    /// When set, every daemon must present this token in its hello.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the network token (trailing newline ignored), the
    /// alternative to `token` that keeps the secret out of this file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The server's Ed25519 identity (PKCS#8 PEM, mode 0600; created on
    /// first start if missing). It signs every punch order, so daemons that
    /// pin its public key (`[rendezvous] server_key`) accept orders only
    /// from this server. Without it the server signs with a key made at
    /// start, which nobody can pin.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Serve https/wss with this certificate; without it, plain http (for a
    /// TLS-terminating proxy in front, or a lab).
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// Bounds on clients, messages and relays.
    #[serde(default)]
    pub limits: ServerLimits,
    /// `redis://HOST:PORT[/DB]` (or `rediss://`): the registry and the
    /// signalling shared by several instances. Without it, the in-memory
    /// registry of this process alone. A secret: it may carry a password.
    #[serde(default)]
    pub redis: Option<Secret>,
    /// How daemons reach this instance (`http[s]://host[:port]`), put in
    /// punch orders so both sides of a relayed tunnel join the relay on
    /// the instance that coordinated it. Required with `redis`.
    #[serde(default)]
    pub public_url: Option<String>,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 8080))]
}

/// `listen` as one address or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "an ip:port address or a list of them")]
    enum OneOrMany {
        One(SocketAddr),
        Many(Vec<SocketAddr>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v,
    })
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            udp_listen: None,
            observe_port: None,
            token: None,
            token_file: None,
            key_file: None,
            tls: None,
            limits: ServerLimits::default(),
            redis: None,
            public_url: None,
        }
    }
}

/// `[tls]`: the server's own certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 or SEC1), mode 0600.
    pub key: PathBuf,
}

/// `[limits]`: every bound the server enforces. The defaults suit a few
/// thousand daemons on a small machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Registered daemons at once; further hellos are refused. Default 20000.
    pub max_clients: usize,
    /// Largest WebSocket message accepted, in bytes. Default 16384.
    pub max_message_bytes: usize,
    /// Sustained messages per second per connection. Default 20.
    pub messages_per_second: u32,
    /// Burst allowance above the sustained rate. Default 40.
    pub message_burst: u32,
    /// A connection that sends nothing for this long is closed. Default 90s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time allowed between the challenge and a valid hello. Default 10s.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Punch sessions waiting for results, in total. Default 10000.
    pub max_pending_punches: usize,
    /// Relayed sessions at once, in total. Default 256.
    pub max_relays: usize,
    /// Relayed sessions at once per daemon. Default 8.
    pub max_relays_per_daemon: usize,
    /// Relay bandwidth per session, bytes per second each way. Default 8 MiB/s.
    pub relay_bytes_per_second: u64,
    /// Relay bandwidth of the whole server, bytes per second summed over
    /// every session and direction; sessions are paced, never cut, when it
    /// is reached. Default 128 MiB/s.
    pub relay_total_bytes_per_second: u64,
    /// A paired relay that carries no frame either way for this long is
    /// closed (the daemons' tunnel keepalive runs far more often). Default 5m.
    #[serde(with = "humantime_serde")]
    pub relay_idle_timeout: Duration,
    /// A paired relay is closed after this long whatever it carries; the
    /// daemons punch again (and relay again if they must). Default 24h.
    #[serde(with = "humantime_serde")]
    pub relay_max_lifetime: Duration,
    /// Punch sessions one daemon may have requested that are still pending
    /// (neither reported nor expired); further `connect`s are refused
    /// `busy`. Default 32.
    pub max_pending_punches_per_daemon: usize,
    /// TCP connections held at once, in every state (HTTP, TLS handshake,
    /// WebSocket); beyond it new connections are closed at once. The
    /// server lowers it to its file descriptor limit (less 64) if that is
    /// smaller. Default 30000.
    pub max_connections: usize,
    /// Connections from one IP address that have not yet become a
    /// WebSocket (TLS handshake or HTTP request in progress). Default 256.
    pub max_http_per_ip: usize,
    /// Time a connection gets to send a complete HTTP request head. Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_clients: 20_000,
            max_message_bytes: 16 * 1024,
            messages_per_second: 20,
            message_burst: 40,
            idle_timeout: Duration::from_secs(90),
            hello_timeout: Duration::from_secs(10),
            max_pending_punches: 10_000,
            max_relays: 256,
            max_relays_per_daemon: 8,
            relay_bytes_per_second: 8 * 1024 * 1024,
            relay_total_bytes_per_second: 128 * 1024 * 1024,
            relay_idle_timeout: Duration::from_secs(300),
            relay_max_lifetime: Duration::from_secs(24 * 3600),
            max_pending_punches_per_daemon: 32,
            max_connections: 30_000,
            max_http_per_ip: 256,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl RendezvousConfig {
    /// Reads and parses a `rendezvous.toml`; relative file names in it are
    /// resolved from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse_str(path, &text)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let tls = cfg.tls.as_mut().map(|t| [&mut t.cert, &mut t.key]);
        for p in [cfg.token_file.as_mut(), cfg.key_file.as_mut()]
            .into_iter()
            .flatten()
            .chain(tls.into_iter().flatten())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parses config text; `path` is used only in messages.
    pub fn parse_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, &e))?;
        let l = &cfg.limits;
        let zero = [
            ("limits.max_clients", l.max_clients == 0),
            ("limits.max_message_bytes", l.max_message_bytes < 1024),
            ("limits.messages_per_second", l.messages_per_second == 0),
            ("limits.max_pending_punches", l.max_pending_punches == 0),
            (
                "limits.max_pending_punches_per_daemon",
                l.max_pending_punches_per_daemon == 0,
            ),
            ("limits.max_connections", l.max_connections == 0),
            ("limits.max_http_per_ip", l.max_http_per_ip == 0),
            (
                "limits.header_read_timeout",
                l.header_read_timeout.is_zero(),
            ),
            ("limits.relay_idle_timeout", l.relay_idle_timeout.is_zero()),
            ("limits.relay_max_lifetime", l.relay_max_lifetime.is_zero()),
        ];
        if cfg.token.is_some() && cfg.token_file.is_some() {
            return Err(ConfigError::from_violation(
                path,
                text,
                crate::error::Violation::new(
                    vec![crate::error::KeySeg::Key("token_file")],
                    "set token or token_file, not both",
                ),
            ));
        }
        if let Some(v) = listen_violation(&cfg.listen) {
            return Err(ConfigError::from_violation(path, text, v));
        }
        if let Some(v) = cluster_violation(&cfg) {
            return Err(ConfigError::from_violation(path, text, v));
        }
        if let Some((key, _)) = zero.iter().find(|(_, bad)| *bad) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: 0,
                column: 0,
                key: (*key).to_owned(),
                message: "too small to serve anyone; remove it to use the default".to_owned(),
            });
        }
        Ok(cfg)
    }
}

/// What is wrong with the `listen` list: empty, or one address twice.
/// (Several addresses on one port are fine: `0.0.0.0:8080` and
/// `[::]:8080` are separate v6-only/v4 sockets.)
fn listen_violation(listen: &[SocketAddr]) -> Option<crate::error::Violation> {
    use crate::error::{KeySeg, Violation};
    if listen.is_empty() {
        return Some(Violation::new(
            vec![KeySeg::Key("listen")],
            "needs at least one address (e.g. \"0.0.0.0:8080\")",
        ));
    }
    let twice = (1..listen.len()).find(|&i| listen[..i].contains(&listen[i]))?;
    Some(Violation::new(
        vec![KeySeg::Key("listen"), KeySeg::Index(twice)],
        format!("{} is listed twice", listen[twice]),
    ))
}

/// What is wrong with `redis` / `public_url`, located at the key.
fn cluster_violation(cfg: &RendezvousConfig) -> Option<crate::error::Violation> {
    use crate::error::{KeySeg, Violation};
    let at = |key: &'static str, why: &str| Some(Violation::new(vec![KeySeg::Key(key)], why));
    if let Some(url) = &cfg.redis {
        let rest = url
            .expose()
            .strip_prefix("redis://")
            .or_else(|| url.expose().strip_prefix("rediss://"));
        let host = rest.map(|r| {
            r.rsplit('@')
                .next()
                .unwrap_or("")
                .split(['/', ':'])
                .next()
                .unwrap_or("")
        });
        match host {
            None => return at("redis", "must start with redis:// or rediss://"),
            Some("") => return at("redis", "has no host (redis://HOST:PORT)"),
            Some(_) => {}
        }
        if cfg.public_url.is_none() {
            return at(
                "redis",
                "needs public_url too (how daemons reach this instance, e.g. for a relay)",
            );
        }
    }
    if let Some(url) = &cfg.public_url {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        match rest {
            None => return at("public_url", "must start with http:// or https://"),
            Some(r) if r.is_empty() || r.starts_with('/') => {
                return at("public_url", "has no host")
            }
            Some(r) if r.trim_end_matches('/').contains(['/', '?', '#']) => {
                return at(
                    "public_url",
                    "must be scheme://host[:port] only; the paths are the server's",
                )
            }
            Some(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let cfg = RendezvousConfig::parse_str(Path::new("r.toml"), "").unwrap();
        assert_eq!(cfg.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(cfg.limits.max_message_bytes, 16384);
    }

    #[test]
    fn tls_key_file_and_token_file_parse() {
        let text = "key_file = \"server.key\"\ntoken_file = \"t\"\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let cfg = RendezvousConfig::parse_str(Path::new("r.toml"), text).unwrap();
        assert_eq!(cfg.tls.unwrap().cert, PathBuf::from("c.pem"));
        let both = format!("token = \"x\"\n{text}");
        let e = RendezvousConfig::parse_str(Path::new("r.toml"), &both).unwrap_err();
        assert!(
            e.to_string().contains("r.toml:3:1: key `token_file`"),
            "{e}"
        );
    }

    #[test]
    fn redis_and_public_url_are_checked_where_written() {
        let p = Path::new("r.toml");
        let ok = "redis = \"redis://127.0.0.1:6379\"\npublic_url = \"http://rv1:8080\"\n";
        let cfg = RendezvousConfig::parse_str(p, ok).unwrap();
        assert_eq!(cfg.public_url.as_deref(), Some("http://rv1:8080"));
        assert!(
            !format!("{cfg:?}").contains("6379"),
            "the URL may hold a password"
        );
        for (text, want) in [
            (
                "redis = \"http://x\"\npublic_url = \"http://a\"\n",
                "r.toml:1:1: key `redis`",
            ),
            (
                "redis = \"redis://\"\npublic_url = \"http://a\"\n",
                "has no host",
            ),
            ("redis = \"redis://r:6379\"\n", "needs public_url"),
            (
                "listen = \"0.0.0.0:1\"\npublic_url = \"ftp://a\"\n",
                "r.toml:2:1: key `public_url`",
            ),
            ("public_url = \"http://a/v1/ws\"\n", "host[:port] only"),
        ] {
            let e = RendezvousConfig::parse_str(p, text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn listen_is_one_address_or_a_list() {
        let p = Path::new("r.toml");
        let one = RendezvousConfig::parse_str(p, "listen = \"[::]:9000\"\n").unwrap();
        assert_eq!(one.listen, vec!["[::]:9000".parse().unwrap()]);
        let both =
            RendezvousConfig::parse_str(p, "listen = [\"0.0.0.0:8080\", \"[::]:8080\"]\n").unwrap();
        assert_eq!(both.listen.len(), 2);
        assert!(both.listen[1].is_ipv6());
        for (text, want) in [
            ("listen = []\n", "r.toml:1:1: key `listen`"),
            ("listen = [\"0.0.0.0:1\", \"0.0.0.0:1\"]\n", "listed twice"),
            ("listen = [\"0.0.0.0:1\", \"nope\"]\n", "r.toml:1:"),
            ("listen = 8080\n", "ip:port address or a list"),
        ] {
            let e = RendezvousConfig::parse_str(p, text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn limits_are_checked() {
        let e = RendezvousConfig::parse_str(Path::new("r.toml"), "[limits]\nmax_clients = 0\n")
            .unwrap_err();
        assert!(e.to_string().contains("limits.max_clients"), "{e}");
        let e =
            RendezvousConfig::parse_str(Path::new("r.toml"), "listen = \"nope\"\n").unwrap_err();
        assert!(e.to_string().starts_with("r.toml:1:"), "{e}");
    }
}
