//! Reading and trimming a Wasm module's exports (native only): `keygate doctor` checks that
//! a module is a proxy-wasm filter, and `keygate-trim` removes the exports of callbacks the
//! filter does not implement.
//!
//! Why trim: Envoy's proxy-wasm host looks every `proxy_on_*` export up once and skips a
//! callback the module does not export, but the Rust SDK exports all of them, so without
//! trimming every stream enters the VM for its response body (once per chunk), request body
//! (once per chunk, on POSTs), trailers and log callbacks, which keygate leaves at the SDK's
//! do-nothing defaults. Only the export section changes; the functions stay in the module.

/// The proxy-wasm callbacks the filter (src/filter/) implements or needs, kept by
/// [`trim`]. Every other `proxy_on_*` export is removed. A callback the filter starts to
/// implement must be added here, or Envoy will never call it.
pub const FILTER_CALLBACKS: &[&str] = &[
    // Envoy requires it: how the host hands memory to the module.
    "proxy_on_memory_allocate",
    // Context lifecycle: the SDK creates a stream's state in context_create and frees it
    // in delete; the root context's on_done flushes the worker's counters.
    "proxy_on_context_create",
    "proxy_on_done",
    "proxy_on_delete",
    // The root context: start, configuration and the counter flush timer.
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_tick",
    // The stream callbacks keygate implements.
    "proxy_on_request_headers",
    "proxy_on_response_headers",
];

/// The export Envoy's proxy-wasm host calls to hand memory to a module; a module without
/// it is not a proxy-wasm filter.
pub const ALLOCATOR_EXPORT: &str = "proxy_on_memory_allocate";

const EXPORT_SECTION: u8 = 7;

/// One export: its name, kind (0 function, 1 table, 2 memory, 3 global, 4 tag) and the
/// bytes of its entry in the export section.
struct Export<'a> {
    name: &'a [u8],
    kind: u8,
    entry: &'a [u8],
}

/// A section: its id, where its header starts, and where its contents start and end.
struct Section {
    id: u8,
    header: usize,
    start: usize,
    end: usize,
}

/// The sections of a module, after checking the magic number and version.
fn sections(bytes: &[u8]) -> Result<Vec<Section>, String> {
    if bytes.get(0..4) != Some(b"\0asm".as_slice()) {
        return Err("not a Wasm module (it does not start with \\0asm)".to_string());
    }
    match bytes.get(4..8) {
        Some([1, 0, 0, 0]) => {}
        Some(v) => {
            return Err(format!(
                "Wasm binary version {v:?}, but Envoy's runtimes load version 1"
            ))
        }
        None => return Err("a truncated Wasm header".to_string()),
    }
    let mut out = Vec::new();
    let mut pos = 8;
    while pos < bytes.len() {
        let header = pos;
        let id = bytes[pos];
        pos += 1;
        let size = leb_u32(bytes, &mut pos)? as usize;
        let end = pos
            .checked_add(size)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| "a truncated Wasm module (a section runs past the end)".to_string())?;
        out.push(Section {
            id,
            header,
            start: pos,
            end,
        });
        pos = end;
    }
    Ok(out)
}

fn exports(section: &[u8]) -> Result<Vec<Export<'_>>, String> {
    let malformed = || "a malformed Wasm export section".to_string();
    let mut pos = 0;
    let count = leb_u32(section, &mut pos)?;
    let mut out = Vec::new();
    for _ in 0..count {
        let start = pos;
        let len = leb_u32(section, &mut pos)? as usize;
        let end = pos.checked_add(len).ok_or_else(malformed)?;
        let name = section.get(pos..end).ok_or_else(malformed)?;
        pos = end;
        let kind = section.get(pos).copied().ok_or_else(malformed)?;
        pos += 1;
        leb_u32(section, &mut pos)?;
        out.push(Export {
            name,
            kind,
            entry: section.get(start..pos).ok_or_else(malformed)?,
        });
    }
    if pos != section.len() {
        return Err(malformed());
    }
    Ok(out)
}

