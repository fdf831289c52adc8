//! The key store behind the `keygate` tool: key hashes with their metadata and the
//! policy, in one JSON file that never holds a plaintext key.
//!
//! The filter's configuration is rendered from the store and checked with the filter's
//! own [`Config::compile`] before anything is written, so the tool cannot produce a store
//! or a configuration the filter would refuse. Changes go through [`update`]: an
//! exclusive lock on a sidecar file, then read, change, validate, and an atomic replace
//! (temp file, fsync, rename, fsync of the directory), so concurrent commands never lose
//! a change and a crash leaves either the old store or the new one.
//!
//! The store, its lock file and its temp files are owner-only (0600) whatever the umask:
//! the store holds the digests of imported legacy keys, which may be guessable. The ECDS
//! file keeps the usual mode, since Envoy may run as another user (uid 101 in the
//! official image).

use crate::config::{
    self, Config, ConfigError, KeyFormatSpec, KeySpec, KeyStatus, Per, PluginConfig, RateSpec,
};
use crate::{keys, time};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Store file used when neither `--store` nor `KEYGATE_STORE` names one.
pub const DEFAULT_STORE: &str = "keygate.json";
/// Where `make build` puts the filter; the default `envoy.wasm`.
pub const DEFAULT_WASM: &str = "target/wasm32-wasip1/release/keygate.wasm";
/// Key prefix used when the policy has no `key_format`.
pub const DEFAULT_PREFIX: &str = "kg";
/// The store format this tool reads and writes.
pub const VERSION: u32 = 1;
/// Characters of a key kept in the store to recognise it by.
pub const PREFIX_CHARS: usize = 8;

/// Why a store operation failed; displayed as the text after `keygate: `.
#[derive(Debug)]
pub enum Error {
    /// The rendered configuration is one the filter would refuse.
    Invalid(ConfigError),
    /// Anything else, as a sentence.
    Other(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The filter's own sentence, so the tool and Envoy's log read alike.
            Error::Invalid(e) => write!(f, "invalid configuration: {e}"),
            Error::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Invalid(e)
    }
}

fn other(msg: impl Into<String>) -> Error {
    Error::Other(msg.into())
}

fn io_error(action: &str, path: &Path, e: io::Error) -> Error {
    other(format!("cannot {action} {}: {e}", path.display()))
}

/// The store document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// Format version, [`VERSION`].
    pub version: u32,
    /// Where `apply` writes, and the filter binary the ECDS resource names.
    #[serde(default)]
    pub envoy: EnvoyTargets,
    /// Every plugin setting but the keys, which are rendered from `keys`.
    #[serde(serialize_with = "policy_without_keys")]
    pub policy: PluginConfig,
    /// The keys, in configuration order.
    #[serde(default)]
    pub keys: Vec<StoredKey>,
}

/// The files the ECDS rendering concerns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyTargets {
    /// ECDS file Envoy watches; relative paths are from the store's directory.
    #[serde(default)]
    pub ecds: Option<String>,
    /// The filter's `.wasm`, as Envoy will open it (relative to Envoy's working directory).
    #[serde(default)]
    pub wasm: Option<String>,
}

/// One key: its hash, identity and lifecycle; never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// Stable id, forwarded by the filter as `x-keygate-key-id`.
    pub id: String,
    /// Human name for lists.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// First [`PREFIX_CHARS`] characters of the key, to recognise it by.
    pub prefix: String,
    /// `sha256:<hex>` of the key.
    pub hash: String,
    /// Client (customer) name.
    #[serde(default)]
    pub client: Option<String>,
    /// Tenant the key is bound to.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Role.
    pub role: String,
    /// Scopes granted.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Rate-limit plan; the policy's `default_plan` when absent.
    #[serde(default)]
    pub plan: Option<String>,
    /// Lifecycle state as configured (expiry is separate).
    pub status: KeyStatus,
    /// Client addresses the key may be used from; any when empty.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// When the key was created or imported (RFC 3339 UTC).
    pub created_at: String,
    /// When the key stops working (RFC 3339).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// When the key was revoked (RFC 3339 UTC).
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// A key's state at a given time: its status, or `Expired` once `expires_at` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Accepted.
    Active,
    /// Refused with 403 until reactivated.
    Suspended,
    /// Refused with 401 for good.
    Revoked,
    /// Past its expiry: refused with 401.
    Expired,
}

