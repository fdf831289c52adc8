//! dynmod-keyjob: keygate's key job as a native Envoy dynamic module (an `.so` loaded by
//! `envoy.filters.http.dynamic_modules`), to measure what the same work costs outside the
//! Wasm VM. See README.md.
//!
//! Filter configuration (a `google.protobuf.StringValue`):
//!
//! * `keyjob:<hex sha256>,<hex sha256>,...`: what bench/wasm-floor's `keyjob:` mode does. On
//!   the request headers: read `x-api-key`, SHA-256 it, look the digest up in a HashMap built
//!   when the configuration was created; on a hit remove `x-api-key`, set `x-keygate-key-id` to
//!   `k` and the digest's position in the list (seven digits) and continue; on a miss (or no
//!   `x-api-key`) a 401 local reply with keygate's JSON body.
//! * `fulljob:<hex sha256>,...`: the same, plus keygate's other allowed-path work in its order:
//!   first the client address (`source.address`) must be in 127.0.0.0/8 (else 403), then the
//!   key job, then one token from a token bucket shared by every worker (1,000,000,000 per 60 s,
//!   so it does not run out in a benchmark; 429 when it does), and on the response
//!   `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`.
//!
//! A digest that is not 64 hex digits, a repeated digest, an unknown mode or an empty list makes
//! configuration creation return null, so Envoy refuses the configuration.

mod abi;
#[path = "../../keyjob_table.rs"]
mod keyjob_table;

use abi::*;
use keyjob_table::{parse_keys, KeyTable};
use sha2::{Digest, Sha256};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Instant;

const DENY_401: &[u8] = br#"{"error":"invalid_api_key","message":"Invalid API key"}"#;
const DENY_403_IP: &[u8] =
    br#"{"error":"ip_not_allowed","message":"Access denied from this IP address"}"#;
const DENY_403_ADDR: &[u8] =
    br#"{"error":"client_address_unknown","message":"Client address could not be determined"}"#;
const DENY_429: &[u8] = br#"{"error":"rate_limited","message":"Rate limit exceeded"}"#;

const API_KEY: &[u8] = b"x-api-key";
const KEY_ID: &[u8] = b"x-keygate-key-id";

/// fulljob's bucket: this many tokens, refilled evenly over `BUCKET_WINDOW_S`.
const BUCKET_LIMIT: u64 = 1_000_000_000;
const BUCKET_WINDOW_S: u64 = 60;

/// The first field of both objects Envoy hands back as the filter's module pointer, so that
/// the hooks know which one they got.
const TAG_KEYJOB: u32 = 0x6b65_796a; // the config itself: keyjob keeps no per-request state
const TAG_FULLJOB: u32 = 0x6675_6c6c; // a per-request FullFilter

