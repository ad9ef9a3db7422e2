//! Keeps the user docs true: every config key and every metric is documented.

use pushcluster_api::config::Config;

use crate::common::Server;

fn doc(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn leaf_keys(prefix: &str, value: &serde_yaml_ng::Value, keys: &mut Vec<String>) {
    match value {
        serde_yaml_ng::Value::Mapping(map) if !map.is_empty() => {
            for (key, value) in map {
                let key = key.as_str().expect("string keys");
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                leaf_keys(&path, value, keys);
            }
        }
        _ => keys.push(prefix.to_string()),
    }
}

#[test]
fn every_config_key_is_documented() {
    let yaml = Config::default().to_yaml().expect("yaml");
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).expect("parse");
    let mut keys = Vec::new();
    leaf_keys("", &value, &mut keys);
    assert!(keys.len() > 40, "{keys:?}");
    let docs = doc("configuration.md");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| !docs.contains(&format!("`{key}`")))
        .collect();
    assert!(missing.is_empty(), "undocumented config keys: {missing:?}");
}

/// Fails unless every `pushcluster_*` metric in this `/metrics` text is in
/// docs/metrics.md.
pub fn assert_metrics_documented(text: &str) {
    let docs = doc("metrics.md");
    let missing: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# HELP "))
        .filter_map(|help| help.split_whitespace().next())
        .filter(|name| name.starts_with("pushcluster_"))
        .filter(|name| !docs.contains(&format!("`{name}`")))
        .collect();
    assert!(missing.is_empty(), "undocumented metrics: {missing:?}");
}

#[tokio::test]
async fn every_metric_is_documented() {
    let server = Server::start();
    let (_, text) = server.admin("/metrics").await;
    assert_metrics_documented(&text);
}
