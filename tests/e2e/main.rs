//! End-to-end tests of `pushcluster standalone`: the real binary on
//! ephemeral loopback ports, driven by real TCP, WebSocket, HTTP and gRPC
//! clients, exactly as goim clients and business backends use it.

mod common;
mod docs;
mod fake_kube;
mod fleet;
mod grpc;
mod lifecycle;
mod observability;
mod operator;
mod push_api;
mod resume;
mod rooms;
mod security;
mod upstream;
mod websocket;
mod wire;
