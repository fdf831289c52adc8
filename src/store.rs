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
use serde_json::Value;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Store file used when neither `--store` nor `KEYGATE_STORE` names one.
pub const DEFAULT_STORE: &str = "keygate.json";
/// Where `make build` puts the filter; the default `envoy.wasm`.
pub const DEFAULT_WASM: &str = "target/wasm32-wasip1/release/keygate.wasm";
/// Key prefix used when the policy has no `key_format`.
pub const DEFAULT_PREFIX: &str = "kg";
/// The store format this tool reads and writes. Version 1 (before `revision` and
/// `keys[].rotated_from`) is read too, and upgraded in place by the first command that
/// writes the store, which keeps the version 1 file as `<store>.v1.bak`.
pub const VERSION: u32 = 2;
/// Characters of a key kept in the store to recognise it by.
pub const PREFIX_CHARS: usize = 8;
/// The ECDS resource's name, which is the name of the filter in Envoy's configuration
/// (Envoy refuses a resource whose name is not the filter's) and in its stats.
pub const FILTER_NAME: &str = "keygate";
/// How long `--apply` waits for Envoy to take a change up, unless told otherwise.
pub const DEFAULT_APPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub mod audit;
pub mod simulate;

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
    /// Bumped by every command that changes the store; `apply` writes it into the ECDS
    /// file's `version_info`, so `keygate status` can tell which revision Envoy serves.
    /// 0 in a store upgraded from version 1 that no command has changed yet.
    #[serde(default)]
    pub revision: u64,
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
    /// The admin interfaces (`http://HOST:PORT`) of the Envoys that watch `ecds`, where
    /// `--apply` confirms that each took the new configuration up: one Envoy, or a fleet
    /// watching one shared directory.
    ///
    /// Stored as `"admin"`: left out when there is none, one URL as a string, several as
    /// a list. A store with one admin (or none) is therefore still the document an older
    /// keygate reads; one with several is refused by an older keygate (`envoy.admin:
    /// invalid type: sequence`), which could only confirm with one Envoy.
    #[serde(
        rename = "admin",
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "one_or_many"
    )]
    pub admins: Vec<String>,
}

/// `envoy.admin`: a string for one URL, a list for several (see [`EnvoyTargets::admins`]).
mod one_or_many {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serialize as _, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
        match urls {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an admin URL (http://HOST:PORT) or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
                Ok(vec![v.to_string()])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
                let mut out = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    out.push(url);
                }
                Ok(out)
            }
        }
        d.deserialize_any(OneOrMany)
    }
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
    /// The key this one replaced (`keygate rotate`): the two spend one rate-limit budget
    /// for as long as both are in the store (see [`Store::render`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
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

    fn spec(&self, shares_quota_with: Option<String>) -> KeySpec {
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
            shares_quota_with,
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

/// What `keygate update` changes in a key ([`Store::edit`]); `None` leaves a field as it
/// is, `Some(None)` clears an optional one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyEdit {
    /// New name.
    pub name: Option<String>,
    /// New description, or none.
    pub description: Option<Option<String>>,
    /// New role.
    pub role: Option<String>,
    /// Exactly these scopes (before removals and additions).
    pub scopes: Option<Vec<String>>,
    /// Scopes to add.
    pub add_scopes: Vec<String>,
    /// Scopes to remove; each must be the key's.
    pub remove_scopes: Vec<String>,
    /// New plan, or the policy's default.
    pub plan: Option<Option<String>>,
    /// New client, or none.
    pub client: Option<Option<String>>,
    /// New tenant, or none.
    pub tenant: Option<Option<String>>,
    /// Exactly these addresses (empty: any).
    pub allowed_ips: Option<Vec<String>>,
    /// New expiry (Unix seconds), or never.
    pub expires_at: Option<Option<i64>>,
}

impl KeyEdit {
    /// Whether it asks for no change at all.
    pub fn is_empty(&self) -> bool {
        *self == KeyEdit::default()
    }
}

