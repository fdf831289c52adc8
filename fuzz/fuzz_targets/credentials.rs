//! The API key found in arbitrary request headers, with the default key sources
//! (`x-api-key`, and `Authorization: Bearer`).
//!
//! The input is read as header lines, `name:value` separated by `\n` (a line without a
//! `:` is a name with an empty value; a name that is not UTF-8 skips the line, as
//! `wire::decode_pairs` does). `credentials::extract` must never panic, and:
//! - a found key (or the first of two conflicting ones) is part of a value sent in a
//!   header that is a key source, with no blanks around it;
//! - its carriers are names sent, each a key source, none listed twice;
//! - no key is found only when no plain (scheme-less) source header was sent.
#![no_main]

use keygate::config::{Config, KeySource};
use keygate::credentials::{self, Credential, Header};
use keygate::keys;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

/// The key sources a configuration that names none compiles to.
static SOURCES: LazyLock<Vec<KeySource>> = LazyLock::new(|| {
    let json = format!(
        r#"{{"keys": [{{"id": "k", "hash": "{}", "role": "client"}}]}}"#,
        keys::hash_string(b"fuzz-key-0123456789")
    );
    match Config::from_json(json.as_bytes()) {
        Ok(config) => config.key_sources,
        Err(e) => panic!("the fixed configuration does not compile: {e}"),
    }
});

fuzz_target!(|data: &[u8]| {
    let headers: Vec<Header> = data
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
            let name = std::str::from_utf8(&line[..colon]).ok()?;
            Some((name, line.get(colon + 1..).unwrap_or(&[])))
        })
        .collect();
    let sources = &*SOURCES;
    let is_source = |name: &str| sources.iter().any(|s| name.eq_ignore_ascii_case(&s.header));
    let sent_in_source = |key: &[u8]| {
        let k = key.as_ptr_range();
        headers.iter().any(|&(name, value)| {
            let v = value.as_ptr_range();
            is_source(name) && v.start <= k.start && k.end <= v.end
        })
    };
    let blank = |b: &u8| *b == b' ' || *b == b'\t';

    match credentials::extract(sources, &headers) {
        Credential::Missing => {
            let plain = headers.iter().find(|(name, _)| {
                sources
                    .iter()
                    .any(|s| s.scheme.is_none() && name.eq_ignore_ascii_case(&s.header))
            });
            assert!(plain.is_none(), "{plain:?} was sent, yet no key was found");
        }
        Credential::Found { key, carriers } => {
            assert!(
                sent_in_source(key),
                "found key {key:?} was not sent in a key source"
            );
            assert!(
                !key.first().is_some_and(blank) && !key.last().is_some_and(blank),
                "found key {key:?} is not trimmed"
            );
            assert!(!carriers.is_empty(), "found key {key:?} has no carrier");
            for (i, carrier) in carriers.iter().enumerate() {
                assert!(
                    is_source(carrier),
                    "carrier {carrier:?} is not a key source"
                );
                assert!(
                    headers
                        .iter()
                        .any(|(name, _)| std::ptr::eq(*name, *carrier)),
                    "carrier {carrier:?} is not a name sent"
                );
                assert!(
                    !carriers[..i].contains(carrier),
                    "carrier {carrier:?} twice"
                );
            }
        }
        Credential::Conflicting { first } => {
            assert!(
                sent_in_source(first),
                "conflicting key {first:?} was not sent in a key source"
            );
        }
    }
});
