//! The audit trail: one JSON line per change the tool makes, appended to
//! `<store>.audit.jsonl` (0600) once the change is committed, under the store's lock.
//!
//! A line says when, who (`--actor`, else `$SUDO_USER`, `$USER` or the uid), the action,
//! the store revision the change made, the key it concerns (none for a change of the
//! policy or the Envoy targets), and each field changed with its old and new value. Never
//! key material: a key's `hash` and `prefix` are left out of every line.
//!
//! The lines are computed from the store before and after the change ([`diff`]), so every
//! command records what it really changed, and a command that changed nothing records
//! nothing.

use super::{Error, Store, StoredKey};
use crate::time;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

/// One field's change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Before (`null`: absent, or the key did not exist).
    pub old: Value,
    /// After (`null`: absent, or the key was removed).
    pub new: Value,
}

/// What an `apply` did, in its audit line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyRecord {
    /// The ECDS file written.
    pub ecds: String,
    /// Its `version_info`.
    pub version: String,
    /// Whether every Envoy the store names confirmed that it serves it (false when the
    /// store names none, or one was not reachable).
    pub confirmed: bool,
    /// Each admin and what it said: `confirmed` or `unreachable`.
    #[serde(default)]
    pub envoys: BTreeMap<String, String>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// RFC 3339 UTC.
    pub time: String,
    /// Who: `--actor`, else the OS user.
    pub actor: String,
    /// The command: create, update, suspend, reactivate, revoke, rotate, import, prune,
    /// policy-set, set-admin, apply, init.
    pub action: String,
    /// The store's revision after the change.
    pub revision: u64,
    /// The key the line is about; `None` for the policy, the Envoy targets, an apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Each field changed: `name`, `scopes`, ... for a key; `policy.<field>` and
    /// `envoy.<field>` for the store.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub changes: BTreeMap<String, Change>,
    /// For `apply` (and a change made with `--apply`): what Envoy made of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply: Option<ApplyRecord>,
}

/// Who makes a change, and with which command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The name recorded.
    pub name: String,
    /// The action recorded.
    pub action: String,
}

impl Actor {
    /// `name` (from `--actor`, checked), else the OS user, doing `action`.
    pub fn new(name: Option<&str>, action: &str) -> Result<Actor, Error> {
        let name = match name {
            Some(n) => {
                super::check_text(n, 200).map_err(|r| super::other(format!("--actor: {r}")))?;
                n.to_string()
            }
            None => os_user(),
        };
        Ok(Actor {
            name,
            action: action.to_string(),
        })
    }
}

/// `$SUDO_USER` (a change made with sudo is the invoking user's), else `$USER`, else
/// `uid:<n>`.
pub fn os_user() -> String {
    for var in ["SUDO_USER", "USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var) {
            if super::check_text(&v, 200).is_ok() {
                return v;
            }
        }
    }
    uid().map_or_else(|| "unknown".to_string(), |u| format!("uid:{u}"))
}

#[cfg(unix)]
fn uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(not(unix))]
fn uid() -> Option<u32> {
    None
}

/// The audit log of the store at `store`: `<store>.audit.jsonl`.
pub fn path_of(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".audit.jsonl");
    PathBuf::from(name)
}

/// A key's fields as the audit log shows them: everything but `id`, `hash` and `prefix`.
fn key_fields(key: &StoredKey) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Ok(Value::Object(fields)) = serde_json::to_value(key) {
        for (name, value) in fields {
            if matches!(name.as_str(), "id" | "hash" | "prefix") {
                continue;
            }
            out.insert(name, value);
        }
    }
    out
}

fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The changes between two maps of fields; absent counts as `null`, and an empty list
/// as absent.
fn changes(
    old: &BTreeMap<String, Value>,
    new: &BTreeMap<String, Value>,
) -> BTreeMap<String, Change> {
    let mut out = BTreeMap::new();
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        let o = old.get(name).cloned().unwrap_or(Value::Null);
        let n = new.get(name).cloned().unwrap_or(Value::Null);
        if o == n || (empty(&o) && empty(&n)) {
            continue;
        }
        out.insert(name.clone(), Change { old: o, new: n });
    }
    out
}

