//! Loading example PushClusters as the API server would hand them over.

use std::path::PathBuf;

use pushcluster_operator::crd::PushCluster;

pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

pub fn read(path: &str) -> String {
    let path = repo(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn yaml(path: &str) -> serde_json::Value {
    serde_yaml_ng::from_str(&read(path)).expect("example YAML")
}

/// An example as stored: namespace, uid and generation set.
pub fn stored(path: &str) -> PushCluster {
    let mut value = yaml(path);
    value["metadata"]["namespace"] = "push".into();
    value["metadata"]["uid"] = "0b5e6c7a-1111-4222-8333-944455556666".into();
    value["metadata"]["generation"] = 3.into();
    value["metadata"]["resourceVersion"] = "100".into();
    serde_json::from_value(value).expect("a PushCluster")
}