/// A change to the Envoy admins a store names ([`Store::set_admins`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminChange {
    /// Exactly these (duplicates dropped), in this order.
    Set(Vec<String>),
    /// These as well, after the ones named (those already named are left as they are).
    Add(Vec<String>),
    /// Not these; each must be named.
    Remove(Vec<String>),
    /// None: `--apply` then only writes the file.
    Clear,
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
            revision: 1,
            envoy: EnvoyTargets {
                ecds,
                wasm: Some(wasm),
                admins: Vec::new(),
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
    ///
    /// A rotated key's successor spends its predecessor's rate-limit budget
    /// (`shares_quota_with`) for as long as the predecessor is in the store, whatever its
    /// state: a client never gets a fresh budget by rotating, during the grace period or
    /// at the first apply after it. Chains (k1 rotated to k2, k2 to k3) share the budget of
    /// the oldest key still in the store, since the filter allows no chains of sharing.
    pub fn render(&self) -> Result<Rendered, Error> {
        self.check_metadata()?;
        let plugin = self.plugin_with(&self.policy);
        let config = compile_named(&plugin)?;
        Ok(Rendered { plugin, config })
    }

    /// `policy` with the store's keys rendered into it (not validated).
    pub fn plugin_with(&self, policy: &PluginConfig) -> PluginConfig {
        let mut plugin = policy.clone();
        plugin.keys = self
            .keys
            .iter()
            .map(|k| k.spec(self.budget_root(&k.id)))
            .collect();
        plugin
    }

    /// The oldest key still in the store that `id` descends from by rotation, if any:
    /// the key whose budget `id` spends.
    pub fn budget_root(&self, id: &str) -> Option<String> {
        let mut seen: Vec<&str> = vec![id];
        let mut root: Option<&str> = None;
        let mut at = self.keys.iter().find(|k| k.id == id)?;
        while let Some(from) = at.rotated_from.as_deref() {
            let Some(prev) = self.keys.iter().find(|k| k.id == from) else {
                break;
            };
            if seen.contains(&from) {
                // A loop (only a hand-edited store has one): no sharing rather than a guess.
                return None;
            }
            seen.push(from);
            root = Some(from);
            at = prev;
        }
        root.map(str::to_string)
    }

    /// The keys rotated from `id` (its successors) still in the store.
    pub fn successors(&self, id: &str) -> Vec<&StoredKey> {
        self.keys
            .iter()
            .filter(|k| k.rotated_from.as_deref() == Some(id))
            .collect()
    }

    /// Everything a store must satisfy to be written. A store without keys yet (just
    /// initialised) renders a configuration the filter refuses, so its policy is checked on
    /// its own (the filter's checks, but no keys is no problem).
    pub fn validate(&self) -> Result<(), Error> {
        if !self.keys.is_empty() {
            return self.render().map(drop);
        }
        self.check_metadata()?;
        match config::policy_problems(&self.policy).into_iter().next() {
            Some(first) => Err(first.into()),
            None => Ok(()),
        }
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
        let admins = &self.envoy.admins;
        for (i, url) in admins.iter().enumerate() {
            let at = || match admins.len() {
                1 => "envoy.admin".to_string(),
                _ => format!("envoy.admin[{i}]"),
            };
            let stored = admin::parse_url(url).map_err(|r| bad(at(), r))?;
            if admins[..i]
                .iter()
                .any(|other| admin::parse_url(other).as_ref() == Ok(&stored))
            {
                return Err(bad(at(), format!("{stored} is named twice")));
            }
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
    ///
    /// An ECDS file is a DiscoveryResponse, so next to `resources` it carries a
    /// `version_info` naming its content and the store's revision:
    /// `sha256:<16 hex digits>-r<revision>`, the first 16 hex digits of the SHA-256 of the
    /// serialised `resources`, then the store's [`Store::revision`]. Envoy reports the
    /// version it serves as the stat `extension_config_discovery.<prefix>.keygate.version_text`,
    /// which is how `--apply` confirms a change and `keygate status` tells which revision
    /// each Envoy serves. The digest names the content (restoring a file restores it); the
    /// revision says which change of the store it came from.
    pub fn ecds_document(&self, plugin: &PluginConfig) -> Result<serde_json::Value, Error> {
        let wasm = self.envoy.wasm.as_deref().ok_or_else(|| {
            other("the store names no filter binary (envoy.wasm); set it with keygate init --wasm PATH")
        })?;
        let value = serde_json::to_string(plugin)
            .map_err(|e| other(format!("cannot serialise the configuration: {e}")))?;
        let resources = serde_json::json!([{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": FILTER_NAME,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": FILTER_NAME,
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
        }]);
        let canonical = serde_json::to_vec(&resources)
            .map_err(|e| other(format!("cannot serialise the ECDS resource: {e}")))?;
        Ok(serde_json::json!({
            "version_info": format!("{}-r{}", content_version(&canonical), self.revision),
            "resources": resources,
        }))
    }

    /// The ECDS document `apply` would write now, with the rendering it wraps.
    pub fn ecds_rendering(&self) -> Result<(serde_json::Value, Rendered), Error> {
        let rendered = self.render()?;
        let doc = self.ecds_document(&rendered.plugin)?;
        Ok((doc, rendered))
    }

    /// Changes the Envoy admins the store names; returns the ones it named before.
    /// URLs are taken as [`admin::parse_url`] returns them.
    pub fn set_admins(&mut self, change: &AdminChange) -> Result<Vec<String>, Error> {
        let previous = self.envoy.admins.clone();
        let named = |url: &String, list: &[String]| list.iter().any(|u| u == url);
        match change {
            AdminChange::Set(urls) => {
                let mut next: Vec<String> = Vec::new();
                for url in urls {
                    if !named(url, &next) {
                        next.push(url.clone());
                    }
                }
                self.envoy.admins = next;
            }
            AdminChange::Add(urls) => {
                for url in urls {
                    if !named(url, &self.envoy.admins) {
                        self.envoy.admins.push(url.clone());
                    }
                }
            }
            AdminChange::Remove(urls) => {
                if let Some(missing) = urls.iter().find(|u| !named(u, &previous)) {
                    return Err(other(format!(
                        "the store names no Envoy admin {missing} (it names {}); nothing was changed",
                        if previous.is_empty() {
                            "none".to_string()
                        } else {
                            previous.join(", ")
                        }
                    )));
                }
                self.envoy.admins.retain(|u| !named(u, urls));
            }
            AdminChange::Clear => self.envoy.admins.clear(),
        }
        Ok(previous)
    }

    /// What this host can tell about the filter binary `envoy.wasm` names. A relative
    /// path is taken from the current directory, which is Envoy's too when both are
    /// started from the same place (as `make run` does).
    pub fn module(&self) -> Module {
        match &self.envoy.wasm {
            None => Module::Unset,
            Some(wasm) => inspect_module(Path::new(wasm)),
        }
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
            rotated_from: None,
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
    /// `grace_s` seconds (or until its own expiry, if sooner). The new key records the
    /// old one (`rotated_from`), so the two spend one rate-limit budget.
    ///
    /// Refused for a suspended key; and, unless `force`, for a revoked or expired key
    /// (a working key would replace one that no longer works), or one already rotated
    /// whose grace period is still running (its successor is the key to rotate). Forced,
    /// a revoked or expired key keeps its state and expiry.
    pub fn rotate(
        &mut self,
        id: &str,
        grace_s: i64,
        expires_at: Option<i64>,
        force: bool,
        now: i64,
    ) -> Result<Rotated, Error> {
        let old = self.find(id)?.clone();
        let state = old.state(now);
        match (state, force) {
            (State::Suspended, _) => {
                return Err(other(format!(
                    "key {id} is suspended; reactivate it first, so rotation does not lift the suspension"
                )))
            }
            (State::Revoked, false) => {
                return Err(other(format!(
                    "key {id} is revoked; create a new key instead of rotating it (or rotate --force to issue a successor anyway)"
                )))
            }
            (State::Expired, false) => {
                return Err(other(format!(
                    "key {id} expired at {}; create a new key instead of rotating it (or rotate --force to issue a successor anyway)",
                    old.expires_at.as_deref().unwrap_or("?")
                )))
            }
            _ => {}
        }
        if !force && state == State::Active {
            if let Some(next) = self.successors(id).first() {
                return Err(other(format!(
                    "key {id} was already rotated: its successor {} was created at {}, and {id} keeps working until {} (its grace period); rotate {} instead, or rotate --force to issue another successor",
                    next.id,
                    next.created_at,
                    old.expires_at.as_deref().unwrap_or("never"),
                    next.id
                )));
            }
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
        let mut created = self.create(&new, now)?;
        created.record.rotated_from = Some(id.to_string());
        if let Some(last) = self.keys.last_mut() {
            last.rotated_from = Some(id.to_string());
        }
        let grace_end = now.saturating_add(grace_s);
        let old = self.find_mut(id)?;
        let current = old
            .expires_at
            .as_deref()
            .and_then(|s| time::parse_rfc3339(s).ok());
        if state == State::Active && current.is_none_or(|t| t > grace_end) {
            old.expires_at = Some(time::format_rfc3339(grace_end));
        }
        Ok(Rotated {
            new: created,
            old: old.clone(),
        })
    }

    /// Changes a key's identity, permissions or expiry, never its secret. The new values
    /// are checked as `create` checks them (the whole store is validated before it is
    /// written). Returns the key before and after.
    pub fn edit(
        &mut self,
        id: &str,
        edit: &KeyEdit,
        now: i64,
    ) -> Result<(StoredKey, StoredKey), Error> {
        if let Some(name) = &edit.name {
            check_text(name, 200).map_err(|r| other(format!("--name: {r}")))?;
        }
        if let Some(Some(d)) = &edit.description {
            check_text(d, 2000).map_err(|r| other(format!("--description: {r}")))?;
        }
        if let Some(Some(t)) = edit.expires_at.filter(|t| t.is_some_and(|t| t <= now)) {
            return Err(other(format!(
                "the expiry {} is not in the future",
                time::format_rfc3339(t)
            )));
        }
        let key = self.find_mut(id)?;
        if key.status == KeyStatus::Revoked {
            return Err(other(format!(
                "key {id} is revoked, and revocation is permanent; nothing to update (keygate prune removes it)"
            )));
        }
        let before = key.clone();
        if let Some(name) = &edit.name {
            key.name = name.clone();
        }
        if let Some(d) = &edit.description {
            key.description = d.clone();
        }
        if let Some(role) = &edit.role {
            key.role = role.clone();
        }
        if let Some(scopes) = &edit.scopes {
            key.scopes = Vec::new();
            for scope in scopes {
                if !key.scopes.contains(scope) {
                    key.scopes.push(scope.clone());
                }
            }
        }
        for scope in &edit.remove_scopes {
            if !key.scopes.contains(scope) {
                return Err(other(format!(
                    "--remove-scope: key {id} has no scope {scope:?} (it has: {}); nothing was changed",
                    if key.scopes.is_empty() {
                        "none".to_string()
                    } else {
                        key.scopes.join(", ")
                    }
                )));
            }
            key.scopes.retain(|s| s != scope);
        }
        for scope in &edit.add_scopes {
            if !key.scopes.contains(scope) {
                key.scopes.push(scope.clone());
            }
        }
        if let Some(plan) = &edit.plan {
            key.plan = plan.clone();
        }
        if let Some(client) = &edit.client {
            key.client = client.clone();
        }
        if let Some(tenant) = &edit.tenant {
            key.tenant = tenant.clone();
        }
        if let Some(ips) = &edit.allowed_ips {
            key.allowed_ips = ips.clone();
        }
        if let Some(t) = edit.expires_at {
            key.expires_at = t.map(time::format_rfc3339);
        }
        Ok((before, key.clone()))
    }

    /// Keys revoked or expired at least `older_than_s` seconds before `now`, with their
    /// state and since when, except those kept for a successor (see
    /// [`Store::kept_for_successors`]).
    pub fn prunable(&self, older_than_s: i64, now: i64) -> Vec<(&StoredKey, State, i64)> {
        let (prunable, _) = self.prune_candidates(older_than_s, now);
        prunable
    }

    /// Keys old enough to prune that stay because a key rotated from them (directly or
    /// through other kept keys) is not pruned: the successor spends the budget of the
    /// oldest key of its rotation chain, and pruning that key would hand it a fresh one.
    /// Each with the id of the successor that holds it.
    pub fn kept_for_successors(&self, older_than_s: i64, now: i64) -> Vec<(&StoredKey, String)> {
        let (_, kept) = self.prune_candidates(older_than_s, now);
        kept
    }

    #[allow(clippy::type_complexity)]
    fn prune_candidates(
        &self,
        older_than_s: i64,
        now: i64,
    ) -> (Vec<(&StoredKey, State, i64)>, Vec<(&StoredKey, String)>) {
        let cutoff = now.saturating_sub(older_than_s);
        let at = |s: Option<&str>| s.and_then(|s| time::parse_rfc3339(s).ok());
        let mut old: Vec<(&StoredKey, State, i64)> = self
            .keys
            .iter()
            .filter_map(|k| {
                let state = k.state(now);
                let since = match state {
                    State::Revoked => {
                        at(k.revoked_at.as_deref()).or(at(Some(k.created_at.as_str())))
                    }
                    State::Expired => at(k.expires_at.as_deref()),
                    State::Active | State::Suspended => None,
                }?;
                (since <= cutoff).then_some((k, state, since))
            })
            .collect();
        // A key stays while a key that stays was rotated from it; repeated until nothing
        // changes, so a whole chain above a remaining successor stays.
        let mut kept: Vec<(&StoredKey, String)> = Vec::new();
        loop {
            let staying = |id: &str| !old.iter().any(|(k, _, _)| k.id == id);
            let held = old.iter().position(|(k, _, _)| {
                self.keys
                    .iter()
                    .any(|s| s.rotated_from.as_deref() == Some(k.id.as_str()) && staying(&s.id))
            });
            let Some(i) = held else { break };
            let (k, _, _) = old.remove(i);
            let by = self
                .keys
                .iter()
                .find(|s| {
                    s.rotated_from.as_deref() == Some(k.id.as_str())
                        && !old.iter().any(|(o, _, _)| o.id == s.id)
                })
                .map(|s| s.id.clone())
                .unwrap_or_default();
            kept.push((k, by));
        }
        (old, kept)
    }

    /// Removes the keys [`Store::prunable`] lists; returns them.
    pub fn prune(&mut self, older_than_s: i64, now: i64) -> Vec<StoredKey> {
        let ids: Vec<String> = self
            .prunable(older_than_s, now)
            .iter()
            .map(|(k, _, _)| k.id.clone())
            .collect();
        let (gone, kept): (Vec<StoredKey>, Vec<StoredKey>) =
            self.keys.drain(..).partition(|k| ids.contains(&k.id));
        self.keys = kept;
        gone
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

/// The filter's compile step, its error naming the element by key id or route prefix
/// (the first of [`config::problems`]) rather than by position.
fn compile_named(plugin: &PluginConfig) -> Result<Config, ConfigError> {
    Config::compile(plugin).map_err(|e| config::problems(plugin).into_iter().next().unwrap_or(e))
}

/// Every problem the filter would refuse `plugin` for (the store's keys with a policy),
/// each naming its element by key id or route prefix (`keys["kg_abc"].plan`,
/// `routes["/v1/admin"].roles[0]`): the filter's own checks, all at once.
pub fn policy_problems(plugin: &PluginConfig) -> Vec<ConfigError> {
    config::problems(plugin)
}

/// Warnings for a key given `role` and `scopes` that no route of `policy` uses: a typo
/// must not pass silently. Only when some route names roles (scopes): with none, every
/// role (scope) is as good as another.
pub fn identity_warnings(
    policy: &PluginConfig,
    role: Option<&str>,
    scopes: &[String],
) -> Vec<String> {
    let collect = |pick: fn(&config::RouteSpec) -> Option<&Vec<String>>| {
        let mut all: Vec<&str> = policy
            .routes
            .iter()
            .filter_map(pick)
            .flatten()
            .map(String::as_str)
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    let roles = collect(|r| r.roles.as_ref());
    let route_scopes = collect(|r| r.scopes.as_ref());
    let mut out = Vec::new();
    if let Some(role) = role.filter(|r| !roles.is_empty() && !roles.contains(r)) {
        out.push(format!(
            "warning: role {role:?} is not used by any route (routes use: {})",
            roles.join(", ")
        ));
    }
    if !route_scopes.is_empty() {
        for scope in scopes {
            if !route_scopes.contains(&scope.as_str()) {
                out.push(format!(
                    "warning: scope {scope:?} is not required by any route (routes require: {})",
                    route_scopes.join(", ")
                ));
            }
        }
    }
    out
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

/// Reads and parses the store; errors name the offending field. A version 1 store is
/// returned as version 2 (the file is upgraded by the next command that writes it).
pub fn load(path: &Path) -> Result<Store, Error> {
    parse(path, &read_store(path)?).map(|(store, _)| store)
}

/// Where the file of a store upgraded from `version` is kept: `<store>.v<version>.bak`.
pub fn backup_path(store: &Path, version: u32) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(format!(".v{version}.bak"));
    PathBuf::from(name)
}

fn read_store(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            other(format!(
                "no store at {}; create one with keygate init (or name another with --store or KEYGATE_STORE)",
                path.display()
            ))
        } else {
            io_error("read", path, e)
        }
    })
}

fn parse(path: &Path, bytes: &[u8]) -> Result<(Store, Option<u32>), Error> {
    let invalid = |at: String, e: &dyn fmt::Display| {
        let at = if at == "." || at == "?" {
            String::new()
        } else {
            format!("{at}: ")
        };
        other(format!("invalid store {}: {at}{e}", path.display()))
    };
    // The format version first: a newer store is refused before its fields are read
    // (they may mean something this keygate does not know), and a version 1 store must
    // not hold what only version 2 has.
    let version = serde_json::from_slice::<Value>(bytes).ok().and_then(|doc| {
        let v = doc.get("version")?.as_u64()?;
        Some((u32::try_from(v).unwrap_or(u32::MAX), doc))
    });
    let mut upgraded_from = None;
    if let Some((v, doc)) = &version {
        if *v > VERSION {
            return Err(other(format!(
                "{} is a version {v} store, and this keygate reads versions up to {VERSION}; \
                 upgrade keygate to use it (nothing was changed)",
                path.display()
            )));
        }
        if *v == 1 {
            if doc.get("revision").is_some() {
                return Err(invalid(
                    "revision".into(),
                    &"unknown field in a version 1 store",
                ));
            }
            let keys = doc.get("keys").and_then(Value::as_array);
            for (i, key) in keys.into_iter().flatten().enumerate() {
                if key.get("rotated_from").is_some() {
                    return Err(invalid(
                        format!("keys[{i}].rotated_from"),
                        &"unknown field in a version 1 store",
                    ));
                }
            }
            upgraded_from = Some(1);
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut store: Store = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| invalid(e.path().to_string(), e.inner()))?;
    de.end().map_err(|e| invalid(String::new(), &e))?;
    if upgraded_from.is_some() {
        store.version = VERSION;
    }
    Ok((store, upgraded_from))
}

/// Reads a policy file for `init --policy`: a plugin configuration without keys, parsed
/// by the filter's own rules (validation follows when the store is created).
pub fn read_policy(path: &Path) -> Result<PluginConfig, Error> {
    let bytes = fs::read(path).map_err(|e| io_error("read", path, e))?;
    PluginConfig::from_json(&bytes)
        .map_err(|e| other(format!("invalid policy {}: {e}", path.display())))
}

/// Creates a new store; refuses to replace an existing one. With `actor`, records it in
/// the audit log.
pub fn init(path: &Path, store: &Store, actor: Option<&audit::Actor>) -> Result<(), Error> {
    store.validate()?;
    let _lock = lock(path)?;
    if fs::symlink_metadata(path).is_ok() {
        return Err(other(format!(
            "{} already exists; keygate init never overwrites a store",
            path.display()
        )));
    }
    let mut log = actor.map(|_| audit::Log::open(path)).transpose()?;
    write_atomically(path, &store_bytes(store)?, Access::OwnerOnly)?;
    if let (Some(log), Some(actor)) = (log.as_mut(), actor) {
        let line = audit::Line {
            time: time::format_rfc3339(unix_now()),
            actor: actor.name.clone(),
            action: actor.action.clone(),
            revision: store.revision,
            key: None,
            changes: Default::default(),
            apply: None,
        };
        audit_or_warn(log, &[line]);
    }
    Ok(())
}

/// Appends audit lines after a committed change; the change stands whatever happens, so
/// a failure is said on stderr rather than returned.
fn audit_or_warn(log: &mut audit::Log, lines: &[audit::Line]) {
    if let Err(e) = log.append(lines) {
        eprintln!("keygate: warning: the change is made, but {e}");
    }
}

/// An apply's audit record.
fn apply_record(applied: &Applied) -> audit::ApplyRecord {
    audit::ApplyRecord {
        ecds: applied.ecds.display().to_string(),
        version: applied.version.clone(),
        confirmed: !applied.envoys.is_empty()
            && applied.confirmed().count() == applied.envoys.len(),
        envoys: applied
            .envoys
            .iter()
            .map(|c| {
                let state = match c {
                    Confirmation::Confirmed { .. } => "confirmed",
                    Confirmation::Unreachable { .. } => "unreachable",
                };
                (c.admin().to_string(), state.to_string())
            })
            .collect(),
    }
}

/// A committed change, and what `--apply` made of it.
#[derive(Debug)]
pub struct Committed<T> {
    /// What the change returned.
    pub value: T,
    /// The ECDS file written and whether Envoy confirmed it; `None` when not asked to
    /// apply. (A failed apply is an error, and the change is undone.)
    pub applied: Option<Applied>,
    /// The store's mode before this change made it 0600, when it was readable by others.
    pub tightened: Option<u32>,
    /// The store's revision after the change (bumped when the change changed anything).
    pub revision: u64,
    /// When this change upgraded the store's format: the version it had, and the backup
    /// of the old file.
    pub upgraded: Option<(u32, PathBuf)>,
}

/// How `--apply` and `keygate apply` wait for Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// How long Envoy has to take the new version up (when the store names its admin).
    pub timeout: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            timeout: DEFAULT_APPLY_TIMEOUT,
        }
    }
}

/// An ECDS file written, and what the Envoys the store names made of it.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The ECDS file.
    pub ecds: PathBuf,
    /// Its `version_info`.
    pub version: String,
    /// Keys in the configuration.
    pub keys: usize,
    /// What each Envoy admin the store names made of it, in the store's order; empty when
    /// the store names none (the change is then only written). A rejection never gets
    /// here: the change is undone and the apply fails.
    pub envoys: Vec<Confirmation>,
}

impl Applied {
    /// The Envoys that confirmed the change.
    pub fn confirmed(&self) -> impl Iterator<Item = &Confirmation> {
        self.envoys
            .iter()
            .filter(|c| matches!(c, Confirmation::Confirmed { .. }))
    }
}

/// Whether one Envoy took an applied change up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// Envoy's admin shows the new version served, this long after the file was written.
    Confirmed {
        /// The admin URL asked.
        admin: String,
        /// From the rename to the first answer showing the new version.
        after: Duration,
    },
    /// Written only: the admin did not answer (Envoy not running yet, or elsewhere).
    Unreachable {
        /// The admin URL tried.
        admin: String,
        /// Why it did not answer.
        reason: String,
    },
}

