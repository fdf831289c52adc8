//! The plugin configuration: its JSON model, and the validated form the filter runs on.
//!
//! Parsing happens in two stages, so that every error names the field it comes from:
//! serde reads the JSON into [`PluginConfig`] (unknown fields refused), then
//! [`Config::compile`] checks every value and builds the lookup structures.

use crate::ip::CidrSet;
use crate::keys::{self, Digest, KeyIndex};
use crate::path::{self, Forms};
use crate::ratelimit::Rate;
use crate::time;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// The plugin configuration exactly as written in Envoy's `configuration` field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Realm named in the `WWW-Authenticate` header of 401 responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    /// Where to look for the key, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sources: Option<Vec<KeySourceSpec>>,
    /// The accepted keys, by digest.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// Large groups of keys that share one identity, as packed digests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_sets: Vec<KeySetSpec>,
    /// Path rules, first matching prefix wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Remove the headers that carried the key before forwarding (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_credentials: Option<bool>,
    /// Let CORS preflight requests through without a key (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_cors_preflight: Option<bool>,
    /// Rate-limit plans by name, added to (or overriding) the built-in ones. A plan is one
    /// rate, or a list of rates that all apply at once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plans: BTreeMap<String, PlanSpec>,
    /// Plan of keys that name none; without it such keys are not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_plan: Option<String>,
    /// Client IP allow and deny lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_rules: Option<IpRulesSpec>,
    /// Peers whose X-Forwarded-For is believed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// Limit on failed authentications (401s) per client IP; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_auth_limit: Option<RateSpec>,
    /// Rate-limit headers on responses to authenticated requests: `true` or
    /// `"x-ratelimit"` (the default) for X-RateLimit-*, `"ietf"` for the IETF draft's
    /// `RateLimit` and `RateLimit-Policy`, `false` for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_headers: Option<RateLimitHeadersSpec>,
    /// A shared limit follows keygate (Envoy's ratelimit filter and a rate-limit service):
    /// it sends X-RateLimit-* on admitted requests, keygate only on its own 429s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_rate_limit: Option<bool>,
    /// Shape of generated keys, so typos are refused before any lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_format: Option<KeyFormatSpec>,
    /// A path keygate answers itself (GET or HEAD, 200), before any rule: a readiness
    /// probe that fails whenever the filter does not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// Count requests per key id (`keygate_key_requests_total{key_id,...}` and
    /// `keygate_key_last_used_seconds{key_id}`); off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_key_metrics: Option<bool>,
    /// Most key ids each worker defines per-key series for (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_key_metrics_max: Option<u32>,
}

/// The shape of keys `keygate create` generates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFormatSpec {
    /// Prefix before the underscore, e.g. `kg`.
    pub prefix: String,
    /// Refuse keys that claim the prefix but fail the checksum.
    #[serde(default)]
    pub checksum: bool,
}

/// A rate: `requests` per `per`, with a bucket of `burst` (default `requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    /// Requests per period.
    pub requests: u64,
    /// The period.
    pub per: Per,
    /// Bucket capacity; defaults to `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

/// A plan as written: one rate (`{"requests": 60, "per": "minute"}`), or a list of rates
/// that all apply at once (`[{"requests": 60, "per": "minute"}, {"requests": 1000, "per":
/// "day"}]`), each its own bucket: a request needs a token from every one. Each form is
/// written back as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanSpec {
    /// A single rate.
    One(RateSpec),
    /// Several rates at once, at most one per period.
    Several(Vec<RateSpec>),
}

impl PlanSpec {
    /// The plan's rates, in the order written.
    pub fn rates(&self) -> &[RateSpec] {
        match self {
            PlanSpec::One(rate) => std::slice::from_ref(rate),
            PlanSpec::Several(rates) => rates,
        }
    }
}

impl From<RateSpec> for PlanSpec {
    fn from(rate: RateSpec) -> PlanSpec {
        PlanSpec::One(rate)
    }
}

impl Serialize for PlanSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PlanSpec::One(rate) => rate.serialize(s),
            PlanSpec::Several(rates) => rates.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PlanSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PlanSpec, D::Error> {
        struct Plan;
        impl<'de> serde::de::Visitor<'de> for Plan {
            type Value = PlanSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a rate such as {\"requests\": 60, \"per\": \"minute\"}, or a list of rates",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<PlanSpec, A::Error> {
                RateSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PlanSpec::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<PlanSpec, A::Error> {
                Vec::<RateSpec>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(PlanSpec::Several)
            }
        }
        d.deserialize_any(Plan)
    }
}

/// `rate_limit_headers` as written: `true`/`false`, or a style by name. Written back as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitHeadersSpec {
    /// `true` (X-RateLimit-*) or `false` (none).
    Switch(bool),
    /// `"x-ratelimit"`: X-RateLimit-Limit, -Remaining and -Reset (as `true`).
    XRateLimit,
    /// `"ietf"`: `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11).
    Ietf,
}

impl RateLimitHeadersSpec {
    /// The style it asks for.
    pub fn style(self) -> HeaderStyle {
        match self {
            RateLimitHeadersSpec::Switch(false) => HeaderStyle::Off,
            RateLimitHeadersSpec::Switch(true) | RateLimitHeadersSpec::XRateLimit => {
                HeaderStyle::XRateLimit
            }
            RateLimitHeadersSpec::Ietf => HeaderStyle::Ietf,
        }
    }
}

impl From<bool> for RateLimitHeadersSpec {
    fn from(on: bool) -> RateLimitHeadersSpec {
        RateLimitHeadersSpec::Switch(on)
    }
}

impl Serialize for RateLimitHeadersSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RateLimitHeadersSpec::Switch(on) => s.serialize_bool(*on),
            RateLimitHeadersSpec::XRateLimit => s.serialize_str("x-ratelimit"),
            RateLimitHeadersSpec::Ietf => s.serialize_str("ietf"),
        }
    }
}

impl<'de> Deserialize<'de> for RateLimitHeadersSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RateLimitHeadersSpec, D::Error> {
        struct Style;
        impl serde::de::Visitor<'_> for Style {
            type Value = RateLimitHeadersSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false, \"x-ratelimit\" or \"ietf\"")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Self::Value, E> {
                Ok(RateLimitHeadersSpec::Switch(on))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "x-ratelimit" => Ok(RateLimitHeadersSpec::XRateLimit),
                    "ietf" => Ok(RateLimitHeadersSpec::Ietf),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(Style)
    }
}

/// Which rate-limit headers keygate sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// None.
    Off,
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset` of the limit closest to running out.
    XRateLimit,
    /// `RateLimit-Policy` and `RateLimit`, one item per limit
    /// (draft-ietf-httpapi-ratelimit-headers-11).
    Ietf,
}

/// Rate periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day.
    Day,
}

impl Per {
    /// The word written in the configuration: `second`, `minute`, `hour` or `day`.
    pub fn name(self) -> &'static str {
        match self {
            Per::Second => "second",
            Per::Minute => "minute",
            Per::Hour => "hour",
            Per::Day => "day",
        }
    }

    /// Length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Per::Second => 1,
            Per::Minute => 60,
            Per::Hour => 3600,
            Per::Day => 86_400,
        }
    }
}

/// IP allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRulesSpec {
    /// If non-empty, only these clients are admitted. `*` means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// These clients are refused, whatever `allow` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// One place a key may be sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySourceSpec {
    /// Header name (matched case-insensitively).
    pub header: String,
    /// Authorization scheme the value must start with, e.g. `Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
}

