//! `keygate usage` and the LAST USED column of `keygate list`: what Envoy's counters say
//! about each key of the store, read from each Envoy admin's `/stats/prometheus` and
//! merged over a fleet (counters summed, last use the latest).
//!
//! The filter exports, in Prometheus' text format:
//!
//! - [`KEY_REQUESTS`]`{key_id, outcome="allowed"|"denied", reason="none"|<code>}`, a
//!   counter per key in use, with the policy's `"per_key_metrics": true`;
//! - [`KEY_LAST_USED`]`{key_id}`, a gauge: the Unix second of the key's last request;
//! - [`REQUESTS`]`{outcome, reason, status_class, route}`, every request;
//! - [`KEY_METRICS_DROPPED`], requests of keys beyond the policy's cap on keys counted.
//!
//! The labels are Envoy's tag extraction at work (`stats_config.stats_tags` in the
//! bootstrap, `src/metrics.rs`); without it the page holds the same series as flat names
//! (`keygate_key_requests_total_outcome_allowed_...`), which [`Usage::untagged`] notices.
//!
//! Reading is liberal: `# HELP`/`# TYPE` lines, other metrics, unknown labels, label
//! order, timestamps and an `envoy_` prefix on a name are all ignored, and a line that does
//! not parse is skipped; [`Usage::from_prometheus`] is a pure function of the page's text.

use crate::metrics::{self, label};
use crate::store::{self, admin, State, Store};
use crate::time;
use std::collections::BTreeMap;
use std::time::Instant;

/// Requests per key, by outcome and reason (a counter).
pub const KEY_REQUESTS: &str = metrics::KEY_REQUESTS_TOTAL;
/// A key's last request, in Unix seconds (a gauge).
pub const KEY_LAST_USED: &str = metrics::KEY_LAST_USED_SECONDS;
/// Every request, by outcome, reason, status class and route (a counter).
pub const REQUESTS: &str = metrics::REQUESTS_TOTAL;
/// Requests of keys beyond the policy's `per_key_metrics_max`, not counted per key.
pub const KEY_METRICS_DROPPED: &str = metrics::KEY_METRICS_DROPPED_TOTAL;
/// Envoy's own `server.uptime` gauge, in seconds, as the Prometheus page names it.
const UPTIME: &str = "server_uptime";
/// What `keygate usage` asks each admin for: the Prometheus page, only the stats whose
/// name holds `keygate` (every series above) and Envoy's uptime (`filter` is a regular
/// expression over stat names: `keygate|^server\.uptime$`).
pub const STATS_PATH: &str = "/stats/prometheus?filter=keygate%7C%5Eserver%5C.uptime%24";

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, as printed.
    pub name: String,
    /// Label names and (unescaped) values, in the order printed.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A cursor over one line.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.rest.chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn skip_whitespace(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &'a str {
        let end = self
            .rest
            .char_indices()
            .find(|&(_, c)| !keep(c))
            .map_or(self.rest.len(), |(i, _)| i);
        let (taken, rest) = self.rest.split_at(end);
        self.rest = rest;
        taken
    }

    /// A double-quoted string with the format's escapes (`\\`, `\"`, `\n`); another
    /// backslash is kept as it is.
    fn quoted(&mut self) -> Option<String> {
        if !self.eat('"') {
            return None;
        }
        let mut out = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Some(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, e @ ('\\' | '"'))) => out.push(e),
                    Some((_, other)) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => return None,
                },
                c => out.push(c),
            }
        }
        None
    }
}

