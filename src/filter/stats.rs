//! What each worker's VM counts, and how it hands the counts to Envoy.
//!
//! Requests are counted in the VM; every `COUNTER_FLUSH_MS` the root context's tick adds
//! the sums to Envoy's counters (one host call per changed series). A labelled series is
//! defined on the first flush that has a count for it, so only series with traffic exist
//! and no request ever pays for a definition. Names: `crate::metrics`.

use super::host;
use crate::config::Config;
use crate::metrics::{self, Verdict};
use std::collections::HashMap;

/// keygate's unlabelled counters (kept as they were before the labelled ones).
#[derive(Debug, Clone, Copy)]
pub enum Counter {
    Allowed,
    Unauthorized,
    Forbidden,
    RateLimited,
    LimiterFailures,
    InternalErrors,
    BadRequests,
    AddressFromRequest,
}

/// Indexed by `Counter as usize`.
const COUNTER_NAMES: [&str; 8] = [
    "keygate_allowed",
    "keygate_unauthorized",
    "keygate_forbidden",
    "keygate_rate_limited",
    "keygate_limiter_failures",
    "keygate_internal_errors",
    "keygate_bad_requests",
    "keygate_client_address_from_request",
];

impl Counter {
    pub fn for_status(status: u32) -> Counter {
        match status {
            401 => Counter::Unauthorized,
            403 => Counter::Forbidden,
            429 => Counter::RateLimited,
            400 => Counter::BadRequests,
            _ => Counter::InternalErrors,
        }
    }
}

/// A metric id not yet asked for, or one the host refused (its counts are dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Id {
    Undefined,
    Defined(u32),
    Refused,
}

impl Id {
    /// The id, defining the metric first if needed (`define` gets the name).
    fn get(&mut self, define: impl FnOnce() -> Result<u32, host::HostError>) -> Option<u32> {
        if *self == Id::Undefined {
            *self = define().map_or(Id::Refused, Id::Defined);
        }
        match *self {
            Id::Defined(id) => Some(id),
            Id::Undefined | Id::Refused => None,
        }
    }
}

/// Counts not yet added to Envoy's counters, and the ids of the series they go to.
#[derive(Debug, Default)]
pub struct Counts {
    /// The unlabelled counters, defined once per VM.
    ids: Option<[u32; COUNTER_NAMES.len()]>,
    pending: [u64; COUNTER_NAMES.len()],
    /// `keygate_requests_total` by route and verdict.
    requests: Requests,
    /// Per-key series, when the configuration asks for them.
    per_key: Option<PerKey>,
}

impl Counts {
    /// Defines the unlabelled counters (once per VM, so they show at zero).
    pub fn define_counters(&mut self) {
        if self.ids.is_none() {
            self.ids =
                Some(COUNTER_NAMES.map(|name| host::define_counter(name).unwrap_or(u32::MAX)));
        }
    }

    /// Adopts a configuration's routes and per-key settings, first handing over what was
    /// counted under the previous one.
    pub fn configure(&mut self, config: &Config) {
        self.flush();
        self.requests = Requests::new(config);
        self.per_key = config.per_key_metrics.map(PerKey::new);
    }

    pub fn add(&mut self, counter: Counter) {
        let n = &mut self.pending[counter as usize];
        *n = n.saturating_add(1);
    }

    /// Counts one request in `keygate_requests_total`; `route_slot` is from [`route_slot`].
    pub fn request(&mut self, verdict: Verdict, route_slot: usize) {
        self.requests.add(verdict, route_slot);
    }

    /// Counts one request of a configured key in the per-key series (when they are on).
    /// `authenticated`: the request authenticated as the key (its last use moves to
    /// `now_s`); revoked and expired keys are counted without it.
    pub fn key_request(&mut self, key_id: &str, verdict: Verdict, authenticated: bool, now_s: u64) {
        if let Some(per_key) = &mut self.per_key {
            per_key.add(key_id, verdict, authenticated.then_some(now_s));
        }
    }

    /// Adds the pending counts to Envoy's counters.
    pub fn flush(&mut self) {
        if let Some(ids) = self.ids {
            for (id, n) in ids.iter().zip(self.pending.iter_mut()) {
                if *n > 0 {
                    host::add_to_counter(*id, *n);
                    *n = 0;
                }
            }
        }
        self.requests.flush();
        if let Some(per_key) = &mut self.per_key {
            per_key.flush();
        }
    }
}

/// The slot of a request's route in the counts: 0 for no rule, else the rule's index + 1.
pub fn route_slot(route: Option<&crate::config::Route>) -> usize {
    route.map_or(0, |r| r.index + 1)
}

/// `keygate_requests_total`, one series per (route, verdict) seen.
#[derive(Debug, Default)]
struct Requests {
    /// Route labels by slot: `none`, then each rule's.
    routes: Vec<String>,
    /// `slot * Verdict::COUNT + verdict.index()`.
    ids: Vec<Id>,
    pending: Vec<u64>,
    /// Some count is pending.
    dirty: bool,
}