/// One configured key: its digest and identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Stable identifier, forwarded as `x-keygate-key-id`.
    pub id: String,
    /// `sha256:<64 lowercase hex>` of the key.
    pub hash: String,
    /// Client (customer) the key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Tenant the key is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Role, e.g. client, miner, admin.
    pub role: String,
    /// Scopes granted to the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// active (default), suspended or revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<KeyStatus>,
    /// RFC 3339 instant after which the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Rate-limit plan; `default_plan` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Client addresses this key may be used from (CIDR blocks); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<String>,
    /// Id of another key in `keys` whose rate-limit budget this key spends instead of
    /// its own: a rotated key's successor shares its predecessor's, so rotating never
    /// gives a client twice the quota. The named key must not share another's itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares_quota_with: Option<String>,
}

/// Many keys with one identity, known only by their digests: the compact form for large
/// key sets (a million `keys` entries cost hundreds of megabytes of JSON per Wasm VM; a
/// million members here cost 21 MB of base64, held as 16 MB).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySetSpec {
    /// Name; a member's id is `<name>:<first 16 hex digits of its digest>`.
    pub name: String,
    /// The first 16 bytes of each member's SHA-256 digest, concatenated and
    /// base64-encoded (standard alphabet, padded), as a list of strings that each hold
    /// whole prefixes.
    #[serde(with = "packed_digests")]
    pub digests: Vec<DigestPrefix>,
    /// Client (customer) the keys belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Tenant the keys are bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Role of every member.
    pub role: String,
    /// Scopes granted to every member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// RFC 3339 instant after which every member is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Rate-limit plan (one bucket per member); `default_plan` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Client addresses the members may be used from; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<String>,
}

/// The first 16 bytes (128 bits) of a SHA-256 digest: how a key-set member is given and
/// held. Finding a key that matches a member's prefix without being the member takes
/// about 2^128 / members guesses (2^108 for a million members), so the other 16 bytes
/// would add nothing but size, to the configuration Envoy keeps copies of and to each
/// Wasm VM (one per worker thread, plus two on Envoy's main thread).
pub type DigestPrefix = [u8; PREFIX_BYTES];

/// Bytes of a digest that identify a key-set member.
pub const PREFIX_BYTES: usize = 16;

/// The first [`PREFIX_BYTES`] bytes of a digest.
pub fn prefix_of(digest: &Digest) -> DigestPrefix {
    let mut p = [0u8; PREFIX_BYTES];
    p.copy_from_slice(&digest[..PREFIX_BYTES]);
    p
}

/// serde for [`KeySetSpec::digests`]: a list of base64 strings, each decoded straight into
/// prefixes as it is read (a parser reading from the host in chunks then never holds more
/// than one string of the list).
mod packed_digests {
    use super::{DigestPrefix, PREFIX_BYTES};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};
    use std::cell::Cell;
    use std::fmt;

    /// Prefixes per string when writing: 16 KiB, 21,848 characters.
    const PER_STRING: usize = 1024;

    pub fn serialize<S: Serializer>(prefixes: &[DigestPrefix], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(prefixes.len().div_ceil(PER_STRING)))?;
        for chunk in prefixes.chunks(PER_STRING) {
            seq.serialize_element(&STANDARD.encode(chunk.concat()))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DigestPrefix>, D::Error> {
        d.deserialize_seq(List)
    }

    std::thread_local! {
        /// Most prefixes the document being read can hold (from its size), or 0.
        static ROOM: Cell<usize> = const { Cell::new(0) };
    }

    /// Runs `parse` on a document of `size` bytes, letting each key set reserve room for
    /// as many prefixes as the document can hold before it decodes the first one.
    /// Reserved and never touched, that room costs address space, not memory; growing by
    /// doubling instead would copy the array and, in Wasm (whose memory never shrinks),
    /// keep both.
    pub(super) fn with_room<T>(size: usize, parse: impl FnOnce() -> T) -> T {
        // Base64 takes at least 64 characters for every 3 prefixes.
        ROOM.with(|room| room.set(size.saturating_mul(3) / 64 + 1));
        let out = parse();
        ROOM.with(|room| room.set(0));
        out
    }

    struct List;

    impl<'de> Visitor<'de> for List {
        type Value = Vec<DigestPrefix>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of base64 strings of concatenated 16-byte SHA-256 digest prefixes")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<DigestPrefix>, A::Error> {
            let mut out = Vec::with_capacity(ROOM.with(Cell::get));
            while seq.next_element_seed(Append(&mut out))?.is_some() {}
            Ok(out)
        }
    }

    /// Decodes one string of the list onto the end of the prefixes read so far.
    struct Append<'a>(&'a mut Vec<DigestPrefix>);

    impl<'de> DeserializeSeed<'de> for Append<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_str(self)
        }
    }

    impl Visitor<'_> for Append<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a base64 string of concatenated 16-byte SHA-256 digest prefixes")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
            decode_into(text, self.0).map_err(E::custom)
        }
    }

    /// 128 base64 characters are exactly 96 bytes, six prefixes: decode chunk by chunk.
    pub(super) fn decode_into(text: &str, out: &mut Vec<DigestPrefix>) -> Result<(), String> {
        const CHUNK: usize = 128;
        let mut buf = [0u8; 96];
        let mut total = 0usize;
        if out.capacity() - out.len() < text.len() / 22 {
            out.reserve(text.len() / 22);
        }
        for (n, chunk) in text.as_bytes().chunks(CHUNK).enumerate() {
            let len = STANDARD.decode_slice(chunk, &mut buf).map_err(|e| {
                format!(
                    "not valid base64 (standard alphabet, padded) near character {}: {e}",
                    n * CHUNK
                )
            })?;
            total += len;
            if !len.is_multiple_of(PREFIX_BYTES) {
                break;
            }
            for prefix in buf[..len].chunks_exact(PREFIX_BYTES) {
                let mut p = [0u8; PREFIX_BYTES];
                p.copy_from_slice(prefix);
                out.push(p);
            }
        }
        if !total.is_multiple_of(PREFIX_BYTES) {
            return Err(format!(
                "decodes to {total} bytes, not a whole number of 16-byte digest prefixes (the first 16 bytes of each SHA-256 digest)"
            ));
        }
        Ok(())
    }
}

/// Lifecycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// Accepted.
    Active,
    /// Temporarily refused with 403.
    Suspended,
    /// Permanently refused with 401.
    Revoked,
}

/// One path rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Path prefix (query string excluded).
    pub prefix: String,
    /// Name of the rule in metrics (the `route` label); the prefix when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// No key needed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// Methods allowed on the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Roles allowed on the route (any one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Scopes the key must all hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
}

/// A configuration error: the field it concerns and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the field, e.g. `keys[2].hash`; `configuration` for the whole document.
    pub path: String,
    /// What is wrong and, where useful, what to write instead.
    pub reason: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Where a key is read from, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    /// Lowercase header name.
    pub header: String,
    /// Scheme the value must carry (compared case-insensitively), if any.
    pub scheme: Option<String>,
}

