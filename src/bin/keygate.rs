//! The keygate command-line tool (key management arrives with the key-management work).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::ExitCode;

const USAGE: &str = "usage:
  keygate hash           read a key on stdin, print its sha256:<hex> for the configuration
  keygate check FILE     validate a plugin configuration (JSON) with the filter's own rules";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["hash"] => {
            let mut key = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut key) {
                eprintln!("keygate: cannot read the key from stdin: {e}");
                return ExitCode::from(1);
            }
            let key = key.strip_suffix('\n').unwrap_or(&key);
            let key = key.strip_suffix('\r').unwrap_or(key);
            if !keygate::keys::well_formed(key.as_bytes()) {
                eprintln!(
                    "keygate: a key must be {} to {} characters without control characters",
                    keygate::keys::MIN_KEY_CHARS,
                    keygate::keys::MAX_KEY_CHARS
                );
                return ExitCode::from(1);
            }
            println!("{}", keygate::keys::hash_string(key.as_bytes()));
            ExitCode::SUCCESS
        }
        ["check", file] => match std::fs::read(file) {
            Err(e) => {
                eprintln!("keygate: cannot read {file}: {e}");
                ExitCode::from(1)
            }
            Ok(bytes) => match keygate::config::Config::from_json(&bytes) {
                Ok(c) => {
                    println!(
                        "{file}: valid ({} keys, {} routes)",
                        c.keys.len(),
                        c.routes.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keygate: invalid configuration: {e}");
                    ExitCode::from(1)
                }
            },
        },
        ["--help"] | ["-h"] | ["help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
