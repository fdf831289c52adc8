//! The key table of the benchmark's key-job fixtures, shared by bench/wasm-floor (`keyjob:`
//! and `fulljob:` modes, in the Wasm VM) and bench/dynmod-keyjob (the same modes as an Envoy
//! dynamic module), so that both read the same configuration the same way. Each includes
//! this file with `#[path]`.

use std::collections::HashMap;

/// SHA-256 digest -> key id (`k` and the digest's position in the list, seven digits: the
/// ids bench/run.py gives its keys).
pub type KeyTable = HashMap<[u8; 32], String>;

/// The table of a comma-separated list of hex SHA-256 digests. A digest that is not 64 hex
/// digits, or a repeated one, is an error naming its position.
pub fn parse_keys(list: &str) -> Result<KeyTable, String> {
    let mut table = KeyTable::new();
    for (i, hex) in list.split(',').enumerate() {
        let bytes = hex.trim().as_bytes();
        if bytes.len() != 64 {
            return Err(format!("digest {i} is not 64 hex digits"));
        }
        let mut digest = [0u8; 32];
        for (j, pair) in bytes.chunks_exact(2).enumerate() {
            let (Some(hi), Some(lo)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
                return Err(format!("digest {i} is not 64 hex digits"));
            };
            digest[j] = hi << 4 | lo;
        }
        if table.insert(digest, format!("k{i:07}")).is_some() {
            return Err(format!("digest {i} is repeated"));
        }
    }
    Ok(table)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}