impl State {
    /// The word shown in lists.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Suspended => "suspended",
            State::Revoked => "revoked",
            State::Expired => "expired",
        }
    }
}

impl StoredKey {
    /// The key's state at `now` (Unix seconds), in the filter's order: revoked before
    /// expired before suspended.
    pub fn state(&self, now: i64) -> State {
        let expired = self
            .expires_at
            .as_deref()
            .and_then(|s| time::parse_rfc3339(s).ok())
            .is_some_and(|t| now >= t);
        match self.status {
            KeyStatus::Revoked => State::Revoked,
            _ if expired => State::Expired,
            KeyStatus::Suspended => State::Suspended,
            KeyStatus::Active => State::Active,
        }
    }

    /// The plan the filter applies: the key's own, else the policy's default.
    pub fn effective_plan<'a>(&'a self, policy: &'a PluginConfig) -> Option<&'a str> {
        self.plan.as_deref().or(policy.default_plan.as_deref())
    }

    fn spec(&self) -> KeySpec {
        KeySpec {
            id: self.id.clone(),
            hash: self.hash.clone(),
            client: self.client.clone(),
            tenant: self.tenant.clone(),
            role: self.role.clone(),
            scopes: self.scopes.clone(),
            status: (self.status != KeyStatus::Active).then_some(self.status),
            expires_at: self.expires_at.clone(),
            plan: self.plan.clone(),
            allowed_ips: self.allowed_ips.clone(),
        }
    }
}

fn policy_without_keys<S: Serializer>(policy: &PluginConfig, s: S) -> Result<S::Ok, S::Error> {
    let mut value = serde_json::to_value(policy).map_err(serde::ser::Error::custom)?;
    if let Some(fields) = value.as_object_mut() {
        fields.remove("keys");
    }
    value.serialize(s)
}

/// What a new key (created, rotated or imported) is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKey {
    /// Name shown in lists.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Role.
    pub role: String,
    /// Plan; the default plan when `None`.
    pub plan: Option<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// Client.
    pub client: Option<String>,
    /// Expiry in Unix seconds.
    pub expires_at: Option<i64>,
    /// Addresses the key may be used from.
    pub allowed_ips: Vec<String>,
}

/// A key just made: shown once, then only its hash remains.
#[derive(Debug, Clone)]
pub struct Created {
    /// The stored record.
    pub record: StoredKey,
    /// The plaintext key.
    pub key: String,
}

/// A status change asked of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// To revoked, for good.
    Revoke,
    /// Active to suspended.
    Suspend,
    /// Suspended to active.
    Reactivate,
}

/// The outcome of a [`Transition`].
#[derive(Debug, Clone)]
pub struct Changed {
    /// The key after the change.
    pub record: StoredKey,
    /// False when the key was already in the wanted state.
    pub changed: bool,
}

/// The outcome of a rotation.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The new key.
    pub new: Created,
    /// The old key, with its shortened expiry.
    pub old: StoredKey,
}

/// One key read from an import list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportLine {
    /// 1-based line number in the input.
    pub line: usize,
    /// The plaintext key.
    pub key: String,
}

/// A key an import left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based line number in the input.
    pub line: usize,
    /// First characters of the key.
    pub prefix: String,
    /// The id of the key already holding that hash.
    pub existing_id: String,
}

/// The outcome of an import.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Keys added, with the line each came from.
    pub added: Vec<(usize, StoredKey)>,
    /// Duplicates left out.
    pub skipped: Vec<Skipped>,
}

/// How many keys are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Active and unexpired.
    pub active: usize,
    /// Suspended and unexpired.
    pub suspended: usize,
    /// Revoked.
    pub revoked: usize,
    /// Expired and not revoked.
    pub expired: usize,
}

/// The plugin configuration rendered from a store, with its compiled form.
#[derive(Debug)]
pub struct Rendered {
    /// The JSON model, as Envoy receives it.
    pub plugin: PluginConfig,
    /// The filter's compiled view of it.
    pub config: Config,
}

