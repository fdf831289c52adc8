//! proxy-wasm glue: reads the request, asks `decision`, applies the outcome.

mod host;
mod stats;

use crate::config::{Config, Route};
use crate::decision::{self, Admission, Denial, QuotaHeaders, Reason, Request, Subject};
use crate::ip;
use crate::logbudget::LogBudget;
use crate::metrics::Verdict;
use crate::ratelimit::Leases;
use crate::wire;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use stats::{route_slot, Counter, Counts};
use std::cell::RefCell;
use std::rc::Rc;

/// The header that carries the key id, forwarded with allowed requests and set on refused
/// ones for the access log.
const ACCESS_LOG_KEY_ID_HEADER: &str = "x-keygate-key-id";

/// Denial lines written per second per worker at most (the rest are counted, see
/// `LogBudget`): a flood of refused requests must not become a flood of log writes.
const DENIAL_LINES_PER_SECOND: u32 = 100;

proxy_wasm::main! {{
    host::install_logger();
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// How often each VM hands its counts to Envoy's counters. Counting in the VM and
/// adding the sum each period spares every request a host call (about 2 us, the first
/// `proxy_increment_metric` of a request being the dear one); the counters at the admin
/// endpoint lag by at most this much.
const COUNTER_FLUSH_MS: u32 = 250;

/// What one worker's VM keeps between requests.
struct Worker {
    /// Tokens taken ahead from shared buckets.
    leases: Leases,
    /// Denial log lines left this second.
    denial_log: LogBudget,
    /// Outcomes counted since the last flush.
    counts: Counts,
    /// The error line about an address Envoy took from the request has been written.
    warned_address_from_request: bool,
}

impl Default for Worker {
    fn default() -> Self {
        Worker {
            leases: Leases::default(),
            denial_log: LogBudget::new(DENIAL_LINES_PER_SECOND),
            counts: Counts::default(),
            warned_address_from_request: false,
        }
    }
}

#[derive(Default)]
struct Root {
    config: Option<Rc<Config>>,
    worker: Rc<RefCell<Worker>>,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // The VM is going away (shutdown, or a configuration replaced it): count the rest.
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.counts.flush();
        }
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        if self.config.is_none() {
            if let Ok(mut worker) = self.worker.try_borrow_mut() {
                worker.counts.define_counters();
            }
            if let Err(e) = host::set_tick_period_ms(COUNTER_FLUSH_MS) {
                log::warn!(
                    "keygate: no timer (status {}): counters are added only when the VM stops",
                    e.0
                );
            }
        }
        match Config::from_reader(host::PluginConfiguration::new(size), size) {
            Ok(config) => {
                log::info!(
                    "keygate: configured {} keys, {} routes",
                    config.key_count(),
                    config.routes.len()
                );
                // Plans may have changed: tokens held for the old ones are dropped. Routes
                // and per-key settings too: what was counted under the old ones is handed over.
                if let Ok(mut worker) = self.worker.try_borrow_mut() {
                    worker.leases.clear();
                    worker.counts.configure(&config);
                }
                self.config = Some(Rc::new(config));
                true
            }
            Err(e) => {
                log::error!("keygate: invalid configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.counts.flush();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            worker: Rc::clone(&self.worker),
            quota_headers: Vec::new(),
            route_slot: 0,
            now_ns: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    config: Option<Rc<Config>>,
    worker: Rc<RefCell<Worker>>,
    /// Rate-limit headers to add to the upstream's response.
    quota_headers: QuotaHeaders,
    /// Where the request is counted in `keygate_requests_total` (0: no rule), once known.
    route_slot: usize,
    /// When the request was decided (host time, ns since the Unix epoch), once known.
    now_ns: u64,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return self.internal_error("keygate has no configuration");
        };
        let buffer = match host::request_headers() {
            Ok(h) => h,
            Err(e) => {
                return self
                    .internal_error(&format!("cannot read request headers (status {})", e.0))
            }
        };
        let headers = match wire::decode_pairs(&buffer) {
            Ok(headers) => headers,
            Err(wire::WireError::Malformed) => {
                return self.internal_error("the host sent a malformed header map")
            }
            Err(wire::WireError::NameNotText) => {
                return self.refuse_unreadable(&config, "a header name is not UTF-8")
            }
        };
        // Missing pseudo-headers read as empty, which the decision refuses.
        let pseudo = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(&b""[..], |(_, v)| *v)
        };
        if decision::is_health_check(&config, pseudo(":method"), pseudo(":path")) {
            let _ = host::send_response(
                200,
                "keygate_health",
                &[("content-type", "application/json")],
                br#"{"status":"ready"}"#,
            );
            return Action::Pause;
        }
        // The peer address costs a host call; only rules that use it pay for it.
        let peer = if config.needs_client_ip {
            match host::property(&["source", "address"]) {
                Ok(Some(addr)) => ip::parse_source_address(&addr),
                _ => ip::Peer::Unknown,
            }
        } else {
            ip::Peer::Unknown
        };
        let request = Request {
            method: pseudo(":method"),
            path: pseudo(":path"),
            headers: &headers,
            peer,
        };
        let now = match host::now_nanos() {
            Ok(ns) => ns,
            Err(e) => {
                return self.internal_error(&format!("cannot read the clock (status {})", e.0))
            }
        };
        self.now_ns = now;
        // Callbacks of one VM never nest, so the borrow cannot fail; if it ever did,
        // refusing beats a panic.
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            return self.internal_error("worker state is in use");
        };
        let decision = decision::decide(
            &config,
            &request,
            now,
            &host::SharedData,
            &mut worker.leases,
        );
        let log_line = match &decision {
            Err(_) => worker.denial_log.admit(now),
            Ok(_) => None,
        };
        // A setting of Envoy's, not a client, is at fault: said once per worker, loudly.
        let misconfigured = matches!(&decision, Err(d) if d.unknown_address == Some(ip::Unknown::FromRequest))
            && !std::mem::replace(&mut worker.warned_address_from_request, true);
        drop(worker);
        if misconfigured {
            log::error!(
                "keygate: Envoy gave the client address from the request's X-Forwarded-For, which any client can write; requests that need the client address are refused with 403 client_address_unknown. Set use_remote_address: true on the http_connection_manager (see keygate doctor)"
            );
        }
        match decision {
            Ok(admission) => self.forward(admission),
            Err(denial) => {
                let spoofed = decision::spoofed_identity(&headers);
                self.deny(&config, &denial, &request, &spoofed, log_line)
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in std::mem::take(&mut self.quota_headers) {
            // Missing informational headers must not fail the response.
            let _ = host::add_response_header(name, &value);
        }
        Action::Continue
    }
}

impl Stream {
    fn count(&self, counter: Counter) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.counts.add(counter);
        }
    }

    /// Counts the request in the labelled series, and under its key when there is one.
    fn count_request(&self, verdict: Verdict, key: Option<(&str, bool)>) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.counts.request(verdict, self.route_slot);
            if let Some((id, authenticated)) = key {
                worker
                    .counts
                    .key_request(id, verdict, authenticated, self.now_ns / 1_000_000_000);
            }
        }
    }

    fn set_route(&mut self, route: Option<&Route>) {
        self.route_slot = route_slot(route);
    }

    fn forward(&mut self, mut admission: Admission<'_>) -> Action {
        self.set_route(admission.route);
        let mut ok = true;
        for name in &admission.remove {
            ok &= host::remove_request_header(name).is_ok();
        }
        for (name, value) in admission.identity_headers() {
            // Every client-sent x-keygate-* header was removed above, so those are added
            // (one host operation); others (x-tenant-id) may be client-sent: replaced.
            ok &= if name.starts_with(decision::IDENTITY_PREFIX) {
                host::add_request_header(name, value).is_ok()
            } else {
                host::set_request_header(name, value).is_ok()
            };
        }
        if !ok {
            // Forwarding without the identity (or with a spoofed one) is not an option.
            return self.internal_error("cannot rewrite request headers");
        }
        self.count(Counter::Allowed);
        self.count_request(
            Verdict::Allowed,
            admission.key.as_ref().map(|k| (k.id.as_ref(), true)),
        );
        self.quota_headers = std::mem::take(&mut admission.quota_headers);
        Action::Continue
    }

    /// Refuses the request. `log_line` is `Some(skipped)` when this denial may be logged,
    /// with the number of denials left unlogged since the last line. `spoofed` are the
    /// client-sent identity headers, removed so that access logs never show them as
    /// keygate's; the key id of a configured key is set instead.
    fn deny(
        &mut self,
        config: &Config,
        denial: &Denial<'_>,
        request: &Request<'_>,
        spoofed: &[String],
        log_line: Option<u64>,
    ) -> Action {
        self.set_route(denial.route);
        let reason = denial.reason;
        let status = reason.status();
        if let Some(skipped) = log_line {
            log::info!(
                "{}",
                denial.log_line(
                    request.method,
                    request.path,
                    skipped,
                    DENIAL_LINES_PER_SECOND
                )
            );
        }
        if denial.unknown_address == Some(ip::Unknown::FromRequest) {
            self.count(Counter::AddressFromRequest);
        }
        if let Some(failure) = denial.limiter_failure {
            self.count(Counter::LimiterFailures);
            if log_line.is_some() {
                log::warn!("keygate: rate limiter unavailable ({failure:?}); request refused to stay within the limit");
            }
        }
        for name in spoofed {
            let _ = host::remove_request_header(name);
        }
        let key_id = denial.key_id();
        if let Some(id) = key_id {
            // For the access log, which reads %REQ(X-KEYGATE-KEY-ID)% of allowed and refused
            // requests alike (a refused request goes nowhere, and any client-sent one was
            // removed above). Only ids of configured keys get here, never a presented key.
            let _ = host::add_request_header(ACCESS_LOG_KEY_ID_HEADER, id);
        }
        self.count_request(
            Verdict::Denied(reason),
            key_id.map(|id| (id, denial.authenticated())),
        );
        let retry_after = denial.retry_after_s.map(|s| s.to_string());
        let mut headers = vec![("content-type", "application/json")];
        if status == 401 {
            headers.push(("www-authenticate", config.www_authenticate.as_str()));
        }
        if let Some(seconds) = &retry_after {
            headers.push(("retry-after", seconds));
        }
        for (name, value) in &denial.quota_headers {
            headers.push((name, value));
        }
        self.respond(status, reason, &headers)
    }

    fn respond(&self, status: u32, reason: Reason, headers: &[(&str, &str)]) -> Action {
        self.count(Counter::for_status(status));
        let mut details = String::with_capacity(8 + reason.code().len());
        details.push_str("keygate_");
        details.push_str(reason.code());
        if host::send_response(status, &details, headers, reason.body().as_bytes()).is_err() {
            log::error!("keygate: cannot send the {status} response");
        }
        Action::Pause
    }

    /// Refuses a request the host handed over in a form keygate cannot read.
    fn refuse_unreadable(&mut self, config: &Config, what: &'static str) -> Action {
        let denial = Denial {
            detail: Some(what),
            ..Denial::new(Reason::InvalidRequest, Subject::Nobody)
        };
        let now = host::now_nanos().unwrap_or_default();
        self.now_ns = now;
        let log_line = self
            .worker
            .try_borrow_mut()
            .ok()
            .and_then(|mut w| w.denial_log.admit(now));
        let request = Request {
            method: b"",
            path: b"",
            headers: &[],
            peer: ip::Peer::Unknown,
        };
        self.deny(config, &denial, &request, &[], log_line)
    }

    fn internal_error(&self, what: &str) -> Action {
        log::error!("keygate: internal error: {what}; request refused with 500");
        self.count(Counter::InternalErrors);
        self.count_request(Verdict::InternalError, None);
        let body =
            br#"{"error":"internal_error","message":"The gateway could not process this request"}"#;
        let _ = host::send_response(
            500,
            "keygate_internal_error",
            &[("content-type", "application/json")],
            body,
        );
        Action::Pause
    }
}
