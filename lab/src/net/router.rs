//! A real router daemon in a NAT namespace: miniupnpd 2.3.1 (UPnP IGD,
//! NAT-PMP and PCP), built from Debian's source by `lab/miniupnpd/build.sh`
//! with only the TEST-NET ranges taken out of its reserved-address table
//! (unchanged, it refuses the lab's 203.0.113.0/24 WAN address).
//!
//! It runs with `ext_ifname=wan0`, `listening_ip=lan0`, its nftables
//! chains made by its own `nft_init.sh`, and a FORWARD chain like a home
//! router's: drop by default, accept the LAN's outbound, established
//! flows, and what miniupnpd's own chain accepts (the mapped ports).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::net::netns::Netns;

/// Where `build.sh` installs it (override: `PUNCH_LAB_MINIUPNPD`).
pub const DEFAULT_DIR: &str = "/usr/local/lib/punch-lab/miniupnpd";

/// The installed router daemon, or why there is none.
pub fn installed() -> Result<PathBuf, String> {
    let dir = std::env::var_os("PUNCH_LAB_MINIUPNPD")
        .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from);
    if dir.join("miniupnpd").is_file() && dir.join("scripts/nft_init.sh").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "miniupnpd is not built in {} (run lab/miniupnpd/build.sh as root)",
            dir.display()
        ))
    }
}

/// Which protocols the router answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// UPnP IGD only.
    Upnp,
    /// NAT-PMP only (PCP requests are dropped, as an old router ignores them).
    NatPmp,
    /// PCP only (NAT-PMP requests are dropped).
    Pcp,
    /// All three.
    All,
}

/// A router to run on one side's NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterSpec {
    /// Which protocols answer.
    pub offer: Offer,
    /// Refuse every mapping (a `deny` rule for everything).
    pub deny: bool,
}

/// The miniupnpd.conf for a router on a NAT whose LAN is `lan_cidr`.
pub fn config(spec: RouterSpec, lan_cidr: &str, lease_file: &Path) -> String {
    let (upnp, natpmp) = match spec.offer {
        Offer::Upnp => ("yes", "no"),
        Offer::NatPmp | Offer::Pcp => ("no", "yes"),
        Offer::All => ("yes", "yes"),
    };
    let rules = if spec.deny {
        "deny 0-65535 0.0.0.0/0 0-65535\n".to_owned()
    } else {
        format!("allow 1024-65535 {lan_cidr} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n")
    };
    format!(
        "ext_ifname=wan0\nlistening_ip=lan0\nhttp_port=0\nenable_upnp={upnp}\nenable_natpmp={natpmp}\n\
         secure_mode=yes\nsystem_uptime=yes\nmin_lifetime=120\nmax_lifetime=86400\n\
         lease_file={}\nuuid=3a2e0f0e-1f19-4c19-9a19-000000000019\n{rules}",
        lease_file.display()
    )
}

/// The nftables rules that make a "NAT-PMP only" or "PCP only" router out
/// of miniupnpd (which serves both on UDP 5351 under `enable_natpmp`): the
/// other version's requests are dropped before they reach it. The first
/// payload byte is the version: 0 for NAT-PMP, 2 for PCP.
fn version_filter(offer: Offer) -> Option<&'static str> {
    let drop = match offer {
        Offer::NatPmp => 2,
        Offer::Pcp => 0,
        _ => return None,
    };
    Some(match drop {
        0 => "table inet lab_router {\n  chain input { type filter hook input priority -10; policy accept; udp dport 5351 @th,64,8 0 drop; }\n}\n",
        _ => "table inet lab_router {\n  chain input { type filter hook input priority -10; policy accept; udp dport 5351 @th,64,8 2 drop; }\n}\n",
    })
}

/// A router running in a NAT namespace.
#[derive(Debug)]
pub struct Router {
    dir: PathBuf,
    conf: PathBuf,
    /// Index of the miniupnpd process in the NAT namespace.
    pub process: usize,
    starts: u32,
}

