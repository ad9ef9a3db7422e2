//! `comet.limits`: what one comet, one client address and one connection
//! may take. Connections are admitted at accept (before any TLS or
//! WebSocket work), each holding an [`Admitted`] that gives its place back
//! when the connection ends; frames are paced per connection by a
//! [`FrameBudget`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushcluster_api::config::LimitsConfig;
use tokio::time::Instant;

/// Which limit refused a connection or closed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    ConnectionsPerIp,
    NewConnectionsPerIp,
    FramesPerConnection,
}

impl Limit {
    /// The `limit` label of `pushcluster_comet_limited_total`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::ConnectionsPerIp => "max_connections_per_ip",
            Limit::NewConnectionsPerIp => "new_connections_per_second_per_ip",
            Limit::FramesPerConnection => "frames_per_second_per_connection",
        }
    }
}

/// How often addresses without connections are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

struct PerIp {
    open: usize,
    /// New-connection tokens left, refilled at the configured rate.
    tokens: f64,
    refilled: Instant,
}

struct Addresses {
    by_ip: HashMap<IpAddr, PerIp>,
    swept: Instant,
}

pub struct Admission {
    config: LimitsConfig,
    open: AtomicUsize,
    addresses: Mutex<Addresses>,
}

impl Admission {
    pub fn new(config: LimitsConfig) -> Arc<Admission> {
        Arc::new(Admission {
            config,
            open: AtomicUsize::new(0),
            addresses: Mutex::new(Addresses {
                by_ip: HashMap::new(),
                swept: Instant::now(),
            }),
        })
    }

    fn tracks_addresses(&self) -> bool {
        self.config.max_connections_per_ip > 0 || self.config.new_connections_per_second_per_ip > 0
    }

    /// Takes a place for a new connection from `ip`, or says which limit
    /// refuses it. Refusals take nothing.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Limit> {
        let max = self.config.max_connections;
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (max == 0 || open < max).then_some(open + 1)
            });
        if taken.is_err() {
            return Err(Limit::Connections);
        }
        if self.tracks_addresses()
            && let Err(limit) = self.admit_address(ip)
        {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(limit);
        }
        Ok(Admitted {
            admission: Arc::clone(self),
            ip,
        })
    }

    fn admit_address(&self, ip: IpAddr) -> Result<(), Limit> {
        let Ok(mut addresses) = self.addresses.lock() else {
            // A panic elsewhere poisoned the map: fail open, not closed.
            return Ok(());
        };
        let now = Instant::now();
        let rate = f64::from(self.config.new_connections_per_second_per_ip);
        if now.duration_since(addresses.swept) >= SWEEP_INTERVAL {
            addresses.swept = now;
            // Forget addresses with nothing open whose budget has refilled.
            addresses.by_ip.retain(|_, entry| {
                entry.open > 0
                    || (rate > 0.0
                        && entry.tokens + now.duration_since(entry.refilled).as_secs_f64() * rate
                            < rate)
            });
        }
        let entry = addresses.by_ip.entry(ip).or_insert(PerIp {
            open: 0,
            tokens: rate,
            refilled: now,
        });
        let per_ip = self.config.max_connections_per_ip;
        if per_ip > 0 && entry.open >= per_ip {
            return Err(Limit::ConnectionsPerIp);
        }
        if rate > 0.0 {
            let refill = now.duration_since(entry.refilled).as_secs_f64() * rate;
            entry.tokens = (entry.tokens + refill).min(rate);
            entry.refilled = now;
            if entry.tokens < 1.0 {
                return Err(Limit::NewConnectionsPerIp);
            }
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if self.tracks_addresses()
            && let Ok(mut addresses) = self.addresses.lock()
            && let Some(entry) = addresses.by_ip.get_mut(&ip)
        {
            entry.open = entry.open.saturating_sub(1);
        }
    }

    /// Connections holding a place.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A connection's place; given back when dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.release(self.ip);
    }
}

/// Frames a connection may still send: a bucket of twice the per-second
/// rate, refilled continuously. Rate 0: unlimited.
pub struct FrameBudget {
    rate: f32,
    tokens: f32,
    refilled: Instant,
}

impl FrameBudget {
    pub fn new(per_second: u32) -> FrameBudget {
        let rate = per_second as f32;
        FrameBudget {
            rate,
            tokens: rate * 2.0,
            refilled: Instant::now(),
        }
    }

    /// Takes one frame's token; false when the connection is over its rate.
    pub fn take(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f32() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate * 2.0);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize, rate: u32) -> Arc<Admission> {
        Admission::new(LimitsConfig {
            max_connections: max,
            max_connections_per_ip: per_ip,
            new_connections_per_second_per_ip: rate,
            frames_per_second_per_connection: 0,
            ..LimitsConfig::default()
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn the_comet_limit_refuses_only_beyond_it_and_frees_on_drop() {
        let admission = limits(2, 0, 0);
        let first = admission.admit(A).expect("1st");
        let _second = admission.admit(B).expect("2nd");
        assert_eq!(admission.admit(A).err(), Some(Limit::Connections));
        drop(first);
        assert!(admission.admit(A).is_ok());
    }

    #[test]
    fn the_per_ip_limit_leaves_other_addresses_alone() {
        let admission = limits(0, 1, 0);
        let a = admission.admit(A).expect("A");
        assert_eq!(admission.admit(A).err(), Some(Limit::ConnectionsPerIp));
        let _b = admission.admit(B).expect("B is another address");
        assert_eq!(admission.open(), 2, "the refusal took no place");
        drop(a);
        assert!(admission.admit(A).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn new_connections_per_ip_refill_at_the_rate() {
        let admission = limits(0, 0, 2);
        let held = vec![
            admission.admit(A).expect("1"),
            admission.admit(A).expect("2"),
        ];
        assert_eq!(
            admission.admit(A).err(),
            Some(Limit::NewConnectionsPerIp),
            "a burst of 2"
        );
        assert!(admission.admit(B).is_ok(), "B has its own budget");
        drop(held);
        // Closing does not give the rate back; time does.
        assert_eq!(admission.admit(A).err(), Some(Limit::NewConnectionsPerIp));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(admission.admit(A).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn frame_budget_allows_a_burst_then_the_rate() {
        let mut budget = FrameBudget::new(5);
        assert!((0..10).all(|_| budget.take()), "a burst of twice the rate");
        assert!(!budget.take());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(budget.take(), "one more after 1/5 s");
        assert!(!budget.take());
        let mut unlimited = FrameBudget::new(0);
        assert!((0..10_000).all(|_| unlimited.take()));
    }
}
