//! How a port-range forward names the remote port: the stream request
//! carries the service and, for a range, the listen port's position in it
//! (`web#2`: the third port). The exposer maps that position onto its own
//! `target` range (the n-th listen port reaches the n-th target port) and
//! refuses a position its range does not have, so a peer still reaches
//! only the ports the exposer listed, and only for services it may use.
//!
//! A plain request (`web`) is position 0: a single-port forward to a range
//! service reaches its first port.

/// Separates the service name from the position (`[a-z0-9-]` never
/// contains it).
const SEP: char = '#';

#[cfg(test)]
use crate::tunnel::header::MAX_REQUEST_LEN;

/// The request a forward's `index`-th listen port sends; `None` for a
/// single-port forward.
pub(crate) fn request(service: &str, index: Option<u16>) -> String {
    match index {
        Some(n) => format!("{service}{SEP}{n}"),
        None => service.to_owned(),
    }
}

/// Splits a request into the service and the position.
pub(crate) fn parse(request: &str) -> Result<(&str, u16), &'static str> {
    match request.split_once(SEP) {
        None => Ok((request, 0)),
        Some((service, n)) => {
            let n: u16 = n.parse().map_err(|_| "bad port position")?;
            if n >= punch_config::MAX_RANGE_PORTS || service.is_empty() {
                return Err("bad port position");
            }
            Ok((service, n))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        assert_eq!(parse(&request("web", None)), Ok(("web", 0)));
        assert_eq!(parse(&request("web", Some(2))), Ok(("web", 2)));
        assert_eq!(request("web", Some(0)), "web#0");
        let longest = request(&"a".repeat(63), Some(255));
        assert_eq!(longest.len(), MAX_REQUEST_LEN);
        for bad in ["web#", "web#x", "web#256", "#1", "web#-1", "web#1#2"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
