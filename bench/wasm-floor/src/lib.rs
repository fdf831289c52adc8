//! Without a plugin configuration: an HTTP filter that does nothing, every callback keeps
//! its default and returns `Action::Continue` (bench/run.py's "wasm-floor").
//!
//! With a configuration `OP:N` (for example `pairs:10`): the same filter, but each request
//! makes the host call OP N times, so that bench/run.py can price one host call as
//! (CPU per request with `OP:10` - CPU per request of the floor) / 10. The ops are listed
//! in `Op::parse`. An unknown op or count makes `on_configure` return false, so Envoy
//! refuses the configuration instead of measuring the floor under a wrong name.
//!
//! With a configuration `keyjob:<hex sha256>,<hex sha256>,...` (bench/run.py's
//! "wasm-keyjob"): the cheapest filter that still does keygate's job. On request headers it
//! reads x-api-key with one proxy_get_header_map_value call, hashes it with SHA-256 and looks
//! the digest up in a HashMap built in on_configure; on a hit it removes x-api-key and sets
//! x-keygate-key-id (`k` and the digest's position in the list, seven digits: the ids
//! bench/run.py gives its keys) with two header mutations and continues; on a miss (or no
//! x-api-key) it sends a 401 local reply. No rate limit, no IP rule, no response callback.
//! A digest that is not 64 hex digits, or a repeated one, makes `on_configure` return false.
//!
//! With a configuration `fulljob:<hex sha256>,...` (bench/run.py's "wasm-fulljob"): the
//! cheapest filter that does the job the native chain (rbac + api_key_auth +
//! local_ratelimit) does, which is keygate's allowed path: the keyjob's work, plus the
//! client address read (`source.address`, one property call) and checked against
//! 127.0.0.0/8 (403 otherwise), the clock read, one token from the key's bucket (a lease of
//! 256 tokens taken from shared data with one get and one compare-and-swap set when the
//! worker's lease is spent, as keygate leases; the bucket never refuses at the benchmark's
//! rate), and X-RateLimit-Limit / -Remaining / -Reset added to the response (three host
//! calls in the response-headers callback), as local_ratelimit adds them.

#[path = "../../keyjob_table.rs"]
mod keyjob_table;

use keyjob_table::{parse_keys, KeyTable};
use proxy_wasm::hostcalls as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { probe: None, keyjob: None, fulljob: false, leases: Rc::default() })
    });
}}

/// The shared-data key `shared_get` reads (written once per VM in `on_configure`, so the
/// read finds a value and pays for copying it into Wasm memory, as a real lookup does).
const SHARED_KEY: &str = "wasm-floor:bucket";
const SHARED_VALUE: [u8; 16] = [1; 16];
const DENY_BODY: &[u8] = b"{\"error\":\"invalid_api_key\",\"message\":\"Invalid API key\"}";

#[derive(Clone, Copy, PartialEq)]
enum Op {
    /// proxy_get_header_map_pairs on the request headers (and the SDK's decoding).
    Pairs,
    /// proxy_get_header_map_value of x-api-key (present in every benchmark request).
    Header,
    /// proxy_get_property source.address.
    Property,
    /// proxy_get_current_time_nanoseconds.
    Time,
    /// proxy_get_shared_data of a key that exists.
    SharedGet,
    /// proxy_set_shared_data (16 bytes, no CAS).
    SharedSet,
    /// proxy_replace_header_map_value of x-client-id on the request (the first call adds it).
    ReplaceHeader,
    /// proxy_remove_header_map_value of x-api-key (the first call removes it).
    RemoveHeader,
    /// proxy_add_header_map_value of x-floor on the response, in on_http_response_headers
    /// (each call adds one more x-floor line).
    AddResponseHeader,
    /// proxy_increment_metric of a counter.
    Counter,
    /// proxy_log at debug level (below Envoy's info: the host drops it).
    LogFiltered,
    /// proxy_send_local_response 401 with a small JSON body instead of continuing (once).
    LocalReply,
}

impl Op {
    fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "pairs" => Op::Pairs,
            "header" => Op::Header,
            "property" => Op::Property,
            "time" => Op::Time,
            "shared_get" => Op::SharedGet,
            "shared_set" => Op::SharedSet,
            "replace_header" => Op::ReplaceHeader,
            "remove_header" => Op::RemoveHeader,
            "add_response_header" => Op::AddResponseHeader,
            "counter" => Op::Counter,
            "log_filtered" => Op::LogFiltered,
            "local_reply" => Op::LocalReply,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy)]
struct Probe {
    op: Op,
    count: u32,
    metric: u32,
}

struct Root {
    probe: Option<Probe>,
    keyjob: Option<Rc<KeyTable>>,
    /// The key table is the fulljob's (see the module comment), not the keyjob's.
    fulljob: bool,
    /// The fulljob's tokens taken ahead, by key digest (one worker's; never shared).
    leases: Rc<RefCell<HashMap<[u8; 32], u64>>>,
}

