//! Readiness shared between a process's components and its admin endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process should receive traffic. Cloning shares the flag.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
