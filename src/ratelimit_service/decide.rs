//! The pure part of the service: which descriptor is limited by which bucket at which
//! rate, and what Envoy is answered once Redis has replied. Nothing here does I/O.

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::google::protobuf::Duration;

use std::sync::Arc;

use super::plans::Plans;
use crate::config::{HeaderStyle, PlanLimits};
use crate::decision::{self, Reason};
use crate::ratelimit::{Rate, Verdict};

/// The rate-limit domain keygate's descriptors are sent in.
pub const DOMAIN: &str = "keygate";
/// Descriptor entry holding the key's plan (from `x-keygate-plan`).
pub const PLAN_ENTRY: &str = "plan";
/// Descriptor entry holding the key's id (from `x-keygate-key-id`).
pub const KEY_ENTRY: &str = "key_id";
/// Redis key prefix of the buckets: `keygate:rl:<length of plan>:<plan>:<key_id>` (the
/// length keeps a plan name and a key id that both hold `:` from naming one bucket).
pub const BUCKET_PREFIX: &str = "keygate:rl:";

/// The buckets of one descriptor: one per rate of its plan, all taken from or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Redis keys, one per rate of the plan: `keygate:rl:<length of plan>:<plan>:<key_id>`
    /// for the first (as for a plan with one rate), then that with `#<i>` for rate `i`
    /// (no key id holds `#`).
    pub keys: Vec<String>,
    /// Plan name.
    pub plan: String,
    /// The plan's rates and policy names.
    pub limits: Arc<PlanLimits>,
    /// Tokens this request takes from each bucket (its `hits_addend`; 0 means 1).
    pub cost: u64,
}

impl Bucket {
    /// The plan's rates, one per key.
    pub fn rates(&self) -> &[Rate] {
        &self.limits.rates
    }
}

/// What a descriptor asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<'a> {
    /// Not keygate's (it lacks `plan` or `key_id`, or refunds hits): OK, unlimited.
    Ignored,
    /// keygate's, but its plan is not in the store: OK, unlimited (logged).
    UnknownPlan(&'a str),
    /// Take from these buckets.
    Limited(Bucket),
}

/// The buckets a descriptor is limited by, if any. A descriptor is keygate's when it has
/// both a `plan` and a non-empty `key_id` entry (other entries are ignored; the first of
/// each name counts). `key_id` names whose quota is spent: the filter's
/// `x-keygate-quota-id` (a rotated key's successor spends its predecessor's), or, in
/// configurations from before that header, `x-keygate-key-id`. Its cost is its own
/// `hits_addend` if set, else the request's; 0 means 1.
pub fn select<'a>(d: &'a RateLimitDescriptor, plans: &Plans, request_hits: u32) -> Selection<'a> {
    let entry = |name: &str| {
        d.entries
            .iter()
            .find(|e| e.key == name)
            .map(|e| e.value.as_str())
    };
    let (Some(plan), Some(key_id)) = (entry(PLAN_ENTRY), entry(KEY_ENTRY)) else {
        return Selection::Ignored;
    };
    if d.is_negative_hits || plan.is_empty() || key_id.is_empty() {
        return Selection::Ignored;
    }
    let Some(limits) = plans.get(plan) else {
        return Selection::UnknownPlan(plan);
    };
    let hits = d
        .hits_addend
        .map(|v| v.value)
        .unwrap_or(u64::from(request_hits));
    let first = format!("{BUCKET_PREFIX}{}:{plan}:{key_id}", plan.len());
    let keys = (0..limits.rates.len())
        .map(|i| {
            if i == 0 {
                first.clone()
            } else {
                format!("{first}#{i}")
            }
        })
        .collect();
    Selection::Limited(Bucket {
        keys,
        plan: plan.to_string(),
        limits: Arc::clone(limits),
        cost: hits.max(1),
    })
}

/// What the script answered for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The tokens were taken.
    pub admitted: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
    /// Milliseconds until the refused request's tokens are there (0 when admitted).
    pub retry_ms: u64,
}

impl Reply {
    /// Reads the script's answer for several buckets: `{admitted, remaining, reset_ms,
    /// retry_ms}` for each, one after the other; exactly `buckets` of them.
    pub fn from_all(values: &[i64], buckets: usize) -> Result<Vec<Reply>, String> {
        if values.len() != 4 * buckets {
            return Err(format!(
                "the script answered {} values, not 4 for each of {buckets} buckets",
                values.len()
            ));
        }
        values.chunks(4).map(Reply::from_values).collect()
    }

