//! Keeps per-event log lines bounded: bad input from many clients must not
//! flood the log. Each budget allows a few lines per second and reports how
//! many were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct LogBudget {
    per_second: u64,
    /// second (since the epoch) << 32 | lines logged in that second
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl LogBudget {
    pub const fn new(per_second: u64) -> Self {
        LogBudget {
            per_second,
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now; if so, also how many lines were
    /// suppressed since the last one.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() & 0xffff_ffff)
            .unwrap_or(0);
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (second, count) = (current >> 32, current & 0xffff_ffff);
            let next = if second == now {
                if count >= self.per_second {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                current + 1
            } else {
                (now << 32) | 1
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_few_lines_per_second() {
        let budget = LogBudget::new(3);
        let allowed = (0..100).filter(|_| budget.allow().is_some()).count();
        // The loop may straddle a second boundary.
        assert!((3..=6).contains(&allowed), "{allowed}");
    }
}
