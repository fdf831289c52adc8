//! Without a plugin configuration: an HTTP filter that does nothing, every callback keeps
//! its default and returns `Action::Continue` (bench/run.py's "wasm-floor").
//!
//! With a configuration `OP:N` (for example `pairs:10`): the same filter, but each request
//! makes the host call OP N times, so that bench/run.py can price one host call as
//! (CPU per request with `OP:10` - CPU per request of the floor) / 10. The ops are listed
//! in `Op::parse`. An unknown op or count makes `on_configure` return false, so Envoy
//! refuses the configuration instead of measuring the floor under a wrong name.

use proxy_wasm::hostcalls as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::hint::black_box;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { probe: None }) });
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
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
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