    /// As a bucket verdict of the filter's (what its headers are made from).
    pub fn verdict(&self) -> Verdict {
        Verdict {
            admitted: self.admitted,
            remaining: self.remaining,
            retry_after_s: if self.admitted {
                0
            } else {
                self.retry_after_s()
            },
            reset_s: self.reset_s(),
        }
    }

    /// Reads the script's `{admitted, remaining, reset_ms, retry_ms}`.
    pub fn from_values(values: &[i64]) -> Result<Reply, String> {
        let [admitted, remaining, reset_ms, retry_ms] = values else {
            return Err(format!(
                "the script answered {} values, not 4",
                values.len()
            ));
        };
        let whole = |v: i64, what: &str| {
            u64::try_from(v).map_err(|_| format!("the script answered {what} = {v}"))
        };
        Ok(Reply {
            admitted: match admitted {
                0 => false,
                1 => true,
                other => return Err(format!("the script answered admitted = {other}")),
            },
            remaining: whole(*remaining, "remaining")?,
            reset_ms: whole(*reset_ms, "reset_ms")?,
            retry_ms: whole(*retry_ms, "retry_ms")?,
        })
    }

    /// `X-RateLimit-Reset`: whole seconds until full, rounded up.
    pub fn reset_s(&self) -> u64 {
        self.reset_ms.div_ceil(1000)
    }

    /// `Retry-After`: whole seconds until the tokens are there, rounded up, at least 1.
    pub fn retry_after_s(&self) -> u64 {
        self.retry_ms.div_ceil(1000).max(1)
    }
}

/// The outcome for one descriptor, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not limited here.
    Unlimited,
    /// Taken from a plan's buckets (all or none).
    Limited {
        /// Plan name.
        plan: String,
        /// The plan's rates and policy names.
        limits: Arc<PlanLimits>,
        /// What Redis answered, one reply per rate.
        replies: Vec<Reply>,
    },
}

impl Outcome {
    /// Taken from a plan with a single rate.
    pub fn single(plan: &str, rate: Rate, reply: Reply) -> Outcome {
        Outcome::Limited {
            plan: plan.to_string(),
            limits: Arc::new(PlanLimits::new(plan, vec![rate])),
            replies: vec![reply],
        }
    }
}

/// The time unit Envoy is told a plan's `requests` are per.
pub fn unit(rate: &Rate) -> Unit {
    match rate.period_ns / 1_000_000_000 {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Unknown,
    }
}

/// The answer for the request whose descriptors came out as `outcomes`: OVER_LIMIT if any
/// did. The rate-limit headers, in the policy's `style` (and on OVER_LIMIT `Retry-After`,
/// the content type and the filter's own 429 body), are the filter's, about one
/// descriptor: on OVER_LIMIT the refused one whose wait is longest, else the one whose
/// bucket is closest to running out (see `decision::shown_limit`). X-RateLimit-* report
/// that bucket; the IETF `RateLimit-Policy` and `RateLimit` every rate of its plan.
/// `Retry-After` is the time until every bucket of every refused descriptor admits. A
/// request with no limited descriptor gets none.
pub fn response(outcomes: &[Outcome], style: HeaderStyle) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = outcomes.iter().map(status).collect();
    // Every bucket of every limited descriptor: (descriptor, rate, verdict).
    let mut owner = Vec::new();
    let mut rates = Vec::new();
    let mut verdicts = Vec::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        if let Outcome::Limited {
            limits, replies, ..
        } = outcome
        {
            for (rate, reply) in limits.rates.iter().zip(replies) {
                owner.push(i);
                rates.push(*rate);
                verdicts.push(reply.verdict());
            }
        }
    }
    let refused = verdicts.iter().any(|v| !v.admitted);
    let mut out = RateLimitResponse {
        overall_code: if refused { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        ..RateLimitResponse::default()
    };
    if !verdicts.is_empty() {
        let shown = decision::shown_limit(&rates, &verdicts);
        let mut add = |key: &str, value: String| {
            out.response_headers_to_add.push(HeaderValue {
                key: key.into(),
                value,
                ..HeaderValue::default()
            })
        };
        match style {
            HeaderStyle::Off => {}
            HeaderStyle::XRateLimit => {
                if let (Some(rate), Some(v)) = (rates.get(shown), verdicts.get(shown)) {
                    add("x-ratelimit-limit", rate.requests.to_string());
                    add("x-ratelimit-remaining", v.remaining.to_string());
                    add("x-ratelimit-reset", v.reset_s.to_string());
                }
            }
            HeaderStyle::Ietf => {
                let descriptor = owner.get(shown).and_then(|&i| outcomes.get(i));
                if let Some(Outcome::Limited {
                    limits, replies, ..
                }) = descriptor
                {
                    let each: Vec<Verdict> = replies.iter().map(Reply::verdict).collect();
                    for (name, value) in decision::ietf_headers(limits, &each) {
                        add(name, value);
                    }
                }
            }
        }
        if refused {
            let wait = verdicts.iter().map(|v| v.retry_after_s).max().unwrap_or(1);
            add("retry-after", wait.max(1).to_string());
            add("content-type", "application/json".into());
        }
    }
    if refused {
        out.raw_body = Reason::RateLimited.body().into_bytes();
    }
    out
}

