//! The three protocols, through well-kept crates: `crab_nat` for PCP and
//! NAT-PMP, `igd-next` for UPnP IGD. They parse the router's replies (both
//! check lengths and bound what they read: `crab_nat` reads into fixed
//! buffers, `igd-next` caps SSDP at 1,500 bytes and HTTP bodies at 1 MiB
//! and only follows URLs on the responder's own address); a reply they
//! refuse comes back here as an error, which is logged and counted.
//!
//! Only the punch port is ever mapped: every request here names
//! [`Ports::tcp`] or [`Ports::udp`] as the internal port, and asks for the
//! same external port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{natpmp, pcp, InternetProtocol, PortMapping, PortMappingOptions, TimeoutConfig};
use igd_next::aio::tokio::Tokio;
use igd_next::aio::Gateway;
use igd_next::{PortMappingProtocol, SearchOptions};

use super::plan::{Grant, Protocol};

/// How long one probe may take, all three protocols at once. A LAN with
/// no router answers with ICMP unreachable (fast) or not at all (this).
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// One mapping request (after the probe found the router).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The lease we ask for. Renewed at half, so a router restart is noticed
/// within this much even without a lost tunnel.
pub(crate) const LEASE: Duration = Duration::from_secs(3600);
/// What the router shows next to the mapping.
const DESCRIPTION: &str = "punchd";

/// The local ports to map (the punch port, and the QUIC path's UDP port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ports {
    pub(crate) tcp: NonZeroU16,
    pub(crate) udp: Option<NonZeroU16>,
}

/// Where the router is and who we are to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) gateway: Ipv4Addr,
    /// Our address on the gateway's LAN.
    pub(crate) local: Ipv4Addr,
    pub(crate) ports: Ports,
    /// The external port to ask for; None asks for the internal one (so
    /// the mapping and the NAT's own port-preserving choice agree). After
    /// a router restart we ask for a fresh one instead: see
    /// [`super::plan::Plan::router_restarted`].
    pub(crate) external: Option<NonZeroU16>,
}

impl Target {
    /// The external port to request for this internal one.
    fn wanted(&self, internal: NonZeroU16) -> NonZeroU16 {
        self.external.unwrap_or(internal)
    }
}

/// A random external port in 20000-60999 other than `internal`: where a
/// restarted router has no stale state for any peer (see
/// [`super::plan::Plan::router_restarted`]).
pub(crate) fn fresh_external(internal: NonZeroU16) -> Option<NonZeroU16> {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).ok()?;
    let mut port = 20_000 + u16::from_le_bytes(b) % 41_000;
    if port == internal.get() {
        port = 20_000 + (port - 20_000 + 1) % 41_000;
    }
    NonZeroU16::new(port)
}

