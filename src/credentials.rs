//! Finding the API key in the request headers.
//!
//! The whole header map is read, because a key sent twice (or in two places) with
//! different values must be refused, and Envoy's single-header lookup would only show
//! the first copy.

use crate::config::KeySource;

/// A request header as the host hands it over: lowercase name, raw value bytes, both
/// borrowed from the host's buffer (no copy per header).
pub type Header<'h> = (&'h str, &'h [u8]);

/// What the request's headers say about its key.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'h> {
    /// No configured source carried a key.
    Missing,
    /// One key, possibly sent several times with the same value.
    Found {
        /// The key as sent.
        key: &'h [u8],
        /// Names of the headers that carried it (to strip before forwarding).
        carriers: Vec<&'h str>,
    },
    /// Two different values were sent; `first` is the first one (for the log prefix).
    Conflicting {
        /// The first value seen.
        first: &'h [u8],
    },
}

/// Extracts the key from every configured source.
pub fn extract<'h>(sources: &[KeySource], headers: &[Header<'h>]) -> Credential<'h> {
    let mut found: Option<&'h [u8]> = None;
    let mut carriers: Vec<&'h str> = Vec::new();
    for &(name, value) in headers {
        for source in sources {
            if !name.eq_ignore_ascii_case(&source.header) {
                continue;
            }
            let mut carried = false;
            let mut candidate = |key: &'h [u8]| -> bool {
                carried = true;
                match found {
                    None => {
                        found = Some(key);
                        true
                    }
                    Some(first) => first == key,
                }
            };
            let consistent = match &source.scheme {
                None => candidate(trim(value)),
                // Credentials in Authorization-style headers are comma-separated
                // (RFC 9110 section 11.4; token68 has no commas), and a header sent
                // twice may reach the filter joined with a comma.
                Some(scheme) => value
                    .split(|&b| b == b',')
                    .filter_map(|part| scheme_value(trim(part), scheme))
                    .all(&mut candidate),
            };
            if !consistent {
                if let Some(first) = found {
                    return Credential::Conflicting { first };
                }
            }
            if carried && !carriers.contains(&name) {
                carriers.push(name);
            }
        }
    }
    match found {
        Some(key) => Credential::Found { key, carriers },
        None => Credential::Missing,
    }
}

/// `Bearer abc` → `abc` when the scheme matches (case-insensitively); `None` for any
/// other scheme, which is then not an API key at all.
fn scheme_value<'v>(part: &'v [u8], scheme: &str) -> Option<&'v [u8]> {
    let split = part
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(part.len());
    let (name, rest) = part.split_at(split);
    if name.eq_ignore_ascii_case(scheme.as_bytes()) {
        Some(trim(rest))
    } else {
        None
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<KeySource> {
        vec![
            KeySource {
                header: "x-api-key".into(),
                scheme: None,
            },
            KeySource {
                header: "authorization".into(),
                scheme: Some("Bearer".into()),
            },
        ]
    }

    fn h<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Header<'a>> {
        pairs.iter().map(|&(n, v)| (n, v.as_bytes())).collect()
    }

    fn found<'a>(key: &'a str, carriers: &[&'a str]) -> Credential<'a> {
        Credential::Found {
            key: key.as_bytes(),
            carriers: carriers.to_vec(),
        }
    }

    #[test]
    fn missing_when_no_source_present() {
        assert_eq!(
            extract(&sources(), &h(&[("host", "x")])),
            Credential::Missing
        );
        assert_eq!(extract(&sources(), &[]), Credential::Missing);
    }

    #[test]
    fn reads_x_api_key_and_bearer() {
        let hs = h(&[("x-api-key", "key-aaaaaaaaaaaaaaaa")]);
        assert_eq!(
            extract(&sources(), &hs),
            found("key-aaaaaaaaaaaaaaaa", &["x-api-key"])
        );
        let hs = h(&[("authorization", "Bearer key-bbbbbbbbbbbbbbbb")]);
        assert_eq!(
            extract(&sources(), &hs),
            found("key-bbbbbbbbbbbbbbbb", &["authorization"])
        );
    }

    #[test]
    fn header_names_and_scheme_are_case_insensitive() {
        let hs = h(&[("X-Api-Key", "k1")]);
        assert_eq!(extract(&sources(), &hs), found("k1", &["X-Api-Key"]));
        for v in ["bearer k2", "BEARER k2", "Bearer   k2  ", "Bearer\tk2"] {
            let hs = h(&[("authorization", v)]);
            assert_eq!(
                extract(&sources(), &hs),
                found("k2", &["authorization"]),
                "{v}"
            );
        }
    }

    #[test]
    fn other_schemes_are_not_keys() {
        let hs = h(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(extract(&sources(), &hs), Credential::Missing);
        // Basic plus a key elsewhere: the key counts, Authorization is not a carrier.
        let hs = h(&[("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", "k1")]);
        assert_eq!(extract(&sources(), &hs), found("k1", &["x-api-key"]));
        // A scheme that merely starts with "Bearer" is another scheme.
        let hs = h(&[("authorization", "Bearerx k1")]);
        assert_eq!(extract(&sources(), &hs), Credential::Missing);
    }

    #[test]
    fn empty_bearer_is_an_empty_key() {
        let hs = h(&[("authorization", "Bearer")]);
        assert_eq!(extract(&sources(), &hs), found("", &["authorization"]));
        let hs = h(&[("x-api-key", "")]);
        assert_eq!(extract(&sources(), &hs), found("", &["x-api-key"]));
    }

    #[test]
    fn duplicates_with_same_value_are_one_key() {
        let hs = h(&[
            ("x-api-key", "k1"),
            ("x-api-key", "k1"),
            ("authorization", "Bearer k1"),
        ]);
        assert_eq!(
            extract(&sources(), &hs),
            found("k1", &["x-api-key", "authorization"])
        );
        // Joined by the proxy with a comma.
        let hs = h(&[("authorization", "Bearer k1, Bearer k1")]);
        assert_eq!(extract(&sources(), &hs), found("k1", &["authorization"]));
    }

    #[test]
    fn different_values_conflict() {
        let cases = [
            h(&[("x-api-key", "k1"), ("x-api-key", "k2")]),
            h(&[("x-api-key", "k1"), ("authorization", "Bearer k2")]),
            h(&[("authorization", "Bearer k1"), ("x-api-key", "k2")]),
            h(&[("authorization", "Bearer k1,Bearer k2")]),
            h(&[
                ("authorization", "Bearer k1"),
                ("authorization", "Bearer k2"),
            ]),
        ];
        for hs in cases {
            assert_eq!(
                extract(&sources(), &hs),
                Credential::Conflicting { first: b"k1" },
                "{hs:?}"
            );
        }
    }

    #[test]
    fn non_utf8_values_are_passed_through_as_bytes() {
        let hs: Vec<Header> = vec![("x-api-key", b"k\xff\xfe")];
        assert_eq!(
            extract(&sources(), &hs),
            Credential::Found {
                key: b"k\xff\xfe",
                carriers: vec!["x-api-key"]
            }
        );
    }

    #[test]
    fn custom_source_without_scheme() {
        let src = vec![KeySource {
            header: "x-custom-key".into(),
            scheme: None,
        }];
        let hs = h(&[("x-api-key", "ignored"), ("x-custom-key", "k9")]);
        assert_eq!(extract(&src, &hs), found("k9", &["x-custom-key"]));
    }
}