/// A configured key's identity and state, as the filter uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Key id.
    pub id: String,
    /// Client, if set.
    pub client: Option<String>,
    /// Tenant, if set.
    pub tenant: Option<String>,
    /// Role.
    pub role: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Scopes joined with commas, as forwarded in `x-keygate-scopes`.
    pub scopes_header: String,
    /// Lifecycle state.
    pub status: KeyStatus,
    /// Expiry in Unix seconds.
    pub expires_at: Option<i64>,
    /// Rate limit, if the key has a plan (its own or the default).
    pub limit: Option<Limit>,
    /// Addresses the key may be used from; empty means any.
    pub allowed_ips: CidrSet,
    /// Shared-data name of the key's bucket.
    pub bucket: String,
}

/// A key set, compiled: the identity its members share, and their sorted digest prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    /// The members' identity; its `id` is the set's name and its `bucket` is unused.
    pub identity: Key,
    /// Sorted, distinct.
    pub digests: Vec<DigestPrefix>,
}

impl KeySet {
    /// Whether the set holds this digest.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.holds(&prefix_of(digest))
    }

    fn holds(&self, prefix: &DigestPrefix) -> bool {
        self.digests.binary_search(prefix).is_ok()
    }

    /// A member's id: the set's name and the first 16 hex digits of its digest.
    pub fn member_id(&self, digest: &[u8]) -> String {
        let mut id = String::with_capacity(self.identity.id.len() + 17);
        id.push_str(&self.identity.id);
        id.push(':');
        for b in &digest[..MEMBER_ID_BYTES] {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        id
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";
/// Digest bytes in a key-set member's id (64 bits: no two members of a set may share them).
const MEMBER_ID_BYTES: usize = 8;

/// A key found by its digest: a configured key, or a key-set member whose id and bucket
/// are made from its digest when it is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef<'c> {
    /// Key id, forwarded as `x-keygate-key-id`.
    pub id: Cow<'c, str>,
    /// Shared-data name of the key's bucket.
    pub bucket: Cow<'c, str>,
    /// Identity and state: role, client, tenant, scopes, status, expiry, plan, addresses.
    pub key: &'c Key,
}

/// A plan applied to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Plan name.
    pub plan: String,
    /// The plan's first rate (its only one, unless it has several).
    pub rate: Rate,
    /// Every rate of the plan, shared by all the keys on it.
    pub limits: std::sync::Arc<PlanLimits>,
}

impl Limit {
    /// The plan's rates, in the order written (bucket `i` of a key is [`bucket_name`]`(.., i)`).
    pub fn rates(&self) -> &[Rate] {
        &self.limits.rates
    }
}

/// A compiled plan: its rates and what the IETF headers call them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanLimits {
    /// The rates, in the order written; at most one per period.
    pub rates: Vec<Rate>,
    /// Each rate's policy name as a structured-field string, e.g. `"pro/minute"` (quotes
    /// included), in the `RateLimit` and `RateLimit-Policy` headers.
    pub policy_names: Vec<String>,
    /// The `RateLimit-Policy` value (draft-ietf-httpapi-ratelimit-headers-11, section 3):
    /// one item per rate, `"<plan>/<per>";q=<requests>;w=<period seconds>`, with
    /// `;keygate-burst=<burst>` when the bucket holds more or fewer than `requests`.
    pub policy_header: String,
}

impl PlanLimits {
    /// The limits of plan `plan` with these rates (periods of a second, minute, hour or
    /// day are named so; others by their seconds, e.g. `90s`).
    pub fn new(plan: &str, rates: Vec<Rate>) -> PlanLimits {
        let seconds = |rate: &Rate| rate.period_ns / 1_000_000_000;
        let policy_names: Vec<String> = rates
            .iter()
            .map(|rate| {
                let per = match seconds(rate) {
                    1 => Per::Second.name().to_string(),
                    60 => Per::Minute.name().to_string(),
                    3600 => Per::Hour.name().to_string(),
                    86_400 => Per::Day.name().to_string(),
                    n => format!("{n}s"),
                };
                sf_string(&format!("{plan}/{per}"))
            })
            .collect();
        let items: Vec<String> = rates
            .iter()
            .zip(&policy_names)
            .map(|(rate, name)| {
                let mut item = format!("{name};q={};w={}", rate.requests, seconds(rate));
                if rate.burst != rate.requests {
                    item.push_str(&format!(";keygate-burst={}", rate.burst));
                }
                item
            })
            .collect();
        PlanLimits {
            rates,
            policy_names,
            policy_header: items.join(", "),
        }
    }
}

/// A structured-field String (RFC 9651, section 3.3.3): printable ASCII in double quotes,
/// with `"` and `\` escaped. Plan names are printable ASCII without spaces (see
/// `check_word`); anything else would be replaced by `?`.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

/// Shared-data name of bucket `index` of a plan for the key whose own bucket is `bucket`:
/// the first rate's bucket is the key's own (as for a plan with one rate), the others add
/// `#<index>` (no key id holds `#`, so no two keys' buckets can meet).
pub fn bucket_name(bucket: &str, index: usize) -> Cow<'_, str> {
    if index == 0 {
        Cow::Borrowed(bucket)
    } else {
        Cow::Owned(format!("{bucket}#{index}"))
    }
}

impl Route {
    /// Whether the rule covers `path` (without query). Prefixes match whole path
    /// segments: `/v1/jobs` covers `/v1/jobs` and `/v1/jobs/7`, not `/v1/jobsearch`, so a
    /// public `/healthz` cannot make `/healthz-internal` public. A prefix ending in `/`
    /// covers everything below it.
    pub fn matches(&self, path: &str) -> bool {
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => self.prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// The rules one request is held to, one selection per form of its path and way of
/// comparing (`path::MAX_FORMS` forms x exact/ignoring case); `None` is "no rule covers it".
#[derive(Debug, Clone, Copy, Default)]
pub struct Matched<'c> {
    selections: [Option<&'c Route>; 2 * path::MAX_FORMS],
    len: usize,
}

impl<'c> Matched<'c> {
    fn push(&mut self, rule: Option<&'c Route>) {
        if let Some(slot) = self.selections.get_mut(self.len) {
            *slot = rule;
            self.len += 1;
        }
    }

    /// The rule a request is counted under in metrics: the first restricting rule any
    /// reading of its path selects, else the first public one; `None` when no rule covers it.
    pub fn label_rule(&self) -> Option<&'c Route> {
        let selected = || self.selections[..self.len].iter().flatten().copied();
        selected().find(|r| !r.public).or_else(|| selected().next())
    }

    /// No key needed: every reading of the path lands on a public rule.
    pub fn is_public(&self) -> bool {
        self.len > 0
            && self.selections[..self.len]
                .iter()
                .all(|r| r.is_some_and(|r| r.public))
    }

    /// Rules whose requirements the request must meet, all of them.
    pub fn restricting(&self) -> impl Iterator<Item = &'c Route> + '_ {
        self.selections[..self.len]
            .iter()
            .flatten()
            .copied()
            .filter(|r| !r.public)
    }
}

/// A path rule, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Path prefix.
    pub prefix: String,
    /// Position in the configuration's `routes`.
    pub index: usize,
    /// The `route` label of its metrics: its `name`, or else its prefix.
    pub label: String,
    /// No key needed.
    pub public: bool,
    /// Allowed methods; empty means any.
    pub methods: Vec<String>,
    /// Allowed roles; empty means any.
    pub roles: Vec<String>,
    /// Required scopes; empty means none.
    pub scopes: Vec<String>,
}

