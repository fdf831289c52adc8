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

/// The peer address Envoy reports for a request (`source.address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Envoy could not tell (no address, or one keygate cannot parse).
    Unknown,
    /// The address of the connection's peer.
    Connection(IpAddr),
    /// An address Envoy took from the request's X-Forwarded-For (its port is 0: no
    /// connection has port 0). Envoy does this when the connection manager's
    /// `use_remote_address` is false, its default, so the client chose it.
    FromRequest(IpAddr),
}

/// Reads `source.address` as Envoy reports it: `127.0.0.1:5000`, `[::1]:5000`.
pub fn parse_source_address(s: &[u8]) -> Peer {
    let Ok(s) = std::str::from_utf8(s) else {
        return Peer::Unknown;
    };
    match parse_with_port(s.trim()) {
        Some((ip, Some(0))) => Peer::FromRequest(ip),
        Some((ip, _)) => Peer::Connection(ip),
        None => Peer::Unknown,
    }
}

/// Parses the peer address as Envoy reports it in `source.address`:
/// `127.0.0.1:5000`, `[::1]:5000`, or a bare address.
pub fn parse_peer(s: &str) -> Option<IpAddr> {
    parse_with_port(s.trim()).map(|(ip, _)| ip)
}

/// An address with an optional port: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`.
fn parse_with_port(s: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(parse_port(p.strip_prefix(':')?)?),
        };
        let ip = addr.parse::<Ipv6Addr>().ok()?;
        return Some((canonical(IpAddr::V6(ip)), port));
    }
    // One colon: an IPv4 address and its port, the form Envoy reports for IPv4 peers (an
    // IPv6 address has at least two colons), read without trying IPv6 first.
    if let Some((addr, port)) = s.split_once(':') {
        if !port.contains(':') {
            let ip = addr.parse::<Ipv4Addr>().ok()?;
            return Some((IpAddr::V4(ip), Some(parse_port(port)?)));
        }
    }
    let ip = s.parse::<IpAddr>().ok()?;
    Some((canonical(ip), None))
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Why the client address is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Envoy reported no address keygate can read.
    NoPeer,
    /// Envoy took the address from the request (`use_remote_address: false`).
    FromRequest,
    /// The X-Forwarded-For entry that decides is not an address.
    MalformedForwardedFor,
}

