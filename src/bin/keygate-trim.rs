//! `keygate-trim MODULE [--untrimmed-copy PATH]`: removes from keygate's .wasm the exports of
//! the proxy-wasm callbacks the filter does not implement, so that Envoy skips them instead
//! of entering the VM for every response body chunk, request body chunk, trailer and log
//! callback (see `keygate::wasm_module`). `make build` runs it after linking. The module is
//! replaced atomically; run again, it changes nothing. With `--untrimmed-copy`, the module
//! as linked is kept there first (the benchmark compares the two).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keygate::wasm_module::{self, FILTER_CALLBACKS};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut module: Option<PathBuf> = None;
    let mut copy: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        if arg == "--untrimmed-copy" {
            copy = args.next().map(PathBuf::from);
            if copy.is_none() {
                return fail("--untrimmed-copy needs a path");
            }
        } else if module.is_none() {
            module = Some(PathBuf::from(arg));
        } else {
            return fail("usage: keygate-trim MODULE [--untrimmed-copy PATH]");
        }
    }
    let Some(module) = module else {
        return fail("usage: keygate-trim MODULE [--untrimmed-copy PATH]");
    };
    match run(&module, copy.as_deref()) {
        Ok(msg) => {
            println!("keygate-trim: {msg}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{}: {e}", module.display())),
    }
}

fn run(module: &Path, copy: Option<&Path>) -> Result<String, String> {
    let bytes = std::fs::read(module).map_err(|e| e.to_string())?;
    let (trimmed, removed) = wasm_module::trim(&bytes, FILTER_CALLBACKS)?;
    if removed.is_empty() {
        return Ok(format!("{} is already trimmed", module.display()));
    }
    if let Some(copy) = copy {
        std::fs::write(copy, &bytes).map_err(|e| format!("{}: {e}", copy.display()))?;
    }
    let tmp = module.with_extension("wasm.trim-tmp");
    std::fs::write(&tmp, &trimmed).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, module).map_err(|e| format!("{}: {e}", module.display()))?;
    Ok(format!(
        "{}: removed the exports of {} callbacks the filter does not implement ({})",
        module.display(),
        removed.len(),
        removed.join(", ")
    ))
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("keygate-trim: {msg}");
    ExitCode::from(1)
}