#[repr(C)]
struct Config {
    tag: u32,
    table: KeyTable,
    /// `Some` in fulljob mode.
    bucket: Option<Mutex<Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// What fulljob's response hook reports (set when the request was allowed).
#[derive(Clone, Copy)]
struct Quota {
    remaining: u64,
    reset_s: u64,
}

#[repr(C)]
struct FullFilter {
    tag: u32,
    config: *const Config,
    quota: Option<Quota>,
}

// ---------------------------------------------------------------- configuration parsing

fn parse_config(text: &str) -> Result<Config, String> {
    let text = text.trim();
    let (full, list) = if let Some(list) = text.strip_prefix("keyjob:") {
        (false, list)
    } else if let Some(list) = text.strip_prefix("fulljob:") {
        (true, list)
    } else {
        return Err("the configuration must start with keyjob: or fulljob:".into());
    };
    let table = parse_keys(list)?;
    let bucket = full.then(|| {
        Mutex::new(Bucket {
            tokens: BUCKET_LIMIT as f64,
            last: Instant::now(),
        })
    });
    Ok(Config {
        tag: TAG_KEYJOB,
        table,
        bucket,
    })
}

fn log_error(message: &str) {
    // SAFETY: a plain call into Envoy with a buffer valid for the call.
    unsafe { envoy_dynamic_module_callback_log(LOG_ERROR, ModuleBuffer::of(message.as_bytes())) }
}

// ---------------------------------------------------------------- the request work

/// A local reply with keygate's JSON body; the status the hook returns after it.
///
/// # Safety
/// `filter` is the Envoy filter pointer of the current hook.
unsafe fn deny(filter: HttpFilterEnvoyPtr, status: u32, body: &[u8]) -> FilterStatus {
    const CT_KEY: &[u8] = b"content-type";
    const CT_VALUE: &[u8] = b"application/json";
    let mut headers = [ModuleHttpHeader {
        key_ptr: CT_KEY.as_ptr().cast(),
        key_length: CT_KEY.len(),
        value_ptr: CT_VALUE.as_ptr().cast(),
        value_length: CT_VALUE.len(),
    }];
    envoy_dynamic_module_callback_http_send_response(
        filter,
        status,
        headers.as_mut_ptr(),
        headers.len(),
        ModuleBuffer::of(body),
        ModuleBuffer::NULL,
    );
    STOP_ITERATION
}

/// The key job: `Ok(())` when the key is known (headers rewritten), else the 401 status.
///
/// # Safety
/// `filter` is the Envoy filter pointer of the current request-headers hook.
unsafe fn key_job(filter: HttpFilterEnvoyPtr, config: &Config) -> Result<(), FilterStatus> {
    let mut value = EnvoyBuffer::NULL;
    let mut count = 0usize;
    let found = envoy_dynamic_module_callback_http_get_header(
        filter,
        REQUEST_HEADER,
        ModuleBuffer::of(API_KEY),
        &mut value,
        0,
        &mut count,
    );
    if !found || count == 0 {
        return Err(deny(filter, 401, DENY_401));
    }
    // The value is hashed before any header is changed (a setter may invalidate it).
    let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
    let Some(id) = config.table.get(&digest) else {
        return Err(deny(filter, 401, DENY_401));
    };
    envoy_dynamic_module_callback_http_set_header(
        filter,
        REQUEST_HEADER,
        ModuleBuffer::of(API_KEY),
        ModuleBuffer::NULL,
    );
    envoy_dynamic_module_callback_http_set_header(
        filter,
        REQUEST_HEADER,
        ModuleBuffer::of(KEY_ID),
        ModuleBuffer::of(id.as_bytes()),
    );
    Ok(())
}

/// Whether `source.address` ("ip:port", "[v6]:port") is in 127.0.0.0/8; `None` if unknown.
fn loopback_v4(address: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(address).ok()?;
    if text.is_empty() {
        return None;
    }
    if text.starts_with('[') {
        return Some(false);
    }
    let host = match text.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => text,
    };
    match host.parse::<Ipv4Addr>() {
        Ok(ip) => Some(ip.octets()[0] == 127),
        Err(_) => Some(false),
    }
}

fn take_token(bucket: &Mutex<Bucket>) -> Option<Quota> {
    let rate = BUCKET_LIMIT as f64 / BUCKET_WINDOW_S as f64; // tokens per second
    let now = Instant::now();
    let mut b = match bucket.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
    b.tokens = (b.tokens + elapsed * rate).min(BUCKET_LIMIT as f64);
    b.last = now;
    if b.tokens < 1.0 {
        return None;
    }
    b.tokens -= 1.0;
    let remaining = b.tokens as u64;
    let reset_s = ((BUCKET_LIMIT as f64 - b.tokens) / rate).ceil() as u64;
    Some(Quota { remaining, reset_s })
}

/// # Safety
/// `filter` is the Envoy filter pointer of the current request-headers hook.
unsafe fn full_job(filter: HttpFilterEnvoyPtr, state: &mut FullFilter) -> FilterStatus {
    let Some(config) = state.config.as_ref() else {
        return CONTINUE;
    };
    let mut address = EnvoyBuffer::NULL;
    let known = envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter,
        ATTRIBUTE_SOURCE_ADDRESS,
        &mut address,
    );
    match if known {
        loopback_v4(address.as_bytes())
    } else {
        None
    } {
        None => return deny(filter, 403, DENY_403_ADDR),
        Some(false) => return deny(filter, 403, DENY_403_IP),
        Some(true) => {}
    }
    if let Err(status) = key_job(filter, config) {
        return status;
    }
    let Some(bucket) = &config.bucket else {
        return CONTINUE;
    };
    match take_token(bucket) {
        Some(quota) => {
            state.quota = Some(quota);
            CONTINUE
        }
        None => deny(filter, 429, DENY_429),
    }
}