/// The client address: the peer, unless the peer is a trusted proxy; then
/// X-Forwarded-For is walked from the right past trusted entries and the first untrusted
/// entry is the client (every entry trusted: the left-most). Entries left of the one that
/// decides are the client's to write and are never read; if the entry that decides is not
/// an address, the client is unknown (never the proxy). `xff` holds every X-Forwarded-For
/// header value in arrival order: several headers are one list.
pub fn client_address(peer: Peer, xff: &[&[u8]], trusted: &CidrSet) -> Result<IpAddr, Unknown> {
    let peer = match peer {
        Peer::Connection(ip) => ip,
        Peer::FromRequest(_) => return Err(Unknown::FromRequest),
        Peer::Unknown => return Err(Unknown::NoPeer),
    };
    if trusted.is_empty() || !trusted.contains(peer) {
        return Ok(peer);
    }
    let mut leftmost = peer;
    let entries = xff
        .iter()
        .rev()
        // A header that holds nothing adds no entry; an empty entry in a list is malformed.
        .filter(|value| !value.trim_ascii().is_empty())
        .flat_map(|value| value.rsplit(|&b| b == b','));
    for entry in entries {
        let ip = std::str::from_utf8(entry.trim_ascii())
            .ok()
            .and_then(parse_hop)
            .ok_or(Unknown::MalformedForwardedFor)?;
        if !trusted.contains(ip) {
            return Ok(ip);
        }
        leftmost = ip;
    }
    Ok(leftmost)
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

    fn conn(s: &str) -> Peer {
        Peer::Connection(ip(s))
    }

    #[test]
    fn source_addresses() {
        assert_eq!(parse_source_address(b"127.0.0.7:5000"), conn("127.0.0.7"));
        assert_eq!(parse_source_address(b"[::1]:5000"), conn("::1"));
        assert_eq!(
            parse_source_address(b"203.0.113.7:0"),
            Peer::FromRequest(ip("203.0.113.7"))
        );
        assert_eq!(
            parse_source_address(b"[2001:db8::1]:0"),
            Peer::FromRequest(ip("2001:db8::1"))
        );
        for bad in [
            &b"garbage"[..],
            b"",
            b"\xff",
            b"1.2.3.4:",
            b"[::1]x",
            b"1.2.3.4:+1",
        ] {
            assert_eq!(parse_source_address(bad), Peer::Unknown, "{bad:?}");
        }
    }

    #[test]
    fn xff_ignored_without_trusted_peer() {
        let trusted = set(&["127.0.0.1/32"]);
        let xff: &[&[u8]] = &[b"203.0.113.9"];
        assert_eq!(
            client_address(conn("127.0.0.2"), xff, &trusted),
            Ok(ip("127.0.0.2"))
        );
        assert_eq!(
            client_address(conn("127.0.0.1"), xff, &CidrSet::default()),
            Ok(ip("127.0.0.1"))
        );
        // Even junk is not read when the peer is not trusted.
        let junk: &[&[u8]] = &[b"\xff, junk"];
        assert_eq!(
            client_address(conn("127.0.0.2"), junk, &trusted),
            Ok(ip("127.0.0.2"))
        );
    }

    #[test]
    fn xff_walked_from_the_right_past_trusted_hops() {
        let trusted = set(&["127.0.0.1/32", "10.0.0.0/8"]);
        let peer = conn("127.0.0.1");
        let xff: &[&[u8]] = &[b"198.51.100.1, 203.0.113.9, 10.1.1.1, 127.0.0.1"];
        assert_eq!(client_address(peer, xff, &trusted), Ok(ip("203.0.113.9")));
        // Several headers are one list, in order.
        let xff: &[&[u8]] = &[b"198.51.100.1", b"203.0.113.9, 10.1.1.1"];
        assert_eq!(client_address(peer, xff, &trusted), Ok(ip("203.0.113.9")));
        let xff: &[&[u8]] = &[b"198.51.100.1, 203.0.113.9", b"10.1.1.1"];
        assert_eq!(client_address(peer, xff, &trusted), Ok(ip("203.0.113.9")));
        // IPv6, with and without brackets and ports.
        let xff: &[&[u8]] = &[b"[2001:db8::5]:1234, 10.0.0.1"];
        assert_eq!(client_address(peer, xff, &trusted), Ok(ip("2001:db8::5")));
        let xff: &[&[u8]] = &[b"2001:db8::5"];
        assert_eq!(client_address(peer, xff, &trusted), Ok(ip("2001:db8::5")));
        // All trusted: the left-most.
        let xff: &[&[u8]] = &[b"10.0.0.9, 10.0.0.8"];
        assert_eq!(client_address(peer, xff, &trusted), Ok(ip("10.0.0.9")));
        // No header: the peer.
        assert_eq!(client_address(peer, &[], &trusted), Ok(ip("127.0.0.1")));
    }

    #[test]
    fn entries_left_of_the_deciding_one_never_matter() {
        let trusted = set(&["127.0.0.1/32", "10.0.0.0/8"]);
        let peer = conn("127.0.0.1");
        for left in [
            &b"junk"[..],
            b"",
            b"\xff\xfe",
            b"1.2.3.4 5.6.7.8",
            b"[::1",
            b"unknown, ,",
        ] {
            let mut value = left.to_vec();
            value.extend_from_slice(b", 203.0.113.7, 10.0.0.1");
            assert_eq!(
                client_address(peer, &[&value], &trusted),
                Ok(ip("203.0.113.7")),
                "{value:?}"
            );
            // The same split over two headers.
            let two: &[&[u8]] = &[left, b"203.0.113.7"];
            assert_eq!(client_address(peer, two, &trusted), Ok(ip("203.0.113.7")));
        }
    }

    #[test]
    fn a_malformed_deciding_entry_makes_the_client_unknown() {
        let trusted = set(&["127.0.0.1/32", "10.0.0.0/8"]);
        let peer = conn("127.0.0.1");
        for bad in [
            &b"not-an-ip"[..],
            b"1.2.3.4,,",
            b"1.2.3.4, \xff",
            b"1.2.3.4 5.6.7.8",
            b"203.0.113.7, junk, 10.0.0.1",
            b"1.2.3.4:99999",
        ] {
            assert_eq!(
                client_address(peer, &[bad], &trusted),
                Err(Unknown::MalformedForwardedFor),
                "{bad:?}"
            );
        }
        assert_eq!(
            client_address(Peer::FromRequest(ip("203.0.113.7")), &[], &trusted),
            Err(Unknown::FromRequest)
        );
        assert_eq!(
            client_address(Peer::Unknown, &[], &trusted),
            Err(Unknown::NoPeer)
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a client writes left of the entry its trusted proxy appended, the
        /// client address is that entry.
        #[test]
        fn the_client_part_never_decides(
            left in proptest::collection::vec(any::<u8>(), 0..48),
            split in any::<bool>(),
            client in any::<[u8; 4]>(),
        ) {
            let trusted = CidrSet::parse(&["127.0.0.0/8".to_string(), "10.0.0.0/8".to_string()]).unwrap();
            let client = IpAddr::from(client);
            prop_assume!(!trusted.contains(client));
            let appended = format!("{client}, 10.9.8.7");
            let joined = [left.as_slice(), b", ", appended.as_bytes()].concat();
            let xff: Vec<&[u8]> = if split { vec![&left, appended.as_bytes()] } else { vec![&joined] };
            prop_assert_eq!(
                client_address(Peer::Connection(ip_of("127.0.0.1")), &xff, &trusted),
                Ok(canonical(client))
            );
        }
    }

    fn ip_of(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// parse_with_port as it was before it read the IPv4 `address:port` form first: every
    /// string must read the same.
    fn parse_with_port_reference(s: &str) -> Option<(IpAddr, Option<u16>)> {
        if let Some(rest) = s.strip_prefix('[') {
            let (addr, after) = rest.split_once(']')?;
            let port = match after {
                "" => None,
                p => Some(parse_port(p.strip_prefix(':')?)?),
            };
            let ip = addr.parse::<Ipv6Addr>().ok()?;
            return Some((canonical(IpAddr::V6(ip)), port));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some((canonical(ip), None));
        }
        let (addr, port) = s.rsplit_once(':')?;
        let ip = addr.parse::<Ipv4Addr>().ok()?;
        Some((IpAddr::V4(ip), Some(parse_port(port)?)))
    }

    #[test]
    fn parse_with_port_fast_path_reads_as_before() {
        for s in [
            "127.0.0.1:5000",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65535",
            "127.0.0.1:65536",
            "127.0.0.1:99999",
            "127.0.0.1:+80",
            "127.0.0.1:80:80",
            "1.2.3:80",
            "01.2.3.4:80",
            "::1",
            "[::1]",
            "[::1]:80",
            "[::1]:",
            "::ffff:1.2.3.4",
            "[::ffff:1.2.3.4]:80",
            "::1:80",
            "a:80",
            ":80",
            ":",
            "",
            "[",
            "[:80",
            "1.2.3.4 :80",
            "fe80::1%eth0",
        ] {
            assert_eq!(parse_with_port(s), parse_with_port_reference(s), "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_with_port_agrees_with_the_reference(s in "[0-9a-f:.\\[\\]%]{0,24}") {
            proptest::prop_assert_eq!(parse_with_port(&s), parse_with_port_reference(&s));
        }

        #[test]
        fn parse_with_port_agrees_on_v4_forms(
            a in 0u16..300, b in 0u16..300, port in proptest::option::of(0u32..70000)
        ) {
            let s = match port {
                Some(p) => format!("{a}.{b}.0.1:{p}"),
                None => format!("{a}.{b}.0.1"),
            };
            proptest::prop_assert_eq!(parse_with_port(&s), parse_with_port_reference(&s));
        }
    }
}
