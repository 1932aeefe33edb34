//! Port forwarding: local listeners on one side ([`listen`]), exposed
//! services and their allow lists on the other ([`expose`]), one tunnel
//! stream per connection, bytes copied both ways ([`splice`]).
//!
//! A stream opens with the stream header (`tunnel::header`), then bytes
//! flow both ways, framed ([`frame`]: length-prefixed chunks and an end
//! marker), until each side half-closes. A stream cut before its end
//! marker resets both local sockets: never a FIN on truncated data. The exposer only ever
//! connects to a `target` from its own `[[expose]]` table, and only for
//! peers in that entry's `allow` list: a forward names a service, never an
//! address, so a daemon cannot be used as an open proxy.
//!
//! UDP forwards (`protocol = "udp"`) are in [`udp`]: one flow per local
//! client address, each on its own stream, datagrams as QUIC datagrams or
//! length-prefixed on the stream.
//!
//! This is not the relay: "relay" means only the fallback path through the
//! rendezvous (`fallback`). The forwarder never knows which path a stream
//! takes.

pub(crate) mod expose;
pub(crate) mod frame;
pub(crate) mod listen;
pub(crate) mod ranges;
pub(crate) mod splice;
pub(crate) mod udp;

pub(crate) use expose::serve_inbound;
pub(crate) use listen::{run_forward, StreamSource};