/// Parses one line of the Prometheus text format: `name{label="value",...} value
/// [timestamp]`, also with quoted names (`{"name", label="value"} value`). `None` for
/// comments, blank lines and lines that do not parse.
pub fn parse_line(line: &str) -> Option<Sample> {
    let mut p = Cursor {
        rest: line.trim_start(),
    };
    if p.rest.is_empty() || p.rest.starts_with('#') {
        return None;
    }
    let mut name = match p.peek() {
        Some('{') => None,
        _ => Some(p.take_while(|c| c != '{' && !c.is_whitespace()).to_string()),
    };
    let mut labels = Vec::new();
    p.skip_whitespace();
    if p.eat('{') {
        loop {
            p.skip_whitespace();
            if p.eat('}') {
                break;
            }
            let label = if p.peek() == Some('"') {
                p.quoted()?
            } else {
                p.take_while(|c| c != '=' && c != ',' && c != '}' && !c.is_whitespace())
                    .to_string()
            };
            p.skip_whitespace();
            if p.eat('=') {
                p.skip_whitespace();
                labels.push((label, p.quoted()?));
            } else if name.is_none() && !label.is_empty() {
                name = Some(label);
            } else {
                return None;
            }
            p.skip_whitespace();
            if p.eat(',') {
                continue;
            }
            if p.eat('}') {
                break;
            }
            return None;
        }
    }
    let name = name.filter(|n| !n.is_empty())?;
    p.skip_whitespace();
    let value = p.take_while(|c| !c.is_whitespace()).parse::<f64>().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Every sample of a Prometheus page, in order; lines that do not parse are skipped.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// A metric's name without the `envoy_` prefix Envoy gives its own stats.
fn metric_name(name: &str) -> &str {
    name.strip_prefix("envoy_").unwrap_or(name)
}

/// A counter's value as a whole count; `None` when it is not a finite, non-negative
/// number.
fn count(value: f64) -> Option<u64> {
    // A float cast saturates; counters beyond 2^53 lose precision, not their size.
    (value.is_finite() && value >= 0.0).then(|| value.round() as u64)
}

/// Requests that were allowed, and those denied by reason code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests allowed.
    pub allowed: u64,
    /// Requests denied, by reason code (`invalid_api_key`, `rate_limited`, ...); reasons
    /// with a zero count are left out.
    pub denied: BTreeMap<String, u64>,
}

impl Counts {
    /// Requests denied, over every reason.
    pub fn denied_total(&self) -> u64 {
        self.denied.values().fold(0, |a, &b| a.saturating_add(b))
    }

    /// Allowed and denied.
    pub fn total(&self) -> u64 {
        self.allowed.saturating_add(self.denied_total())
    }

    fn add(&mut self, outcome: Option<&str>, reason: Option<&str>, n: u64) {
        match outcome {
            Some("allowed") => self.allowed = self.allowed.saturating_add(n),
            Some("denied") if n > 0 => {
                let slot = self
                    .denied
                    .entry(reason.unwrap_or("unknown").to_string())
                    .or_default();
                *slot = slot.saturating_add(n);
            }
            _ => {}
        }
    }

    fn merge(&mut self, other: &Counts) {
        self.allowed = self.allowed.saturating_add(other.allowed);
        for (reason, &n) in &other.denied {
            let slot = self.denied.entry(reason.clone()).or_default();
            *slot = slot.saturating_add(n);
        }
    }
}

/// What Envoy's counters say about one key id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// Its requests.
    pub counts: Counts,
    /// Its last request, in Unix seconds (the gauge; `None` when absent or zero).
    pub last_used: Option<i64>,
}

impl KeyUsage {
    /// Whether Envoy saw it used at all: a last-use time, or a request counted.
    pub fn used(&self) -> bool {
        self.last_used.is_some() || self.counts.total() > 0
    }

    fn merge(&mut self, other: &KeyUsage) {
        self.counts.merge(&other.counts);
        self.last_used = self.last_used.max(other.last_used);
    }
}

/// What one Envoy's (or a fleet's, merged) Prometheus page says about keygate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Per key id, from the per-key series.
    pub keys: BTreeMap<String, KeyUsage>,
    /// Every request ([`REQUESTS`], over routes and status classes); `None` when the page
    /// has no such series.
    pub totals: Option<Counts>,
    /// Envoy's uptime in seconds (the shortest in a fleet): counters start with the
    /// process, so "never used" means "not since then".
    pub uptime: Option<i64>,
    /// Requests of keys beyond the policy's cap, counted for no key: while above zero,
    /// a key that looks never used may have been used.
    pub dropped: Option<u64>,
    /// Whether the page holds any `keygate_` series at all (a keygate filter is loaded).
    pub keygate: bool,
    /// Whether it holds keygate's per-key or labelled series as flat names: the bootstrap
    /// lacks keygate's `stats_tags`, so no key can be read from them.
    pub untagged: bool,
}

