//! A budget of log lines per second, so that a flood of refused requests cannot turn into
//! a flood of log writes (each one a formatted line and a write to Envoy's log).
//!
//! Pure: the caller passes the time in.

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Lines written per second at most; the rest are counted and reported with the next
/// line written.
#[derive(Debug, Clone)]
pub struct LogBudget {
    per_second: u32,
    window_start_ns: u64,
    written: u32,
    skipped: u64,
}

impl LogBudget {
    /// A budget of `per_second` lines a second.
    pub const fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            window_start_ns: 0,
            written: 0,
            skipped: 0,
        }
    }

    /// Whether a line may be written at `now_ns`: `Some(n)` with the number of lines
    /// skipped since the last one written, or `None` to skip this one.
    pub fn admit(&mut self, now_ns: u64) -> Option<u64> {
        // A new window each second; a clock that steps back also starts one.
        if now_ns < self.window_start_ns || now_ns - self.window_start_ns >= NANOS_PER_SECOND {
            self.window_start_ns = now_ns;
            self.written = 0;
        }
        if self.written < self.per_second {
            self.written += 1;
            Some(std::mem::take(&mut self.skipped))
        } else {
            self.skipped = self.skipped.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SECOND;
    const T0: u64 = 1_800_000_000 * SEC;

    #[test]
    fn writes_the_budget_then_counts_what_it_skips() {
        let mut b = LogBudget::new(3);
        let first: Vec<Option<u64>> = (0..5).map(|i| b.admit(T0 + i)).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        // Within the same second: still skipping.
        assert_eq!(b.admit(T0 + SEC - 1), None);
        // Next second: the first line written reports the 3 skipped, the next ones none.
        assert_eq!(b.admit(T0 + SEC), Some(3));
        assert_eq!(b.admit(T0 + SEC + 1), Some(0));
    }

    #[test]
    fn a_clock_stepping_back_starts_a_new_window() {
        let mut b = LogBudget::new(1);
        assert_eq!(b.admit(T0), Some(0));
        assert_eq!(b.admit(T0 + 10), None);
        assert_eq!(b.admit(T0 - SEC), Some(1));
        assert_eq!(b.admit(0), Some(0));
        assert_eq!(b.admit(u64::MAX), Some(0));
    }
}
