//! The proxy-wasm ABI's serialized header-map format, decoded without trusting it.
//!
//! Layout: `u32 count`, then `count` pairs of `u32 name_len, u32 value_len`, then each
//! name and value followed by a NUL byte; all integers little-endian. The SDK's own
//! decoder panics on a malformed buffer or a non-UTF-8 name; this one returns `None`.

use crate::credentials::Header;

/// Why a header map cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The buffer does not follow the format (a host fault).
    Malformed,
    /// A header name is not UTF-8 (Envoy's codecs should never pass one; if one comes
    /// through, the request is refused rather than read without that header).
    NameNotText,
}

/// Decodes a serialized header map, borrowing names and values from `buf`.
pub fn decode_pairs(buf: &[u8]) -> Result<Vec<Header<'_>>, WireError> {
    decode(buf).ok_or(WireError::Malformed)?
}

fn decode(buf: &[u8]) -> Option<Result<Vec<Header<'_>>, WireError>> {
    if buf.is_empty() {
        return Some(Ok(Vec::new()));
    }
    let count = read_u32(buf, 0)? as usize;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    if data > buf.len() {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let name_len = read_u32(buf, 4 + i * 8)? as usize;
        let value_len = read_u32(buf, 8 + i * 8)? as usize;
        let name = buf.get(data..data.checked_add(name_len)?)?;
        data = data + name_len + 1;
        let value = buf.get(data..data.checked_add(value_len)?)?;
        data = data + value_len + 1;
        match std::str::from_utf8(name) {
            Ok(name) => out.push((name, value)),
            Err(_) => return Some(Err(WireError::NameNotText)),
        }
    }
    Some(Ok(out))
}

/// Serializes header pairs for the host.
pub fn encode_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(n, v)| n.len() + v.len() + 10)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&len_u32(name.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(value.len()).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pairs = [(":path", "/v1/jobs"), ("x-api-key", "abc"), ("empty", "")];
        let encoded = encode_pairs(&pairs);
        let decoded = decode_pairs(&encoded).unwrap();
        let expected: Vec<Header> = pairs.iter().map(|&(n, v)| (n, v.as_bytes())).collect();
        assert_eq!(decoded, expected);
        assert_eq!(decode_pairs(&[]), Ok(Vec::new()));
        assert_eq!(decode_pairs(&encode_pairs(&[])), Ok(Vec::new()));
    }

    #[test]
    fn malformed_buffers_are_refused_not_panicked_on() {
        let good = encode_pairs(&[("a", "bc"), ("d", "ef")]);
        for cut in 1..good.len() - 1 {
            // Every truncation is either refused or decodes without reading past the end.
            let _ = decode_pairs(&good[..cut]);
        }
        assert_eq!(decode_pairs(&[1, 0, 0]), Err(WireError::Malformed));
        assert_eq!(
            decode_pairs(&[0xff, 0xff, 0xff, 0xff]),
            Err(WireError::Malformed)
        );
        let mut huge_len = good.clone();
        huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_pairs(&huge_len), Err(WireError::Malformed));
    }

    #[test]
    fn non_utf8_values_survive_and_non_utf8_names_are_refused() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(&2u32.to_le_bytes());
        buf.extend_from_slice(&[0xff, 0, 0xfe, 0xfd, 0]);
        assert_eq!(decode_pairs(&buf), Err(WireError::NameNotText));
        buf[12] = b'n';
        assert_eq!(decode_pairs(&buf).unwrap(), vec![("n", &[0xfe, 0xfd][..])]);
    }
}
