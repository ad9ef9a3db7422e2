//! The one retry backoff every component uses: exponential, capped, with
//! jitter. Each delay is drawn between half and all of `base · 2ⁿ` (at most
//! `max`) — "equal jitter" — so the retries of many processes that failed
//! together (a NATS restart, an API server hiccup, a comet that died under
//! every job at once) spread out instead of arriving in waves, while no
//! delay falls below half its step.

use std::time::Duration;

/// Exponential backoff with jitter for one sequence of retries.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempts: 0,
        }
    }

    /// The next delay to wait; counts one attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        Backoff::delay_for(self.base, self.max, self.attempts)
    }

    /// Delays handed out so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over from `base` (after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// The jittered delay before retry number `attempt` (1 for the first),
    /// for callers that keep only a count.
    pub fn delay_for(base: Duration, max: Duration, attempt: u32) -> Duration {
        jitter(Backoff::step(base, max, attempt))
    }

    /// The un-jittered ceiling of retry number `attempt`: `base · 2ⁿ⁻¹`,
    /// at most `max`.
    pub fn step(base: Duration, max: Duration, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        base.saturating_mul(1u32 << doublings).min(max.max(base))
    }
}

fn jitter(step: Duration) -> Duration {
    let half = step / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_half_a_step() {
        let mut backoff = Backoff::new(100 * MS, 2000 * MS);
        for step in [100, 200, 400, 800, 1600, 2000, 2000] {
            let delay = backoff.next_delay();
            assert!(
                delay >= step * MS / 2 && delay <= step * MS,
                "{delay:?} outside [{}, {step}] ms",
                step / 2
            );
        }
        assert_eq!(backoff.attempts(), 7);
        backoff.reset();
        assert!(backoff.next_delay() <= 100 * MS);
    }

    #[test]
    fn retries_that_start_together_spread_out() {
        let delays: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| Backoff::new(1000 * MS, 1000 * MS).next_delay())
            .collect();
        assert!(
            delays.len() > 40,
            "jittered: {} distinct of 50",
            delays.len()
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        assert_eq!(
            Backoff::step(Duration::from_secs(1), Duration::from_secs(300), u32::MAX),
            Duration::from_secs(300)
        );
        assert_eq!(Backoff::step(MS, MS, 0), MS);
    }
}
