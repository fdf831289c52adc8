//! The client address behind trusted proxies: Envoy's `source.address` and arbitrary
//! X-Forwarded-For values.
//!
//! The input's first line is `source.address` as Envoy would report it; every further
//! line is one X-Forwarded-For header value (several headers are one list). The trusted
//! proxies are fixed. `ip::client_address` must never panic, and:
//! - a peer keygate cannot read, or one Envoy took from the request, gives no address;
//! - an untrusted peer is the client, whatever X-Forwarded-For says;
//! - an address found behind a trusted peer is untrusted, or every entry was trusted.
//!
//! The first line is also read as a CIDR block, which must not panic either.
#![no_main]

use keygate::ip::{self, CidrSet, Peer, Unknown};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static TRUSTED: LazyLock<CidrSet> = LazyLock::new(|| {
    let list = ["127.0.0.1/32", "10.0.0.0/8", "2001:db8:cafe::/48", "::1"];
    match CidrSet::parse(&list.map(String::from)) {
        Ok(set) => set,
        Err((i, e)) => panic!("trusted[{i}]: {e}"),
    }
});

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let source = lines.next().unwrap_or_default();
    let xff: Vec<&[u8]> = lines.collect();
    let trusted = &*TRUSTED;

    if let Ok(text) = std::str::from_utf8(source) {
        let _ = ip::parse_peer(text);
        if let Ok(block) = ip::Cidr::parse(text) {
            let _ = block.contains(std::net::IpAddr::from([127, 0, 0, 1]));
        }
    }

    let peer = ip::parse_source_address(source);
    let client = ip::client_address(peer, &xff, trusted);
    // Each X-Forwarded-For entry (headers that hold nothing add none), read as an address.
    let entries = || {
        xff.iter()
            .filter(|value| !value.trim_ascii().is_empty())
            .flat_map(|value| value.split(|&b| b == b','))
            .map(|entry| {
                std::str::from_utf8(entry.trim_ascii())
                    .ok()
                    .and_then(ip::parse_peer)
            })
    };
    match peer {
        Peer::Unknown => assert_eq!(client, Err(Unknown::NoPeer)),
        Peer::FromRequest(_) => assert_eq!(client, Err(Unknown::FromRequest)),
        Peer::Connection(addr) if !trusted.contains(addr) => assert_eq!(client, Ok(addr)),
        Peer::Connection(_) => match client {
            // Every entry was walked past, so each is a trusted address.
            Ok(addr) if trusted.contains(addr) => {
                for hop in entries() {
                    assert!(
                        hop.is_some_and(|hop| trusted.contains(hop)),
                        "client {addr} is trusted, but entry {hop:?} is not"
                    );
                }
            }
            Ok(addr) => assert!(
                entries().any(|hop| hop == Some(addr)),
                "client {addr} is no X-Forwarded-For entry"
            ),
            Err(Unknown::MalformedForwardedFor) => {
                assert!(entries().any(|hop| hop.is_none()), "no malformed entry")
            }
            Err(other) => panic!("a trusted connection peer gave {other:?}"),
        },
    }
});
