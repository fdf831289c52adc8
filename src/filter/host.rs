//! The few proxy-wasm host calls keygate makes, with every status handled.
//!
//! The SDK's `hostcalls` wrappers panic on an unexpected status; a panic in a filter
//! takes the worker's VM down, so these call the ABI directly and return `Result`.

use crate::ratelimit::{self, StoreError};
use crate::wire;
use std::ptr::{null, null_mut};

/// A non-Ok status returned by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;
const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const METRIC_COUNTER: u32 = 0;
const METRIC_GAUGE: u32 = 1;

/// proxy-wasm log levels.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_get_metric(id: u32, value: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
}

fn check(status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError(status))
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's
/// `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes).
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// Writes one line to Envoy's log.
pub fn log(level: Level, message: &str) {
    // Nothing sensible can be done if logging itself fails.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Host wall-clock time in nanoseconds since the Unix epoch.
pub fn now_nanos() -> Result<u64, HostError> {
    let mut t = 0u64;
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

/// Reads the plugin configuration from the host a chunk at a time, so that a large one
/// is never copied into the VM whole. `size` is what `on_configure` was told; reads never
/// start past it (hosts differ in how they treat a start beyond the end).
pub struct PluginConfiguration {
    offset: usize,
    size: usize,
}

impl PluginConfiguration {
    pub fn new(size: usize) -> Self {
        PluginConfiguration { offset: 0, size }
    }
}

impl std::io::Read for PluginConfiguration {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(self.size.saturating_sub(self.offset));
        if want == 0 {
            return Ok(0);
        }
        let mut data = null_mut();
        let mut size = 0usize;
        let status = unsafe {
            proxy_get_buffer_bytes(
                BUFFER_PLUGIN_CONFIGURATION,
                self.offset,
                want,
                &mut data,
                &mut size,
            )
        };
        let chunk = match status {
            OK => unsafe { take_host_buffer(data, size) },
            NOT_FOUND => Vec::new(),
            status => {
                return Err(std::io::Error::other(format!(
                    "the host refused to hand over the configuration (status {status})"
                )))
            }
        };
        let n = chunk.len().min(want);
        buf[..n].copy_from_slice(&chunk[..n]);
        self.offset += n;
        Ok(n)
    }
}

/// Every request header, duplicates included, in order, in the ABI's serialized form
/// (decode with `wire::decode_pairs`, which borrows from it).
pub fn request_headers() -> Result<Vec<u8>, HostError> {
    let mut data = null_mut();
    let mut size = 0usize;
    check(unsafe { proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, &mut data, &mut size) })?;
    Ok(unsafe { take_host_buffer(data, size) })
}

/// Replaces every value of a request header with one value.
pub fn set_request_header(name: &str, value: &str) -> Result<(), HostError> {
    check(unsafe {
        proxy_replace_header_map_value(
            MAP_REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every value of a request header.
pub fn remove_request_header(name: &str) -> Result<(), HostError> {
    check(unsafe { proxy_remove_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len()) })
}

/// Adds a request header value (keeping any already there).
pub fn add_request_header(name: &str, value: &str) -> Result<(), HostError> {
    add_header(MAP_REQUEST_HEADERS, name, value)
}

/// Adds a response header (for headers on upstream responses).
pub fn add_response_header(name: &str, value: &str) -> Result<(), HostError> {
    add_header(MAP_RESPONSE_HEADERS, name, value)
}

fn add_header(map: u32, name: &str, value: &str) -> Result<(), HostError> {
    check(unsafe {
        proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

/// A property of the stream, e.g. `["source", "address"]`; `None` when absent.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    let path = path.join("\0");
    let mut data = null_mut();
    let mut size = 0usize;
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        OK => Ok(Some(unsafe { take_host_buffer(data, size) })),
        NOT_FOUND => Ok(None),
        status => Err(HostError(status)),
    }
}

/// Proxy-wasm shared data: one key-value space per `vm_id`, shared by all workers,
/// with a version per value for compare-and-swap.
pub struct SharedData;

impl ratelimit::Store for SharedData {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let mut data = null_mut();
        let mut size = 0usize;
        let mut cas = 0u32;
        match unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        } {
            OK => Ok(Some((unsafe { take_host_buffer(data, size) }, cas))),
            NOT_FOUND => Ok(None),
            status => Err(StoreError::Host(status)),
        }
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
        match unsafe {
            proxy_set_shared_data(
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
                version,
            )
        } {
            OK => Ok(()),
            CAS_MISMATCH => Err(StoreError::Conflict),
            status => Err(StoreError::Host(status)),
        }
    }
}

/// Answers the request locally; `details` shows in Envoy's %RESPONSE_CODE_DETAILS%.
pub fn send_response(
    status: u32,
    details: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), HostError> {
    let headers = wire::encode_pairs(headers);
    check(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            if body.is_empty() {
                null()
            } else {
                body.as_ptr()
            },
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Defines (or finds) a counter; Envoy aggregates it across worker VMs.
pub fn define_counter(name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    check(unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Defines (or finds) a gauge; every worker VM sets the same one.
pub fn define_gauge(name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    check(unsafe { proxy_define_metric(METRIC_GAUGE, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Sets a gauge.
pub fn set_gauge(id: u32, value: u64) {
    // A lost value must not fail anything.
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// A gauge's value (0 when it cannot be read).
pub fn gauge(id: u32) -> u64 {
    let mut value = 0u64;
    match unsafe { proxy_get_metric(id, &mut value) } {
        OK => value,
        _ => 0,
    }
}

/// Adds `n` to a counter.
pub fn add_to_counter(id: u32, n: u64) {
    // A lost count must not fail anything.
    let _ = unsafe { proxy_increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX)) };
}

/// Asks the host to call the root context's `on_tick` every `ms` milliseconds.
pub fn set_tick_period_ms(ms: u32) -> Result<(), HostError> {
    check(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Routes the `log` crate's macros to Envoy's log.
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warn,
            log::Level::Info => Level::Info,
            log::Level::Debug | log::Level::Trace => Level::Debug,
        };
        log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

static LOGGER: HostLogger = HostLogger;

/// Installs the host logger (once per VM; later calls are no-ops), and a panic hook
/// that says in Envoy's log why a VM died (Envoy then fails closed with 503).
pub fn install_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    std::panic::set_hook(Box::new(|info| {
        log(Level::Critical, &format!("keygate: panic: {info}"))
    }));
}
