//! Everything the lab takes from the punchd library, imported here and
//! nowhere else: the status document's own types (what `punchd status
//! --json` prints, so the lab reads it with the daemon's types rather than
//! by field names and fallbacks), and the payload helpers the sink and
//! sender share with the daemon's demo. When punchd re-exports them at its
//! root, these two lines are all that change.

pub use punchd::demo::{hex, pattern};
pub use punchd::status::{ForwardDoc, LastPunch, PathState, PeerDoc, StatusDoc, Transport};