impl Confirmation {
    /// The admin URL this is about.
    pub fn admin(&self) -> &str {
        match self {
            Confirmation::Confirmed { admin, .. } | Confirmation::Unreachable { admin, .. } => {
                admin
            }
        }
    }
}

/// Changes the store under an exclusive lock: read, change, validate, replace
/// atomically, and with `apply`, write the ECDS rendering and confirm that Envoy took it
/// up (see [`apply`]). Nothing is written when `change` or validation fails, and when
/// the apply fails (Envoy rejects the new version, does not take it up in time, or the
/// file cannot be written) the store and the ECDS file are put back byte for byte, so
/// the command changes nothing: a new key is then never shown, since no Envoy would
/// accept it. The lock is held until Envoy answers, so changes reach Envoy one at a time
/// and in order, and an undo never overwrites another command's change.
pub fn update<T>(
    path: &Path,
    apply: Option<ApplyOptions>,
    change: impl FnOnce(&mut Store) -> Result<T, Error>,
) -> Result<Committed<T>, Error> {
    update_as(path, apply, None, change)
}

/// [`update`], recording the change in the audit log as `actor`'s (when given): one line
/// per key changed and one for the store's own fields ([`audit::diff`]), and with
/// `apply`, one for the apply. The log is opened before anything is written (a log that
/// cannot be opened fails the command, changing nothing) and appended to only once the
/// change is committed, under the store's lock, so lines are in the order of the changes
/// and a change that did not happen has none. A change that changes nothing (the store
/// before and after are equal) keeps the revision and records nothing.
///
/// A version 1 store is upgraded here: its file is first copied to `<store>.v1.bak`
/// (0600), then replaced by the version 2 store.
pub fn update_as<T>(
    path: &Path,
    apply: Option<ApplyOptions>,
    actor: Option<&audit::Actor>,
    change: impl FnOnce(&mut Store) -> Result<T, Error>,
) -> Result<Committed<T>, Error> {
    let _lock = lock(path)?;
    let before = read_store(path)?;
    let (mut store, upgraded_from) = parse(path, &before)?;
    let original = store.clone();
    let value = change(&mut store)?;
    if store != original {
        store.revision = original.revision.saturating_add(1);
    }
    store.validate()?;
    // Rendered, and Envoy's admin asked where it stands, before the store is written:
    // a store that cannot be applied is not written either.
    let pending = match apply {
        Some(_) => Some(prepare(path, &store)?),
        None => None,
    };
    let mut log = actor.map(|_| audit::Log::open(path)).transpose()?;
    let upgraded = match upgraded_from {
        Some(v) => {
            let backup = backup_path(path, v);
            write_atomically(&backup, &before, Access::OwnerOnly)?;
            Some((v, backup))
        }
        None => None,
    };
    let tightened = write_atomically(path, &store_bytes(&store)?, Access::OwnerOnly)?;
    let mut lines = Vec::new();
    if let Some(actor) = actor {
        let mut was = original;
        if let Some(v) = upgraded_from {
            was.version = v;
        }
        lines = audit::diff(&was, &store, actor, unix_now());
    }
    let revision = store.revision;
    let Some((pending, options)) = pending.zip(apply) else {
        if let Some(log) = log.as_mut() {
            audit_or_warn(log, &lines);
        }
        return Ok(Committed {
            value,
            applied: None,
            tightened,
            revision,
            upgraded,
        });
    };
    match pending.commit(options) {
        Ok(applied) => {
            if let (Some(log), Some(actor)) = (log.as_mut(), actor) {
                lines.push(apply_line(actor, revision, &applied));
                audit_or_warn(log, &lines);
            }
            Ok(Committed {
                value,
                applied: Some(applied),
                tightened,
                revision,
                upgraded,
            })
        }
        Err(failure) => {
            let store_back = write_atomically(path, &before, Access::OwnerOnly).map(drop);
            // The store is its old version again: the backup of the upgrade goes too.
            if let (Ok(()), Some((_, backup))) = (&store_back, &upgraded) {
                let _ = fs::remove_file(backup);
            }
            Err(failure.undone(store_back, path))
        }
    }
}

