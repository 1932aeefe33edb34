//! Everything the lab takes from the punchd library, imported here and
//! nowhere else: the status document's own types (what `punchd status
//! --json` prints, so the lab reads it with the daemon's types rather than
//! by field names and fallbacks), and the payload helpers the sink and
//! sender share with the daemon's demo (from punchd's root re-exports).

pub use punchd::{hex, pattern};
pub use punchd::{ForwardDoc, LastPunch, PathState, PeerDoc, StatusDoc, Transport};