impl Store {
    /// A fresh store with the default policy: built-in plans, `free` by default,
    /// checksummed keys with `prefix`, and a failed-authentication limit.
    pub fn new(ecds: Option<String>, wasm: String, prefix: String) -> Store {
        Store {
            version: VERSION,
            envoy: EnvoyTargets {
                ecds,
                wasm: Some(wasm),
            },
            policy: PluginConfig {
                plans: config::builtin_plans(),
                default_plan: Some("free".into()),
                key_format: Some(KeyFormatSpec {
                    prefix,
                    checksum: true,
                }),
                failed_auth_limit: Some(RateSpec {
                    requests: 20,
                    per: Per::Minute,
                    burst: None,
                }),
                ..PluginConfig::default()
            },
            keys: Vec::new(),
        }
    }

    /// The plugin configuration, validated with the filter's own rules.
    pub fn render(&self) -> Result<Rendered, Error> {
        self.check_metadata()?;
        let mut plugin = self.policy.clone();
        plugin.keys = self.keys.iter().map(StoredKey::spec).collect();
        let config = Config::compile(&plugin)?;
        Ok(Rendered { plugin, config })
    }

    /// Everything a store must satisfy to be written. A store without keys yet (just
    /// initialised) renders a configuration the filter refuses, so its policy is checked
    /// with a stand-in key instead.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.keys.is_empty() {
            return self.render().map(drop);
        }
        self.check_metadata()?;
        let mut plugin = self.policy.clone();
        plugin.keys = vec![KeySpec {
            id: "policy-check".into(),
            hash: keys::hash_string(b"policy-check-stand-in"),
            client: None,
            tenant: None,
            role: "policy-check".into(),
            scopes: Vec::new(),
            status: None,
            expires_at: None,
            plan: None,
            allowed_ips: Vec::new(),
        }];
        Config::compile(&plugin)?;
        Ok(())
    }

    /// What the filter does not check but the store relies on.
    fn check_metadata(&self) -> Result<(), Error> {
        let bad = |path: String, reason: String| other(format!("invalid store: {path}: {reason}"));
        if self.version != VERSION {
            return Err(bad(
                "version".into(),
                format!("this keygate reads version {VERSION}, not {}", self.version),
            ));
        }
        if !self.policy.keys.is_empty() {
            return Err(bad(
                "policy.keys".into(),
                "keys belong in the store's top-level \"keys\" list (keygate create or keygate import), not in the policy".into(),
            ));
        }
        for (i, key) in self.keys.iter().enumerate() {
            let at = |field: &str| format!("keys[{i}].{field}");
            check_text(&key.name, 200).map_err(|r| bad(at("name"), r))?;
            if let Some(d) = &key.description {
                check_text(d, 2000).map_err(|r| bad(at("description"), r))?;
            }
            check_text(&key.prefix, PREFIX_CHARS).map_err(|r| bad(at("prefix"), r))?;
            time::parse_rfc3339(&key.created_at).map_err(|r| bad(at("created_at"), r))?;
            if let Some(t) = &key.revoked_at {
                time::parse_rfc3339(t).map_err(|r| bad(at("revoked_at"), r))?;
            }
        }
        Ok(())
    }

    /// The ECDS resource Envoy watches, wrapping the rendered plugin configuration.
    pub fn ecds_document(&self, plugin: &PluginConfig) -> Result<serde_json::Value, Error> {
        let wasm = self.envoy.wasm.as_deref().ok_or_else(|| {
            other("the store names no filter binary (envoy.wasm); set it with keygate init --wasm PATH")
        })?;
        let value = serde_json::to_string(plugin)
            .map_err(|e| other(format!("cannot serialise the configuration: {e}")))?;
        Ok(serde_json::json!({
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": "keygate",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": {
                        "name": "keygate",
                        "root_id": "keygate",
                        "fail_open": false,
                        "vm_config": {
                            "vm_id": "keygate",
                            "runtime": "envoy.wasm.runtime.v8",
                            "code": {"local": {"filename": wasm}},
                        },
                        "configuration": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": value,
                        },
                    },
                },
            }],
        }))
    }

    /// The key with this id.
    pub fn find(&self, id: &str) -> Result<&StoredKey, Error> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| other(format!("no key with id {id:?}; keygate list shows the ids")))
    }

    fn find_mut(&mut self, id: &str) -> Result<&mut StoredKey, Error> {
        self.keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| other(format!("no key with id {id:?}; keygate list shows the ids")))
    }

    /// Counts keys by state at `now`.
    pub fn counts(&self, now: i64) -> Counts {
        let mut c = Counts::default();
        for key in &self.keys {
            match key.state(now) {
                State::Active => c.active += 1,
                State::Suspended => c.suspended += 1,
                State::Revoked => c.revoked += 1,
                State::Expired => c.expired += 1,
            }
        }
        c
    }

    fn key_prefix(&self) -> &str {
        self.policy
            .key_format
            .as_ref()
            .map_or(DEFAULT_PREFIX, |f| f.prefix.as_str())
    }

    fn new_id(&self) -> Result<String, Error> {
        loop {
            let id = format!("k_{}", hex(&random::<6>()?));
            if !self.keys.iter().any(|k| k.id == id) {
                return Ok(id);
            }
        }
    }

    fn add(&mut self, new: &NewKey, key: &str, now: i64) -> Result<StoredKey, Error> {
        check_text(&new.name, 200).map_err(|r| other(format!("--name: {r}")))?;
        if let Some(d) = &new.description {
            check_text(d, 2000).map_err(|r| other(format!("--description: {r}")))?;
        }
        if let Some(t) = new.expires_at.filter(|&t| t <= now) {
            return Err(other(format!(
                "the expiry {} is not in the future",
                time::format_rfc3339(t)
            )));
        }
        let record = StoredKey {
            id: self.new_id()?,
            name: new.name.clone(),
            description: new.description.clone(),
            prefix: key.chars().take(PREFIX_CHARS).collect(),
            hash: keys::hash_string(key.as_bytes()),
            client: new.client.clone(),
            tenant: new.tenant.clone(),
            role: new.role.clone(),
            scopes: new.scopes.clone(),
            plan: new.plan.clone(),
            status: KeyStatus::Active,
            allowed_ips: new.allowed_ips.clone(),
            created_at: time::format_rfc3339(now),
            expires_at: new.expires_at.map(time::format_rfc3339),
            revoked_at: None,
        };
        self.keys.push(record.clone());
        Ok(record)
    }

    /// Generates a key and adds its hash; the plaintext is returned, never stored.
    pub fn create(&mut self, new: &NewKey, now: i64) -> Result<Created, Error> {
        let key = keys::format_key(self.key_prefix(), &random::<{ keys::RANDOM_BYTES }>()?);
        let record = self.add(new, &key, now)?;
        Ok(Created { record, key })
    }

    /// Revokes, suspends or reactivates a key. Revocation is final.
    pub fn transition(&mut self, id: &str, to: Transition, now: i64) -> Result<Changed, Error> {
        let key = self.find_mut(id)?;
        let changed = match (to, key.status) {
            (Transition::Revoke, KeyStatus::Revoked)
            | (Transition::Suspend, KeyStatus::Suspended)
            | (Transition::Reactivate, KeyStatus::Active) => false,
            (Transition::Suspend | Transition::Reactivate, KeyStatus::Revoked) => {
                return Err(other(format!(
                    "key {id} is revoked, and revocation is permanent; create a new key instead"
                )))
            }
            (Transition::Revoke, _) => {
                key.status = KeyStatus::Revoked;
                key.revoked_at = Some(time::format_rfc3339(now));
                true
            }
            (Transition::Suspend, _) => {
                key.status = KeyStatus::Suspended;
                true
            }
            (Transition::Reactivate, _) => {
                key.status = KeyStatus::Active;
                true
            }
        };
        Ok(Changed {
            record: key.clone(),
            changed,
        })
    }

    /// Issues a new key with the old one's identity; the old key keeps working for
    /// `grace_s` seconds (or until its own expiry, if sooner).
    pub fn rotate(
        &mut self,
        id: &str,
        grace_s: i64,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<Rotated, Error> {
        let old = self.find(id)?.clone();
        match old.status {
            KeyStatus::Revoked => {
                return Err(other(format!(
                    "key {id} is revoked; create a new key instead of rotating it"
                )))
            }
            KeyStatus::Suspended => {
                return Err(other(format!(
                    "key {id} is suspended; reactivate it first, so rotation does not lift the suspension"
                )))
            }
            KeyStatus::Active => {}
        }
        let name = if old.name.ends_with(" (rotated)") {
            old.name.clone()
        } else {
            format!("{} (rotated)", old.name)
        };
        let new = NewKey {
            name,
            description: old.description.clone(),
            role: old.role.clone(),
            plan: old.plan.clone(),
            scopes: old.scopes.clone(),
            tenant: old.tenant.clone(),
            client: old.client.clone(),
            expires_at,
            allowed_ips: old.allowed_ips.clone(),
        };
        let created = self.create(&new, now)?;
        let grace_end = now.saturating_add(grace_s);
        let old = self.find_mut(id)?;
        let current = old
            .expires_at
            .as_deref()
            .and_then(|s| time::parse_rfc3339(s).ok());
        if current.is_none_or(|t| t > grace_end) {
            old.expires_at = Some(time::format_rfc3339(grace_end));
        }
        Ok(Rotated {
            new: created,
            old: old.clone(),
        })
    }

    /// Adds the hashes of existing keys; keys already in the store are skipped.
    pub fn import(
        &mut self,
        lines: &[ImportLine],
        template: &NewKey,
        name_prefix: &str,
        now: i64,
    ) -> Result<Imported, Error> {
        let mut out = Imported {
            added: Vec::new(),
            skipped: Vec::new(),
        };
        for item in lines {
            let hash = keys::hash_string(item.key.as_bytes());
            if let Some(existing) = self.keys.iter().find(|k| k.hash == hash) {
                out.skipped.push(Skipped {
                    line: item.line,
                    prefix: keys::log_prefix(item.key.as_bytes()),
                    existing_id: existing.id.clone(),
                });
                continue;
            }
            let new = NewKey {
                name: format!("{name_prefix}-{}", out.added.len() + 1),
                ..template.clone()
            };
            let record = self.add(&new, &item.key, now)?;
            out.added.push((item.line, record));
        }
        Ok(out)
    }
}