/// The validated configuration the filter decides with.
#[derive(Debug)]
pub struct Config {
    /// Realm for `WWW-Authenticate`.
    pub realm: String,
    /// The full `WWW-Authenticate` value sent with every 401.
    pub www_authenticate: String,
    /// Key sources in order.
    pub key_sources: Vec<KeySource>,
    /// Keys, in configuration order.
    pub keys: Vec<Key>,
    /// Digest → position in `keys`.
    pub index: KeyIndex,
    /// Key sets, each with its members' digests sorted.
    pub key_sets: Vec<KeySet>,
    /// Routes in order.
    pub routes: Vec<Route>,
    /// Remove the credential headers before forwarding.
    pub strip_credentials: bool,
    /// Let CORS preflights through without a key.
    pub allow_cors_preflight: bool,
    /// The path keygate answers itself, if any.
    pub health_path: Option<String>,
    /// Clients refused whatever else holds.
    pub deny_ips: CidrSet,
    /// If non-empty, the only clients admitted.
    pub allow_ips: CidrSet,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: CidrSet,
    /// Failed-authentication limit per client IP.
    pub failed_auth_limit: Option<Rate>,
    /// Which rate-limit headers to send.
    pub rate_limit_headers: HeaderStyle,
    /// A shared limit after keygate reports the quota of admitted requests.
    pub shared_rate_limit: bool,
    /// Whether any rule needs the client address (so it is only looked up then).
    pub needs_client_ip: bool,
    /// Prefix whose keys must pass the checksum, when checking is on.
    pub checksum_prefix: Option<String>,
    /// Most key ids given per-key metrics by each worker; `None` when per-key metrics are off.
    pub per_key_metrics: Option<usize>,
}

/// `per_key_metrics_max` when not given.
pub const DEFAULT_PER_KEY_METRICS_MAX: u32 = 1000;
/// Largest `per_key_metrics_max` accepted.
pub const MAX_PER_KEY_METRICS: u32 = 100_000;

/// Largest `requests` or `burst` accepted: far above any real plan, and small enough
/// that bucket arithmetic in nano-tokens never saturates.
pub const MAX_RATE_REQUESTS: u64 = 1_000_000_000;

/// The published plans, present unless the configuration overrides them by name.
pub fn builtin_plans() -> BTreeMap<String, PlanSpec> {
    let plan = |requests| {
        PlanSpec::One(RateSpec {
            requests,
            per: Per::Minute,
            burst: None,
        })
    };
    BTreeMap::from([
        ("free".to_string(), plan(60)),
        ("pro".to_string(), plan(600)),
        ("enterprise".to_string(), plan(6000)),
    ])
}

/// Shared-data name prefix of per-key buckets.
pub const BUCKET_PREFIX: &str = "keygate:bucket:";

/// Realm used when the configuration names none.
pub const DEFAULT_REALM: &str = "keygate";

/// The key sources used when the configuration names none.
pub fn default_key_sources() -> Vec<KeySourceSpec> {
    vec![
        KeySourceSpec {
            header: "x-api-key".into(),
            scheme: None,
        },
        KeySourceSpec {
            header: "authorization".into(),
            scheme: Some("Bearer".into()),
        },
    ]
}

impl Config {
    /// Parses and validates the JSON plugin configuration. Key-set digests move into the
    /// result rather than being copied, so a large set is held once.
    pub fn from_json(json: &[u8]) -> Result<Config, ConfigError> {
        Config::build_owned(PluginConfig::from_json(json)?)
    }

    /// [`Config::from_json`] from a reader; see [`PluginConfig::from_reader`].
    pub fn from_reader(reader: impl std::io::Read, size: usize) -> Result<Config, ConfigError> {
        Config::build_owned(PluginConfig::from_reader(reader, size)?)
    }

    fn build_owned(mut doc: PluginConfig) -> Result<Config, ConfigError> {
        let digests = doc
            .key_sets
            .iter_mut()
            .map(|set| std::mem::take(&mut set.digests))
            .collect();
        Config::build(&doc, digests)
    }

    /// Validates a parsed configuration and builds the lookup structures.
    pub fn compile(doc: &PluginConfig) -> Result<Config, ConfigError> {
        let digests = doc.key_sets.iter().map(|set| set.digests.clone()).collect();
        Config::build(doc, digests)
    }

    /// `compile`, with each key set's digests passed separately (in set order): the first
    /// problem [`Checks`] finds, in the order of the checks.
    fn build(
        doc: &PluginConfig,
        set_digests: Vec<Vec<DigestPrefix>>,
    ) -> Result<Config, ConfigError> {
        let mut checks = Checks::new(Naming::Positional, true);
        match checks.run(doc, set_digests) {
            Some(config) if checks.errors.is_empty() => Ok(config),
            _ => Err(checks
                .errors
                .into_iter()
                .next()
                .unwrap_or_else(|| ConfigError::new("configuration", "invalid configuration"))),
        }
    }

    /// The key with this digest, if it is configured (explicitly or in a key set).
    pub fn find_key(&self, digest: &Digest) -> Option<KeyRef<'_>> {
        if let Some(key) = self.index.get(digest).and_then(|i| self.keys.get(i)) {
            return Some(KeyRef {
                id: Cow::Borrowed(&key.id),
                bucket: Cow::Borrowed(&key.bucket),
                key,
            });
        }
        let set = self.key_sets.iter().find(|s| s.contains(digest))?;
        let id = set.member_id(digest);
        Some(KeyRef {
            bucket: Cow::Owned(format!("{BUCKET_PREFIX}{id}")),
            id: Cow::Owned(id),
            key: &set.identity,
        })
    }

    /// Number of keys, key-set members included.
    pub fn key_count(&self) -> usize {
        self.keys.len() + self.key_sets.iter().map(|s| s.digests.len()).sum::<usize>()
    }

    /// The first route whose prefix matches the path exactly (query string ignored).
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.routes.iter().find(|r| r.matches(path))
    }

    /// The rules a request is held to: for each form of its path (see `path::Forms`),
    /// the first rule that covers it, and the first that covers it ignoring ASCII case.
    pub fn rules_for(&self, forms: &Forms<'_>) -> Matched<'_> {
        let mut matched = Matched::default();
        for form in forms.iter() {
            for ignore_case in [false, true] {
                let rule = self
                    .routes
                    .iter()
                    .find(|r| path::prefix_covers(r.prefix.as_bytes(), form, ignore_case));
                matched.push(rule);
            }
        }
        matched
    }
}

/// Every problem of a plugin configuration, in the order `Config::compile` checks them
/// (its error is the first of these), each naming the element it concerns by its key id,
/// route prefix, key set name or plan name where there is one: `keys["kg_abc"].plan`,
/// `routes["/v1/admin"].roles[0]`, `key_sets["batch"].digests`, `plans["pro"][1].per`
/// (names in JSON string syntax; an element whose name is empty or not unique is named by
/// its position, `keys[3].id`). Empty when the filter would accept the document.
pub fn problems(doc: &PluginConfig) -> Vec<ConfigError> {
    let mut checks = Checks::new(Naming::Named(doc), true);
    let digests = doc.key_sets.iter().map(|set| set.digests.clone()).collect();
    checks.run(doc, digests);
    checks.errors
}