impl Router {
    /// Sets up the NAT's filter chains and starts miniupnpd in `nat`.
    pub fn start(nat: &mut Netns, spec: RouterSpec, lan_cidr: &str, work: &Path) -> Result<Self> {
        let dir = installed().map_err(anyhow::Error::msg)?;
        let init = dir.join("scripts/nft_init.sh");
        let out = nat.exec("sh", &[init.to_str().unwrap_or("")])?;
        if !out.status.success() {
            bail!(
                "nft_init.sh in {}: {}",
                nat.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A home router's forward policy around miniupnpd's own chain.
        nat.nft(
            "add rule inet filter forward ct state established,related accept\n\
             add rule inet filter forward iifname \"lan0\" accept\n",
        )?;
        if let Some(rules) = version_filter(spec.offer) {
            nat.nft(rules)?;
        }
        let conf = work.join(format!("{}.miniupnpd.conf", nat.name()));
        let leases = work.join(format!("{}.upnp.leases", nat.name()));
        std::fs::write(&conf, config(spec, lan_cidr, &leases))
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let mut r = Self {
            dir,
            conf,
            process: 0,
            starts: 0,
        };
        r.spawn(nat, work)?;
        Ok(r)
    }

    fn spawn(&mut self, nat: &mut Netns, work: &Path) -> Result<()> {
        self.starts += 1;
        let log = work.join(format!("{}.miniupnpd.{}.log", nat.name(), self.starts));
        let pid = work.join(format!("{}.miniupnpd.pid", nat.name()));
        // `-d` logs every line to stderr (the log file) and to syslog too;
        // with no syslog daemon (no /dev/log, as on the CI machines) glibc
        // writes each syslog line to /dev/console instead, a serial port.
        // A denied PCP request makes miniupnpd try every port and log each
        // refusal, 20,000 lines, and the console's interrupts then starved
        // the whole lab for seconds: relayed tunnels missed their
        // keepalives (CI: pm-deny). So the console miniupnpd sees is
        // /dev/null, bound in the mount namespace `ip netns exec` makes
        // for this process only; the host's console is untouched.
        let miniupnpd = self.dir.join("miniupnpd");
        self.process = nat.spawn(
            std::path::Path::new("sh"),
            &[
                "-c",
                "mount --bind /dev/null /dev/console && exec \"$0\" \"$@\"",
                miniupnpd.to_str().unwrap_or("miniupnpd"),
                "-d",
                "-f",
                self.conf.to_str().unwrap_or(""),
                "-P",
                pid.to_str().unwrap_or(""),
            ],
            &[],
            &log,
        )?;
        // NAT-PMP/PCP are served as soon as its sockets are up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            let out = nat.exec_output("ss", &["-lun"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains(":1900") || text.contains(":5351") {
                return Ok(());
            }
            if !nat.is_running(self.process) {
                bail!("miniupnpd exited at start (see {})", log.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bail!("miniupnpd did not come up (see {})", log.display())
    }

    /// A router restart that forgets every mapping: the daemon is killed
    /// (no clean-up of its own), its rules and lease file are wiped, the
    /// NAT's connection tracking is flushed, and it starts again.
    pub fn restart_forgetting(&mut self, nat: &mut Netns, work: &Path) -> Result<()> {
        nat.kill(self.process);
        let flush = self.dir.join("scripts/nft_flush.sh");
        nat.exec("sh", &[flush.to_str().unwrap_or("")])?;
        let _ = std::fs::remove_file(work.join(format!("{}.upnp.leases", nat.name())));
        nat.exec("conntrack", &["-F"])?;
        self.spawn(nat, work)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_say_what_they_offer() {
        let leases = Path::new("/tmp/x.leases");
        let upnp = config(
            RouterSpec {
                offer: Offer::Upnp,
                deny: false,
            },
            "192.0.2.0/24",
            leases,
        );
        assert!(upnp.contains("enable_upnp=yes") && upnp.contains("enable_natpmp=no"));
        assert!(upnp.contains("allow 1024-65535 192.0.2.0/24 1024-65535"));
        let denied = config(
            RouterSpec {
                offer: Offer::All,
                deny: true,
            },
            "192.0.2.0/24",
            leases,
        );
        assert!(!denied.contains("allow"));
        assert!(version_filter(Offer::Pcp).is_some_and(|r| r.contains("@th,64,8 0 drop")));
        assert!(version_filter(Offer::NatPmp).is_some_and(|r| r.contains("@th,64,8 2 drop")));
        assert!(version_filter(Offer::All).is_none());
    }
}
