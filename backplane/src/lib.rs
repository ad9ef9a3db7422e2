//! The seams between pushcluster's components and the stateful backends
//! they share: the [`Bus`](bus::Bus) that carries `PushMsg` from logic to
//! job, the [`Registry`](registry::Registry) of sessions and online counts,
//! and the [`Discovery`](discovery::Discovery) of comets.
//!
//! Each seam is a trait with an in-memory implementation (standalone mode).
//! Invariant: this is the only crate that talks to NATS, and with the
//! operator the only one that talks to the Kubernetes API. comet, logic and
//! job know these backends only through the traits.
#![forbid(unsafe_code)]

pub mod bus;
#[cfg(test)]
mod conformance;
pub mod discovery;
pub mod kubernetes;
pub mod nats;
pub mod registry;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod upstream;