/// Reads an import list: one key per line, blank lines and `#` comments ignored, and
/// env-file lines such as `CLIENT_API_KEYS=a,b,c` (quotes allowed) split on commas.
/// Keys that the filter would refuse, under `checksum_prefix` too, fail with their
/// line number.
pub fn parse_import(text: &str, checksum_prefix: Option<&str>) -> Result<Vec<ImportLine>, Error> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let mut value = raw.trim();
        if value.is_empty() || value.starts_with('#') {
            continue;
        }
        value = strip_env_name(value);
        for quote in ['"', '\''] {
            if let Some(inner) = value
                .strip_prefix(quote)
                .and_then(|v| v.strip_suffix(quote))
            {
                value = inner;
            }
        }
        for key in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            if !keys::well_formed(key.as_bytes()) {
                return Err(other(format!(
                    "line {line}: {:?}... is not a key: keys are {} to {} characters without control characters; nothing was imported",
                    keys::log_prefix(key.as_bytes()),
                    keys::MIN_KEY_CHARS,
                    keys::MAX_KEY_CHARS
                )));
            }
            if let Some(prefix) = checksum_prefix {
                if keys::checksum_holds(prefix, key.as_bytes()) == Some(false) {
                    return Err(other(format!(
                        "line {line}: {:?}... claims the {prefix:?} prefix but fails its checksum, so the filter would refuse it; nothing was imported",
                        keys::log_prefix(key.as_bytes())
                    )));
                }
            }
            out.push(ImportLine {
                line,
                key: key.to_string(),
            });
        }
    }
    if out.is_empty() {
        return Err(other("no keys on standard input; nothing was imported"));
    }
    Ok(out)
}