/// [`problems`] with elements named by position, as `Config::compile` names them (its
/// error is the first of these): for tests that the two never drift apart.
#[doc(hidden)]
pub fn problems_by_position(doc: &PluginConfig) -> Vec<ConfigError> {
    let mut checks = Checks::new(Naming::Positional, true);
    let digests = doc.key_sets.iter().map(|set| set.digests.clone()).collect();
    checks.run(doc, digests);
    checks.errors
}

/// [`problems`] of a policy checked on its own, without its keys: the same checks, but a
/// document with no keys is not a problem (a store's policy holds none; its keys are added
/// when the configuration is rendered).
pub fn policy_problems(policy: &PluginConfig) -> Vec<ConfigError> {
    let mut checks = Checks::new(Naming::Named(policy), false);
    let digests = policy
        .key_sets
        .iter()
        .map(|set| set.digests.clone())
        .collect();
    checks.run(policy, digests);
    checks.errors
}

/// How an error names the element it is about.
#[derive(Clone, Copy)]
enum Naming<'d> {
    /// By position: `keys[3]`, `routes[0]`, `key_sets[1]`, `plans.pro` (what
    /// `Config::compile` has always said).
    Positional,
    /// By name where the name is unique: `keys["kg_abc"]`, `routes["/v1"]`,
    /// `key_sets["batch"]`, `plans["pro"]`.
    Named(&'d PluginConfig),
}

/// The checks of a configuration, each written once: `Config::compile` stops at the first
/// problem, [`problems`] collects them all. A check that fails records its problem and the
/// checks go on without the element (so one mistake is reported once, not again by every
/// check that uses the element).
struct Checks<'d> {
    naming: Naming<'d>,
    /// A document must have keys (false when a policy is checked on its own).
    require_keys: bool,
    errors: Vec<ConfigError>,
}

/// `name` in JSON string syntax, for a path.
fn quoted_name(name: &str) -> String {
    serde_json::to_string(name).unwrap_or_else(|_| format!("\"{name}\""))
}

impl<'d> Checks<'d> {
    fn new(naming: Naming<'d>, require_keys: bool) -> Checks<'d> {
        Checks {
            naming,
            require_keys,
            errors: Vec::new(),
        }
    }

    fn fail(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError::new(path, reason));
    }

    /// The name of element `i` of a list whose elements are named by `name`, when that
    /// name is non-empty and held by no other element.
    fn by_name<T>(list: &str, items: &[T], i: usize, name: impl Fn(&T) -> &str) -> String {
        match items.get(i).map(&name) {
            Some(n) if !n.is_empty() && items.iter().filter(|x| name(x) == n).count() == 1 => {
                format!("{list}[{}]", quoted_name(n))
            }
            _ => format!("{list}[{i}]"),
        }
    }

    fn key(&self, i: usize) -> String {
        match self.naming {
            Naming::Positional => format!("keys[{i}]"),
            Naming::Named(doc) => Self::by_name("keys", &doc.keys, i, |k| k.id.as_str()),
        }
    }

    fn key_set(&self, i: usize) -> String {
        match self.naming {
            Naming::Positional => format!("key_sets[{i}]"),
            Naming::Named(doc) => Self::by_name("key_sets", &doc.key_sets, i, |k| k.name.as_str()),
        }
    }

    fn route(&self, i: usize) -> String {
        match self.naming {
            Naming::Positional => format!("routes[{i}]"),
            Naming::Named(doc) => Self::by_name("routes", &doc.routes, i, |r| r.prefix.as_str()),
        }
    }

    fn plan(&self, name: &str) -> String {
        match self.naming {
            Naming::Positional => format!("plans.{name}"),
            Naming::Named(_) => format!("plans[{}]", quoted_name(name)),
        }
    }

    /// Runs every check; the configuration when none failed.
    fn run(&mut self, doc: &PluginConfig, set_digests: Vec<Vec<DigestPrefix>>) -> Option<Config> {
        let realm = doc.realm.clone().unwrap_or_else(|| DEFAULT_REALM.into());
        if realm.is_empty()
            || !realm
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            self.fail(
                "realm",
                "must be non-empty printable ASCII without quotes or backslashes (it is sent in WWW-Authenticate)",
            );
        }

        let key_sources = compile_key_sources(self, doc.key_sources.as_deref());
        let routes = compile_routes(self, &doc.routes);