/// Decimal digits of `v` at the end of `buf`.
fn decimal(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[at..]
}

/// # Safety
/// `filter` is the Envoy filter pointer of the current response-headers hook.
unsafe fn rate_limit_headers(filter: HttpFilterEnvoyPtr, quota: Quota) {
    let mut buf = [0u8; 20];
    for (key, value) in [
        (&b"x-ratelimit-limit"[..], BUCKET_LIMIT),
        (&b"x-ratelimit-remaining"[..], quota.remaining),
        (&b"x-ratelimit-reset"[..], quota.reset_s),
    ] {
        let digits = decimal(&mut buf, value);
        envoy_dynamic_module_callback_http_set_header(
            filter,
            RESPONSE_HEADER,
            ModuleBuffer::of(key),
            ModuleBuffer::of(digits),
        );
    }
}

// ---------------------------------------------------------------- event hooks (exported)

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> AbiVersionModulePtr {
    ABI_VERSION.as_ptr().cast()
}

/// # Safety
/// Called by Envoy with buffers valid for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> HttpFilterConfigModulePtr {
    let Ok(text) = std::str::from_utf8(config.as_bytes()) else {
        log_error("dynmod-keyjob: the configuration is not UTF-8");
        return std::ptr::null();
    };
    match parse_config(text) {
        Ok(config) => Box::into_raw(Box::new(config)) as HttpFilterConfigModulePtr,
        Err(e) => {
            log_error(&format!("dynmod-keyjob: {e}"));
            std::ptr::null()
        }
    }
}

/// # Safety
/// `filter_config_ptr` is a pointer returned by `envoy_dynamic_module_on_http_filter_config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    filter_config_ptr: HttpFilterConfigModulePtr,
) {
    if !filter_config_ptr.is_null() {
        drop(Box::from_raw(filter_config_ptr as *mut Config));
    }
}

/// keyjob: the config itself is the filter (no allocation per request); fulljob: a FullFilter.
///
/// # Safety
/// `filter_config_ptr` is a pointer returned by `envoy_dynamic_module_on_http_filter_config_new`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    filter_config_ptr: HttpFilterConfigModulePtr,
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
) -> HttpFilterModulePtr {
    let config = filter_config_ptr as *const Config;
    let Some(c) = config.as_ref() else {
        return std::ptr::null();
    };
    if c.bucket.is_none() {
        return filter_config_ptr;
    }
    Box::into_raw(Box::new(FullFilter {
        tag: TAG_FULLJOB,
        config,
        quota: None,
    })) as HttpFilterModulePtr
}

/// # Safety
/// Called by Envoy with the pointers of a live filter.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> FilterStatus {
    if filter_module_ptr.is_null() {
        return CONTINUE;
    }
    match *(filter_module_ptr as *const u32) {
        TAG_KEYJOB => {
            let config = &*(filter_module_ptr as *const Config);
            match key_job(filter_envoy_ptr, config) {
                Ok(()) => CONTINUE,
                Err(status) => status,
            }
        }
        TAG_FULLJOB => full_job(
            filter_envoy_ptr,
            &mut *(filter_module_ptr as *mut FullFilter),
        ),
        _ => CONTINUE,
    }
}

/// # Safety
/// Called by Envoy with the pointers of a live filter.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> FilterStatus {
    if !filter_module_ptr.is_null() && *(filter_module_ptr as *const u32) == TAG_FULLJOB {
        let state = &*(filter_module_ptr as *const FullFilter);
        if let Some(quota) = state.quota {
            rate_limit_headers(filter_envoy_ptr, quota);
        }
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy once per filter, with the pointer `envoy_dynamic_module_on_http_filter_new`
/// returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(
    filter_module_ptr: HttpFilterModulePtr,
) {
    if !filter_module_ptr.is_null() && *(filter_module_ptr as *const u32) == TAG_FULLJOB {
        drop(Box::from_raw(filter_module_ptr as *mut FullFilter));
    }
}