impl Usage {
    /// Reads a Prometheus page.
    pub fn from_prometheus(text: &str) -> Usage {
        let mut usage = Usage::default();
        for sample in parse_samples(text) {
            let name = metric_name(&sample.name);
            usage.keygate |= name.starts_with("keygate_");
            match name {
                KEY_REQUESTS => {
                    let (Some(id), Some(n)) = (sample.label(label::KEY_ID), count(sample.value))
                    else {
                        continue;
                    };
                    usage.keys.entry(id.to_string()).or_default().counts.add(
                        sample.label(label::OUTCOME),
                        sample.label(label::REASON),
                        n,
                    );
                }
                KEY_LAST_USED => {
                    let Some(id) = sample.label(label::KEY_ID) else {
                        continue;
                    };
                    let at = (sample.value.is_finite() && sample.value >= 1.0)
                        .then(|| sample.value.floor() as i64);
                    let key = usage.keys.entry(id.to_string()).or_default();
                    key.last_used = key.last_used.max(at);
                }
                REQUESTS => {
                    if let Some(n) = count(sample.value) {
                        usage.totals.get_or_insert_with(Counts::default).add(
                            sample.label(label::OUTCOME),
                            sample.label(label::REASON),
                            n,
                        );
                    }
                }
                KEY_METRICS_DROPPED => {
                    if let Some(n) = count(sample.value) {
                        let dropped = usage.dropped.get_or_insert(0);
                        *dropped = dropped.saturating_add(n);
                    }
                }
                UPTIME if sample.value.is_finite() && sample.value >= 0.0 => {
                    usage.uptime = Some(sample.value as i64);
                }
                other => {
                    usage.untagged |= [KEY_REQUESTS, KEY_LAST_USED, REQUESTS].iter().any(|m| {
                        other
                            .strip_prefix(m)
                            .is_some_and(|rest| rest.starts_with('_') && rest.len() > 1)
                    });
                }
            }
        }
        usage
    }

    /// Adds another Envoy's usage: counters summed, the later last use kept, the shorter
    /// uptime kept.
    pub fn merge(&mut self, other: &Usage) {
        for (id, key) in &other.keys {
            self.keys.entry(id.clone()).or_default().merge(key);
        }
        if let Some(totals) = &other.totals {
            self.totals
                .get_or_insert_with(Counts::default)
                .merge(totals);
        }
        self.uptime = match (self.uptime, other.uptime) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.dropped = match (self.dropped, other.dropped) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            (a, b) => a.or(b),
        };
        self.keygate |= other.keygate;
        self.untagged |= other.untagged;
    }

    /// Whether the page holds per-key series (the policy's `per_key_metrics`, and a key
    /// used since Envoy started).
    pub fn per_key(&self) -> bool {
        !self.keys.is_empty()
    }
}

/// The usage one Envoy admin reports, read by `deadline`.
pub fn fetch(url: &str, deadline: Instant) -> Result<Usage, admin::GetError> {
    let body = admin::get(url, STATS_PATH, deadline)?;
    Ok(Usage::from_prometheus(&String::from_utf8_lossy(&body)))
}

/// [`fetch`] from every admin in `urls`, asked at once, in their order.
pub fn fetch_all(urls: &[String], deadline: Instant) -> Vec<Result<Usage, admin::GetError>> {
    store::in_parallel(urls, |url| fetch(url, deadline))
}

/// Why a key is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// No request in the counters of the Envoys asked (since they started).
    NeverUsed,
    /// Last used longer ago than `--unused-for`.
    Unused,
}

impl Flag {
    /// The word in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::NeverUsed => "never_used",
            Flag::Unused => "unused",
        }
    }
}

/// One row of the report: a key of the store, a removed key, or a key-set member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The key id.
    pub id: String,
    /// Its name, for a key of the store.
    pub name: Option<String>,
    /// Its state now, for a key of the store.
    pub state: Option<State>,
    /// The key set it belongs to, for a key-set member.
    pub key_set: Option<String>,
    /// What the counters say (all zero, no last use, when they say nothing).
    pub usage: KeyUsage,
    /// Why it is flagged, if it is.
    pub flag: Option<Flag>,
}

/// Every key of the store with its usage, then the keys the counters name that the store
/// does not hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The store's keys, in its order.
    pub keys: Vec<Row>,
    /// Key ids in the counters that are neither in the store nor members of one of the
    /// policy's key sets: removed keys (Envoy keeps their series until it restarts).
    pub removed: Vec<Row>,
    /// Members of the policy's key sets (`<set>:<16 hex digits>`) seen in the counters.
    pub key_sets: Vec<Row>,
}