        let mut plans = builtin_plans();
        for (name, spec) in &doc.plans {
            if let Err(reason) = check_word(name) {
                let path = self.plan(name);
                self.fail(path, reason);
            }
            plans.insert(name.clone(), spec.clone());
        }
        // A plan that fails its checks is still known by name (None), so keys on it are
        // not reported again as naming an unknown plan.
        let mut rates: BTreeMap<String, Option<std::sync::Arc<PlanLimits>>> = BTreeMap::new();
        for (name, spec) in &plans {
            let compiled = compile_plan(self, name, spec);
            rates.insert(name.clone(), compiled.map(std::sync::Arc::new));
        }
        let plan_named = |checks: &mut Checks<'_>, path: String, name: &str| -> Option<Limit> {
            match rates.get(name) {
                Some(Some(limits)) => Some(Limit {
                    plan: name.to_string(),
                    rate: limits.rates.first().copied()?,
                    limits: std::sync::Arc::clone(limits),
                }),
                Some(None) => None,
                None => {
                    checks.fail(
                        path,
                        format!(
                            "unknown plan {name:?}; known plans: {}",
                            rates
                                .keys()
                                .map(String::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    None
                }
            }
        };
        let default_limit = match &doc.default_plan {
            Some(name) => plan_named(self, "default_plan".into(), name),
            None => None,
        };
        let cidrs =
            |checks: &mut Checks<'_>, path: &str, list: &[String]| match CidrSet::parse(list) {
                Ok(set) => set,
                Err((i, reason)) => {
                    checks.fail(format!("{path}[{i}]"), reason);
                    CidrSet::default()
                }
            };
        let rules = doc.ip_rules.clone().unwrap_or_default();
        let allow_ips = cidrs(self, "ip_rules.allow", &rules.allow);
        let deny_ips = cidrs(self, "ip_rules.deny", &rules.deny);
        let trusted_proxies = cidrs(self, "trusted_proxies", &doc.trusted_proxies);
        let failed_auth_limit = match &doc.failed_auth_limit {
            Some(spec) => compile_rate(self, "failed_auth_limit", spec),
            None => None,
        };

        let mut keys: Vec<Option<Key>> = Vec::with_capacity(doc.keys.len());
        let mut index = KeyIndex::with_capacity(doc.keys.len());
        let mut ids = std::collections::HashMap::with_capacity(doc.keys.len());
        let mut key_prefixes = std::collections::HashMap::with_capacity(doc.keys.len());
        for (i, spec) in doc.keys.iter().enumerate() {
            let at = self.key(i);
            let Some((mut key, digest)) = compile_key(self, &at, spec) else {
                // Still known by its id, so that keys naming it are not reported too.
                ids.entry(spec.id.clone()).or_insert(i);
                keys.push(None);
                continue;
            };
            let mut ok = true;
            key.limit = match &spec.plan {
                Some(name) => {
                    let limit = plan_named(self, format!("{at}.plan"), name);
                    ok &= limit.is_some() || rates.contains_key(name.as_str());
                    limit
                }
                None => default_limit.clone(),
            };
            let errors = self.errors.len();
            key.allowed_ips = cidrs(self, &format!("{at}.allowed_ips"), &spec.allowed_ips);
            ok &= self.errors.len() == errors;
            if let Some(first) = ids.insert(key.id.clone(), i) {
                let first = self.key(first);
                self.fail(
                    format!("{at}.id"),
                    format!(
                        "duplicate id {:?} (also {first}.id); ids must be unique",
                        key.id
                    ),
                );
                keys.push(None);
                continue;
            }
            // Key-set members are held by prefix: a key's digest must not share one with them.
            key_prefixes.insert(prefix_of(&digest), i);
            if let Err(first) = index.insert(digest, i) {
                let first = self.key(first);
                self.fail(
                    format!("{at}.hash"),
                    format!("duplicate hash (also {first}.hash); each key must be configured once"),
                );
                ok = false;
            }
            keys.push(ok.then_some(key));
        }
        for (i, spec) in doc.keys.iter().enumerate() {
            let Some(other) = &spec.shares_quota_with else {
                continue;
            };
            let field = format!("{}.shares_quota_with", self.key(i));
            let Some(&j) = ids.get(other.as_str()) else {
                self.fail(field, format!("{other:?} is not the id of a key in keys"));
                continue;
            };
            if j == i {
                self.fail(field, "a key cannot share its own quota");
                continue;
            }
            if doc.keys[j].shares_quota_with.is_some() {
                self.fail(
                    field,
                    format!(
                        "key {other:?} itself shares another key's quota; name the key whose quota it is ({:?})",
                        doc.keys[j].shares_quota_with.as_deref().unwrap_or_default()
                    ),
                );
                continue;
            }
            if let Some(Some(key)) = keys.get_mut(i) {
                key.bucket = format!("{BUCKET_PREFIX}{other}");
            }
        }
        let mut key_sets: Vec<KeySet> = Vec::with_capacity(doc.key_sets.len());
        for (i, (spec, digests)) in doc.key_sets.iter().zip(set_digests).enumerate() {
            let at = self.key_set(i);
            let Some(mut set) =
                compile_key_set(self, &at, spec, digests, &key_prefixes, &ids, &key_sets)
            else {
                continue;
            };
            set.identity.limit = match &spec.plan {
                Some(name) => plan_named(self, format!("{at}.plan"), name),
                None => default_limit.clone(),
            };
            set.identity.allowed_ips = cidrs(self, &format!("{at}.allowed_ips"), &spec.allowed_ips);
            key_sets.push(set);
        }
        let everything_public =
            doc.routes.iter().all(|r| r.public) && doc.routes.iter().any(|r| r.prefix == "/");
        if self.require_keys && doc.keys.is_empty() && doc.key_sets.is_empty() && !everything_public
        {
            self.fail(
                "keys",
                "no keys configured, so every request that needs a key would be refused; add at least one key",
            );
        }

        let checksum_prefix = match &doc.key_format {
            Some(format) => {
                let p = &format.prefix;
                if p.is_empty()
                    || p.len() > 16
                    || !p
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    self.fail(
                        "key_format.prefix",
                        format!(
                            "{p:?} must be 1 to 16 lowercase letters or digits, such as \"kg\""
                        ),
                    );
                }
                format.checksum.then(|| p.clone())
            }
            None => None,
        };
        let health_path = match &doc.health_path {
            Some(p)
                if !p.starts_with('/')
                    || !path::is_normal_form(p.as_bytes())
                    || p.bytes()
                        .any(|b| !(0x21..0x7f).contains(&b) || b == b'?' || b == b'#') =>
            {
                self.fail(
                    "health_path",
                    format!("{p:?} must be a plain path such as \"/keygate/health\": starting with \"/\", visible ASCII, no query, escapes, parameters or dot segments"),
                );
                None
            }
            other => other.clone(),
        };
        let per_key_metrics = match (doc.per_key_metrics, doc.per_key_metrics_max) {
            (_, Some(n)) if !(1..=MAX_PER_KEY_METRICS).contains(&n) => {
                self.fail(
                    "per_key_metrics_max",
                    format!("must be between 1 and {MAX_PER_KEY_METRICS}, got {n}"),
                );
                None
            }
            (Some(true), max) => Some(max.unwrap_or(DEFAULT_PER_KEY_METRICS_MAX) as usize),
            // A cap without per-key metrics is allowed (it is kept for when they are on).
            _ => None,
        };
        if !self.errors.is_empty() {
            return None;
        }
        let keys: Vec<Key> = keys.into_iter().flatten().collect();
        let needs_client_ip = !allow_ips.is_empty()
            || !deny_ips.is_empty()
            || failed_auth_limit.is_some()
            || keys.iter().any(|k| !k.allowed_ips.is_empty())
            || key_sets.iter().any(|s| !s.identity.allowed_ips.is_empty());
        Some(Config {
            deny_ips,
            allow_ips,
            trusted_proxies,
            failed_auth_limit,
            rate_limit_headers: doc
                .rate_limit_headers
                .map_or(HeaderStyle::XRateLimit, RateLimitHeadersSpec::style),
            shared_rate_limit: doc.shared_rate_limit.unwrap_or(false),
            needs_client_ip,
            checksum_prefix,
            per_key_metrics,
            www_authenticate: format!("ApiKey realm=\"{realm}\""),
            realm,
            key_sources,
            keys,
            index,
            key_sets,
            routes,
            strip_credentials: doc.strip_credentials.unwrap_or(true),
            allow_cors_preflight: doc.allow_cors_preflight.unwrap_or(false),
            health_path,
        })
    }
}

const EMPTY_CONFIGURATION: &str =
    "the plugin configuration is empty; it must be a JSON object with at least \"keys\"";

impl PluginConfig {
    /// Reads the JSON document; errors name the offending field.
    pub fn from_json(json: &[u8]) -> Result<PluginConfig, ConfigError> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::new("configuration", EMPTY_CONFIGURATION));
        }
        parse(serde_json::Deserializer::from_slice(json))
    }

    /// Reads the JSON document from `reader` (`size` bytes) without holding it whole:
    /// the filter reads its configuration from the host in chunks this way, so a large key
    /// set is never in memory twice.
    pub fn from_reader(
        reader: impl std::io::Read,
        size: usize,
    ) -> Result<PluginConfig, ConfigError> {
        if size == 0 {
            return Err(ConfigError::new("configuration", EMPTY_CONFIGURATION));
        }
        let reader = std::io::BufReader::with_capacity(64 * 1024, reader);
        packed_digests::with_room(size, || {
            parse(serde_json::Deserializer::from_reader(reader))
        })
    }
}

fn parse<'de, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
) -> Result<PluginConfig, ConfigError> {
    let doc: PluginConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // "." is the document itself; "?" a position serde could not name (e.g. early EOF).
        let path = if path == "." || path == "?" {
            "configuration".to_string()
        } else {
            path
        };
        ConfigError::new(path, e.into_inner().to_string())
    })?;
    de.end()
        .map_err(|e| ConfigError::new("configuration", e.to_string()))?;
    Ok(doc)
}

