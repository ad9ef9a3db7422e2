//! Operator tests: the generated CRD, its schema, rendering (golden YAML),
//! the reconciler against a mocked API server, and the Helm chart.

mod chart;
mod common;
mod leader;
mod reconcile;
mod rendering;
mod schema;