impl Requests {
    fn new(config: &Config) -> Requests {
        let routes: Vec<String> = std::iter::once(metrics::NO_ROUTE.to_string())
            .chain(config.routes.iter().map(|r| r.label.clone()))
            .collect();
        let series = routes.len() * Verdict::COUNT;
        Requests {
            routes,
            ids: vec![Id::Undefined; series],
            pending: vec![0; series],
            dirty: false,
        }
    }

    fn add(&mut self, verdict: Verdict, route_slot: usize) {
        let i = route_slot * Verdict::COUNT + verdict.index();
        if let Some(n) = self.pending.get_mut(i) {
            *n = n.saturating_add(1);
            self.dirty = true;
        }
    }

    fn flush(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        for (i, (id, n)) in self.ids.iter_mut().zip(self.pending.iter_mut()).enumerate() {
            if *n == 0 {
                continue;
            }
            let count = std::mem::take(n);
            let (slot, verdict) = (i / Verdict::COUNT, i % Verdict::COUNT);
            let (Some(route), Some(verdict)) =
                (self.routes.get(slot), Verdict::from_index(verdict))
            else {
                continue;
            };
            if let Some(id) =
                id.get(|| host::define_counter(&metrics::requests_name(verdict, route)))
            {
                host::add_to_counter(id, count);
            }
        }
    }
}

/// The per-key series of one worker: at most `max` key ids, each with a counter per
/// verdict it has seen and a last-used gauge.
#[derive(Debug)]
struct PerKey {
    max: usize,
    index: HashMap<Box<str>, usize>,
    keys: Vec<KeySeries>,
    /// Positions in `keys` with something to flush.
    dirty: Vec<usize>,
    /// `keygate_key_metrics_dropped_total`: defined with the configuration, so it shows at 0.
    dropped_id: Id,
    dropped: u64,
}

#[derive(Debug)]
struct KeySeries {
    key_id: Box<str>,
    /// (verdict index, series, pending count); a key sees one or two verdicts in practice.
    counts: Vec<(u8, Id, u64)>,
    last_used_s: u64,
    flushed_last_used_s: u64,
    gauge: Id,
    dirty: bool,
}

impl PerKey {
    fn new(max: usize) -> PerKey {
        let mut dropped_id = Id::Undefined;
        let _ = dropped_id.get(|| host::define_counter(metrics::KEY_METRICS_DROPPED_TOTAL));
        PerKey {
            max,
            index: HashMap::new(),
            keys: Vec::new(),
            dirty: Vec::new(),
            dropped_id,
            dropped: 0,
        }
    }

    fn add(&mut self, key_id: &str, verdict: Verdict, used_at_s: Option<u64>) {
        let at = match self.index.get(key_id) {
            Some(&at) => at,
            None if self.keys.len() >= self.max => {
                self.dropped = self.dropped.saturating_add(1);
                return;
            }
            None => {
                let at = self.keys.len();
                self.keys.push(KeySeries {
                    key_id: key_id.into(),
                    counts: Vec::new(),
                    last_used_s: 0,
                    flushed_last_used_s: 0,
                    gauge: Id::Undefined,
                    dirty: false,
                });
                self.index.insert(key_id.into(), at);
                at
            }
        };
        let Some(series) = self.keys.get_mut(at) else {
            return;
        };
        let v = verdict.index() as u8;
        match series.counts.iter_mut().find(|(i, _, _)| *i == v) {
            Some((_, _, n)) => *n = n.saturating_add(1),
            None => series.counts.push((v, Id::Undefined, 1)),
        }
        if let Some(t) = used_at_s {
            series.last_used_s = series.last_used_s.max(t);
        }
        if !series.dirty {
            series.dirty = true;
            self.dirty.push(at);
        }
    }

    fn flush(&mut self) {
        if self.dropped > 0 {
            if let Some(id) = self
                .dropped_id
                .get(|| host::define_counter(metrics::KEY_METRICS_DROPPED_TOTAL))
            {
                host::add_to_counter(id, self.dropped);
            }
            self.dropped = 0;
        }
        for at in std::mem::take(&mut self.dirty) {
            let Some(series) = self.keys.get_mut(at) else {
                continue;
            };
            series.dirty = false;
            for (v, id, n) in &mut series.counts {
                if *n == 0 {
                    continue;
                }
                let count = std::mem::take(n);
                let Some(verdict) = Verdict::from_index(usize::from(*v)) else {
                    continue;
                };
                let key_id = &series.key_id;
                if let Some(id) =
                    id.get(|| host::define_counter(&metrics::key_requests_name(key_id, verdict)))
                {
                    host::add_to_counter(id, count);
                }
            }
            if series.last_used_s > series.flushed_last_used_s {
                series.flushed_last_used_s = series.last_used_s;
                let key_id = &series.key_id;
                if let Some(id) = series
                    .gauge
                    .get(|| host::define_gauge(&metrics::key_last_used_name(key_id)))
                {
                    // Every worker sets the same gauge: it only moves forward.
                    if host::gauge(id) < series.last_used_s {
                        host::set_gauge(id, series.last_used_s);
                    }
                }
            }
        }
    }
}