fn compile_key_sources(checks: &mut Checks<'_>, specs: Option<&[KeySourceSpec]>) -> Vec<KeySource> {
    let defaults;
    let specs = match specs {
        Some(s) => s,
        None => {
            defaults = default_key_sources();
            &defaults
        }
    };
    if specs.is_empty() {
        checks.fail(
            "key_sources",
            "must name at least one header (omit the field for x-api-key and Authorization: Bearer)",
        );
    }
    let mut out: Vec<KeySource> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let errors = checks.errors.len();
        let header = spec.header.to_ascii_lowercase();
        if header.is_empty() || !header.bytes().all(is_tchar) {
            checks.fail(
                format!("key_sources[{i}].header"),
                format!("{:?} is not a valid HTTP header name", spec.header),
            );
        } else if header.starts_with("x-keygate-") {
            checks.fail(
                format!("key_sources[{i}].header"),
                "x-keygate-* headers are set by keygate itself and cannot carry keys",
            );
        }
        if let Some(scheme) = &spec.scheme {
            if scheme.is_empty() || !scheme.bytes().all(is_tchar) {
                checks.fail(
                    format!("key_sources[{i}].scheme"),
                    format!(
                        "{scheme:?} is not a valid authorization scheme name such as \"Bearer\""
                    ),
                );
            }
        }
        if checks.errors.len() != errors {
            continue;
        }
        let source = KeySource {
            header,
            scheme: spec.scheme.clone(),
        };
        if out.contains(&source) {
            checks.fail(format!("key_sources[{i}]"), "duplicate key source");
            continue;
        }
        out.push(source);
    }
    out
}

/// A key's own fields; `at` names it (`keys[3]` or `keys["kg_abc"]`).
fn compile_key(checks: &mut Checks<'_>, at: &str, spec: &KeySpec) -> Option<(Key, Digest)> {
    let field = |name: &str| format!("{at}.{name}");
    let id_ok = !(spec.id.is_empty()
        || spec.id.len() > 128
        || !spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b)));
    if !id_ok {
        checks.fail(
            field("id"),
            format!(
                "{:?} is not a valid key id: use 1 to 128 letters, digits or . _ : @ -",
                spec.id
            ),
        );
    }
    let digest = keys::parse_hash(&spec.hash)
        .map_err(|reason| checks.fail(field("hash"), reason))
        .ok();
    let key = compile_identity(
        checks,
        at,
        &spec.id,
        Identity {
            client: &spec.client,
            tenant: &spec.tenant,
            role: &spec.role,
            scopes: &spec.scopes,
            expires_at: &spec.expires_at,
        },
        spec.status.unwrap_or(KeyStatus::Active),
    );
    match (id_ok, digest, key) {
        (true, Some(digest), Some(key)) => Some((key, digest)),
        _ => None,
    }
}

/// The identity fields a key and a key set have in common.
struct Identity<'a> {
    client: &'a Option<String>,
    tenant: &'a Option<String>,
    role: &'a str,
    scopes: &'a [String],
    expires_at: &'a Option<String>,
}

fn compile_identity(
    checks: &mut Checks<'_>,
    at: &str,
    id: &str,
    identity: Identity<'_>,
    status: KeyStatus,
) -> Option<Key> {
    let errors = checks.errors.len();
    let field = |name: &str| format!("{at}.{name}");
    for (name, value) in [("client", identity.client), ("tenant", identity.tenant)] {
        if let Some(v) = value {
            if let Err(reason) = check_label(v) {
                checks.fail(field(name), reason);
            }
        }
    }
    if let Err(reason) = check_word(identity.role) {
        checks.fail(field("role"), reason);
    }
    for (j, scope) in identity.scopes.iter().enumerate() {
        if let Err(reason) = check_word(scope) {
            checks.fail(format!("{at}.scopes[{j}]"), reason);
        }
    }
    let expires_at = match identity.expires_at {
        Some(s) => match time::parse_rfc3339(s) {
            Ok(t) => Some(t),
            Err(reason) => {
                checks.fail(field("expires_at"), reason);
                None
            }
        },
        None => None,
    };
    if checks.errors.len() != errors {
        return None;
    }
    Some(Key {
        id: id.to_string(),
        client: identity.client.clone(),
        tenant: identity.tenant.clone(),
        role: identity.role.to_string(),
        scopes: identity.scopes.to_vec(),
        scopes_header: identity.scopes.join(","),
        status,
        expires_at,
        limit: None,
        allowed_ips: CidrSet::default(),
        bucket: format!("{BUCKET_PREFIX}{id}"),
    })
}

/// Checks a key set (`at` names it) and sorts its digests; `earlier` are the sets compiled
/// before it.
fn compile_key_set(
    checks: &mut Checks<'_>,
    at: &str,
    spec: &KeySetSpec,
    mut digests: Vec<DigestPrefix>,
    key_prefixes: &std::collections::HashMap<DigestPrefix, usize>,
    ids: &std::collections::HashMap<String, usize>,
    earlier: &[KeySet],
) -> Option<KeySet> {
    let errors = checks.errors.len();
    let name = &spec.name;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
    {
        checks.fail(
            format!("{at}.name"),
            format!("{name:?} is not a valid key set name: use 1 to 64 letters, digits or . _ @ -"),
        );
    } else if let Some(j) = earlier.iter().position(|s| &s.identity.id == name) {
        let other = checks.key_set(j);
        checks.fail(
            format!("{at}.name"),
            format!("duplicate key set name {name:?} (also {other}.name)"),
        );
    } else {
        let member_prefix = format!("{name}:");
        if let Some((id, &j)) = ids.iter().find(|(id, _)| id.starts_with(&member_prefix)) {
            let key = checks.key(j);
            checks.fail(
                format!("{at}.name"),
                format!("{key}.id {id:?} has the form of this set's member ids ({name}:<hex>); rename one of them"),
            );
        }
    }
    let identity = compile_identity(
        checks,
        at,
        name,
        Identity {
            client: &spec.client,
            tenant: &spec.tenant,
            role: &spec.role,
            scopes: &spec.scopes,
            expires_at: &spec.expires_at,
        },
        KeyStatus::Active,
    );
    let field = format!("{at}.digests");
    let digests_ok = check_set_digests(checks, &field, &mut digests, key_prefixes, earlier);
    let mut identity = identity?;
    if !digests_ok || checks.errors.len() != errors {
        return None;
    }
    identity.bucket = String::new();
    Some(KeySet { identity, digests })
}

/// Sorts a key set's digests and checks that each is configured once.
fn check_set_digests(
    checks: &mut Checks<'_>,
    field: &str,
    digests: &mut [DigestPrefix],
    key_prefixes: &std::collections::HashMap<DigestPrefix, usize>,
    earlier: &[KeySet],
) -> bool {
    if digests.is_empty() {
        checks.fail(
            field,
            "no digests: a key set needs at least one (or remove the set)",
        );
        return false;
    }
    digests.sort_unstable();
    for pair in digests.windows(2) {
        if pair[0] == pair[1] {
            checks.fail(
                field,
                format!(
                    "the digest {}... appears twice (members are told apart by their first {PREFIX_BYTES} bytes); each key must be configured once",
                    hex_digest(&pair[0])
                ),
            );
            return false;
        }
        if pair[0][..MEMBER_ID_BYTES] == pair[1][..MEMBER_ID_BYTES] {
            checks.fail(
                field,
                format!(
                    "two digests begin with the same {MEMBER_ID_BYTES} bytes ({}...), so their member ids would collide; move one of them to keys",
                    &hex_digest(&pair[0])[..2 * MEMBER_ID_BYTES]
                ),
            );
            return false;
        }
    }
    for d in digests.iter() {
        if let Some(&j) = key_prefixes.get(d) {
            let key = checks.key(j);
            checks.fail(
                field,
                format!(
                    "the digest {}... is also {key}.hash (members are told apart by their first {PREFIX_BYTES} bytes); each key must be configured once",
                    hex_digest(d)
                ),
            );
            return false;
        }
        if let Some(j) = earlier.iter().position(|s| s.holds(d)) {
            let set = checks.key_set(j);
            checks.fail(
                field,
                format!(
                    "the digest {}... is also in {set}; each key must be configured once",
                    hex_digest(d)
                ),
            );
            return false;
        }
    }
    true
}

