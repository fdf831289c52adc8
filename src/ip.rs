//! Client addresses: CIDR sets, the peer address Envoy reports, and X-Forwarded-For
//! through trusted proxies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One CIDR block, stored as an IPv6 network (IPv4 as IPv4-mapped `::ffff:a.b.c.d/96+n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: u128,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a single address (`203.0.113.7`, `::1`).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = |why: &str| {
            format!("{s:?} is not an IP address or CIDR block ({why}), e.g. \"10.0.0.0/8\" or \"2001:db8::/32\"")
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad("bad address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) && l.len() <= 3 => {
                l.parse::<u8>().map_err(|_| bad("bad prefix length"))?
            }
            Some(_) => return Err(bad("bad prefix length")),
        };
        if len > max {
            return Err(bad(&format!("prefix length over {max}")));
        }
        let (bits, prefix) = match ip {
            IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 96 + len),
            IpAddr::V6(v6) => (u128::from(v6), len),
        };
        let cidr = Cidr {
            network: bits & mask(prefix),
            prefix,
        };
        if cidr.network != bits {
            return Err(bad(
                "host bits set after the prefix; write the network address",
            ));
        }
        Ok(cidr)
    }

    /// Whether the address lies inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        to_bits(ip) & mask(self.prefix) == self.network
    }
}