/// The fields that differ between two versions of a key (never `hash` or `prefix`).
pub fn diff_keys(before: &StoredKey, after: &StoredKey) -> BTreeMap<String, Change> {
    changes(&key_fields(before), &key_fields(after))
}

/// The store-level fields: `version`, `policy.<field>`, `envoy.<field>`.
fn store_fields(store: &Store) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    out.insert("version".to_string(), Value::from(store.version));
    for (prefix, value) in [
        ("policy", serde_json::to_value(&store.policy)),
        ("envoy", serde_json::to_value(&store.envoy)),
    ] {
        if let Ok(Value::Object(fields)) = value {
            for (name, value) in fields {
                if prefix == "policy" && name == "keys" {
                    continue;
                }
                out.insert(format!("{prefix}.{name}"), value);
            }
        }
    }
    out
}

/// The lines recording the change from `before` to `after`: one per key added, removed
/// or changed (in the order of `after`, removed keys last), then one for the store's own
/// fields when they changed.
pub fn diff(before: &Store, after: &Store, actor: &Actor, now: i64) -> Vec<Line> {
    let line = |key: Option<String>, changes: BTreeMap<String, Change>| Line {
        time: time::format_rfc3339(now),
        actor: actor.name.clone(),
        action: actor.action.clone(),
        revision: after.revision,
        key,
        changes,
        apply: None,
    };
    let mut out = Vec::new();
    let none = BTreeMap::new();
    for key in &after.keys {
        let old = before.keys.iter().find(|k| k.id == key.id).map(key_fields);
        let c = changes(old.as_ref().unwrap_or(&none), &key_fields(key));
        if !c.is_empty() {
            out.push(line(Some(key.id.clone()), c));
        }
    }
    for key in &before.keys {
        if !after.keys.iter().any(|k| k.id == key.id) {
            out.push(line(Some(key.id.clone()), changes(&key_fields(key), &none)));
        }
    }
    let c = changes(&store_fields(before), &store_fields(after));
    if !c.is_empty() {
        out.push(line(None, c));
    }
    out
}

/// The open audit log, ready to append to.
pub struct Log {
    file: fs::File,
    path: PathBuf,
}

impl Log {
    /// Opens (creating, 0600) the audit log of the store at `store`. Opened before a
    /// change is written, so a log that cannot be written fails the command with nothing
    /// changed.
    pub fn open(store: &Path) -> Result<Log, Error> {
        let path = path_of(store);
        let mut options = OpenOptions::new();
        options.append(true).create(true);
        super::owner_only_on_create(&mut options);
        let file = options
            .open(&path)
            .map_err(|e| super::io_error("open the audit log", &path, e))?;
        if super::mode_of(&file).is_some_and(|m| m & 0o077 != 0) {
            let _ = super::set_owner_only(&file);
        }
        Ok(Log { file, path })
    }

    /// Appends `lines`, each one JSON line, in one write, and syncs.
    pub fn append(&mut self, lines: &[Line]) -> Result<(), Error> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for line in lines {
            let text = serde_json::to_string(line)
                .map_err(|e| super::other(format!("cannot serialise an audit line: {e}")))?;
            bytes.extend_from_slice(text.as_bytes());
            bytes.push(b'\n');
        }
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| super::io_error("append to the audit log", &self.path, e))
    }
}

/// Reads the audit log of the store at `store` (none yet: no lines). A line that is not
/// an audit line fails with its number.
pub fn read(store: &Path) -> Result<Vec<Line>, Error> {
    let path = path_of(store);
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::io_error("read", &path, e)),
    };
    let mut out = Vec::new();
    for (i, text) in BufReader::new(file).lines().enumerate() {
        let text = text.map_err(|e| super::io_error("read", &path, e))?;
        if text.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(&text).map_err(|e| {
            super::other(format!(
                "{} line {}: not an audit line: {e}",
                path.display(),
                i + 1
            ))
        })?;
        out.push(line);
    }
    Ok(out)
}