/// The names of the functions a module exports.
pub fn exported_functions(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for s in sections(bytes)? {
        if s.id == EXPORT_SECTION {
            for e in exports(&bytes[s.start..s.end])? {
                if e.kind == 0 {
                    names.push(String::from_utf8_lossy(e.name).into_owned());
                }
            }
        }
    }
    Ok(names)
}

/// Checks that `bytes` is a Wasm module (magic, version 1) exporting the proxy-wasm
/// allocator.
pub fn check_proxy_wasm(bytes: &[u8]) -> Result<(), String> {
    let names = exported_functions(bytes)?;
    if names.is_empty() {
        return Err(format!(
            "a Wasm module with no exports ({ALLOCATOR_EXPORT} missing): not a proxy-wasm filter"
        ));
    }
    if !names.iter().any(|n| n == ALLOCATOR_EXPORT) {
        return Err(format!(
            "a Wasm module without the export {ALLOCATOR_EXPORT}: not a proxy-wasm filter"
        ));
    }
    Ok(())
}

/// The module without the `proxy_on_*` function exports that are not in `keep`, and the
/// names removed (empty when there was nothing to remove; the bytes are then unchanged).
/// Refuses a module that is not a proxy-wasm filter, and a `keep` naming a callback the
/// module does not export (a misspelt list must not pass).
pub fn trim(bytes: &[u8], keep: &[&str]) -> Result<(Vec<u8>, Vec<String>), String> {
    check_proxy_wasm(bytes)?;
    let names = exported_functions(bytes)?;
    if let Some(missing) = keep.iter().find(|k| !names.iter().any(|n| n == *k)) {
        return Err(format!(
            "the module does not export {missing}, which keygate's filter needs"
        ));
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..8]);
    let mut removed = Vec::new();
    for s in sections(bytes)? {
        if s.id != EXPORT_SECTION {
            out.extend_from_slice(&bytes[s.header..s.end]);
            continue;
        }
        let all = exports(&bytes[s.start..s.end])?;
        let mut body = Vec::new();
        let mut kept = 0u32;
        for e in &all {
            let name = String::from_utf8_lossy(e.name);
            if e.kind == 0 && name.starts_with("proxy_on_") && !keep.contains(&name.as_ref()) {
                removed.push(name.into_owned());
            } else {
                kept += 1;
                body.extend_from_slice(e.entry);
            }
        }
        let mut contents = Vec::with_capacity(body.len() + 5);
        write_leb_u32(&mut contents, kept);
        contents.extend_from_slice(&body);
        out.push(EXPORT_SECTION);
        write_leb_u32(
            &mut out,
            u32::try_from(contents.len()).map_err(|_| "too large")?,
        );
        out.extend_from_slice(&contents);
    }
    if removed.is_empty() {
        return Ok((bytes.to_vec(), removed));
    }
    Ok((out, removed))
}