/// The key set `id` is a member id of, if the policy has one by that name.
fn key_set_of<'a>(store: &'a Store, id: &str) -> Option<&'a str> {
    let (name, hex) = id.rsplit_once(':')?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    store
        .policy
        .key_sets
        .iter()
        .find(|set| set.name == name)
        .map(|set| set.name.as_str())
}

/// The report over `store` for `usage` at `now`. Active and suspended keys are flagged
/// when never used, and, given `unused_for` (seconds), when last used longer ago than
/// that; revoked and expired keys are never flagged (they cannot be used any more).
pub fn report(store: &Store, usage: &Usage, now: i64, unused_for: Option<i64>) -> Report {
    let mut out = Report::default();
    for key in &store.keys {
        let state = key.state(now);
        let seen = usage.keys.get(&key.id).cloned().unwrap_or_default();
        let flag = match (state, seen.used(), seen.last_used, unused_for) {
            (State::Revoked | State::Expired, ..) => None,
            (_, false, ..) => Some(Flag::NeverUsed),
            (_, true, Some(at), Some(limit)) if now.saturating_sub(at) >= limit => {
                Some(Flag::Unused)
            }
            _ => None,
        };
        out.keys.push(Row {
            id: key.id.clone(),
            name: Some(key.name.clone()),
            state: Some(state),
            key_set: None,
            usage: seen,
            flag,
        });
    }
    for (id, seen) in &usage.keys {
        if store.keys.iter().any(|k| &k.id == id) {
            continue;
        }
        let key_set = key_set_of(store, id).map(str::to_string);
        let row = Row {
            id: id.clone(),
            name: None,
            state: None,
            key_set: key_set.clone(),
            usage: seen.clone(),
            flag: None,
        };
        if key_set.is_some() {
            out.key_sets.push(row);
        } else {
            out.removed.push(row);
        }
    }
    out
}

/// A span of seconds in one unit: "12 s", "5 min", "3 h", "1 day", "41 days".
pub fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h", s / 3600),
        86_400..=172_799 => "1 day".to_string(),
        _ => format!("{} days", s / 86_400),
    }
}

/// How long before `now` the instant `at` was: "just now", "12 s ago", "3 min ago", ...
pub fn ago(now: i64, at: i64) -> String {
    if at >= now {
        "just now".to_string()
    } else {
        format!("{} ago", span(now - at))
    }
}