fn apply_line(actor: &audit::Actor, revision: u64, applied: &Applied) -> audit::Line {
    audit::Line {
        time: time::format_rfc3339(unix_now()),
        actor: actor.name.clone(),
        action: actor.action.clone(),
        revision,
        key: None,
        changes: Default::default(),
        apply: Some(apply_record(applied)),
    }
}

/// Writes the ECDS rendering of the store to `envoy.ecds` (refusing when the module
/// `envoy.wasm` names is there and is not a Wasm module). Then, for every Envoy admin the
/// store names (one Envoy, or a fleet watching one shared directory), waits until that
/// Envoy serves the new `version_info` (its `extension_config_discovery.*.keygate.version_text`
/// stat) or rejects it (`update_rejected` or `update_failure` moves), all of them at once
/// and for at most `options.timeout`. When any of them rejects it or does not take it up
/// in time, the previous ECDS file is put back (the Envoys that had taken the change up
/// go back with it) and this fails, naming that Envoy. An admin that does not answer
/// within about a second before the write (Envoy not started yet, as in `make run`, or
/// down) is reported as not confirmed: the file stays written, and that Envoy reads it
/// when it comes up.
///
/// Why stats and not `/config_dump?resource=ecds_filters`: Envoy 1.40 shows there the
/// version it last *received*, rejected or not, and no error state; `version_text` is
/// only set by an accepted update.
pub fn apply(
    path: &Path,
    options: ApplyOptions,
    actor: Option<&audit::Actor>,
) -> Result<Applied, Error> {
    let _lock = lock(path)?;
    let store = load(path)?;
    store.validate()?;
    let pending = prepare(path, &store)?;
    let mut log = actor.map(|_| audit::Log::open(path)).transpose()?;
    let applied = pending
        .commit(options)
        .map_err(|failure| failure.undone(Ok(()), path))?;
    if let (Some(log), Some(actor)) = (log.as_mut(), actor) {
        audit_or_warn(log, &[apply_line(actor, store.revision, &applied)]);
    }
    Ok(applied)
}

/// The rendered ECDS file and what to compare the Envoys against.
struct Pending {
    ecds: PathBuf,
    bytes: Vec<u8>,
    version: String,
    keys: usize,
    /// The file as it was (`None`: there was none), to put back on failure.
    previous: Option<Vec<u8>>,
    module: Module,
    /// Where each Envoy the store names stood before the write, in the store's order.
    watches: Vec<Watch>,
}

/// Where one Envoy stood before the write.
enum Watch {
    Unreachable {
        admin: String,
        reason: String,
    },
    Envoy {
        admin: String,
        before: Vec<admin::Subscription>,
    },
}

/// What waiting for one Envoy came to.
enum Waited {
    /// It serves the new version, this long after the write.
    Served(Duration),
    /// It rejected the version, could not read the file, or did not take it up in time.
    Failed(String),
    /// Given up because another Envoy failed.
    Cancelled,
}

/// Why an apply failed, with the ECDS file already put back (or why it could not be).
struct ApplyFailure {
    reason: String,
    ecds: PathBuf,
    ecds_back: Result<(), Error>,
}

impl ApplyFailure {
    /// The error to report once the store too is back (or could not be put back).
    fn undone(self, store_back: Result<(), Error>, store: &Path) -> Error {
        match (self.ecds_back, store_back) {
            (Ok(()), Ok(())) => other(format!(
                "{}; nothing was changed: {} and {} are as they were",
                self.reason,
                store.display(),
                self.ecds.display()
            )),
            (ecds, store_back) => {
                let mut text = format!("{}; and putting things back failed:", self.reason);
                if let Err(e) = ecds {
                    text += &format!(" {e} ({} holds the rejected version);", self.ecds.display());
                }
                if let Err(e) = store_back {
                    text += &format!(
                        " {e} ({} holds the change; keygate apply once Envoy is fixed);",
                        store.display()
                    );
                }
                other(text.trim_end_matches(';').to_string())
            }
        }
    }
}

fn prepare(path: &Path, store: &Store) -> Result<Pending, Error> {
    let ecds = store.envoy.ecds.as_deref().ok_or_else(|| {
        other("the store names no ECDS file to apply to; set one with keygate init --ecds PATH (in a new store) or envoy.ecds in the store")
    })?;
    let ecds = resolve(path, ecds);
    let (doc, rendered) = store.ecds_rendering()?;
    let version = doc["version_info"].as_str().unwrap_or_default().to_string();
    let mut bytes = serde_json::to_vec_pretty(&doc)
        .map_err(|e| other(format!("cannot serialise the ECDS resource: {e}")))?;
    bytes.push(b'\n');
    let module = store.module();
    if let Module::NotWasm(file, why) = &module {
        return Err(other(format!(
            "{} is not a Wasm module ({why}), and Envoy would reject a configuration naming it; \
             point envoy.wasm in the store at the filter's keygate.wasm; nothing was changed",
            file.display()
        )));
    }
    let previous = match fs::read(&ecds) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("read", &ecds, e)),
    };
    let watches = watch(&store.envoy.admins, &ecds)?;
    Ok(Pending {
        ecds,
        bytes,
        version,
        keys: rendered.plugin.keys.len(),
        previous,
        module,
        watches,
    })
}

/// How long an admin has to answer before a change: "not reachable" means it did not.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Between two looks at Envoy's stats while waiting for a change.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Asks every Envoy the store names, at once, where its keygate subscriptions stand,
/// before a change. An admin that answers but not as Envoy's, or an Envoy without the
/// filter's ECDS subscription, is a store naming the wrong admin: nothing is changed.
fn watch(urls: &[String], ecds: &Path) -> Result<Vec<Watch>, Error> {
    let answers = admin::subscriptions_of_all(urls, Instant::now() + PROBE_TIMEOUT);
    let mut watches = Vec::new();
    let mut wrong = Vec::new();
    let mut not_envoy = false;
    for (url, answer) in urls.iter().zip(answers) {
        match answer {
            Err(admin::GetError::Unreachable(reason)) => watches.push(Watch::Unreachable {
                admin: url.clone(),
                reason,
            }),
            Err(admin::GetError::Failed(reason)) => {
                not_envoy = true;
                wrong.push(format!(
                    "Envoy's admin at {url} did not answer as Envoy does ({reason})"
                ));
            }
            Ok(subs) if subs.is_empty() => wrong.push(format!(
                "Envoy at {url} has no ECDS subscription for the filter {FILTER_NAME:?} (no \
                 extension_config_discovery.*.{FILTER_NAME}.* stats), so it would never take up {}",
                ecds.display()
            )),
            Ok(before) => watches.push(Watch::Envoy {
                admin: url.clone(),
                before,
            }),
        }
    }
    if wrong.is_empty() {
        return Ok(watches);
    }
    let hint = match (urls.len(), not_envoy) {
        (1, true) => "if envoy.admin is wrong, keygate set-admin URL (or set-admin --clear to only write the file)",
        (1, false) => "if envoy.admin names another Envoy, keygate set-admin URL (or set-admin --clear to only write the file)",
        _ => "if the store names an admin that is not one of the Envoys watching the file, keygate set-admin --remove URL",
    };
    Err(other(format!(
        "{}; nothing was changed; {hint}",
        wrong.join("; ")
    )))
}

