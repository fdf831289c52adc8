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

use super::plans::Plans;
use crate::decision::Reason;
use crate::ratelimit::Rate;

/// The rate-limit domain keygate's descriptors are sent in.
pub const DOMAIN: &str = "keygate";
/// Descriptor entry holding the key's plan (from `x-keygate-plan`).
pub const PLAN_ENTRY: &str = "plan";
/// Descriptor entry holding the key's id (from `x-keygate-key-id`).
pub const KEY_ENTRY: &str = "key_id";
/// Redis key prefix of the buckets: `keygate:rl:<length of plan>:<plan>:<key_id>` (the
/// length keeps a plan name and a key id that both hold `:` from naming one bucket).
pub const BUCKET_PREFIX: &str = "keygate:rl:";

/// One bucket to take from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Redis key: `keygate:rl:<length of plan>:<plan>:<key_id>`.
    pub key: String,
    /// Plan name.
    pub plan: String,
    /// The plan's rate.
    pub rate: Rate,
    /// Tokens this request takes (its `hits_addend`; 0 means 1).
    pub cost: u64,
}

/// What a descriptor asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<'a> {
    /// Not keygate's (it lacks `plan` or `key_id`, or refunds hits): OK, unlimited.
    Ignored,
    /// keygate's, but its plan is not in the store: OK, unlimited (logged).
    UnknownPlan(&'a str),
    /// Take from this bucket.
    Limited(Bucket),
}

/// The bucket a descriptor is limited by, if any. A descriptor is keygate's when it has
/// both a `plan` and a non-empty `key_id` entry (other entries are ignored; the first of
/// each name counts). Its cost is its own `hits_addend` if set, else the request's; 0
/// means 1.
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
    let Some(rate) = plans.get(plan) else {
        return Selection::UnknownPlan(plan);
    };
    let hits = d
        .hits_addend
        .map(|v| v.value)
        .unwrap_or(u64::from(request_hits));
    Selection::Limited(Bucket {
        key: format!("{BUCKET_PREFIX}{}:{plan}:{key_id}", plan.len()),
        plan: plan.to_string(),
        rate: *rate,
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
    /// Taken from a bucket.
    Limited {
        /// Plan name.
        plan: String,
        /// The plan's rate.
        rate: Rate,
        /// What Redis answered.
        reply: Reply,
    },
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
/// did. The `X-RateLimit-*` headers (and on OVER_LIMIT `Retry-After`, the content type and
/// the filter's own 429 body) are those of the first refused descriptor, else of the
/// limited one with the fewest tokens left; a request with no limited descriptor gets none.
pub fn response(outcomes: &[Outcome]) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = outcomes.iter().map(status).collect();
    let limited = outcomes.iter().filter_map(|o| match o {
        Outcome::Limited { rate, reply, .. } => Some((rate, reply)),
        Outcome::Unlimited => None,
    });
    let refused = limited.clone().find(|(_, reply)| !reply.admitted);
    let shown = refused.or_else(|| limited.min_by_key(|(_, reply)| reply.remaining));
    let mut out = RateLimitResponse {
        overall_code: if refused.is_some() {
            Code::OverLimit
        } else {
            Code::Ok
        } as i32,
        statuses,
        ..RateLimitResponse::default()
    };
    if let Some((rate, reply)) = shown {
        let mut add = |key: &str, value: String| {
            out.response_headers_to_add.push(HeaderValue {
                key: key.into(),
                value,
                ..HeaderValue::default()
            })
        };
        add("x-ratelimit-limit", rate.requests.to_string());
        add("x-ratelimit-remaining", reply.remaining.to_string());
        add("x-ratelimit-reset", reply.reset_s().to_string());
        if !reply.admitted {
            add("retry-after", reply.retry_after_s().to_string());
            add("content-type", "application/json".into());
        }
    }
    if refused.is_some() {
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
        Outcome::Limited { plan, rate, reply } => DescriptorStatus {
            code: if reply.admitted {
                Code::Ok
            } else {
                Code::OverLimit
            } as i32,
            current_limit: Some(RateLimit {
                name: plan.clone(),
                requests_per_unit: u32::try_from(rate.requests).unwrap_or(u32::MAX),
                unit: unit(rate) as i32,
            }),
            limit_remaining: u32::try_from(reply.remaining).unwrap_or(u32::MAX),
            duration_until_reset: Some(duration_ms(reply.reset_ms)),
            ..DescriptorStatus::default()
        },
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
        Plans::from([
            ("free".to_string(), rate(60, 60, 60)),
            ("tiny".to_string(), rate(5, 60, 5)),
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
        let d = descriptor(&[("plan", "tiny"), ("key_id", "k_1")]);
        assert_eq!(
            select(&d, &plans(), 0),
            Selection::Limited(Bucket {
                key: "keygate:rl:4:tiny:k_1".into(),
                plan: "tiny".into(),
                rate: rate(5, 60, 5),
                cost: 1,
            })
        );
    }

    #[test]
    fn plan_and_key_id_never_share_a_bucket_across_colons() {
        let p = Plans::from([
            ("a:b".to_string(), rate(5, 60, 5)),
            ("a".to_string(), rate(5, 60, 5)),
        ]);
        let key = |plan: &str, id: &str| match select(
            &descriptor(&[("plan", plan), ("key_id", id)]),
            &p,
            1,
        ) {
            Selection::Limited(b) => b.key,
            other => panic!("{other:?}"),
        };
        assert_ne!(key("a:b", "c"), key("a", "b:c"));
    }

    #[test]
    fn other_entries_are_ignored_but_both_are_needed() {
        let p = plans();
        let with_extra = descriptor(&[("generic_key", "x"), ("plan", "free"), ("key_id", "a")]);
        assert!(
            matches!(select(&with_extra, &p, 1), Selection::Limited(b) if b.key == "keygate:rl:4:free:a")
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
        let out = response(&[Outcome::Limited {
            plan: "tiny".into(),
            rate: rate(5, 60, 5),
            reply: Reply {
                admitted: true,
                remaining: 4,
                reset_ms: 12_000,
                retry_ms: 0,
            },
        }]);
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
        let out = response(&[
            Outcome::Unlimited,
            Outcome::Limited {
                plan: "tiny".into(),
                rate: rate(5, 60, 5),
                reply: Reply {
                    admitted: false,
                    remaining: 0,
                    reset_ms: 59_500,
                    retry_ms: 11_500,
                },
            },
        ]);
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
        let out = response(&[Outcome::Unlimited]);
        assert_eq!(out.overall_code, Code::Ok as i32);
        assert!(out.response_headers_to_add.is_empty());
        let empty = response(&[]);
        assert_eq!(empty.overall_code, Code::Ok as i32);
    }

    #[test]
    fn headers_come_from_the_tightest_bucket() {
        let limited = |plan: &str, remaining| Outcome::Limited {
            plan: plan.into(),
            rate: rate(100, 60, 100),
            reply: Reply {
                admitted: true,
                remaining,
                reset_ms: 1000,
                retry_ms: 0,
            },
        };
        let out = response(&[limited("a", 50), limited("b", 7), limited("c", 9)]);
        assert_eq!(header(&out, "x-ratelimit-remaining"), Some("7"));
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