/// An unsigned LEB128 number of at most 5 bytes, as the Wasm binary format writes u32s.
fn leb_u32(bytes: &[u8], pos: &mut usize) -> Result<u32, String> {
    let mut value: u32 = 0;
    for i in 0..5 {
        let byte = bytes
            .get(*pos)
            .copied()
            .ok_or_else(|| "a truncated Wasm module".to_string())?;
        *pos += 1;
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a malformed Wasm module (an over-long number)".to_string())
}

fn write_leb_u32(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module with one function type, `n` functions and the given function exports, plus
    /// a memory export and a custom section after the exports.
    fn module(exported: &[&str]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        let section = |m: &mut Vec<u8>, id: u8, contents: &[u8]| {
            m.push(id);
            write_leb_u32(m, contents.len() as u32);
            m.extend_from_slice(contents);
        };
        section(&mut m, 1, &[1, 0x60, 1, 0x7f, 1, 0x7f]); // (func (param i32) (result i32))
        let mut funcs = Vec::new();
        write_leb_u32(&mut funcs, exported.len() as u32);
        funcs.extend(std::iter::repeat_n(0u8, exported.len()));
        section(&mut m, 3, &funcs);
        section(&mut m, 5, &[1, 0, 1]); // one memory, min 1 page
        let mut exp = Vec::new();
        write_leb_u32(&mut exp, exported.len() as u32 + 1);
        for (i, name) in exported.iter().enumerate() {
            write_leb_u32(&mut exp, name.len() as u32);
            exp.extend_from_slice(name.as_bytes());
            exp.push(0);
            write_leb_u32(&mut exp, i as u32);
        }
        exp.extend_from_slice(&[6, b'm', b'e', b'm', b'o', b'r', b'y', 2, 0]);
        section(&mut m, 7, &exp);
        let mut code = Vec::new();
        write_leb_u32(&mut code, exported.len() as u32);
        for _ in exported {
            code.extend_from_slice(&[4, 0, 0x20, 0, 0x0b]); // local.get 0; end
        }
        section(&mut m, 10, &code);
        section(&mut m, 0, b"\x04name-custom");
        m
    }

    #[test]
    fn trimming_removes_only_unlisted_callbacks_and_keeps_everything_else() {
        let m = module(&[
            "proxy_on_memory_allocate",
            "proxy_on_request_headers",
            "proxy_on_response_body",
            "proxy_on_log",
            "proxy_abi_version_0_2_1",
        ]);
        let keep = ["proxy_on_memory_allocate", "proxy_on_request_headers"];
        let (trimmed, removed) = trim(&m, &keep).unwrap();
        assert_eq!(removed, ["proxy_on_response_body", "proxy_on_log"]);
        assert_eq!(
            exported_functions(&trimmed).unwrap(),
            [
                "proxy_on_memory_allocate",
                "proxy_on_request_headers",
                "proxy_abi_version_0_2_1"
            ]
        );
        // Every other section is byte for byte the same, in the same order.
        let others = |b: &[u8]| -> Vec<(u8, Vec<u8>)> {
            sections(b)
                .unwrap()
                .into_iter()
                .filter(|s| s.id != EXPORT_SECTION)
                .map(|s| (s.id, b[s.start..s.end].to_vec()))
                .collect()
        };
        assert_eq!(others(&m), others(&trimmed));
        assert!(trimmed.len() < m.len());
        // The memory export is kept.
        let s = sections(&trimmed)
            .unwrap()
            .into_iter()
            .find(|s| s.id == EXPORT_SECTION)
            .unwrap();
        assert!(exports(&trimmed[s.start..s.end])
            .unwrap()
            .iter()
            .any(|x| x.name == b"memory"));
        // Trimming again changes nothing.
        let (again, removed) = trim(&trimmed, &keep).unwrap();
        assert!(removed.is_empty());
        assert_eq!(again, trimmed);
    }

    #[test]
    fn trimming_refuses_what_is_not_a_filter_or_lacks_a_needed_callback() {
        assert!(trim(b"not wasm", &[])
            .unwrap_err()
            .contains("not a Wasm module"));
        let no_alloc = module(&["proxy_on_request_headers"]);
        assert!(trim(&no_alloc, &[]).unwrap_err().contains(ALLOCATOR_EXPORT));
        let m = module(&["proxy_on_memory_allocate"]);
        assert_eq!(
            trim(&m, &["proxy_on_memory_allocate", "proxy_on_tick"]).unwrap_err(),
            "the module does not export proxy_on_tick, which keygate's filter needs"
        );
    }

    #[test]
    fn malformed_modules_are_refused_not_misread() {
        let m = module(&["proxy_on_memory_allocate"]);
        for cut in 9..m.len() {
            // Any truncation either fails to parse or parses to fewer sections; never a panic.
            let _ = trim(&m[..cut], &[]);
            let _ = exported_functions(&m[..cut]);
        }
        assert!(check_proxy_wasm(b"\0asm\x02\0\0\0")
            .unwrap_err()
            .contains("version"));
        assert!(check_proxy_wasm(b"\0asm\x01\0\0\0")
            .unwrap_err()
            .contains("no exports"));
    }

    #[test]
    fn leb_round_trip() {
        for v in [0u32, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut b = Vec::new();
            write_leb_u32(&mut b, v);
            let mut pos = 0;
            assert_eq!(leb_u32(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
        let mut pos = 0;
        assert_eq!(leb_u32(&[0xe5, 0x8e, 0x26], &mut pos), Ok(624_485));
        assert!(leb_u32(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], &mut 0).is_err());
    }
}