impl Pending {
    /// Writes the file and waits for every Envoy; on failure puts the previous file back.
    fn commit(self, options: ApplyOptions) -> Result<Applied, ApplyFailure> {
        let fail = |pending: &Pending, reason: String| {
            let ecds_back = match &pending.previous {
                Some(bytes) => write_atomically(&pending.ecds, bytes, Access::AsBefore).map(drop),
                None => match fs::remove_file(&pending.ecds) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        Err(io_error("remove", &pending.ecds, e))
                    }
                    _ => Ok(()),
                },
            };
            ApplyFailure {
                reason,
                ecds: pending.ecds.clone(),
                ecds_back,
            }
        };
        if let Err(e) = write_atomically(&self.ecds, &self.bytes, Access::AsBefore) {
            // write_atomically leaves the old file in place when it fails.
            return Err(ApplyFailure {
                reason: e.to_string(),
                ecds: self.ecds.clone(),
                ecds_back: Ok(()),
            });
        }
        let written = Instant::now();
        let stop = AtomicBool::new(false);
        let waited = in_parallel(&self.watches, |watch| match watch {
            Watch::Unreachable { .. } => None,
            Watch::Envoy { admin, before } => {
                let waited = self.wait(admin, before, written, options.timeout, &stop);
                if matches!(waited, Waited::Failed(_)) {
                    // One failure undoes the change: the others need not wait any longer.
                    stop.store(true, Ordering::SeqCst);
                }
                Some(waited)
            }
        });
        let mut envoys = Vec::new();
        let mut failures = Vec::new();
        for (watch, waited) in self.watches.iter().zip(waited) {
            match (watch, waited) {
                (Watch::Unreachable { admin, reason }, _) => {
                    envoys.push(Confirmation::Unreachable {
                        admin: admin.clone(),
                        reason: reason.clone(),
                    });
                }
                (Watch::Envoy { admin, .. }, Some(Waited::Served(after))) => {
                    envoys.push(Confirmation::Confirmed {
                        admin: admin.clone(),
                        after,
                    });
                }
                (Watch::Envoy { .. }, Some(Waited::Failed(reason))) => failures.push(reason),
                (Watch::Envoy { .. }, Some(Waited::Cancelled) | None) => {}
            }
        }
        if !failures.is_empty() {
            let mut reason = failures.join("; ");
            let took_up: Vec<&str> = envoys
                .iter()
                .filter(|c| matches!(c, Confirmation::Confirmed { .. }))
                .map(Confirmation::admin)
                .collect();
            match took_up.as_slice() {
                [] => {}
                [one] => {
                    reason += &format!(
                        "; Envoy at {one} had taken it up, and goes back to the previous version with the file"
                    )
                }
                many => {
                    reason += &format!(
                        "; Envoys at {} had taken it up, and go back to the previous version with the file",
                        many.join(", ")
                    )
                }
            }
            return Err(fail(&self, reason));
        }
        Ok(Applied {
            ecds: self.ecds,
            version: self.version,
            keys: self.keys,
            envoys,
        })
    }

    /// Polls one Envoy's stats until every keygate subscription serves `self.version`
    /// (how long after `written` it was seen), or one of them rejects an update or fails
    /// to read the file, or `timeout` from `written` passes (why, in a sentence), or
    /// `stop` is set (another Envoy failed).
    fn wait(
        &self,
        url: &str,
        before: &[admin::Subscription],
        written: Instant,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Waited {
        let deadline = written + timeout;
        // What the last look saw; a look cut short by the deadline says nothing of Envoy.
        let mut last: Result<Vec<admin::Subscription>, String> = Ok(before.to_vec());
        loop {
            if stop.load(Ordering::SeqCst) {
                return Waited::Cancelled;
            }
            // Each look gets at most 2 s, and never runs past the deadline.
            let look = deadline.min(Instant::now() + Duration::from_secs(2));
            match admin::subscriptions(url, look) {
                Ok(now) => {
                    // The content decides (not the `-r<revision>`): a revision whose
                    // content Envoy already serves is served.
                    let content = content_of(&self.version);
                    if !now.is_empty() && now.iter().all(|s| content_of(&s.version) == content) {
                        return Waited::Served(written.elapsed());
                    }
                    for sub in &now {
                        let Some(was) = before.iter().find(|b| b.name == sub.name) else {
                            continue;
                        };
                        if sub.rejected > was.rejected {
                            return Waited::Failed(self.rejected(url, was, sub));
                        }
                        if sub.failed > was.failed {
                            return Waited::Failed(format!(
                                "Envoy at {url} could not read {} ({}.update_failure went from {} to {})",
                                self.ecds.display(),
                                sub.name,
                                was.failed,
                                sub.failed
                            ));
                        }
                    }
                    last = Ok(now);
                }
                Err(e) if Instant::now() < deadline => last = Err(e.to_string()),
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(POLL_INTERVAL));
        }
        let state = match last {
            Ok(subs) => {
                let served: Vec<String> = subs.iter().map(|s| served(&s.version)).collect();
                format!(
                    "it still serves {}; is it the Envoy that watches {}?",
                    served.join(", "),
                    self.ecds.display()
                )
            }
            Err(e) => format!("its admin stopped answering: {e}"),
        };
        Waited::Failed(format!(
            "Envoy at {url} did not take up version {} within {} ({state})",
            self.version,
            seconds(timeout)
        ))
    }

    fn rejected(&self, url: &str, was: &admin::Subscription, now: &admin::Subscription) -> String {
        let hint = match &self.module {
            Module::Missing(file) => format!(
                "; the module {} that envoy.wasm names does not exist here, which is fine only \
                 if it is a path Envoy sees (inside its container, or from its working directory)",
                file.display()
            ),
            Module::Unreadable(file, why) => format!(
                "; the module {} that envoy.wasm names cannot be read here ({why})",
                file.display()
            ),
            Module::Unset | Module::Valid(_) | Module::NotWasm(..) => String::new(),
        };
        format!(
            "Envoy at {url} rejected version {} ({}.update_rejected went from {} to {}); its \
             admin does not say why, its log does: look for \"keygate: invalid configuration\" \
             or \"config update rejected\"{hint}; Envoy keeps serving {}",
            self.version,
            now.name,
            was.rejected,
            now.rejected,
            served(&now.version)
        )
    }
}

fn served(version: &str) -> String {
    if version.is_empty() {
        "a configuration without a version".into()
    } else {
        format!("version {version}")
    }
}

/// `f` of every item, each in a thread of its own (or here, when no thread can be
/// started), the results in the items' order: Envoys are asked at once, so one slow admin
/// does not hold up the others' deadlines.
pub fn in_parallel<I: Sync, T: Send>(items: &[I], f: impl Fn(&I) -> T + Sync) -> Vec<T> {
    if items.len() < 2 {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let jobs: Vec<_> = items
            .iter()
            .map(|item| {
                std::thread::Builder::new()
                    .name("keygate-envoy".into())
                    .spawn_scoped(scope, move || f(item))
                    .map_err(|_| item)
            })
            .collect();
        jobs.into_iter()
            .map(|job| match job {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
                Err(item) => f(item),
            })
            .collect()
    })
}

/// A duration as "10 s" or "0.4 s".
pub fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if d.subsec_millis() == 0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// `sha256:` and the first 16 hex digits of the SHA-256 of `bytes`.
pub fn content_version(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&keys::digest(bytes)[..8]))
}

/// The store revision an ECDS `version_info` (`sha256:<hex>-r<revision>`) names; `None`
/// for a version written before revisions (`sha256:<hex>`) or by something else.
pub fn revision_of(version: &str) -> Option<u64> {
    let (_, rev) = version.rsplit_once("-r")?;
    if rev.is_empty() || !rev.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rev.parse().ok()
}

/// The content part of an ECDS `version_info`: without its `-r<revision>`.
pub fn content_of(version: &str) -> &str {
    match (revision_of(version), version.rsplit_once("-r")) {
        (Some(_), Some((content, _))) => content,
        _ => version,
    }
}

/// The filter binary `envoy.wasm` names, as seen from this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Module {
    /// The store names none.
    Unset,
    /// A WebAssembly module (`\0asm`, binary version 1).
    Valid(PathBuf),
    /// Not here: a path inside Envoy's container, or one from Envoy's working directory,
    /// may still be right.
    Missing(PathBuf),
    /// Here but unreadable by this user (Envoy may run as another).
    Unreadable(PathBuf, String),
    /// Here and not a WebAssembly module: Envoy would reject the configuration.
    NotWasm(PathBuf, String),
}

/// The first 8 bytes of every WebAssembly module: `\0asm`, then version 1 (little-endian).
const WASM_HEADER: [u8; 8] = [0, b'a', b's', b'm', 1, 0, 0, 0];

fn inspect_module(file: &Path) -> Module {
    let path = file.to_path_buf();
    let meta = match fs::metadata(file) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Module::Missing(path),
        Err(e) => return Module::Unreadable(path, e.to_string()),
    };
    if meta.is_dir() {
        return Module::NotWasm(path, "it is a directory".into());
    }
    let mut head = Vec::with_capacity(WASM_HEADER.len());
    let read = File::open(file).and_then(|f| {
        use std::io::Read as _;
        f.take(WASM_HEADER.len() as u64).read_to_end(&mut head)
    });
    if let Err(e) = read {
        return Module::Unreadable(path, e.to_string());
    }
    if head.starts_with(&WASM_HEADER) {
        return Module::Valid(path);
    }
    let magic = &WASM_HEADER[..4];
    let why = if !head.starts_with(magic) && !magic.starts_with(&head) {
        "it does not start with \\0asm".to_string()
    } else if head.len() < WASM_HEADER.len() {
        format!("it is only {} bytes long", meta.len())
    } else {
        format!(
            "its binary version is {}, not 1: a component, not a module?",
            u32::from_le_bytes([head[4], head[5], head[6], head[7]])
        )
    };
    Module::NotWasm(path, why)
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
    if let Some(dir) = store.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::Other(format!(
                "the store's directory {} does not exist; create it first (keygate does not make directories)",
                dir.display()
            )));
        }
    }
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