fn status(outcome: &Outcome) -> DescriptorStatus {
    match outcome {
        Outcome::Unlimited => DescriptorStatus {
            code: Code::Ok as i32,
            ..DescriptorStatus::default()
        },
        Outcome::Limited {
            plan,
            limits,
            replies,
        } => {
            let verdicts: Vec<Verdict> = replies.iter().map(Reply::verdict).collect();
            let shown = decision::shown_limit(&limits.rates, &verdicts);
            let admitted = replies.iter().all(|r| r.admitted);
            let (Some(rate), Some(reply)) = (limits.rates.get(shown), replies.get(shown)) else {
                return DescriptorStatus {
                    code: if admitted { Code::Ok } else { Code::OverLimit } as i32,
                    ..DescriptorStatus::default()
                };
            };
            DescriptorStatus {
                code: if admitted { Code::Ok } else { Code::OverLimit } as i32,
                current_limit: Some(RateLimit {
                    name: plan.clone(),
                    requests_per_unit: u32::try_from(rate.requests).unwrap_or(u32::MAX),
                    unit: unit(rate) as i32,
                }),
                limit_remaining: u32::try_from(reply.remaining).unwrap_or(u32::MAX),
                duration_until_reset: Some(duration_ms(reply.reset_ms)),
                ..DescriptorStatus::default()
            }
        }
    }
}

