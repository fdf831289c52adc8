//! The plans in force, and the watcher that reloads them when the store file changes.
//!
//! The store is looked at every [`POLL`]: a change of size, modification time, inode or
//! device is a change (`keygate` replaces the file by renaming a new one over it). A store
//! that loads becomes the plans in force; one that does not keeps the previous plans, and
//! its error is logged once for that version of the file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::plans::{self, Plans, PlansError};

/// How often the store file is looked at.
pub const POLL: Duration = Duration::from_millis(500);

/// What identifies one version of the store file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    device: u64,
}

/// The signature of the file at `path`; `None` if it cannot be looked at.
pub fn signature(path: &Path) -> Option<Signature> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (inode, device) = {
        use std::os::unix::fs::MetadataExt;
        (meta.ino(), meta.dev())
    };
    #[cfg(not(unix))]
    let (inode, device) = (0, 0);
    Some(Signature {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
        device,
    })
}

/// The plans in force, shared by every request.
#[derive(Debug)]
pub struct Current(RwLock<Arc<Plans>>);

impl Current {
    /// Plans in force from now on.
    pub fn new(plans: Plans) -> Current {
        Current(RwLock::new(Arc::new(plans)))
    }

    /// The plans in force.
    pub fn get(&self) -> Arc<Plans> {
        match self.0.read() {
            Ok(plans) => Arc::clone(&plans),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set(&self, plans: Plans) {
        let plans = Arc::new(plans);
        match self.0.write() {
            Ok(mut current) => *current = plans,
            Err(poisoned) => *poisoned.into_inner() = plans,
        }
    }
}

/// One sentence on what changed between two sets of plans.
pub fn describe_change(old: &Plans, new: &Plans) -> String {
    let mut parts = Vec::new();
    let added: Vec<&str> = new
        .keys()
        .filter(|k| !old.contains_key(k))
        .map(String::as_str)
        .collect();
    let removed: Vec<&str> = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .map(String::as_str)
        .collect();
    let changed: Vec<&str> = new
        .iter()
        .filter(|(k, rate)| old.get(k).is_some_and(|r| r != *rate))
        .map(|(k, _)| k.as_str())
        .collect();
    for (what, names) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !names.is_empty() {
            parts.push(format!("{what} {}", names.join(", ")));
        }
    }
    if old.headers != new.headers {
        parts.push(format!("rate-limit headers now {:?}", new.headers));
    }
    if parts.is_empty() {
        "no plan changed".into()
    } else {
        parts.join("; ")
    }
}

/// Called after a reload took effect, with the new plans.
pub type OnReload = Box<dyn Fn(&Plans) + Send>;

/// Watches the store; what a change does is [`Watcher::apply`].
pub struct Watcher {
    path: PathBuf,
    seen: Option<Signature>,
    current: Arc<Current>,
    on_reload: OnReload,
}

impl Watcher {
    /// A watcher of `path`, whose version `seen` gave the plans in `current`.
    pub fn new(
        path: PathBuf,
        seen: Option<Signature>,
        current: Arc<Current>,
        on_reload: OnReload,
    ) -> Watcher {
        Watcher {
            path,
            seen,
            current,
            on_reload,
        }
    }

    /// Looks at the store once: [`Watcher::apply`] with its signature now.
    pub fn poll(&mut self, load: impl FnOnce(&Path) -> Result<Plans, PlansError>) -> bool {
        self.apply(signature(&self.path), load)
    }

    /// If `now` (the store's signature, taken before `load` reads it) differs from the
    /// last one seen, loads the store with `load`, and either puts its plans in force and
    /// logs the reload, or logs why not. Returns whether plans were put in force.
    pub fn apply(
        &mut self,
        now: Option<Signature>,
        load: impl FnOnce(&Path) -> Result<Plans, PlansError>,
    ) -> bool {
        if now == self.seen {
            return false;
        }
        self.seen = now;
        if now.is_none() {
            log::error!(
                "store {}: cannot be read; keeping the previous plans",
                self.path.display()
            );
            return false;
        }
        match load(&self.path) {
            Ok(plans) => {
                let old = self.current.get();
                log::info!(
                    "plans reloaded from {}: {} plans ({})",
                    self.path.display(),
                    plans.len(),
                    describe_change(&old, &plans)
                );
                (self.on_reload)(&plans);
                self.current.set(plans);
                true
            }
            Err(e) => {
                log::error!("{e}; keeping the previous plans");
                false
            }
        }
    }

    /// Polls every [`POLL`] until the runtime stops; loading runs off the async threads.
    pub async fn run(mut self) {
        let mut ticks = tokio::time::interval(POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let path = self.path.clone();
            let now = signature(&path);
            if now == self.seen {
                continue;
            }
            // `now` was taken before the store is read: a change during the read is seen
            // at the next tick.
            let loaded = tokio::task::spawn_blocking(move || plans::load(&path)).await;
            let loaded = match loaded {
                Ok(result) => result,
                Err(e) => Err(PlansError(format!("loading the store failed: {e}"))),
            };
            self.apply(now, |_| loaded);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Rate;

    fn rate(requests: u64) -> Rate {
        Rate {
            requests,
            period_ns: 60_000_000_000,
            burst: requests,
        }
    }

    #[test]
    fn change_is_described() {
        let old = Plans::of([("a", vec![rate(1)]), ("b", vec![rate(2)])]);
        let new = Plans::of([("a", vec![rate(5)]), ("c", vec![rate(2)])]);
        assert_eq!(describe_change(&old, &new), "added c; removed b; changed a");
        assert_eq!(describe_change(&old, &old), "no plan changed");
    }

    #[test]
    fn a_failed_load_keeps_the_plans_and_is_tried_once_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.json");
        std::fs::write(&path, "one").unwrap();
        let current = Arc::new(Current::new(Plans::of([("a", vec![rate(1)])])));
        let mut watcher = Watcher::new(path.clone(), None, Arc::clone(&current), Box::new(|_| {}));
        let mut loads = 0;
        assert!(!watcher.poll(|_| {
            loads += 1;
            Err(PlansError("bad".into()))
        }));
        assert!(!watcher.poll(|_| {
            loads += 1;
            Err(PlansError("bad".into()))
        }));
        assert_eq!(loads, 1, "the same version is not loaded again");
        assert_eq!(
            current.get().get("a").map(|p| p.rates.clone()),
            Some(vec![rate(1)])
        );
        std::fs::write(&path, "two!").unwrap();
        assert!(watcher.poll(|_| Ok(Plans::of([("a", vec![rate(9)])]))));
        assert_eq!(
            current.get().get("a").map(|p| p.rates.clone()),
            Some(vec![rate(9)])
        );
        std::fs::remove_file(&path).unwrap();
        assert!(!watcher.poll(|_| Ok(Plans::new())));
        assert_eq!(
            current.get().get("a").map(|p| p.rates.clone()),
            Some(vec![rate(9)])
        );
    }
}
