//! Operator tests: the generated CRD, its schema, rendering (golden YAML)
//! and the reconciler against a mocked API server.

mod common;
mod reconcile;
mod rendering;
mod schema;
