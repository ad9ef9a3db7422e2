//! Contracts shared by every pushcluster component: the goim v2 frame codec
//! and op codes, goim's protobuf messages and gRPC services, the links
//! between components, and the configuration schema.
//!
//! Invariant: this crate knows nothing of sockets, NATS, Kubernetes or HTTP
//! servers. The gRPC code here is generated contract (message types, client
//! and service traits); who listens where is decided elsewhere.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod health;
pub mod link;
pub mod log_budget;
pub mod pb;
pub mod protocol;
pub mod streams;