const KEYJOB_PREFIX: &str = "keyjob:";
const FULLJOB_PREFIX: &str = "fulljob:";
/// Tokens a fulljob worker takes from the shared bucket at once (keygate's MAX_LEASE).
const FULLJOB_LEASE: u64 = 256;
/// The fulljob bucket's rate: the benchmark plan's, so that nothing is refused.
const FULLJOB_LIMIT: u64 = 1_000_000_000;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        self.keyjob = None;
        if size == 0 {
            self.probe = None;
            return true;
        }
        let raw = match host::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(raw)) => raw,
            _ => Vec::new(),
        };
        let text = String::from_utf8_lossy(&raw);
        let text = text.trim();
        if text.is_empty() {
            self.probe = None;
            return true;
        }
        let keyjob = text
            .strip_prefix(KEYJOB_PREFIX)
            .map(|list| (list, false))
            .or_else(|| text.strip_prefix(FULLJOB_PREFIX).map(|list| (list, true)));
        if let Some((list, fulljob)) = keyjob {
            self.probe = None;
            return match parse_keys(list) {
                Ok(table) => {
                    self.keyjob = Some(Rc::new(table));
                    self.fulljob = fulljob;
                    self.leases.borrow_mut().clear();
                    true
                }
                Err(e) => {
                    let _ = host::log(LogLevel::Error, &format!("wasm-floor: keyjob: {e}"));
                    false
                }
            };
        }
        let (name, count) = text.split_once(':').unwrap_or((text, "1"));
        let (Some(op), Ok(count)) = (Op::parse(name), count.parse::<u32>()) else {
            let _ = host::log(
                LogLevel::Error,
                &format!("wasm-floor: configuration {text:?} is not OP:COUNT with a known OP"),
            );
            return false;
        };
        let ready = match op {
            Op::SharedGet => host::set_shared_data(SHARED_KEY, Some(&SHARED_VALUE), None),
            _ => Ok(()),
        };
        let metric = match op {
            Op::Counter => host::define_metric(MetricType::Counter, "wasm_floor_calls"),
            _ => Ok(0),
        };
        let (Ok(()), Ok(metric)) = (ready, metric) else {
            return false;
        };
        self.probe = Some(Probe { op, count, metric });
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let (Some(table), true) = (&self.keyjob, self.fulljob) {
            return Some(Box::new(FullJob {
                table: Rc::clone(table),
                leases: Rc::clone(&self.leases),
                remaining: None,
            }));
        }
        if let Some(table) = &self.keyjob {
            return Some(Box::new(KeyJob {
                table: Rc::clone(table),
            }));
        }
        Some(match self.probe {
            None => Box::new(Floor),
            Some(probe) => Box::new(probe),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The floor: no callback overridden.
struct Floor;

impl Context for Floor {}

impl HttpContext for Floor {}

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let mut sink = 0usize;
        for _ in 0..self.count {
            match self.op {
                Op::Pairs => {
                    if let Ok(pairs) = host::get_map_bytes(MapType::HttpRequestHeaders) {
                        sink += pairs.len();
                    }
                }
                Op::Header => {
                    if let Ok(Some(v)) =
                        host::get_map_value_bytes(MapType::HttpRequestHeaders, "x-api-key")
                    {
                        sink += v.len();
                    }
                }
                Op::Property => {
                    if let Ok(Some(v)) = host::get_property(vec!["source", "address"]) {
                        sink += v.len();
                    }
                }
                Op::Time => {
                    if let Ok(t) = host::get_current_time() {
                        sink += usize::from(black_box(t) == std::time::UNIX_EPOCH);
                    }
                }
                Op::SharedGet => {
                    if let Ok((Some(v), _)) = host::get_shared_data(SHARED_KEY) {
                        sink += v.len();
                    }
                }
                Op::SharedSet => {
                    let _ = host::set_shared_data(SHARED_KEY, Some(&SHARED_VALUE), None);
                }
                Op::ReplaceHeader => {
                    let _ = host::set_map_value(
                        MapType::HttpRequestHeaders,
                        "x-client-id",
                        Some("k0000005"),
                    );
                }
                Op::RemoveHeader => {
                    let _ = host::remove_map_value(MapType::HttpRequestHeaders, "x-api-key");
                }
                Op::Counter => {
                    let _ = host::increment_metric(self.metric, 1);
                }
                Op::LogFiltered => {
                    let _ = host::log(LogLevel::Debug, "wasm-floor: a line below Envoy's level");
                }
                Op::LocalReply => {
                    let _ = host::send_http_response(
                        401,
                        vec![("content-type", "application/json")],
                        Some(DENY_BODY),
                    );
                    return Action::Pause;
                }
                Op::AddResponseHeader => break,
            }
        }
        black_box(sink);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.op == Op::AddResponseHeader {
            for _ in 0..self.count {
                let _ = host::add_map_value(MapType::HttpResponseHeaders, "x-floor", "1");
            }
        }
        Action::Continue
    }
}