/// Envoy's admin interface: the URL the store names, and the little of HTTP needed to
/// read its stats.
///
/// A hand-written HTTP/1.1 GET over `std::net::TcpStream` rather than a client crate: one
/// request shape to one plain-HTTP, usually loopback, endpoint (`Connection: close`,
/// a `Content-Length` or chunked body, timeouts) is about a hundred lines, and keeps the
/// tool's dependency tree (and Cargo.lock) as it is.
pub mod admin {
    use std::fmt;
    use std::io::{self, Read as _, Write as _};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
    use std::time::{Duration, Instant};

    /// The largest answer read: Envoy's filtered stats are a few kilobytes, but its
    /// Prometheus page for `keygate usage` holds a few series per key in use (about
    /// 200 bytes a key), so a large key set in use may take tens of megabytes.
    const MAX_RESPONSE: usize = 256 << 20;

    /// Checks an admin URL: `http://HOST:PORT` and nothing more (a trailing `/` is
    /// dropped). Returns it as stored.
    pub fn parse_url(url: &str) -> Result<String, String> {
        let bad = |why: &str| {
            format!("{url:?} is not an admin URL: {why}; expected http://HOST:PORT, such as http://127.0.0.1:9901")
        };
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(bad(if url.starts_with("https://") {
                "Envoy's admin interface speaks plain HTTP"
            } else {
                "it must start with http://"
            }));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) || rest.chars().any(|c| c.is_whitespace()) {
            return Err(bad("no path, query or user part"));
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, port) = v6
                    .split_once("]:")
                    .ok_or_else(|| bad("an IPv6 address is written [ADDRESS]:PORT"))?;
                host.parse::<Ipv6Addr>()
                    .map_err(|_| bad("not an IPv6 address between the brackets"))?;
                (format!("[{host}]"), port)
            }
            None => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
                let hostname = !host.is_empty()
                    && host.len() <= 253
                    && host.split('.').all(|l| {
                        !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-')
                    })
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
                if !hostname || (numeric && host.parse::<Ipv4Addr>().is_err()) {
                    return Err(bad("not a host name or an IP address"));
                }
                (host.to_string(), port)
            }
        };
        match port.parse::<u16>() {
            Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(format!("http://{host}:{p}"))
            }
            _ => Err(bad("the port must be 1 to 65535")),
        }
    }

    /// Why a GET did not return a 200 answer.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum GetError {
        /// No connection, or no answer at all, in time: Envoy is not there (yet).
        Unreachable(String),
        /// Something answered, but not with a complete 200 HTTP answer.
        Failed(String),
    }

    impl fmt::Display for GetError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                GetError::Unreachable(why) | GetError::Failed(why) => f.write_str(why),
            }
        }
    }

    fn describe(e: &io::Error) -> String {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => "connection refused".into(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "no answer in time".into(),
            _ => e.to_string(),
        }
    }

    /// GETs `path` from the admin at `url` (as [`parse_url`] returns it), giving up at
    /// `deadline`; the body of a 200 answer.
    pub fn get(url: &str, path: &str, deadline: Instant) -> Result<Vec<u8>, GetError> {
        let left = || deadline.saturating_duration_since(Instant::now());
        let authority = url.strip_prefix("http://").unwrap_or(url);
        let addrs: Vec<SocketAddr> = authority
            .to_socket_addrs()
            .map_err(|e| GetError::Unreachable(format!("cannot resolve {authority}: {e}")))?
            .collect();
        let mut last = format!("{authority} resolves to no address");
        let mut stream = None;
        for addr in addrs {
            let budget = left();
            if budget.is_zero() {
                last = "no answer in time".into();
                break;
            }
            match TcpStream::connect_timeout(&addr, budget) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = describe(&e),
            }
        }
        let mut stream = stream.ok_or(GetError::Unreachable(last))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: keygate\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let timeout = |d: Duration| Some(d.max(Duration::from_millis(1)));
        stream
            .set_write_timeout(timeout(left()))
            .and_then(|()| stream.write_all(request.as_bytes()))
            .map_err(|e| GetError::Unreachable(describe(&e)))?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let budget = left();
            let read = if budget.is_zero() {
                Err(io::Error::from(io::ErrorKind::TimedOut))
            } else {
                stream
                    .set_read_timeout(timeout(budget))
                    .and_then(|()| stream.read(&mut buf))
            };
            match read {
                Ok(0) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    if raw.len() > MAX_RESPONSE {
                        return Err(GetError::Failed(format!(
                            "an answer over {MAX_RESPONSE} bytes"
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Nothing at all: as good as not there. Half an answer: something is wrong.
                Err(e) if raw.is_empty() => return Err(GetError::Unreachable(describe(&e))),
                Err(e) => {
                    return Err(GetError::Failed(format!(
                        "an incomplete answer ({})",
                        describe(&e)
                    )))
                }
            }
        }
        if raw.is_empty() {
            return Err(GetError::Failed(
                "the connection closed without an answer".into(),
            ));
        }
        match parse_response(&raw).map_err(GetError::Failed)? {
            (200, body) => Ok(body),
            (status, _) => Err(GetError::Failed(format!("HTTP status {status} for {path}"))),
        }
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    /// The status and body of an HTTP/1.1 answer read to the end of the connection.
    pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let end = find(raw, b"\r\n\r\n").ok_or("not an HTTP answer (no end of headers)")?;
        let head = std::str::from_utf8(&raw[..end]).map_err(|_| "not an HTTP answer")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| {
                format!(
                    "not an HTTP answer: {:?}",
                    status_line.chars().take(40).collect::<String>()
                )
            })?;
        let (mut chunked, mut length) = (false, None);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("a bad Content-Length {value:?}"))?,
                );
            }
        }
        let body = &raw[end + 4..];
        let body = if chunked {
            decode_chunked(body)?
        } else if let Some(n) = length {
            body.get(..n)
                .ok_or("an answer shorter than its Content-Length")?
                .to_vec()
        } else {
            body.to_vec()
        };
        Ok((status, body))
    }

    /// Decodes a chunked body (chunk extensions and trailers are ignored).
    pub fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
        let truncated = || "a truncated chunked answer".to_string();
        let mut out = Vec::new();
        loop {
            let eol = find(rest, b"\r\n").ok_or_else(truncated)?;
            let line = std::str::from_utf8(&rest[..eol]).map_err(|_| "a bad chunk size")?;
            let digits = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(digits, 16)
                .map_err(|_| format!("a bad chunk size {digits:?}"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                return Ok(out);
            }
            let chunk = rest.get(..size).ok_or_else(truncated)?;
            out.extend_from_slice(chunk);
            rest = rest
                .get(size..)
                .and_then(|r| r.strip_prefix(b"\r\n"))
                .ok_or_else(truncated)?;
            if out.len() > MAX_RESPONSE {
                return Err(format!("an answer over {MAX_RESPONSE} bytes"));
            }
        }
    }

    /// One ECDS subscription to the filter, as Envoy's stats show it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Subscription {
        /// The stats prefix, `extension_config_discovery.<prefix>.keygate`.
        pub name: String,
        /// `version_text`: the `version_info` of the last update Envoy accepted.
        pub version: String,
        /// `update_rejected`: updates Envoy refused (a module or configuration it rejects).
        pub rejected: u64,
        /// `update_failure`: updates it could not fetch.
        pub failed: u64,
    }

    /// The keygate subscriptions in Envoy's `/stats?format=json`.
    pub fn parse_subscriptions(body: &[u8]) -> Result<Vec<Subscription>, String> {
        let doc: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("stats that are not JSON: {e}"))?;
        let stats = doc
            .get("stats")
            .and_then(serde_json::Value::as_array)
            .ok_or("stats without a \"stats\" list")?;
        let mut out: Vec<Subscription> = Vec::new();
        let tail = format!(".{}.", super::FILTER_NAME);
        for entry in stats {
            let (Some(name), Some(value)) = (
                entry.get("name").and_then(serde_json::Value::as_str),
                entry.get("value"),
            ) else {
                continue;
            };
            let Some(rest) = name.strip_prefix("extension_config_discovery.") else {
                continue;
            };
            let Some(at) = rest.rfind(&tail) else {
                continue;
            };
            let (scope, field) = (&rest[..at], &rest[at + tail.len()..]);
            if scope.is_empty()
                || !["version_text", "update_rejected", "update_failure"].contains(&field)
            {
                continue;
            }
            let sub_name = format!("extension_config_discovery.{scope}.{}", super::FILTER_NAME);
            let index = match out.iter().position(|s| s.name == sub_name) {
                Some(i) => i,
                None => {
                    out.push(Subscription {
                        name: sub_name,
                        version: String::new(),
                        rejected: 0,
                        failed: 0,
                    });
                    out.len() - 1
                }
            };
            let sub = &mut out[index];
            match field {
                "version_text" => sub.version = value.as_str().unwrap_or_default().to_string(),
                "update_rejected" => sub.rejected = value.as_u64().unwrap_or_default(),
                _ => sub.failed = value.as_u64().unwrap_or_default(),
            }
        }
        Ok(out)
    }

    /// [`subscriptions`] of every admin in `urls`, asked at once, in their order.
    pub fn subscriptions_of_all(
        urls: &[String],
        deadline: Instant,
    ) -> Vec<Result<Vec<Subscription>, GetError>> {
        super::in_parallel(urls, |url| subscriptions(url, deadline))
    }

    /// Envoy's keygate subscriptions, read from the admin at `url` by `deadline`.
    pub fn subscriptions(url: &str, deadline: Instant) -> Result<Vec<Subscription>, GetError> {
        let body = get(
            url,
            "/stats?format=json&filter=extension_config_discovery",
            deadline,
        )?;
        parse_subscriptions(&body).map_err(GetError::Failed)
    }
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
        assert!(store.rotate(&id, 60, None, true, now).is_err());
        assert!(
            store
                .transition(&id, Transition::Reactivate, now)
                .unwrap()
                .changed
        );
        let rotated = store.rotate(&id, 60, None, false, now).unwrap();
        assert_eq!(rotated.old.expires_at, Some(time::format_rfc3339(now + 60)));
        assert_eq!(rotated.new.record.name, "acme (rotated)");
        assert_eq!(
            rotated.new.record.rotated_from.as_deref(),
            Some(id.as_str())
        );
        assert_eq!(store.find(&id).unwrap().state(now + 60), State::Expired);
        // A second rotation in the grace period is refused unless forced, and never
        // extends the old key.
        let e = store.rotate(&id, 3600, None, false, now).unwrap_err();
        assert!(e.to_string().contains("was already rotated"), "{e}");
        store.rotate(&id, 3600, None, true, now).unwrap();
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

    #[test]
    fn admins_are_stored_as_one_url_or_a_list() {
        let mut store = Store::new(Some("e.yaml".into()), "f.wasm".into(), "kg".into());
        let admin_field =
            |store: &Store| serde_json::to_value(store).unwrap()["envoy"]["admin"].clone();
        assert_eq!(admin_field(&store), serde_json::Value::Null);
        let (a, b, c) = (
            "http://a:1".to_string(),
            "http://b:1".to_string(),
            "http://c:1".to_string(),
        );
        let previous = store
            .set_admins(&AdminChange::Set(vec![a.clone(), b.clone(), a.clone()]))
            .unwrap();
        assert!(previous.is_empty());
        assert_eq!(store.envoy.admins, [a.clone(), b.clone()]);
        assert_eq!(admin_field(&store), serde_json::json!([a, b]));
        store
            .set_admins(&AdminChange::Add(vec![b.clone(), c.clone()]))
            .unwrap();
        assert_eq!(store.envoy.admins, [a.clone(), b.clone(), c.clone()]);
        let err = store.set_admins(&AdminChange::Remove(vec![c.clone(), "http://d:1".into()]));
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("names no Envoy admin http://d:1"));
        assert_eq!(
            store.envoy.admins.len(),
            3,
            "a refused removal removes nothing"
        );
        store
            .set_admins(&AdminChange::Remove(vec![a.clone(), c.clone()]))
            .unwrap();
        // One admin: a string, as a keygate that predates fleets wrote and reads it.
        assert_eq!(admin_field(&store), serde_json::json!(b));
        let back: Store = serde_json::from_value(serde_json::to_value(&store).unwrap()).unwrap();
        assert_eq!(back, store);
        let mut list = serde_json::to_value(&store).unwrap();
        list["envoy"]["admin"] = serde_json::json!([a, c]);
        let back: Store = serde_json::from_value(list).unwrap();
        assert_eq!(back.envoy.admins, [a.clone(), c.clone()]);
        assert_eq!(store.set_admins(&AdminChange::Clear).unwrap(), [b]);
        assert_eq!(admin_field(&store), serde_json::Value::Null);
    }

    #[test]
    fn in_parallel_keeps_the_order() {
        let items: Vec<u64> = (0..8).collect();
        let out = in_parallel(&items, |&i| {
            std::thread::sleep(Duration::from_millis(8 - i));
            i * 10
        });
        assert_eq!(out, (0..8).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(in_parallel(&[] as &[u8], |&b| b), Vec::<u8>::new());
    }

    #[test]
    fn admin_answers_chunked_or_not() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                        5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(
            admin::parse_response(chunked).unwrap(),
            (200, b"hello, world".to_vec())
        );
        let sized = b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nabcdef";
        assert_eq!(
            admin::parse_response(sized).unwrap(),
            (404, b"abc".to_vec())
        );
        let to_close = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(admin::parse_response(to_close).unwrap().1, b"all of it");
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\n",
        ] {
            assert!(admin::parse_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn admin_stats_give_each_keygate_subscription() {
        let body = serde_json::json!({"stats": [
            {"name": "extension_config_discovery.http_filter.keygate.version_text", "value": "sha256:0011"},
            {"name": "extension_config_discovery.http_filter.keygate.update_rejected", "value": 2},
            {"name": "extension_config_discovery.http_filter.keygate.update_failure", "value": 1},
            {"name": "extension_config_discovery.http_filter.keygate.update_success", "value": 9},
            {"name": "extension_config_discovery.http_filter.other.version_text", "value": "x"},
            {"name": "extension_config_discovery.listener_filter.keygate.version_text", "value": ""},
            {"name": "cluster.keygate.version_text", "value": "y"},
            {"histograms": {}},
        ]});
        let subs = admin::parse_subscriptions(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            subs,
            vec![
                admin::Subscription {
                    name: "extension_config_discovery.http_filter.keygate".into(),
                    version: "sha256:0011".into(),
                    rejected: 2,
                    failed: 1,
                },
                admin::Subscription {
                    name: "extension_config_discovery.listener_filter.keygate".into(),
                    version: String::new(),
                    rejected: 0,
                    failed: 0,
                },
            ]
        );
        assert!(admin::parse_subscriptions(b"<html>").is_err());
        assert!(admin::parse_subscriptions(b"{}").is_err());
    }

    #[test]
    fn admin_urls() {
        for (url, stored) in [
            ("http://127.0.0.1:9901", "http://127.0.0.1:9901"),
            ("http://127.0.0.1:9901/", "http://127.0.0.1:9901"),
            ("http://[::1]:9901", "http://[::1]:9901"),
            ("http://envoy:9901", "http://envoy:9901"),
            ("http://a-b.example.org:1", "http://a-b.example.org:1"),
        ] {
            assert_eq!(admin::parse_url(url).as_deref(), Ok(stored), "{url}");
        }
        for bad in [
            "",
            "http://",
            "http://:1",
            "http://h:",
            "http://h:+1",
            "http://h:01x",
            "http://-h:1",
            "http://h..x:1",
            "http://1.2.3:1",
            "http://::1:9901",
            "http://[::1]",
            "http://h:1/x",
            "http://h:1//",
            "http:// h:1",
            "https://h:1",
        ] {
            assert!(admin::parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.wasm");
        assert_eq!(inspect_module(&file), Module::Missing(file.clone()));
        fs::write(&file, WASM_HEADER).unwrap();
        assert_eq!(inspect_module(&file), Module::Valid(file.clone()));
        fs::write(&file, b"\x7fELF\x02\x01\x01\0").unwrap();
        assert!(matches!(inspect_module(&file), Module::NotWasm(_, why) if why.contains("\\0asm")));
        assert!(
            matches!(inspect_module(dir.path()), Module::NotWasm(_, why) if why.contains("directory"))
        );
    }

    #[test]
    fn versions_name_content() {
        let store = Store::new(Some("e.yaml".into()), "f.wasm".into(), "kg".into());
        let mut with_key = store.clone();
        with_key
            .create(
                &NewKey {
                    name: "a".into(),
                    role: "r".into(),
                    ..NewKey::default()
                },
                1_800_000_000,
            )
            .unwrap();
        let plugin = with_key.render().unwrap().plugin;
        let doc = with_key.ecds_document(&plugin).unwrap();
        let version = doc["version_info"].as_str().unwrap();
        assert_eq!(version.len(), "sha256:".len() + 16 + "-r1".len());
        assert!(version.ends_with("-r1"), "{version}");
        assert_eq!(revision_of(version), Some(1));
        assert_eq!(content_of(version), &version[..version.len() - 3]);
        assert_eq!(doc, with_key.ecds_document(&plugin).unwrap());
        // Another revision of the same content: the same content part.
        let mut later = with_key.clone();
        later.revision = 17;
        let later_version = later.ecds_document(&plugin).unwrap()["version_info"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(later_version.ends_with("-r17"));
        assert_eq!(content_of(&later_version), content_of(version));
        // Versions from before revisions, and anything else, name no revision.
        assert_eq!(revision_of("sha256:0011223344556677"), None);
        assert_eq!(
            content_of("sha256:0011223344556677"),
            "sha256:0011223344556677"
        );
        assert_eq!(revision_of("sha256:00-r"), None);
        assert_eq!(revision_of("sha256:00-rx1"), None);
        let mut moved = with_key.clone();
        moved.envoy.wasm = Some("g.wasm".into());
        assert_ne!(
            moved.ecds_document(&plugin).unwrap()["version_info"],
            version
        );
        assert_eq!(seconds(Duration::from_secs(10)), "10 s");
        assert_eq!(seconds(Duration::from_millis(430)), "0.4 s");
    }

    fn key_named(store: &mut Store, name: &str, now: i64) -> String {
        store
            .create(
                &NewKey {
                    name: name.into(),
                    role: "client".into(),
                    ..NewKey::default()
                },
                now,
            )
            .unwrap()
            .record
            .id
    }

    fn shares(store: &Store, id: &str) -> Option<String> {
        let plugin = store.render().unwrap().plugin;
        plugin
            .keys
            .iter()
            .find(|k| k.id == id)
            .unwrap()
            .shares_quota_with
            .clone()
    }

    #[test]
    fn rotated_keys_share_the_oldest_budget_still_in_the_store() {
        let now = 1_800_000_000;
        let mut store = Store::new(None, "f.wasm".into(), "kg".into());
        let k1 = key_named(&mut store, "one", now);
        let other = key_named(&mut store, "other", now);
        let k2 = store
            .rotate(&k1, 60, None, false, now)
            .unwrap()
            .new
            .record
            .id;
        let k3 = store
            .rotate(&k2, 60, None, false, now + 1)
            .unwrap()
            .new
            .record
            .id;
        assert_eq!(shares(&store, &k1), None);
        assert_eq!(shares(&store, &other), None);
        assert_eq!(shares(&store, &k2), Some(k1.clone()));
        assert_eq!(shares(&store, &k3), Some(k1.clone()), "no chains: the root");
        let config = store.render().unwrap().config;
        let bucket = |id: &str| {
            config
                .keys
                .iter()
                .find(|k| k.id == id)
                .unwrap()
                .bucket
                .clone()
        };
        assert_eq!(bucket(&k3), bucket(&k1));
        assert_ne!(bucket(&other), bucket(&k1));
        // The predecessor stays in the store revoked or expired: still shared.
        store.transition(&k1, Transition::Revoke, now).unwrap();
        assert_eq!(shares(&store, &k3), Some(k1.clone()));
        // prune keeps it while a successor spends its budget, naming that successor.
        assert!(store.prune(0, now + 10).is_empty());
        let kept = store.kept_for_successors(0, now + 10);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (kept[0].0.id.as_str(), kept[0].1.as_str()),
            (k1.as_str(), k2.as_str())
        );
        // Gone anyway (a hand-edited store): the next oldest is the root.
        store.keys.retain(|k| k.id != k1);
        assert_eq!(shares(&store, &k2), None);
        assert_eq!(shares(&store, &k3), Some(k2.clone()));
        // A loop (hand-edited) shares nothing rather than guessing.
        store
            .keys
            .iter_mut()
            .find(|k| k.id == k2)
            .unwrap()
            .rotated_from = Some(k3.clone());
        assert_eq!(store.budget_root(&k3), None);
    }

    #[test]
    fn rotation_refuses_revoked_expired_and_already_rotated_keys_unless_forced() {
        let now = 1_800_000_000;
        let mut store = Store::new(None, "f.wasm".into(), "kg".into());
        let revoked = key_named(&mut store, "r", now);
        store.transition(&revoked, Transition::Revoke, now).unwrap();
        let e = store.rotate(&revoked, 60, None, false, now).unwrap_err();
        assert!(e.to_string().contains("is revoked"), "{e}");
        let forced = store.rotate(&revoked, 60, None, true, now).unwrap();
        assert_eq!(forced.old.status, KeyStatus::Revoked);
        assert_eq!(
            forced.old.expires_at, None,
            "a forced rotation leaves the old key"
        );

        let expired = key_named(&mut store, "e", now);
        store.find_mut(&expired).unwrap().expires_at = Some(time::format_rfc3339(now - 1));
        let e = store.rotate(&expired, 60, None, false, now).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("key {expired} expired at ")),
            "{e}"
        );
        store.rotate(&expired, 60, None, true, now).unwrap();

        let live = key_named(&mut store, "l", now);
        let next = store
            .rotate(&live, 600, None, false, now)
            .unwrap()
            .new
            .record
            .id;
        let e = store.rotate(&live, 60, None, false, now + 1).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("its successor {next} was created at")),
            "{e}"
        );
        // Once the grace period is over the old key is expired: the expiry says so.
        let e = store.rotate(&live, 60, None, false, now + 601).unwrap_err();
        assert!(e.to_string().contains("expired at"), "{e}");
    }

    #[test]
    fn prune_takes_revoked_and_expired_keys_older_than_the_age() {
        let now = 1_800_000_000;
        let day = 86_400;
        let mut store = Store::new(None, "f.wasm".into(), "kg".into());
        let active = key_named(&mut store, "a", now - 100 * day);
        let old_revoked = key_named(&mut store, "b", now - 100 * day);
        store
            .transition(&old_revoked, Transition::Revoke, now - 40 * day)
            .unwrap();
        let new_revoked = key_named(&mut store, "c", now - 100 * day);
        store
            .transition(&new_revoked, Transition::Revoke, now - day)
            .unwrap();
        let old_expired = key_named(&mut store, "d", now - 100 * day);
        store.find_mut(&old_expired).unwrap().expires_at =
            Some(time::format_rfc3339(now - 31 * day));
        let suspended = key_named(&mut store, "e", now - 100 * day);
        store
            .transition(&suspended, Transition::Suspend, now - 90 * day)
            .unwrap();
        let listed: Vec<&str> = store
            .prunable(30 * day, now)
            .iter()
            .map(|(k, _, _)| k.id.as_str())
            .collect();
        assert_eq!(listed, [old_revoked.as_str(), old_expired.as_str()]);
        let gone: Vec<String> = store
            .prune(30 * day, now)
            .into_iter()
            .map(|k| k.id)
            .collect();
        assert_eq!(gone, [old_revoked, old_expired]);
        let left: Vec<&str> = store.keys.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(
            left,
            [active.as_str(), new_revoked.as_str(), suspended.as_str()]
        );
        assert!(store.prune(30 * day, now).is_empty());
    }

    #[test]
    fn edit_changes_fields_and_refuses_what_create_refuses() {
        let now = 1_800_000_000;
        let mut store = Store::new(None, "f.wasm".into(), "kg".into());
        let id = key_named(&mut store, "a", now);
        let hash = store.find(&id).unwrap().hash.clone();
        let edit = KeyEdit {
            scopes: Some(vec!["a".into(), "b".into(), "a".into()]),
            add_scopes: vec!["c".into()],
            remove_scopes: vec!["b".into()],
            plan: Some(Some("pro".into())),
            client: Some(Some("acme".into())),
            expires_at: Some(Some(now + 60)),
            ..KeyEdit::default()
        };
        let (before, after) = store.edit(&id, &edit, now).unwrap();
        assert_eq!(before.scopes, Vec::<String>::new());
        assert_eq!(after.scopes, ["a", "c"]);
        assert_eq!(after.plan.as_deref(), Some("pro"));
        assert_eq!(after.hash, hash, "the secret stays");
        store.render().unwrap();
        let clear = KeyEdit {
            client: Some(None),
            expires_at: Some(None),
            plan: Some(None),
            ..KeyEdit::default()
        };
        let (_, after) = store.edit(&id, &clear, now).unwrap();
        assert_eq!(
            (after.client, after.expires_at, after.plan),
            (None, None, None)
        );
        let e = store
            .edit(
                &id,
                &KeyEdit {
                    remove_scopes: vec!["zz".into()],
                    ..KeyEdit::default()
                },
                now,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("has no scope \"zz\" (it has: a, c)"),
            "{e}"
        );
        let past = KeyEdit {
            expires_at: Some(Some(now - 1)),
            ..KeyEdit::default()
        };
        assert!(store.edit(&id, &past, now).is_err());
        assert!(KeyEdit::default().is_empty() && !past.is_empty());
        // A plan that does not exist is refused by validation, as at create.
        store
            .edit(
                &id,
                &KeyEdit {
                    plan: Some(Some("gold".into())),
                    ..KeyEdit::default()
                },
                now,
            )
            .unwrap();
        assert!(store.validate().is_err());
    }

    #[test]
    fn stores_of_version_1_are_read_and_newer_ones_refused() {
        let path = Path::new("s.json");
        let mut store = Store::new(None, "f.wasm".into(), "kg".into());
        key_named(&mut store, "a", 1_800_000_000);
        let mut v1 = serde_json::to_value(&store).unwrap();
        v1["version"] = 1.into();
        v1.as_object_mut().unwrap().remove("revision");
        let (read, from) = parse(path, &serde_json::to_vec(&v1).unwrap()).unwrap();
        assert_eq!((read.version, read.revision, from), (VERSION, 0, Some(1)));
        let mut bad = v1.clone();
        bad["keys"][0]["rotated_from"] = "k_x".into();
        let e = parse(path, &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("keys[0].rotated_from"), "{e}");
        let mut newer = serde_json::to_value(&store).unwrap();
        newer["version"] = 3.into();
        newer["something_new"] = true.into();
        let e = parse(path, &serde_json::to_vec(&newer).unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.json is a version 3 store, and this keygate reads versions up to 2; upgrade keygate to use it (nothing was changed)"
        );
        let (same, from) = parse(path, &store_bytes(&store).unwrap()).unwrap();
        assert_eq!((same, from), (store, None));
    }

    #[test]
    fn problems_name_keys_by_id_and_warnings_name_the_routes() {
        let mut store = Store::new(None, "f.wasm".into(), "kg".into());
        let id = key_named(&mut store, "a", 1_800_000_000);
        store.find_mut(&id).unwrap().plan = Some("gold".into());
        store.policy.default_plan = Some("silver".into());
        let problems = policy_problems(&store.plugin_with(&store.policy));
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "default_plan: unknown plan \"silver\"; known plans: enterprise, free, pro",
                &format!(
                    "keys[\"{id}\"].plan: unknown plan \"gold\"; known plans: enterprise, free, pro"
                ),
            ]
        );
        store.policy = serde_json::from_value(serde_json::json!({
            "routes": [
                {"prefix": "/admin", "roles": ["admin"]},
                {"prefix": "/jobs", "roles": ["client", "miner"], "scopes": ["jobs:write"]}
            ]
        }))
        .unwrap();
        assert_eq!(
            identity_warnings(&store.policy, Some("admn"), &["jobs:wrte".into()]),
            [
                "warning: role \"admn\" is not used by any route (routes use: admin, client, miner)",
                "warning: scope \"jobs:wrte\" is not required by any route (routes require: jobs:write)",
            ]
        );
        assert!(identity_warnings(&store.policy, Some("admin"), &["jobs:write".into()]).is_empty());
        assert!(identity_warnings(&store.policy, None, &[]).is_empty());
        assert!(identity_warnings(&PluginConfig::default(), Some("any"), &["x".into()]).is_empty());
    }
}
