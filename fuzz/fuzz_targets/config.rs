//! The plugin configuration from arbitrary bytes, read both ways keygate reads it.
//!
//! `PluginConfig::from_json` + `Config::compile` (what `keygate` checks offline) and
//! `Config::from_reader` (what the filter's `on_configure` runs on the bytes Envoy hands
//! it, in chunks) must never panic, and:
//! - they accept and refuse the same documents;
//! - `config::problems` finds nothing in the documents they accept, and in those
//!   `Config::compile` refuses, first the problem it refuses with (named by position, as
//!   compile names it; the checks are shared, only the naming differs);
//! - a document read writes back as JSON that reads to the same document.
#![no_main]

use keygate::config::{self, Config, PluginConfig};
use libfuzzer_sys::fuzz_target;
use std::io::Read;

/// Hands the document over a few bytes at a time, as the host does in chunks.
struct Chunks<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let offline = PluginConfig::from_json(data).and_then(|doc| {
        let compiled = Config::compile(&doc);
        Ok((doc, compiled))
    });
    let step = 1 + data.first().map_or(0, |&b| usize::from(b % 64));
    let online = Config::from_reader(Chunks { data, step }, data.len());

    let offline_ok = matches!(&offline, Ok((_, Ok(_))));
    if offline_ok != online.is_ok() {
        panic!(
            "offline and filter disagree on {:?}: offline {:?}, filter {:?}",
            String::from_utf8_lossy(data),
            offline.as_ref().map(|(_, c)| c.as_ref().err()),
            online.as_ref().err()
        );
    }
    if let Ok(config) = &online {
        let _ = config.key_count();
    }

    if let Ok((doc, compiled)) = &offline {
        let problems = config::problems(doc);
        let by_position = config::problems_by_position(doc);
        assert_eq!(problems.len(), by_position.len(), "{problems:?} / {by_position:?}");
        match compiled {
            Ok(_) => assert!(problems.is_empty(), "compiles, yet problems: {problems:?}"),
            Err(e) => assert!(
                by_position.first() == Some(e),
                "compile refuses with {e}, problems says {by_position:?}"
            ),
        }
        let written = match serde_json::to_vec(doc) {
            Ok(w) => w,
            Err(e) => panic!("a configuration read cannot be written: {e}"),
        };
        match PluginConfig::from_json(&written) {
            Ok(again) => assert!(
                &again == doc,
                "written as {:?}, it reads as another configuration",
                String::from_utf8_lossy(&written)
            ),
            Err(e) => panic!(
                "written as {:?}, it does not read again: {e}",
                String::from_utf8_lossy(&written)
            ),
        }
    }
});