/// keygate's job and nothing more: one header read, SHA-256, a hash-map lookup, two header
/// mutations on a hit, a 401 local reply on a miss.
struct KeyJob {
    table: Rc<KeyTable>,
}

impl Context for KeyJob {}

impl HttpContext for KeyJob {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let Some((_, id)) = find_key(&self.table) else {
            return deny();
        };
        forward_identity(id);
        Action::Continue
    }
}

/// The key's digest and id: x-api-key read with one host call, hashed and looked up; `None`
/// when the header is missing or the key unknown.
fn find_key(table: &KeyTable) -> Option<(&[u8; 32], &String)> {
    match host::get_map_value_bytes(MapType::HttpRequestHeaders, "x-api-key") {
        Ok(Some(key)) => table.get_key_value(&<[u8; 32]>::from(Sha256::digest(&key))),
        _ => None,
    }
}

/// x-api-key removed, x-keygate-key-id set: two header mutations.
fn forward_identity(id: &str) {
    let _ = host::remove_map_value(MapType::HttpRequestHeaders, "x-api-key");
    let _ = host::set_map_value(MapType::HttpRequestHeaders, "x-keygate-key-id", Some(id));
}

fn deny() -> Action {
    refuse(401, DENY_BODY)
}

fn refuse(status: u32, body: &[u8]) -> Action {
    let _ = host::send_http_response(
        status,
        vec![("content-type", "application/json")],
        Some(body),
    );
    Action::Pause
}

const FORBIDDEN_BODY: &[u8] = b"{\"error\":\"ip_not_allowed\",\"message\":\"Forbidden\"}";

/// The native chain's job (see the module comment): IP rule, key, token bucket, identity
/// forwarded, X-RateLimit-* on the response.
struct FullJob {
    table: Rc<KeyTable>,
    leases: Rc<RefCell<HashMap<[u8; 32], u64>>>,
    /// Tokens left in the key's bucket after this request, for X-RateLimit-Remaining.
    remaining: Option<u64>,
}

impl Context for FullJob {}

impl HttpContext for FullJob {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        // rbac's direct_remote_ip 127.0.0.0/8: "127.x.y.z:port" is the only form admitted.
        let loopback = match host::get_property(vec!["source", "address"]) {
            Ok(Some(addr)) => addr.starts_with(b"127.") && is_ipv4_port(&addr),
            _ => false,
        };
        if !loopback {
            return refuse(403, FORBIDDEN_BODY);
        }
        let Some((digest, id)) = find_key(&self.table) else {
            return deny();
        };
        let Ok(now) = host::get_current_time() else {
            return refuse(500, b"{}");
        };
        let Ok(mut leases) = self.leases.try_borrow_mut() else {
            return refuse(500, b"{}");
        };
        let left = leases.entry(*digest).or_insert(0);
        if *left == 0 {
            // The shared bucket: 16 bytes (tokens, refill time); at the benchmark's rate it
            // is full again at every lease, so the lease is simply taken.
            let key = format!("fulljob:{id}");
            let cas = match host::get_shared_data(&key) {
                Ok((_, cas)) => cas,
                Err(_) => return refuse(500, b"{}"),
            };
            let now_ns = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&(FULLJOB_LIMIT - FULLJOB_LEASE).to_le_bytes());
            value[8..].copy_from_slice(&now_ns.to_le_bytes());
            if host::set_shared_data(&key, Some(&value), cas).is_err() {
                return refuse(429, b"{}");
            }
            *left = FULLJOB_LEASE;
        }
        *left -= 1;
        self.remaining = Some(FULLJOB_LIMIT - FULLJOB_LEASE + *left);
        drop(leases);
        forward_identity(id);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some(remaining) = self.remaining.take() {
            let _ = host::add_map_value(
                MapType::HttpResponseHeaders,
                "x-ratelimit-limit",
                "1000000000",
            );
            let _ = host::add_map_value(
                MapType::HttpResponseHeaders,
                "x-ratelimit-remaining",
                &remaining.to_string(),
            );
            let _ = host::add_map_value(MapType::HttpResponseHeaders, "x-ratelimit-reset", "1");
        }
        Action::Continue
    }
}

/// "a.b.c.d:port" with decimal parts (no IPv6, nothing else).
fn is_ipv4_port(addr: &[u8]) -> bool {
    let Some(colon) = addr.iter().rposition(|&b| b == b':') else {
        return false;
    };
    let (ip, port) = (&addr[..colon], &addr[colon + 1..]);
    !port.is_empty()
        && port.iter().all(u8::is_ascii_digit)
        && ip.split(|&b| b == b'.').count() == 4
        && ip
            .split(|&b| b == b'.')
            .all(|p| !p.is_empty() && p.len() <= 3 && p.iter().all(u8::is_ascii_digit))
}