/// A duration given as seconds, as `--unused-for` takes it: "30d", "12h", "5m", "90s".
pub fn duration_text(seconds: i64) -> String {
    match seconds {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A last use as RFC 3339, or `None`.
pub fn last_used_rfc3339(usage: &KeyUsage) -> Option<String> {
    usage.last_used.map(time::format_rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as Envoy 1.40 prints it with the filter's series: TYPE lines, Envoy's own
    /// stats with the `envoy_` prefix, labels in any order, escaped values.
    const PAGE: &str = r#"# TYPE envoy_cluster_upstream_rq counter
envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="upstream"} 12
# TYPE keygate_allowed counter
keygate_allowed{} 14
# TYPE keygate_key_requests_total counter
keygate_key_requests_total{key_id="k_57eb70b3d398",outcome="allowed",reason="none"} 10
keygate_key_requests_total{outcome="denied",key_id="k_57eb70b3d398",reason="rate_limited"} 3
keygate_key_requests_total{reason="insufficient_permissions",outcome="denied",key_id="k_57eb70b3d398"} 1
keygate_key_requests_total{key_id="svc.payments:eu-1@acme-prod",outcome="allowed",reason="none"} 4
keygate_key_requests_total{key_id="odd\"id\\with\nescapes",outcome="allowed",reason="none"} 2
keygate_key_requests_total{key_id="k_000000000000",outcome="denied",reason="key_revoked"} 0
# TYPE keygate_key_last_used_seconds gauge
keygate_key_last_used_seconds{key_id="k_57eb70b3d398"} 1764000000
keygate_key_last_used_seconds{key_id="svc.payments:eu-1@acme-prod"} 1764000300
keygate_key_last_used_seconds{key_id="k_000000000000"} 0
# TYPE keygate_requests_total counter
keygate_requests_total{outcome="allowed",reason="none",status_class="2xx",route="/v1/jobs"} 14
keygate_requests_total{outcome="denied",reason="missing_api_key",status_class="4xx",route="/v1/jobs"} 5
keygate_requests_total{outcome="denied",reason="rate_limited",status_class="4xx",route="/v1/jobs"} 3
keygate_requests_total{outcome="denied",reason="insufficient_permissions",status_class="4xx",route="/v1/admin"} 1
# TYPE keygate_key_metrics_dropped_total counter
keygate_key_metrics_dropped_total{} 0
# TYPE envoy_server_uptime gauge
envoy_server_uptime{} 7260
"#;

    #[test]
    fn a_page_with_every_series() {
        let usage = Usage::from_prometheus(PAGE);
        assert!(usage.keygate && usage.per_key());
        let ids: Vec<&str> = usage.keys.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            [
                "k_000000000000",
                "k_57eb70b3d398",
                "odd\"id\\with\nescapes",
                "svc.payments:eu-1@acme-prod"
            ]
        );
        let main = &usage.keys["k_57eb70b3d398"];
        assert_eq!(main.counts.allowed, 10);
        assert_eq!(
            main.counts.denied,
            BTreeMap::from([
                ("insufficient_permissions".to_string(), 1),
                ("rate_limited".to_string(), 3)
            ])
        );
        assert_eq!(main.counts.denied_total(), 4);
        assert_eq!(main.last_used, Some(1_764_000_000));
        let dotted = &usage.keys["svc.payments:eu-1@acme-prod"];
        assert_eq!(
            (dotted.counts.allowed, dotted.last_used),
            (4, Some(1_764_000_300))
        );
        assert_eq!(usage.keys["odd\"id\\with\nescapes"].counts.allowed, 2);
        // A series at zero, and a gauge at zero: known to Envoy, never used.
        let idle = &usage.keys["k_000000000000"];
        assert!(!idle.used(), "{idle:?}");
        assert!(idle.counts.denied.is_empty());
        let totals = usage.totals.as_ref().unwrap();
        assert_eq!(totals.allowed, 14);
        assert_eq!(totals.denied_total(), 9);
        assert_eq!(totals.denied["missing_api_key"], 5);
        assert_eq!(usage.uptime, Some(7260));
        assert_eq!(usage.dropped, Some(0));
        assert!(!usage.untagged);
    }

    #[test]
    fn flat_names_are_noticed_not_read() {
        // An Envoy without keygate's stats_tags: the same series, every `.` made `_`.
        let page =
            "# TYPE keygate_key_requests_total_outcome_allowed_reason_none_key_id_k_1 counter\n\
                    keygate_key_requests_total_outcome_allowed_reason_none_key_id_k_1{} 3\n\
                    keygate_key_last_used_seconds_key_id_k_1{} 1764000000\n";
        let usage = Usage::from_prometheus(page);
        assert!(usage.untagged && usage.keygate && !usage.per_key());
        // keygate's older unlabelled counters are not flat names of these.
        let old = Usage::from_prometheus("keygate_allowed{} 3\nkeygate_requests_total{} 1\n");
        assert!(!old.untagged && old.keygate);
    }

    #[test]
    fn lines_parse_liberally() {
        let s = parse_line(r#"  keygate_key_requests_total { key_id = "a" , outcome="allowed" , } 5 1764000000000"#)
            .unwrap();
        assert_eq!(s.name, "keygate_key_requests_total");
        assert_eq!(
            s.labels,
            [
                ("key_id".into(), "a".into()),
                ("outcome".into(), "allowed".into())
            ]
        );
        assert_eq!(s.value, 5.0);
        // No labels at all, no braces, a float value.
        let s = parse_line("envoy_server_uptime 1.5e3").unwrap();
        assert_eq!(
            (s.name.as_str(), s.value, s.labels.len()),
            ("envoy_server_uptime", 1500.0, 0)
        );
        // The UTF-8 form of newer Prometheus: a quoted name inside the braces.
        let s = parse_line(r#"{"keygate_key_last_used_seconds", "key_id"="x.y"} 42"#).unwrap();
        assert_eq!(s.name, "keygate_key_last_used_seconds");
        assert_eq!(s.label("key_id"), Some("x.y"));
        // An unknown escape is kept; a brace inside a value is only text.
        let s = parse_line(r#"m{key_id="a\tb}c"} 1"#).unwrap();
        assert_eq!(s.label("key_id"), Some(r"a\tb}c"));
        for bad in [
            "",
            "# TYPE keygate_key_requests_total counter",
            "# HELP x y",
            "m{key_id=\"unterminated} 1",
            "m{key_id=unquoted} 1",
            "m{key_id=\"a\"",
            "m{key_id=\"a\"} ",
            "m{key_id=\"a\"} not-a-number",
            "{} 1",
            "m{a=\"1\" b=\"2\"} 1",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_match_exactly_after_an_envoy_prefix() {
        let page = "envoy_keygate_key_requests_total{key_id=\"a\",outcome=\"allowed\",reason=\"none\"} 2\n\
                    keygate_key_requests_total_bucket{key_id=\"b\",outcome=\"allowed\"} 9\n\
                    wasm_keygate_key_requests_total{key_id=\"c\",outcome=\"allowed\"} 9\n\
                    keygate_key_requests_total{outcome=\"allowed\"} 9\n\
                    keygate_key_requests_total{key_id=\"d\",outcome=\"allowed\"} NaN\n\
                    keygate_key_requests_total{key_id=\"e\",outcome=\"allowed\"} -1\n\
                    keygate_key_last_used_seconds{key_id=\"f\"} +Inf\n\
                    garbage line without a value\n";
        let usage = Usage::from_prometheus(page);
        assert_eq!(usage.keys.keys().collect::<Vec<_>>(), ["a", "f"]);
        assert_eq!(usage.keys["a"].counts.allowed, 2);
        assert!(!usage.keys["f"].used());
        assert_eq!(usage.totals, None);
        assert_eq!(usage.uptime, None);
        // Nothing of keygate's: an Envoy without the filter, or not Envoy at all.
        let other = Usage::from_prometheus("envoy_server_live{} 1\n{\"stats\": []}\n");
        assert!(!other.keygate && !other.per_key());
    }

    #[test]
    fn a_fleet_sums_counters_and_keeps_the_latest_use() {
        let a = Usage::from_prometheus(
            "keygate_key_requests_total{key_id=\"k1\",outcome=\"allowed\",reason=\"none\"} 3\n\
             keygate_key_requests_total{key_id=\"k1\",outcome=\"denied\",reason=\"rate_limited\"} 1\n\
             keygate_key_last_used_seconds{key_id=\"k1\"} 1000\n\
             keygate_requests_total{outcome=\"allowed\",reason=\"none\",status_class=\"2xx\",route=\"/\"} 3\n\
             keygate_key_metrics_dropped_total{} 4\n\
             envoy_server_uptime{} 500\n",
        );
        let b = Usage::from_prometheus(
            "keygate_key_requests_total{key_id=\"k1\",outcome=\"allowed\",reason=\"none\"} 4\n\
             keygate_key_requests_total{key_id=\"k1\",outcome=\"denied\",reason=\"key_suspended\"} 2\n\
             keygate_key_last_used_seconds{key_id=\"k1\"} 2000\n\
             keygate_key_requests_total{key_id=\"k2\",outcome=\"allowed\",reason=\"none\"} 1\n\
             keygate_key_last_used_seconds{key_id=\"k2\"} 1500\n\
             keygate_key_metrics_dropped_total{} 1\n\
             envoy_server_uptime{} 90\n",
        );
        let mut merged = Usage::default();
        merged.merge(&a);
        merged.merge(&b);
        let k1 = &merged.keys["k1"];
        assert_eq!(k1.counts.allowed, 7);
        assert_eq!(k1.counts.denied_total(), 3);
        assert_eq!(k1.counts.denied["rate_limited"], 1);
        assert_eq!(k1.counts.denied["key_suspended"], 2);
        assert_eq!(k1.last_used, Some(2000));
        assert_eq!(merged.keys["k2"].last_used, Some(1500));
        assert_eq!(merged.totals.as_ref().map(|t| t.allowed), Some(3));
        assert_eq!(merged.uptime, Some(90));
        assert_eq!(merged.dropped, Some(5));
        // The order does not matter.
        let mut other_way = b.clone();
        other_way.merge(&a);
        assert_eq!(other_way, merged);
    }

    fn store_with(keys: &[(&str, crate::config::KeyStatus)]) -> Store {
        let mut store = Store::new(None, "k.wasm".into(), "kg".into());
        for (i, (id, status)) in keys.iter().enumerate() {
            store.keys.push(store::StoredKey {
                id: (*id).to_string(),
                name: format!("key {i}"),
                description: None,
                prefix: "kg_abcde".into(),
                hash: crate::keys::hash_string(id.as_bytes()),
                client: None,
                tenant: None,
                role: "client".into(),
                scopes: Vec::new(),
                plan: None,
                status: *status,
                allowed_ips: Vec::new(),
                created_at: "2026-01-01T00:00:00Z".into(),
                expires_at: None,
                revoked_at: None,
                rotated_from: None,
            });
        }
        store
    }

    #[test]
    fn the_report_flags_unused_keys_and_sorts_out_the_rest() {
        use crate::config::KeyStatus;
        let mut store = store_with(&[
            ("recent", KeyStatus::Active),
            ("stale", KeyStatus::Active),
            ("never", KeyStatus::Active),
            ("paused", KeyStatus::Suspended),
            ("gone", KeyStatus::Revoked),
            ("counted-only", KeyStatus::Active),
        ]);
        store.policy.key_sets.push(
            serde_json::from_str(r#"{"name": "legacy", "digests": [], "role": "r"}"#).unwrap(),
        );
        let now = 100 * 86_400;
        let page = format!(
            "keygate_key_last_used_seconds{{key_id=\"recent\"}} {}\n\
             keygate_key_last_used_seconds{{key_id=\"stale\"}} {}\n\
             keygate_key_requests_total{{key_id=\"counted-only\",outcome=\"denied\",reason=\"ip_not_allowed\"}} 1\n\
             keygate_key_last_used_seconds{{key_id=\"k_removed\"}} {}\n\
             keygate_key_last_used_seconds{{key_id=\"legacy:0123456789abcdef\"}} {}\n\
             keygate_key_last_used_seconds{{key_id=\"legacy:not-hex\"}} {}\n",
            now - 60,
            now - 31 * 86_400,
            now - 5,
            now - 5,
            now - 5
        );
        let usage = Usage::from_prometheus(&page);
        let flags = |r: &Report| -> Vec<(String, Option<Flag>)> {
            r.keys.iter().map(|k| (k.id.clone(), k.flag)).collect()
        };
        let without = report(&store, &usage, now, None);
        let with = report(&store, &usage, now, Some(30 * 86_400));
        let want = |stale: Option<Flag>| {
            vec![
                ("recent".to_string(), None),
                ("stale".to_string(), stale),
                ("never".to_string(), Some(Flag::NeverUsed)),
                ("paused".to_string(), Some(Flag::NeverUsed)),
                ("gone".to_string(), None),
                ("counted-only".to_string(), None),
            ]
        };
        assert_eq!(flags(&without), want(None));
        assert_eq!(flags(&with), want(Some(Flag::Unused)));
        assert_eq!(with.keys[0].state, Some(State::Active));
        assert_eq!(with.keys[0].name.as_deref(), Some("key 0"));
        let ids = |rows: &[Row]| rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&with.removed), ["k_removed", "legacy:not-hex"]);
        assert_eq!(ids(&with.key_sets), ["legacy:0123456789abcdef"]);
        assert_eq!(with.key_sets[0].key_set.as_deref(), Some("legacy"));
    }

    #[test]
    fn times_and_durations_read_as_people_say_them() {
        assert_eq!(ago(1000, 1000), "just now");
        assert_eq!(ago(1000, 1005), "just now");
        assert_eq!(ago(1000, 988), "12 s ago");
        assert_eq!(ago(1000, 1000 - 180), "3 min ago");
        assert_eq!(ago(100_000, 100_000 - 7200), "2 h ago");
        assert_eq!(ago(1_000_000, 1_000_000 - 86_400), "1 day ago");
        assert_eq!(ago(10_000_000, 10_000_000 - 41 * 86_400 - 5), "41 days ago");
        assert_eq!(duration_text(30 * 86_400), "30d");
        assert_eq!(duration_text(7200), "2h");
        assert_eq!(duration_text(300), "5m");
        assert_eq!(duration_text(90), "90s");
    }
}
