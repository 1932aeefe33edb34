//! The default IPv4 gateway, from `/proc/net/route`: the one router the
//! port mapper talks to (a device elsewhere on the LAN is never asked).

use std::net::Ipv4Addr;

/// `RTF_UP | RTF_GATEWAY`.
const UP_GATEWAY: u32 = 0x1 | 0x2;

/// The default route's gateway with the lowest metric, from the text of
/// `/proc/net/route`. Lines that do not parse are skipped (the file is
/// the kernel's, but a malformed line must not stop us finding the rest).
pub(crate) fn parse_default_gateway(text: &str) -> Option<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, gw, flags, metric, mask) =
                (f.get(1)?, f.get(2)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let dest = u32::from_str_radix(dest, 16).ok()?;
            let mask = u32::from_str_radix(mask, 16).ok()?;
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let metric: u32 = metric.parse().ok()?;
            // The kernel prints the network-order address as a native
            // integer, so the native bytes are the address's bytes.
            let gw = Ipv4Addr::from(u32::from_str_radix(gw, 16).ok()?.to_ne_bytes());
            (dest == 0 && mask == 0 && flags & UP_GATEWAY == UP_GATEWAY && !gw.is_unspecified())
                .then_some((metric, gw))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gw)| gw)
}

/// The default gateway of this host (its network namespace), if any.
pub(crate) fn default_gateway() -> Option<Ipv4Addr> {
    std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| parse_default_gateway(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    fn gw(a: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(a))
    }

    #[test]
    fn finds_the_default_route_with_the_lowest_metric() {
        let text = format!(
            "{HEADER}lan\t{}\t00000000\t0001\t0\t0\t0\t{}\t0\t0\t0\n\
             wlan\t00000000\t{}\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
             lan\t00000000\t{}\t0003\t0\t0\t100\t00000000\t0\t0\t0\n",
            gw([192, 0, 2, 0]),
            gw([255, 255, 255, 0]),
            gw([198, 51, 100, 1]),
            gw([192, 0, 2, 1]),
        );
        assert_eq!(
            parse_default_gateway(&text),
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
    }

    #[test]
    fn no_default_route_or_junk_is_none() {
        assert_eq!(parse_default_gateway(HEADER), None);
        assert_eq!(parse_default_gateway(""), None);
        let junk = format!("{HEADER}lan\tzz\t\u{0}\nx\n\t\t\t\t\t\t\t\t\n");
        assert_eq!(parse_default_gateway(&junk), None);
        // A default route without a gateway (a point-to-point link).
        let direct =
            format!("{HEADER}tun0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n");
        assert_eq!(parse_default_gateway(&direct), None);
    }
}
