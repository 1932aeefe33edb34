//! Building the network: namespaces, the address plan and its layouts,
//! the NATs' rule sets, and the link emulator. Nothing here knows about
//! punchd; the harness runs the binaries on top of it.
//!
//! - [`netns`]: one namespace, commands and processes inside it, removal
//!   (one, by prefix, or every lab namespace), and whether something
//!   listens on a port inside it.
//! - [`topology`]: the address plan and the layouts (two NATs, same NAT,
//!   one public host, double NAT), internet link emulation on them.
//! - [`nat`]: the nftables rule sets for each NAT flavour.
//! - [`linkem`]: delay, jitter and loss where packets arrive (NFQUEUE).
//! - [`router`]: a real router daemon (miniupnpd: UPnP IGD, NAT-PMP, PCP)
//!   in a NAT namespace.

pub mod linkem;
pub mod nat;
pub mod netns;
pub mod router;
pub mod topology;
