//! API keys: their accepted shape, SHA-256 digests and the digest index.

use sha2::{Digest as _, Sha256};
use std::collections::HashMap;

/// A SHA-256 digest of an API key.
pub type Digest = [u8; 32];

/// Shortest accepted key, in characters.
pub const MIN_KEY_CHARS: usize = 16;
/// Longest accepted key, in characters.
pub const MAX_KEY_CHARS: usize = 512;
/// The prefix of every configured hash.
pub const HASH_PREFIX: &str = "sha256:";

/// SHA-256 of the key bytes, exactly what `printf %s "$KEY" | sha256sum` computes.
pub fn digest(key: &[u8]) -> Digest {
    Sha256::digest(key).into()
}

/// The `sha256:<hex>` form of a key's digest, as written in the configuration.
pub fn hash_string(key: &[u8]) -> String {
    let mut out = String::with_capacity(HASH_PREFIX.len() + 64);
    out.push_str(HASH_PREFIX);
    for byte in digest(key) {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Parses `sha256:` followed by 64 lowercase hex digits.
pub fn parse_hash(s: &str) -> Result<Digest, String> {
    let bad = || {
        format!(
            "expected \"sha256:\" followed by 64 lowercase hex digits \
             (printf %s \"$KEY\" | sha256sum), got {:?}",
            abbreviate(s)
        )
    };
    let hex = s.strip_prefix(HASH_PREFIX).ok_or_else(bad)?.as_bytes();
    if hex.len() != 64 {
        return Err(bad());
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

fn abbreviate(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Whether a presented credential has the shape of an API key: valid UTF-8, 16 to 512
/// characters, no control characters. Anything else is refused before any lookup.
pub fn well_formed(key: &[u8]) -> bool {
    // Keys are ASCII in practice: one pass over the bytes, no UTF-8 decoding.
    if key.is_ascii() {
        return (MIN_KEY_CHARS..=MAX_KEY_CHARS).contains(&key.len())
            && !key.iter().any(u8::is_ascii_control);
    }
    let Ok(s) = std::str::from_utf8(key) else {
        return false;
    };
    let chars = s.chars().count();
    (MIN_KEY_CHARS..=MAX_KEY_CHARS).contains(&chars) && !s.chars().any(char::is_control)
}

/// The first 8 characters of a presented credential, safe to log: never the whole key,
/// and control or non-printable characters replaced by `?`.
pub fn log_prefix(key: &[u8]) -> String {
    String::from_utf8_lossy(key)
        .chars()
        .take(8)
        .map(|c| {
            if c.is_control() || c == '\u{fffd}' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// Random bytes in a generated key.
pub const RANDOM_BYTES: usize = 32;
/// Characters of the random part: base64url of 32 bytes, unpadded.
pub const RANDOM_CHARS: usize = 43;
/// Characters of the checksum: base64url of the 4-byte CRC-32, unpadded.
pub const CHECKSUM_CHARS: usize = 6;

/// Builds a key `<prefix>_<random><checksum>` from 32 random bytes.
pub fn format_key(prefix: &str, random: &[u8; RANDOM_BYTES]) -> String {
    use base64::Engine as _;
    let body = format!(
        "{prefix}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    );
    let sum = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(crc32(body.as_bytes()).to_be_bytes());
    body + &sum
}

/// For a key that claims `prefix`: whether its checksum holds. Keys with another
/// prefix are not judged (`None`), so imported legacy keys keep working.
pub fn checksum_holds(prefix: &str, key: &[u8]) -> Option<bool> {
    use base64::Engine as _;
    let rest = key.strip_prefix(prefix.as_bytes())?.strip_prefix(b"_")?;
    if rest.len() != RANDOM_CHARS + CHECKSUM_CHARS {
        return Some(false);
    }
    let (_, sum) = key.split_at(key.len() - CHECKSUM_CHARS);
    let body = &key[..key.len() - CHECKSUM_CHARS];
    let expected =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crc32(body).to_be_bytes());
    Some(expected.as_bytes() == sum)
}

/// CRC-32 (IEEE 802.3, as in zlib and `cksum -o 3`): catches typos, not forgery.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Maps key digests to their index in the configured key list.
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_digest: HashMap<Digest, usize>,
}

impl KeyIndex {
    /// An empty index with room for `n` keys.
    pub fn with_capacity(n: usize) -> Self {
        KeyIndex {
            by_digest: HashMap::with_capacity(n),
        }
    }

    /// Adds a digest; returns the index already holding it, if any.
    pub fn insert(&mut self, digest: Digest, index: usize) -> Result<(), usize> {
        match self.by_digest.entry(digest) {
            std::collections::hash_map::Entry::Occupied(e) => Err(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(index);
                Ok(())
            }
        }
    }

    /// Looks up a presented key by its digest; the plaintext is never compared.
    pub fn find(&self, key: &[u8]) -> Option<usize> {
        self.get(&digest(key))
    }

    /// The index holding this digest.
    pub fn get(&self, digest: &Digest) -> Option<usize> {
        self.by_digest.get(digest).copied()
    }

    /// Number of keys in the index.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether the index holds no keys.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_sha256sum() {
        // printf %s test_client_key_16_chars | sha256sum
        assert_eq!(
            hash_string(b"test_client_key_16_chars"),
            "sha256:3fdb536b7aa2eccdaec0c7162262f499b2c6af7b95096edae688f064006df729"
        );
    }

    #[test]
    fn parse_hash_round_trips_and_rejects() {
        let h = hash_string(b"some-key-0123456789");
        assert_eq!(parse_hash(&h), Ok(digest(b"some-key-0123456789")));
        for bad in [
            "",
            "sha256:",
            "sha1:0000000000000000000000000000000000000000000000000000000000000000",
            "sha256:000000000000000000000000000000000000000000000000000000000000000",
            "sha256:00000000000000000000000000000000000000000000000000000000000000000",
            "sha256:000000000000000000000000000000000000000000000000000000000000000A",
            "sha256:000000000000000000000000000000000000000000000000000000000000000g",
            "SHA256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let err = parse_hash(bad).expect_err(bad);
            assert!(
                err.starts_with("expected \"sha256:\" followed by 64"),
                "{err}"
            );
        }
        // Multi-byte characters must not panic the parser.
        assert!(parse_hash("sha256:ééééééééééééééééééééééééééééééééé").is_err());
    }

    #[test]
    fn key_shape() {
        assert!(well_formed(b"0123456789abcdef"));
        assert!(!well_formed(b"0123456789abcde"));
        assert!(well_formed("k".repeat(512).as_bytes()));
        assert!(!well_formed("k".repeat(513).as_bytes()));
        assert!(!well_formed(b"0123456789abcdef\x01"));
        assert!(!well_formed(b"0123456789abcdef\x7f"));
        assert!(!well_formed(b"0123456789abcdef\xff"));
        // Length counts characters, not bytes.
        assert!(well_formed("ééééééééééééééé1".as_bytes()));
    }

    #[test]
    fn log_prefix_is_short_and_printable() {
        assert_eq!(log_prefix(b"abcdefghijklmnop"), "abcdefgh");
        assert_eq!(log_prefix(b"ab\ncd\xffefgh"), "ab?cd?ef");
        assert_eq!(log_prefix(b"abc"), "abc");
    }

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn generated_keys_carry_a_checksum() {
        let key = format_key("kg", &[7u8; 32]);
        assert!(key.starts_with("kg_"));
        assert_eq!(key.len(), 3 + RANDOM_CHARS + CHECKSUM_CHARS);
        assert!(well_formed(key.as_bytes()));
        assert_eq!(checksum_holds("kg", key.as_bytes()), Some(true));
        // One changed character anywhere is caught.
        for i in 3..key.len() {
            let mut typo = key.clone().into_bytes();
            typo[i] = if typo[i] == b'A' { b'B' } else { b'A' };
            assert_eq!(checksum_holds("kg", &typo), Some(false), "position {i}");
        }
        assert_eq!(
            checksum_holds("kg", &key.as_bytes()[..key.len() - 1]),
            Some(false)
        );
        // Other prefixes (legacy keys) are not judged.
        assert_eq!(checksum_holds("kg", b"test_client_key_16_chars"), None);
        assert_eq!(checksum_holds("kg", b"kgx_whatever_0123456789"), None);
        assert_eq!(checksum_holds("live", key.as_bytes()), None);
    }

    #[test]
    fn index_finds_by_digest_and_refuses_duplicates() {
        let mut idx = KeyIndex::with_capacity(2);
        assert_eq!(idx.insert(digest(b"key-one-0123456789"), 0), Ok(()));
        assert_eq!(idx.insert(digest(b"key-two-0123456789"), 1), Ok(()));
        assert_eq!(idx.insert(digest(b"key-one-0123456789"), 2), Err(0));
        assert_eq!(idx.find(b"key-two-0123456789"), Some(1));
        assert_eq!(idx.find(b"key-three-0123456789"), None);
        assert_eq!(idx.len(), 2);
    }

    /// well_formed as it was before its ASCII fast path.
    fn well_formed_reference(key: &[u8]) -> bool {
        let Ok(s) = std::str::from_utf8(key) else {
            return false;
        };
        let chars = s.chars().count();
        (MIN_KEY_CHARS..=MAX_KEY_CHARS).contains(&chars) && !s.chars().any(char::is_control)
    }

    #[test]
    fn well_formed_edges() {
        let ok = |n: usize| vec![b'a'; n];
        assert!(!well_formed(&ok(MIN_KEY_CHARS - 1)));
        assert!(well_formed(&ok(MIN_KEY_CHARS)));
        assert!(well_formed(&ok(MAX_KEY_CHARS)));
        assert!(!well_formed(&ok(MAX_KEY_CHARS + 1)));
        for control in [0u8, b'\t', b'\n', 0x1f, 0x7f] {
            let mut key = ok(20);
            key[5] = control;
            assert!(!well_formed(&key), "{control:#x}");
        }
        // Non-ASCII keys are counted in characters, and C1 controls refused.
        assert!(well_formed("ключ-ключ-ключ-ключ".as_bytes()));
        assert!(!well_formed("key-key-key-key-\u{85}x".as_bytes()));
        assert!(!well_formed(&[0xff; 20]));
    }

    proptest::proptest! {
        #[test]
        fn well_formed_agrees_with_the_reference(key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            proptest::prop_assert_eq!(well_formed(&key), well_formed_reference(&key));
        }

        #[test]
        fn well_formed_agrees_on_ascii(key in "[\\x00-\\x7f]{0,600}") {
            proptest::prop_assert_eq!(well_formed(key.as_bytes()), well_formed_reference(key.as_bytes()));
        }
    }
}