/// Removes a leading `NAME=`. Base64 keys may end in `=` padding, which is not a name:
/// only an identifier followed by `=` and something other than more `=` counts.
fn strip_env_name(value: &str) -> &str {
    let Some((name, rest)) = value.split_once('=') else {
        return value;
    };
    let identifier = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if identifier && rest.bytes().any(|b| b != b'=') {
        rest.trim()
    } else {
        value
    }
}

/// Parses a duration such as `90d`, `24h`, `30m` or `3600s` into seconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not a duration such as 90d, 24h, 30m or 3600s");
    let split = s.len().checked_sub(1).ok_or_else(bad)?;
    let (digits, unit) = (
        s.get(..split).ok_or_else(bad)?,
        s.get(split..).ok_or_else(bad)?,
    );
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    // A hundred years is far beyond any key's life and keeps timestamps in range.
    n.checked_mul(unit)
        .filter(|&secs| secs <= 100 * 366 * 86_400)
        .ok_or_else(|| format!("{s:?} is too long; at most 100 years"))
}

/// The current time in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn check_text(value: &str, max_chars: usize) -> Result<(), String> {
    let chars = value.chars().count();
    if chars == 0 || chars > max_chars || value.chars().any(char::is_control) {
        return Err(format!(
            "{value:?} must be 1 to {max_chars} characters without control characters"
        ));
    }
    Ok(())
}

fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| {
        other(format!(
            "cannot read the system's random number generator: {e}"
        ))
    })?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads and parses the store; errors name the offending field.
pub fn load(path: &Path) -> Result<Store, Error> {
    let bytes = fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            other(format!(
                "no store at {}; create one with keygate init (or name another with --store or KEYGATE_STORE)",
                path.display()
            ))
        } else {
            io_error("read", path, e)
        }
    })?;
    let invalid = |at: String, e: &dyn fmt::Display| {
        let at = if at == "." || at == "?" {
            String::new()
        } else {
            format!("{at}: ")
        };
        other(format!("invalid store {}: {at}{e}", path.display()))
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let store: Store = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| invalid(e.path().to_string(), e.inner()))?;
    de.end().map_err(|e| invalid(String::new(), &e))?;
    Ok(store)
}

/// Reads a policy file for `init --policy`: a plugin configuration without keys, parsed
/// by the filter's own rules (validation follows when the store is created).
pub fn read_policy(path: &Path) -> Result<PluginConfig, Error> {
    let bytes = fs::read(path).map_err(|e| io_error("read", path, e))?;
    PluginConfig::from_json(&bytes)
        .map_err(|e| other(format!("invalid policy {}: {e}", path.display())))
}

/// Creates a new store; refuses to replace an existing one.
pub fn init(path: &Path, store: &Store) -> Result<(), Error> {
    store.validate()?;
    let _lock = lock(path)?;
    if fs::symlink_metadata(path).is_ok() {
        return Err(other(format!(
            "{} already exists; keygate init never overwrites a store",
            path.display()
        )));
    }
    write_atomically(path, &store_bytes(store)?, Access::OwnerOnly).map(drop)
}

/// A committed change, and whether `--apply` then wrote the ECDS file.
#[derive(Debug)]
pub struct Committed<T> {
    /// What the change returned.
    pub value: T,
    /// The ECDS file written, or why not; `None` when not asked to apply.
    pub applied: Option<Result<PathBuf, Error>>,
    /// The store's mode before this change made it 0600, when it was readable by others.
    pub tightened: Option<u32>,
}

/// Changes the store under an exclusive lock: read, change, validate, replace
/// atomically, and with `apply`, write the ECDS rendering too. Nothing is written when
/// `change` or validation fails. If the store is written but the ECDS file cannot be, the
/// change stands (a new key must still be shown) and `applied` carries the error.
pub fn update<T>(
    path: &Path,
    apply: bool,
    change: impl FnOnce(&mut Store) -> Result<T, Error>,
) -> Result<Committed<T>, Error> {
    let _lock = lock(path)?;
    let mut store = load(path)?;
    let value = change(&mut store)?;
    store.validate()?;
    // Rendered before the store is written, so a store that cannot be applied is not
    // written either; and under the lock, so ECDS files land in the order of the changes.
    let ecds = if apply {
        Some(ecds_target(path, &store)?)
    } else {
        None
    };
    let tightened = write_atomically(path, &store_bytes(&store)?, Access::OwnerOnly)?;
    let applied = ecds
        .map(|(target, bytes)| write_atomically(&target, &bytes, Access::AsBefore).map(|_| target));
    Ok(Committed {
        value,
        applied,
        tightened,
    })
}

/// Writes the ECDS rendering of the store to `envoy.ecds`; returns that path and the
/// number of keys it holds.
pub fn apply(path: &Path) -> Result<(PathBuf, usize), Error> {
    let _lock = lock(path)?;
    let store = load(path)?;
    let (target, bytes) = ecds_target(path, &store)?;
    write_atomically(&target, &bytes, Access::AsBefore)?;
    Ok((target, store.keys.len()))
}

fn ecds_target(path: &Path, store: &Store) -> Result<(PathBuf, Vec<u8>), Error> {
    let ecds = store.envoy.ecds.as_deref().ok_or_else(|| {
        other("the store names no ECDS file to apply to; set one with keygate init --ecds PATH (in a new store) or envoy.ecds in the store")
    })?;
    let rendered = store.render()?;
    let doc = store.ecds_document(&rendered.plugin)?;
    let mut bytes = serde_json::to_vec_pretty(&doc)
        .map_err(|e| other(format!("cannot serialise the ECDS resource: {e}")))?;
    bytes.push(b'\n');
    Ok((resolve(path, ecds), bytes))
}