fn mask(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

fn to_bits(ip: IpAddr) -> u128 {
    match canonical(ip) {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A list of CIDR blocks; `*` in the configuration means every address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    blocks: Vec<Cidr>,
}

impl CidrSet {
    /// Parses a list; errors carry the index of the bad entry.
    pub fn parse(list: &[String]) -> Result<CidrSet, (usize, String)> {
        let mut blocks = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            if s == "*" {
                blocks.push(Cidr::parse("::/0").map_err(|e| (i, e))?);
                blocks.push(Cidr::parse("0.0.0.0/0").map_err(|e| (i, e))?);
            } else {
                blocks.push(Cidr::parse(s).map_err(|e| (i, e))?);
            }
        }
        Ok(CidrSet { blocks })
    }

    /// Whether any block contains the address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|b| b.contains(ip))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Parses the peer address as Envoy reports it in `source.address`:
/// `127.0.0.1:5000`, `[::1]:5000`, or a bare address.
pub fn parse_peer(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, _) = rest.split_once(']')?;
        return addr
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| canonical(IpAddr::V6(a)));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    let (addr, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client address: the peer, unless the peer is a trusted proxy, in which case
/// X-Forwarded-For is walked from the right past trusted hops and the first untrusted
/// address is the client. A malformed X-Forwarded-For falls back to the peer.
/// `xff` holds every X-Forwarded-For header value in arrival order.
pub fn client_address(peer: IpAddr, xff: &[&[u8]], trusted: &CidrSet) -> IpAddr {
    if trusted.is_empty() || !trusted.contains(peer) || xff.is_empty() {
        return peer;
    }
    let mut hops = Vec::new();
    for value in xff {
        let Ok(value) = std::str::from_utf8(value) else {
            return peer;
        };
        for hop in value.split(',') {
            match parse_hop(hop.trim()) {
                Some(ip) => hops.push(ip),
                None => return peer,
            }
        }
    }
    // Every hop trusted: the left-most is where the request entered the trusted chain.
    let leftmost = hops.first().copied().unwrap_or(peer);
    hops.into_iter()
        .rev()
        .find(|ip| !trusted.contains(*ip))
        .unwrap_or(leftmost)
}

/// An X-Forwarded-For entry: an address, possibly `[v6]:port` or `v4:port`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if s.is_empty() {
        return None;
    }
    parse_peer(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(list: &[&str]) -> CidrSet {
        CidrSet::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(!c.contains(ip("::a00:1")));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains(ip("2001:db8:1::1")));
        assert!(!c.contains(ip("2001:db9::1")));
        let c = Cidr::parse("203.0.113.7").unwrap();
        assert!(c.contains(ip("203.0.113.7")));
        assert!(!c.contains(ip("203.0.113.8")));
        let c = Cidr::parse("::1").unwrap();
        assert!(c.contains(ip("::1")));
        assert!(!c.contains(ip("127.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(!Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains(ip("2001:db8::1")));
    }

    #[test]
    fn cidr_errors() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.1/8",
            "::/129",
            "hello",
            "10.0.0/8",
            "1.2.3.4/+8",
        ] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(
                e.contains("is not an IP address or CIDR block"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn star_means_any() {
        let s = set(&["*"]);
        assert!(s.contains(ip("1.2.3.4")));
        assert!(s.contains(ip("2001:db8::1")));
        assert!(!set(&[]).contains(ip("1.2.3.4")));
        assert_eq!(
            CidrSet::parse(&["10.0.0.0/8".into(), "nope".into()])
                .unwrap_err()
                .0,
            1
        );
    }

    #[test]
    fn peer_formats() {
        assert_eq!(parse_peer("127.0.0.7:5000"), Some(ip("127.0.0.7")));
        assert_eq!(parse_peer("[::1]:5000"), Some(ip("::1")));
        assert_eq!(parse_peer("[::ffff:127.0.0.1]:5000"), Some(ip("127.0.0.1")));
        assert_eq!(parse_peer("::1"), Some(ip("::1")));
        assert_eq!(parse_peer("10.0.0.1"), Some(ip("10.0.0.1")));
        assert_eq!(parse_peer("garbage"), None);
        assert_eq!(parse_peer("1.2.3.4:99999"), None);
        assert_eq!(parse_peer("[::1"), None);
    }

    #[test]
    fn xff_ignored_without_trusted_peer() {
        let trusted = set(&["127.0.0.1/32"]);
        let xff: &[&[u8]] = &[b"203.0.113.9"];
        assert_eq!(
            client_address(ip("127.0.0.2"), xff, &trusted),
            ip("127.0.0.2")
        );
        assert_eq!(
            client_address(ip("127.0.0.1"), xff, &CidrSet::default()),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn xff_walked_from_the_right_past_trusted_hops() {
        let trusted = set(&["127.0.0.1/32", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        let xff: &[&[u8]] = &[b"198.51.100.1, 203.0.113.9, 10.1.1.1, 127.0.0.1"];
        assert_eq!(client_address(peer, xff, &trusted), ip("203.0.113.9"));
        // Several headers are one list, in order.
        let xff: &[&[u8]] = &[b"198.51.100.1", b"203.0.113.9, 10.1.1.1"];
        assert_eq!(client_address(peer, xff, &trusted), ip("203.0.113.9"));
        // IPv6, with and without brackets and ports.
        let xff: &[&[u8]] = &[b"[2001:db8::5]:1234, 10.0.0.1"];
        assert_eq!(client_address(peer, xff, &trusted), ip("2001:db8::5"));
        let xff: &[&[u8]] = &[b"2001:db8::5"];
        assert_eq!(client_address(peer, xff, &trusted), ip("2001:db8::5"));
        // All trusted: the left-most.
        let xff: &[&[u8]] = &[b"10.0.0.9, 10.0.0.8"];
        assert_eq!(client_address(peer, xff, &trusted), ip("10.0.0.9"));
    }

    #[test]
    fn malformed_xff_falls_back_to_peer() {
        let trusted = set(&["127.0.0.1/32"]);
        let peer = ip("127.0.0.1");
        for bad in [
            &b"not-an-ip"[..],
            b"1.2.3.4,,5.6.7.8",
            b"",
            b"1.2.3.4, \xff",
            b"1.2.3.4 5.6.7.8",
        ] {
            assert_eq!(client_address(peer, &[bad], &trusted), peer, "{bad:?}");
        }
    }
}
