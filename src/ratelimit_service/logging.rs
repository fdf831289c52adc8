//! Log lines on standard error, and the budgets that keep them few: errors at most one a
//! second (the rest counted into the next), and some notices once per name.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::logbudget::LogBudget;

/// Names remembered for "once per name" notices; past this, such notices go through the
/// error budget instead, so clients cannot grow memory by sending names.
const MAX_NAMES: usize = 1024;

/// Writes `log` records as `<RFC 3339 time> <LEVEL> keygate-ratelimit: <message>`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Only this crate's lines: dependencies' debug output is not ours to print.
        if !record.target().starts_with("keygate") {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let line = format!(
            "{} {} keygate-ratelimit: {}\n",
            crate::time::format_rfc3339(i64::try_from(now).unwrap_or(0)),
            record.level(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Sends `log` records to standard error at `level` and above. A second call changes
/// nothing (so in-process tests may start several services).
pub fn init(level: log::LevelFilter) {
    static LOGGER: StderrLogger = StderrLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Errors at most one line a second; the lines skipped are counted into the next one.
#[derive(Debug)]
pub struct ErrorBudget(Mutex<LogBudget>);

impl Default for ErrorBudget {
    fn default() -> Self {
        ErrorBudget(Mutex::new(LogBudget::new(1)))
    }
}

impl ErrorBudget {
    /// Logs `message` as an error if the budget allows.
    pub fn error(&self, message: impl FnOnce() -> String) {
        let admitted = match self.0.lock() {
            Ok(mut budget) => budget.admit(now_ns()),
            Err(poisoned) => poisoned.into_inner().admit(now_ns()),
        };
        match admitted {
            Some(0) => log::error!("{}", message()),
            Some(skipped) => log::error!("{} ({skipped} similar lines skipped)", message()),
            None => {}
        }
    }
}

/// Remembers which names a notice was logged for, so it is logged once per name.
#[derive(Debug, Default)]
pub struct Once(Mutex<HashSet<String>>);

impl Once {
    /// Whether `name` is new (then remembered). After [`MAX_NAMES`] names, `None`: the
    /// caller should fall back to a budget.
    pub fn first(&self, name: &str) -> Option<bool> {
        let mut names = match self.0.lock() {
            Ok(names) => names,
            Err(poisoned) => poisoned.into_inner(),
        };
        if names.contains(name) {
            return Some(false);
        }
        if names.len() >= MAX_NAMES {
            return None;
        }
        names.insert(name.to_string());
        Some(true)
    }

    /// Forgets every name.
    pub fn clear(&self) {
        match self.0.lock() {
            Ok(mut names) => names.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_name_and_bounded() {
        let once = Once::default();
        assert_eq!(once.first("gold"), Some(true));
        assert_eq!(once.first("gold"), Some(false));
        for i in 1..MAX_NAMES {
            assert_eq!(once.first(&format!("n{i}")), Some(true));
        }
        assert_eq!(once.first("one-too-many"), None);
        assert_eq!(once.first("gold"), Some(false));
        once.clear();
        assert_eq!(once.first("gold"), Some(true));
    }
}