/// `target` relative to the store's directory, unless absolute.
pub fn resolve(store: &Path, target: &str) -> PathBuf {
    match store.parent() {
        Some(dir) => dir.join(target),
        None => PathBuf::from(target),
    }
}

fn store_bytes(store: &Store) -> Result<Vec<u8>, Error> {
    let mut bytes = serde_json::to_vec_pretty(store)
        .map_err(|e| other(format!("cannot serialise the store: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The exclusive lock every writer holds, released when dropped (and by the kernel if
/// the process dies, so a crash never leaves a stale lock).
struct Lock {
    _file: File,
}

fn lock(store: &Path) -> Result<Lock, Error> {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    owner_only_on_create(&mut options);
    let file = options
        .open(&path)
        .map_err(|e| io_error("open the lock file", &path, e))?;
    // The lock file holds nothing, but an older keygate (or a umask of 0) may have made
    // it world-readable: tighten it quietly. Someone else's lock file may refuse the
    // chmod, which is no reason to refuse the command.
    if mode_of(&file).is_some_and(|m| m & 0o077 != 0) {
        let _ = set_owner_only(&file);
    }
    file.lock().map_err(|e| io_error("lock", &path, e))?;
    Ok(Lock { _file: file })
}

/// Temp-file names for `target`: hidden, in its directory (so the rename is atomic).
fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    format!(".{name}.tmp.")
}

/// Who may read a file keygate writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The store: 0600 on every write, whatever the umask or the old file's mode.
    OwnerOnly,
    /// The ECDS file: the old file's mode, else the umask's default, so that Envoy
    /// running as another user can read it.
    AsBefore,
}

/// The mode of the store and its lock and temp files.
const OWNER_ONLY: u32 = 0o600;

#[cfg(unix)]
fn owner_only_on_create(options: &mut OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt as _;
    options.mode(OWNER_ONLY);
}

#[cfg(not(unix))]
fn owner_only_on_create(_options: &mut OpenOptions) {}

/// Sets 0600 on an open file (fchmod: not subject to the umask).
#[cfg(unix)]
fn set_owner_only(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    file.set_permissions(fs::Permissions::from_mode(OWNER_ONLY))
}

#[cfg(not(unix))]
fn set_owner_only(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn mode_of(file: &File) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    file.metadata()
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn mode_of(_file: &File) -> Option<u32> {
    None
}

#[cfg(unix)]
fn mode_of_path(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn mode_of_path(_path: &Path) -> Option<u32> {
    None
}

/// Replaces `target` with `bytes` so that readers, and Envoy's watcher, see the old
/// file or the new one, never a mix: temp file, fsync, rename, fsync of the directory.
/// Callers hold the store lock, so temp files of `target` found here are leftovers of
/// a crashed writer and are removed.
///
/// With [`Access::OwnerOnly`] the temp file is created 0600 and set to 0600 before a
/// byte is written, so the new file is never readable by others even for an instant,
/// and a store an older keygate left world-readable is tightened by the first rewrite.
/// Returns the replaced file's mode when that tightened it (the caller says so once:
/// a deployment that relied on another user reading the store learns why it stopped).
fn write_atomically(target: &Path, bytes: &[u8], access: Access) -> Result<Option<u32>, Error> {
    let dir = directory_of(target);
    fs::create_dir_all(dir).map_err(|e| io_error("create the directory", dir, e))?;
    let prefix = temp_prefix(target);
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let tmp = dir.join(format!(
        "{prefix}{}.{}",
        std::process::id(),
        hex(&random::<4>()?)
    ));
    let old_mode = mode_of_path(target);
    let written = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        if access == Access::OwnerOnly {
            owner_only_on_create(&mut options);
        }
        let mut file = options
            .open(&tmp)
            .map_err(|e| io_error("create", &tmp, e))?;
        match access {
            Access::OwnerOnly => set_owner_only(&file),
            Access::AsBefore => match fs::metadata(target) {
                Ok(meta) => file.set_permissions(meta.permissions()),
                Err(_) => Ok(()),
            },
        }
        .map_err(|e| io_error("set the permissions of", &tmp, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("write", &tmp, e))?;
        fs::rename(&tmp, target).map_err(|e| io_error("replace", target, e))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // The rename is only durable once the directory entry is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync the directory", dir, e))?;
    Ok(old_mode.filter(|m| access == Access::OwnerOnly && m & 0o077 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(line: usize, key: &str) -> ImportLine {
        ImportLine {
            line,
            key: key.into(),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration("24h"), Ok(86_400));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("3600s"), Ok(3600));
        assert_eq!(parse_duration("0s"), Ok(0));
        for bad in [
            "",
            "d",
            "90",
            "-1d",
            "1.5h",
            "1w",
            "1 d",
            "+1d",
            "١d",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("40000d").unwrap_err().contains("too long"));
    }

    #[test]
    fn import_lines() {
        let text = "# legacy keys\n\nCLIENT_API_KEYS=test_client_key_16_chars, another_legacy_key_123,\n\
                    MINER_KEYS=\"miner_key_0000000001\"\nQUJDREVGR0hJSktMTU5PUA==\n  plain_key_0123456789  \n";
        assert_eq!(
            parse_import(text, Some("kg")).unwrap(),
            vec![
                key(3, "test_client_key_16_chars"),
                key(3, "another_legacy_key_123"),
                key(4, "miner_key_0000000001"),
                key(5, "QUJDREVGR0hJSktMTU5PUA=="),
                key(6, "plain_key_0123456789"),
            ]
        );
        let err = parse_import("good_key_0123456789\nshort\n", None).unwrap_err();
        assert!(err.to_string().starts_with("line 2: \"short\"..."), "{err}");
        let err = parse_import("kg_not_a_checksummed_key_at_all", Some("kg")).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(parse_import("# nothing\n\n", None).is_err());
    }

    #[test]
    fn lifecycle() {
        let now = 1_800_000_000;
        let mut store = Store::new(None, DEFAULT_WASM.into(), "kg".into());
        store.validate().unwrap();
        assert!(
            store.render().is_err(),
            "no keys: the filter would refuse it"
        );
        let new = NewKey {
            name: "acme".into(),
            role: "client".into(),
            ..NewKey::default()
        };
        let created = store.create(&new, now).unwrap();
        assert_eq!(
            keys::checksum_holds("kg", created.key.as_bytes()),
            Some(true)
        );
        assert_eq!(created.record.prefix, created.key[..8]);
        let id = created.record.id.clone();
        assert!(id.starts_with("k_") && id.len() == 14);
        store.render().unwrap();

        assert!(
            store
                .transition(&id, Transition::Suspend, now)
                .unwrap()
                .changed
        );
        assert!(
            !store
                .transition(&id, Transition::Suspend, now)
                .unwrap()
                .changed
        );
        assert!(store.rotate(&id, 60, None, now).is_err());
        assert!(
            store
                .transition(&id, Transition::Reactivate, now)
                .unwrap()
                .changed
        );
        let rotated = store.rotate(&id, 60, None, now).unwrap();
        assert_eq!(rotated.old.expires_at, Some(time::format_rfc3339(now + 60)));
        assert_eq!(rotated.new.record.name, "acme (rotated)");
        assert_eq!(store.find(&id).unwrap().state(now + 60), State::Expired);
        // A second rotation never extends the old key.
        store.rotate(&id, 3600, None, now).unwrap();
        assert_eq!(
            store.find(&id).unwrap().expires_at,
            Some(time::format_rfc3339(now + 60))
        );

        store.transition(&id, Transition::Revoke, now).unwrap();
        assert!(store.transition(&id, Transition::Reactivate, now).is_err());
        assert_eq!(store.find(&id).unwrap().state(now + 60), State::Revoked);
        assert_eq!(
            store.counts(now),
            Counts {
                active: 2,
                revoked: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn stored_policy_has_no_keys_field() {
        let store = Store::new(Some("e.yaml".into()), "f.wasm".into(), "kg".into());
        let json: serde_json::Value = serde_json::to_value(&store).unwrap();
        assert!(json["policy"].get("keys").is_none());
        assert_eq!(json["policy"]["default_plan"], "free");
        let back: Store = serde_json::from_value(json).unwrap();
        assert_eq!(back, store);
    }
}