/// Why one protocol gave no mapping.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MapError {
    #[error("PCP: {0}")]
    Pcp(#[from] pcp::Failure),
    #[error("NAT-PMP: {0}")]
    NatPmp(#[from] natpmp::Failure),
    #[error("UPnP: {0}")]
    Upnp(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl From<crab_nat::MappingFailure> for MapError {
    fn from(e: crab_nat::MappingFailure) -> Self {
        match e {
            crab_nat::MappingFailure::NatPmp(e) => MapError::NatPmp(e),
            crab_nat::MappingFailure::Pcp(e) => MapError::Pcp(e),
        }
    }
}

impl MapError {
    /// True when the router answered but said no (or answered junk),
    /// rather than not being there at all.
    pub(crate) fn answered(&self) -> bool {
        match self {
            MapError::Pcp(pcp::Failure::Socket(_) | pcp::Failure::Timeout)
            | MapError::NatPmp(natpmp::Failure::Socket(_) | natpmp::Failure::Timeout)
            | MapError::Timeout(_) => false,
            MapError::Pcp(_) | MapError::NatPmp(_) => true,
            MapError::Upnp(m) => !m.starts_with("search:"),
        }
    }
}

/// A mapping we hold, with what is needed to renew and remove it.
#[derive(Debug, Clone)]
pub(crate) enum Held {
    /// PCP or NAT-PMP: `crab_nat` keeps nonce, epoch and lifetime.
    Crab {
        protocol: Protocol,
        external_ip: IpAddr,
        tcp: PortMapping,
        udp: Option<PortMapping>,
    },
    /// UPnP IGD: the gateway's control URL and the external ports.
    Upnp {
        gateway: Gateway<Tokio>,
        external_ip: IpAddr,
        tcp: u16,
        udp: Option<u16>,
    },
}

impl Held {
    pub(crate) fn protocol(&self) -> Protocol {
        match self {
            Held::Crab { protocol, .. } => *protocol,
            Held::Upnp { .. } => Protocol::Upnp,
        }
    }

    /// The grant this mapping amounts to.
    pub(crate) fn grant(&self) -> Grant {
        match self {
            Held::Crab {
                protocol,
                external_ip,
                tcp,
                udp,
            } => {
                let lease = udp
                    .iter()
                    .map(PortMapping::lifetime)
                    .chain([tcp.lifetime()])
                    .min()
                    .unwrap_or(0);
                Grant {
                    protocol: *protocol,
                    external_tcp: SocketAddr::new(*external_ip, tcp.external_port().get()),
                    external_udp: udp
                        .as_ref()
                        .map(|u| SocketAddr::new(*external_ip, u.external_port().get())),
                    lease: Duration::from_secs(u64::from(lease)),
                }
            }
            Held::Upnp {
                external_ip,
                tcp,
                udp,
                ..
            } => Grant {
                protocol: Protocol::Upnp,
                external_tcp: SocketAddr::new(*external_ip, *tcp),
                external_udp: udp.map(|u| SocketAddr::new(*external_ip, u)),
                lease: LEASE,
            },
        }
    }
}

fn timeouts(budget: Duration) -> TimeoutConfig {
    // 250 ms, then 500 ms, capped by the budget around the call.
    TimeoutConfig {
        initial_timeout: budget / 4,
        max_retries: 2,
        max_retry_timeout: Some(budget / 2),
    }
}

fn options(external: NonZeroU16, budget: Duration) -> PortMappingOptions {
    PortMappingOptions {
        external_port: Some(external),
        lifetime_seconds: Some(LEASE.as_secs() as u32),
        timeout_config: Some(timeouts(budget)),
    }
}

async fn bounded<T>(
    budget: Duration,
    f: impl std::future::Future<Output = Result<T, MapError>>,
) -> Result<T, MapError> {
    tokio::time::timeout(budget, f)
        .await
        .unwrap_or(Err(MapError::Timeout(budget)))
}

/// PCP: map the UDP port first (the probe itself), then TCP.
pub(crate) async fn map_pcp(t: Target, budget: Duration) -> Result<Held, MapError> {
    bounded(budget, async {
        let one = |proto, port: NonZeroU16| {
            pcp::port_mapping(
                pcp::BaseMapRequest::new(t.gateway.into(), t.local.into(), proto, port),
                None,
                None,
                options(t.wanted(port), budget),
            )
        };
        let udp = match t.ports.udp {
            Some(p) => Some(one(InternetProtocol::Udp, p).await?),
            None => None,
        };
        let tcp = one(InternetProtocol::Tcp, t.ports.tcp).await?;
        let external_ip = match tcp.mapping_type() {
            crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
            crab_nat::PortMappingType::NatPmp => {
                return Err(MapError::Upnp("PCP answered as NAT-PMP".into()))
            }
        };
        Ok(Held::Crab {
            protocol: Protocol::Pcp,
            external_ip,
            tcp,
            udp,
        })
    })
    .await
}

/// NAT-PMP: the external address (the probe), then both mappings.
pub(crate) async fn natpmp_address(t: Target, budget: Duration) -> Result<Ipv4Addr, MapError> {
    bounded(budget, async {
        Ok(natpmp::external_address(t.gateway.into(), Some(timeouts(budget))).await?)
    })
    .await
}

pub(crate) async fn map_natpmp(
    t: Target,
    external_ip: Ipv4Addr,
    budget: Duration,
) -> Result<Held, MapError> {
    bounded(budget, async {
        let one = |proto, port: NonZeroU16| {
            natpmp::port_mapping(
                t.gateway.into(),
                proto,
                port,
                options(t.wanted(port), budget),
            )
        };
        let udp = match t.ports.udp {
            Some(p) => Some(one(InternetProtocol::Udp, p).await?),
            None => None,
        };
        let tcp = one(InternetProtocol::Tcp, t.ports.tcp).await?;
        Ok(Held::Crab {
            protocol: Protocol::NatPmp,
            external_ip: external_ip.into(),
            tcp,
            udp,
        })
    })
    .await
}

/// UPnP: SSDP sent to the gateway alone (unicast to its port 1900, not
/// the multicast group: only the default gateway is asked), then the
/// device description from the URL it names.
pub(crate) async fn upnp_search(t: Target, budget: Duration) -> Result<Gateway<Tokio>, MapError> {
    let mut opts = SearchOptions::default();
    opts.bind_addr = SocketAddr::new(t.local.into(), 0);
    opts.broadcast_address = SocketAddr::new(t.gateway.into(), 1900);
    opts.timeout = Some(budget);
    opts.single_search_timeout = Some(budget);
    opts.gateway_ip_version = igd_next::GatewayIpVersion::V4;
    bounded(budget, async {
        tokio::select! {
            r = igd_next::aio::tokio::search_gateway(opts) => {
                r.map_err(|e| MapError::Upnp(format!("search: {e}")))
            }
            e = ssdp_refused(t) => Err(e),
        }
    })
    .await
}

/// Resolves only if the gateway's SSDP port is closed (ICMP port
/// unreachable), so a LAN without UPnP costs a round trip, not the whole
/// search budget: `igd-next` searches from an unconnected socket, which
/// never sees the ICMP error, and waits out its timeout (measured: 1 s
/// added to the first registration on a router-less LAN). Sends one
/// M-SEARCH from a connected socket; any answer is left to `igd-next`.
async fn ssdp_refused(t: Target) -> MapError {
    const SEARCH: &[u8] = b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\
        MAN: \"ssdp:discover\"\r\nMX: 1\r\n\
        ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n";
    let closed = async {
        let s = tokio::net::UdpSocket::bind(SocketAddr::new(t.local.into(), 0)).await?;
        s.connect(SocketAddr::new(t.gateway.into(), 1900)).await?;
        s.send(SEARCH).await?;
        let mut buf = [0u8; 64];
        loop {
            // An answer (Ok) is igd-next's business; only a refusal ends this.
            s.recv(&mut buf).await?;
        }
    };
    let r: std::io::Result<()> = closed.await;
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            MapError::Upnp("search: the gateway's SSDP port is closed".into())
        }
        // Any other error says nothing about UPnP: leave it to the search.
        _ => std::future::pending().await,
    }
}

pub(crate) async fn map_upnp(
    t: Target,
    gateway: Gateway<Tokio>,
    budget: Duration,
) -> Result<Held, MapError> {
    bounded(budget, async {
        let external_ip = gateway
            .get_external_ip()
            .await
            .map_err(|e| MapError::Upnp(format!("external address: {e}")))?;
        let lease = LEASE.as_secs() as u32;
        let one = |proto, port: NonZeroU16| {
            let gateway = &gateway;
            async move {
                let local = SocketAddr::new(t.local.into(), port.get());
                let external = t.wanted(port).get();
                match gateway
                    .add_port(proto, external, local, lease, DESCRIPTION)
                    .await
                {
                    Ok(()) => Ok(external),
                    // Someone else holds that external port: take the one the router picks.
                    Err(igd_next::AddPortError::PortInUse) => gateway
                        .add_any_port(proto, local, lease, DESCRIPTION)
                        .await
                        .map_err(|e| MapError::Upnp(format!("{proto} map: {e}"))),
                    Err(e) => Err(MapError::Upnp(format!("{proto} map: {e}"))),
                }
            }
        };
        let udp = match t.ports.udp {
            Some(p) => Some(one(PortMappingProtocol::UDP, p).await?),
            None => None,
        };
        let tcp = one(PortMappingProtocol::TCP, t.ports.tcp).await?;
        Ok(Held::Upnp {
            gateway,
            external_ip,
            tcp,
            udp,
        })
    })
    .await
}

/// Renews (re-creates, if the router forgot it) a mapping.
pub(crate) async fn renew(held: &mut Held, t: Target) -> Result<(), MapError> {
    bounded(REQUEST_TIMEOUT, async {
        match held {
            Held::Crab { tcp, udp, .. } => {
                if let Some(u) = udp.as_mut() {
                    u.renew().await.map_err(MapError::from)?;
                }
                tcp.renew().await.map_err(MapError::from)?;
                Ok(())
            }
            Held::Upnp {
                gateway, tcp, udp, ..
            } => {
                let lease = LEASE.as_secs() as u32;
                let add = |proto, ext: u16, internal: NonZeroU16| {
                    let gateway = &*gateway;
                    async move {
                        gateway
                            .add_port(
                                proto,
                                ext,
                                SocketAddr::new(t.local.into(), internal.get()),
                                lease,
                                DESCRIPTION,
                            )
                            .await
                            .map_err(|e| MapError::Upnp(format!("{proto} renew: {e}")))
                    }
                };
                if let (Some(ext), Some(internal)) = (*udp, t.ports.udp) {
                    add(PortMappingProtocol::UDP, ext, internal).await?;
                }
                add(PortMappingProtocol::TCP, *tcp, t.ports.tcp).await
            }
        }
    })
    .await
}

/// Removes a mapping (clean exit); errors are only reported.
pub(crate) async fn remove(held: Held) -> Result<(), MapError> {
    bounded(REQUEST_TIMEOUT, async {
        match held {
            Held::Crab { tcp, udp, .. } => {
                if let Some(u) = udp {
                    u.try_drop().await.map_err(|(e, _)| MapError::from(e))?;
                }
                tcp.try_drop().await.map_err(|(e, _)| MapError::from(e))
            }
            Held::Upnp {
                gateway, tcp, udp, ..
            } => {
                if let Some(u) = udp {
                    gateway
                        .remove_port(PortMappingProtocol::UDP, u)
                        .await
                        .map_err(|e| MapError::Upnp(format!("UDP remove: {e}")))?;
                }
                gateway
                    .remove_port(PortMappingProtocol::TCP, tcp)
                    .await
                    .map_err(|e| MapError::Upnp(format!("TCP remove: {e}")))
            }
        }
    })
    .await
}