fn duration_ms(ms: u64) -> Duration {
    Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        // Below 1e9, so it fits.
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// The Redis URL as it may be logged: any password replaced by `***` (in the user part,
/// `redis://user:secret@host`, and in a `password=` or `pass=` query parameter).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let (before_query, query) = match rest.find('?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => format!("{userinfo}{host}"),
            }
        }
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}{authority}{path}");
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name == "password" || name == "pass" => format!("{name}=***"),
                _ => param.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn rate(requests: u64, per_s: u64, burst: u64) -> Rate {
        Rate {
            requests,
            period_ns: per_s * 1_000_000_000,
            burst,
        }
    }

    fn plans() -> Plans {
        Plans::of([
            ("free", vec![rate(60, 60, 60)]),
            ("tiny", vec![rate(5, 60, 5)]),
            ("two", vec![rate(5, 60, 5), rate(100, 86_400, 100)]),
        ])
    }

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        }
    }

    fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == name)
            .map(|h| h.value.as_str())
    }

    #[test]
    fn selects_the_plan_and_key_bucket() {
        let p = plans();
        let d = descriptor(&[("plan", "tiny"), ("key_id", "k_1")]);
        assert_eq!(
            select(&d, &p, 0),
            Selection::Limited(Bucket {
                keys: vec!["keygate:rl:4:tiny:k_1".into()],
                plan: "tiny".into(),
                limits: Arc::clone(p.get("tiny").unwrap()),
                cost: 1,
            })
        );
        // A plan with several rates: a bucket for each, the first named as for one rate.
        let d = descriptor(&[("plan", "two"), ("key_id", "k_1")]);
        match select(&d, &p, 0) {
            Selection::Limited(b) => {
                assert_eq!(b.keys, ["keygate:rl:3:two:k_1", "keygate:rl:3:two:k_1#1"]);
                assert_eq!(b.rates(), [rate(5, 60, 5), rate(100, 86_400, 100)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plan_and_key_id_never_share_a_bucket_across_colons() {
        let p = Plans::of([("a:b", vec![rate(5, 60, 5)]), ("a", vec![rate(5, 60, 5)])]);
        let key = |plan: &str, id: &str| match select(
            &descriptor(&[("plan", plan), ("key_id", id)]),
            &p,
            1,
        ) {
            Selection::Limited(b) => b.keys[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_ne!(key("a:b", "c"), key("a", "b:c"));
    }

    #[test]
    fn other_entries_are_ignored_but_both_are_needed() {
        let p = plans();
        let with_extra = descriptor(&[("generic_key", "x"), ("plan", "free"), ("key_id", "a")]);
        assert!(
            matches!(select(&with_extra, &p, 1), Selection::Limited(b) if b.keys == ["keygate:rl:4:free:a"])
        );
        for entries in [
            &[("plan", "free")][..],
            &[("key_id", "a")][..],
            &[][..],
            &[("plan", "free"), ("key_id", "")][..],
            &[("plan", ""), ("key_id", "a")][..],
            &[("remote_address", "10.0.0.1")][..],
        ] {
            assert_eq!(
                select(&descriptor(entries), &p, 1),
                Selection::Ignored,
                "{entries:?}"
            );
        }
        let mut refund = descriptor(&[("plan", "free"), ("key_id", "a")]);
        refund.is_negative_hits = true;
        assert_eq!(select(&refund, &p, 1), Selection::Ignored);
    }

    #[test]
    fn unknown_plan_is_reported() {
        let d = descriptor(&[("plan", "gold"), ("key_id", "a")]);
        assert_eq!(select(&d, &plans(), 1), Selection::UnknownPlan("gold"));
    }

    #[test]
    fn hits_addend_zero_means_one_and_the_descriptor_overrides_the_request() {
        let p = plans();
        let cost = |d: &RateLimitDescriptor, hits| match select(d, &p, hits) {
            Selection::Limited(b) => b.cost,
            other => panic!("{other:?}"),
        };
        let mut d = descriptor(&[("plan", "free"), ("key_id", "a")]);
        assert_eq!(cost(&d, 0), 1);
        assert_eq!(cost(&d, 3), 3);
        d.hits_addend = Some(UInt64Value { value: 7 });
        assert_eq!(cost(&d, 3), 7);
        d.hits_addend = Some(UInt64Value { value: 0 });
        assert_eq!(cost(&d, 3), 1);
    }

    #[test]
    fn units_follow_the_period() {
        assert_eq!(unit(&rate(1, 1, 1)), Unit::Second);
        assert_eq!(unit(&rate(1, 60, 1)), Unit::Minute);
        assert_eq!(unit(&rate(1, 3600, 1)), Unit::Hour);
        assert_eq!(unit(&rate(1, 86_400, 1)), Unit::Day);
    }

    #[test]
    fn replies_are_read_strictly() {
        assert_eq!(
            Reply::from_values(&[1, 4, 12_000, 0]),
            Ok(Reply {
                admitted: true,
                remaining: 4,
                reset_ms: 12_000,
                retry_ms: 0
            })
        );
        assert!(Reply::from_values(&[1, 4, 12_000]).is_err());
        assert!(Reply::from_values(&[2, 4, 12_000, 0]).is_err());
        assert!(Reply::from_values(&[0, -1, 12_000, 0]).is_err());
    }

    #[test]
    fn rounding_of_seconds() {
        let r = |reset_ms, retry_ms| Reply {
            admitted: false,
            remaining: 0,
            reset_ms,
            retry_ms,
        };
        assert_eq!(r(0, 0).reset_s(), 0);
        assert_eq!(r(1, 1).reset_s(), 1);
        assert_eq!(r(60_000, 0).reset_s(), 60);
        assert_eq!(r(60_001, 0).reset_s(), 61);
        assert_eq!(r(0, 1).retry_after_s(), 1);
        assert_eq!(r(0, 0).retry_after_s(), 1);
        assert_eq!(r(0, 12_000).retry_after_s(), 12);
        assert_eq!(r(0, 12_001).retry_after_s(), 13);
    }

    #[test]
    fn admitted_response_has_the_three_headers_and_no_body() {
        let out = response(
            &[Outcome::single(
                "tiny",
                rate(5, 60, 5),
                Reply {
                    admitted: true,
                    remaining: 4,
                    reset_ms: 12_000,
                    retry_ms: 0,
                },
            )],
            HeaderStyle::XRateLimit,
        );
        assert_eq!(out.overall_code, Code::Ok as i32);
        assert_eq!(header(&out, "x-ratelimit-limit"), Some("5"));
        assert_eq!(header(&out, "x-ratelimit-remaining"), Some("4"));
        assert_eq!(header(&out, "x-ratelimit-reset"), Some("12"));
        assert_eq!(header(&out, "retry-after"), None);
        assert_eq!(out.response_headers_to_add.len(), 3);
        assert!(out.raw_body.is_empty());
        let s = &out.statuses[0];
        assert_eq!(s.code, Code::Ok as i32);
        let limit = s
            .current_limit
            .as_ref()
            .map(|l| (l.name.as_str(), l.requests_per_unit, l.unit));
        assert_eq!(limit, Some(("tiny", 5, Unit::Minute as i32)));
        assert_eq!(s.limit_remaining, 4);
        assert_eq!(
            s.duration_until_reset,
            Some(Duration {
                seconds: 12,
                nanos: 0
            })
        );
    }

    #[test]
    fn refused_response_carries_retry_after_and_the_filters_body() {
        let out = response(
            &[
                Outcome::Unlimited,
                Outcome::single(
                    "tiny",
                    rate(5, 60, 5),
                    Reply {
                        admitted: false,
                        remaining: 0,
                        reset_ms: 59_500,
                        retry_ms: 11_500,
                    },
                ),
            ],
            HeaderStyle::XRateLimit,
        );
        assert_eq!(out.overall_code, Code::OverLimit as i32);
        assert_eq!(out.statuses.len(), 2);
        assert_eq!(out.statuses[0].code, Code::Ok as i32);
        assert_eq!(out.statuses[0].current_limit, None);
        assert_eq!(out.statuses[1].code, Code::OverLimit as i32);
        assert_eq!(
            out.statuses[1].duration_until_reset,
            Some(Duration {
                seconds: 59,
                nanos: 500_000_000
            })
        );
        assert_eq!(header(&out, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(header(&out, "x-ratelimit-reset"), Some("60"));
        assert_eq!(header(&out, "retry-after"), Some("12"));
        assert_eq!(header(&out, "content-type"), Some("application/json"));
        assert_eq!(
            out.raw_body,
            br#"{"error":"rate_limited","message":"Rate limit exceeded"}"#.to_vec()
        );
    }

    #[test]
    fn unlimited_only_is_ok_without_headers() {
        let out = response(&[Outcome::Unlimited], HeaderStyle::XRateLimit);
        assert_eq!(out.overall_code, Code::Ok as i32);
        assert!(out.response_headers_to_add.is_empty());
        let empty = response(&[], HeaderStyle::Ietf);
        assert_eq!(empty.overall_code, Code::Ok as i32);
    }

    #[test]
    fn headers_come_from_the_tightest_bucket() {
        let limited = |plan: &str, remaining| {
            Outcome::single(
                plan,
                rate(100, 60, 100),
                Reply {
                    admitted: true,
                    remaining,
                    reset_ms: 1000,
                    retry_ms: 0,
                },
            )
        };
        let out = response(
            &[limited("a", 50), limited("b", 7), limited("c", 9)],
            HeaderStyle::XRateLimit,
        );
        assert_eq!(header(&out, "x-ratelimit-remaining"), Some("7"));
    }

    fn two_rates(minute: Reply, day: Reply) -> Outcome {
        let p = plans();
        Outcome::Limited {
            plan: "two".into(),
            limits: Arc::clone(p.get("two").unwrap()),
            replies: vec![minute, day],
        }
    }

    fn reply(admitted: bool, remaining: u64, reset_ms: u64, retry_ms: u64) -> Reply {
        Reply {
            admitted,
            remaining,
            reset_ms,
            retry_ms,
        }
    }

    #[test]
    fn several_rates_report_the_closest_to_running_out() {
        // 4 of 5 a minute left (80%), 10 of 100 a day (10%): the day is closer.
        let out = response(
            &[two_rates(
                reply(true, 4, 12_000, 0),
                reply(true, 10, 77_760_000, 0),
            )],
            HeaderStyle::XRateLimit,
        );
        assert_eq!(out.overall_code, Code::Ok as i32);
        assert_eq!(header(&out, "x-ratelimit-limit"), Some("100"));
        assert_eq!(header(&out, "x-ratelimit-remaining"), Some("10"));
        assert_eq!(header(&out, "x-ratelimit-reset"), Some("77760"));
        let s = &out.statuses[0];
        assert_eq!(s.limit_remaining, 10);
        assert_eq!(
            s.current_limit.as_ref().map(|l| l.unit),
            Some(Unit::Day as i32)
        );
    }

    #[test]
    fn a_refusal_by_one_rate_reports_it_and_waits_for_every_rate() {
        // The minute refuses (12 s to a token); the day admits: X-RateLimit-* are the
        // minute's, Retry-After the minute's wait.
        let out = response(
            &[two_rates(
                reply(false, 0, 60_000, 11_500),
                reply(true, 10, 1_000, 0),
            )],
            HeaderStyle::XRateLimit,
        );
        assert_eq!(out.overall_code, Code::OverLimit as i32);
        assert_eq!(out.statuses[0].code, Code::OverLimit as i32);
        assert_eq!(header(&out, "x-ratelimit-limit"), Some("5"));
        assert_eq!(header(&out, "retry-after"), Some("12"));
        // Both refuse: Retry-After is the longer wait, and reports that rate.
        let out = response(
            &[two_rates(
                reply(false, 0, 60_000, 11_500),
                reply(false, 0, 86_400_000, 864_000),
            )],
            HeaderStyle::XRateLimit,
        );
        assert_eq!(header(&out, "retry-after"), Some("864"));
        assert_eq!(header(&out, "x-ratelimit-limit"), Some("100"));
    }

    #[test]
    fn ietf_headers_name_one_policy_per_rate() {
        let out = response(
            &[two_rates(
                reply(true, 4, 12_000, 0),
                reply(true, 99, 864_000, 0),
            )],
            HeaderStyle::Ietf,
        );
        assert_eq!(
            header(&out, "ratelimit-policy"),
            Some(r#""two/minute";q=5;w=60, "two/day";q=100;w=86400"#)
        );
        assert_eq!(
            header(&out, "ratelimit"),
            Some(r#""two/minute";r=4;t=12, "two/day";r=99;t=864"#)
        );
        assert_eq!(header(&out, "x-ratelimit-limit"), None);
        let refused = response(
            &[two_rates(
                reply(false, 0, 60_000, 11_500),
                reply(true, 99, 864_000, 0),
            )],
            HeaderStyle::Ietf,
        );
        assert_eq!(
            header(&refused, "ratelimit"),
            Some(r#""two/minute";r=0;t=12, "two/day";r=99;t=864"#)
        );
        assert_eq!(header(&refused, "retry-after"), Some("12"));
        let off = response(
            &[two_rates(
                reply(false, 0, 60_000, 11_500),
                reply(true, 99, 864_000, 0),
            )],
            HeaderStyle::Off,
        );
        assert_eq!(header(&off, "ratelimit"), None);
        assert_eq!(header(&off, "x-ratelimit-limit"), None);
        assert_eq!(header(&off, "retry-after"), Some("12"));
    }

    #[test]
    fn several_replies_are_read_strictly() {
        assert_eq!(
            Reply::from_all(&[1, 4, 12_000, 0, 0, 0, 5_000, 700], 2),
            Ok(vec![reply(true, 4, 12_000, 0), reply(false, 0, 5_000, 700)])
        );
        assert!(Reply::from_all(&[1, 4, 12_000, 0], 2).is_err());
        assert!(Reply::from_all(&[1, 4, 12_000, 0, 1], 1).is_err());
    }

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:p@ss@host/2"),
            "rediss://user:***@host/2"
        );
        assert_eq!(redact_url("redis://user@host"), "redis://user@host");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=x&password=y"),
            "redis+unix:///run/redis.sock?db=1&pass=***&password=***"
        );
    }
}