// The remaining hooks are mandatory for Envoy 1.40 to accept the module (it resolves them when
// the filter configuration is created); this filter has nothing to do in them.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> FilterStatus {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) -> FilterStatus {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> FilterStatus {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) -> FilterStatus {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _callout_id: u64,
    _result: HttpCalloutResult,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _reason: HttpStreamResetReason,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) {
}

// ---------------------------------------------------------------- tests (no Envoy needed)

#[cfg(test)]
mod tests {
    use super::*;

    const D0: &str = "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";
    const D1: &str = "b3a8e0e1f9ab1bfe3a36f231f676f78bb30a519d2b21e6c530c0eee8ebb4a5d0";

    #[test]
    fn keyjob_ids_follow_positions() {
        let c = parse_config(&format!("keyjob:{D0},{D1}")).expect("valid");
        assert!(c.bucket.is_none());
        let digest: [u8; 32] = Sha256::digest(b"123").into();
        assert_eq!(c.table.get(&digest).map(String::as_str), Some("k0000000"));
        assert_eq!(c.table.len(), 2);
    }

    #[test]
    fn fulljob_has_a_bucket() {
        let c = parse_config(&format!("fulljob:{D0}")).expect("valid");
        let bucket = c.bucket.as_ref().expect("bucket");
        let q = take_token(bucket).expect("token");
        assert!(q.remaining >= BUCKET_LIMIT - 1);
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(parse_config("").is_err());
        assert!(parse_config("keyjob:").is_err());
        assert!(parse_config("keyjob:abc").is_err());
        assert!(parse_config(&format!("keyjob:{D0},{D0}")).is_err());
        assert!(parse_config(&format!("keyjob:{}", D0.replace('a', "g"))).is_err());
        assert!(parse_config(&format!("other:{D0}")).is_err());
    }

    #[test]
    fn source_addresses() {
        assert_eq!(loopback_v4(b"127.0.0.1:5555"), Some(true));
        assert_eq!(loopback_v4(b"127.9.9.9"), Some(true));
        assert_eq!(loopback_v4(b"10.0.0.1:80"), Some(false));
        assert_eq!(loopback_v4(b"[::1]:80"), Some(false));
        assert_eq!(loopback_v4(b""), None);
    }

    #[test]
    fn decimals() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(&mut buf, 0), b"0");
        assert_eq!(decimal(&mut buf, 1_000_000_000), b"1000000000");
        assert_eq!(decimal(&mut buf, u64::MAX), b"18446744073709551615");
    }
}

/// Stand-ins for Envoy's callbacks, so that the unit tests link as an executable (in Envoy the
/// module resolves them against the Envoy binary when it is loaded). Never called by the tests.
#[cfg(test)]
mod envoy_stubs {
    use super::*;

    #[no_mangle]
    extern "C" fn envoy_dynamic_module_callback_http_get_header(
        _: HttpFilterEnvoyPtr,
        _: HeaderType,
        _: ModuleBuffer,
        _: *mut EnvoyBuffer,
        _: usize,
        _: *mut usize,
    ) -> bool {
        false
    }

    #[no_mangle]
    extern "C" fn envoy_dynamic_module_callback_http_set_header(
        _: HttpFilterEnvoyPtr,
        _: HeaderType,
        _: ModuleBuffer,
        _: ModuleBuffer,
    ) -> bool {
        false
    }

    #[no_mangle]
    extern "C" fn envoy_dynamic_module_callback_http_send_response(
        _: HttpFilterEnvoyPtr,
        _: u32,
        _: *mut ModuleHttpHeader,
        _: usize,
        _: ModuleBuffer,
        _: ModuleBuffer,
    ) {
    }

    #[no_mangle]
    extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        _: HttpFilterEnvoyPtr,
        _: AttributeId,
        _: *mut EnvoyBuffer,
    ) -> bool {
        false
    }

    #[no_mangle]
    extern "C" fn envoy_dynamic_module_callback_log(_: LogLevel, _: ModuleBuffer) {}
}