fn hex_digest(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A plan's rates: one, or a non-empty list with at most one rate per period.
fn compile_plan(checks: &mut Checks<'_>, name: &str, spec: &PlanSpec) -> Option<PlanLimits> {
    let at = checks.plan(name);
    let errors = checks.errors.len();
    let specs = spec.rates();
    let mut rates = Vec::with_capacity(specs.len());
    match spec {
        PlanSpec::One(rate) => rates.extend(compile_rate(checks, &at, rate)),
        PlanSpec::Several(list) => {
            if list.is_empty() {
                checks.fail(
                    at.clone(),
                    "an empty list of rates: give at least one, e.g. [{\"requests\": 60, \"per\": \"minute\"}]",
                );
            }
            for (i, rate) in list.iter().enumerate() {
                let path = format!("{at}[{i}]");
                if let Some(j) = list[..i].iter().position(|r| r.per == rate.per) {
                    checks.fail(
                        format!("{path}.per"),
                        format!(
                            "a second rate per {} (also {at}[{j}]); a plan has at most one rate per period: combine them into one, with a burst if needed",
                            rate.per.name()
                        ),
                    );
                    continue;
                }
                rates.extend(compile_rate(checks, &path, rate));
            }
        }
    }
    (checks.errors.len() == errors).then(|| PlanLimits::new(name, rates))
}

fn compile_rate(checks: &mut Checks<'_>, path: &str, spec: &RateSpec) -> Option<Rate> {
    let in_range = |v: u64| (1..=MAX_RATE_REQUESTS).contains(&v);
    if !in_range(spec.requests) {
        checks.fail(
            format!("{path}.requests"),
            format!(
                "must be between 1 and {MAX_RATE_REQUESTS}, got {}",
                spec.requests
            ),
        );
        return None;
    }
    let burst = spec.burst.unwrap_or(spec.requests);
    if !in_range(burst) {
        checks.fail(
            format!("{path}.burst"),
            format!("must be between 1 and {MAX_RATE_REQUESTS}, got {burst}"),
        );
        return None;
    }
    Some(Rate {
        requests: spec.requests,
        period_ns: spec.per.seconds() * 1_000_000_000,
        burst,
    })
}

fn compile_routes(checks: &mut Checks<'_>, specs: &[RouteSpec]) -> Vec<Route> {
    let mut routes: Vec<Route> = Vec::with_capacity(specs.len());
    let mut reachable: Vec<Route> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let here = checks.route(i);
        let at = |name: &str| format!("{here}.{name}");
        if !spec.prefix.starts_with('/')
            || spec
                .prefix
                .bytes()
                .any(|b| b <= b' ' || b == b'?' || b == 0x7f)
        {
            checks.fail(
                at("prefix"),
                format!(
                    "{:?} must start with \"/\" and contain no spaces, control characters or \"?\"",
                    spec.prefix
                ),
            );
            continue;
        }
        if !path::is_normal_form(spec.prefix.as_bytes()) {
            checks.fail(
                at("prefix"),
                format!(
                    "{:?} is not a path as upstreams route it: write it decoded, without \"%\" escapes, \";\" parameters, \"\\\", repeated slashes or \".\" and \"..\" segments",
                    spec.prefix
                ),
            );
            continue;
        }
        // Every earlier route with a valid prefix, whatever else is wrong with it.
        let covering = reachable
            .iter()
            .find(|r| r.matches(&spec.prefix))
            .map(|r| (r.index, r.prefix.clone()));
        reachable.push(Route {
            prefix: spec.prefix.clone(),
            index: i,
            label: String::new(),
            public: false,
            methods: Vec::new(),
            roles: Vec::new(),
            scopes: Vec::new(),
        });
        if let Some((j, earlier)) = covering {
            let other = checks.route(j);
            checks.fail(
                at("prefix"),
                format!(
                    "{:?} is never reached: {other} ({earlier:?}) matches every such path first; put the longer prefix first",
                    spec.prefix
                ),
            );
            continue;
        }
        let errors = checks.errors.len();
        let list = |checks: &mut Checks<'_>,
                    name: &str,
                    values: &Option<Vec<String>>,
                    check: fn(&str) -> Result<(), String>| {
            let Some(values) = values else {
                return Vec::new();
            };
            if values.is_empty() {
                checks.fail(
                    at(name),
                    "must not be empty; omit the field to place no requirement",
                );
            }
            for (j, v) in values.iter().enumerate() {
                if let Err(reason) = check(v) {
                    checks.fail(format!("{here}.{name}[{j}]"), reason);
                }
            }
            values.clone()
        };
        let label = match &spec.name {
            Some(name) => {
                if let Err(reason) = check_route_name(name) {
                    checks.fail(at("name"), reason);
                } else if let Some(j) = routes.iter().find(|r| &r.label == name).map(|r| r.index) {
                    let other = checks.route(j);
                    checks.fail(
                        at("name"),
                        format!(
                            "duplicate name {name:?} (also {other}.name); names must be unique"
                        ),
                    );
                }
                name.clone()
            }
            None => spec.prefix.clone(),
        };
        let methods = list(checks, "methods", &spec.methods, check_method);
        let roles = list(checks, "roles", &spec.roles, check_word);
        let scopes = list(checks, "scopes", &spec.scopes, check_word);
        if spec.public && !(methods.is_empty() && roles.is_empty() && scopes.is_empty()) {
            checks.fail(
                here.clone(),
                "a public route needs no key, so it cannot also require methods, roles or scopes",
            );
        }
        if checks.errors.len() != errors {
            continue;
        }
        routes.push(Route {
            prefix: spec.prefix.clone(),
            index: i,
            label,
            public: spec.public,
            methods,
            roles,
            scopes,
        });
    }
    routes
}

/// A route's metric name: 1 to 64 of `[A-Za-z0-9_-]`, and not `none` (the label of
/// requests no rule covers).
fn check_route_name(v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 64
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "{v:?} is not a valid route name: use 1 to 64 letters, digits, _ or -"
        ));
    }
    if v == crate::metrics::NO_ROUTE {
        return Err(format!(
            "{v:?} is reserved: it labels the requests no rule covers"
        ));
    }
    Ok(())
}

// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Roles and scopes: forwarded comma-separated, so no commas or spaces.
fn check_word(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 128 || !v.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',') {
        return Err(format!(
            "{v:?} must be 1 to 128 printable ASCII characters without spaces or commas"
        ));
    }
    Ok(())
}

/// Client and tenant names: forwarded as header values.
fn check_label(v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 256
        || v.starts_with(' ')
        || v.ends_with(' ')
        || !v.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(format!(
            "{v:?} must be 1 to 256 printable ASCII characters without leading or trailing spaces"
        ));
    }
    Ok(())
}

fn check_method(v: &str) -> Result<(), String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{v:?} is not an HTTP method in upper case, such as \"POST\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
