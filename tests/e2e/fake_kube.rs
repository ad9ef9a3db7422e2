//! A small in-memory Kubernetes API server over real HTTP, enough for the
//! operator process: list and (idle) watch, get, create, server-side apply
//! and merge patches, status patches, replace and delete. It records every
//! request so tests can check them against the operator's RBAC.
//!
//! Not a conformance fake: no validation, label selectors or watch events.
//! Real clusters are covered by the env-gated suite in `kubernetes.rs`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
}

#[derive(Default)]
struct Store {
    /// Objects by their path (`/apis/apps/v1/namespaces/push/deployments/x`).
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    version: u64,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    task: JoinHandle<()>,
}

/// Where a request points.
struct Target {
    /// `/api/v1` or `/apis/<group>/<version>`.
    prefix: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (prefix, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => (format!("/api/{version}"), rest),
            ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some(namespace.to_string()), rest)
            }
            rest => (None, rest),
        };
        let (resource, name, subresource) = match rest {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(*name), None),
            [resource, name, subresource] => (*resource, Some(*name), Some(*subresource)),
            _ => return None,
        };
        Some(Target {
            prefix,
            namespace,
            resource: resource.to_string(),
            name: name.map(str::to_string),
            subresource: subresource.map(str::to_string),
        })
    }

    fn object_path(&self, name: &str) -> String {
        match &self.namespace {
            Some(namespace) => format!(
                "{}/namespaces/{namespace}/{}/{name}",
                self.prefix, self.resource
            ),
            None => format!("{}/{}/{name}", self.prefix, self.resource),
        }
    }

    /// Whether an object path lies in this collection (all namespaces when
    /// the request names none).
    fn contains(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix(&self.prefix) else {
            return false;
        };
        let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
        match (segments.as_slice(), &self.namespace) {
            (["namespaces", namespace, resource, _], Some(wanted)) => {
                namespace == wanted && *resource == self.resource
            }
            (["namespaces", _, resource, _], None) => *resource == self.resource,
            ([resource, _], None) => *resource == self.resource,
            _ => false,
        }
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    (code, axum::Json(body)).into_response()
}

fn ok(code: StatusCode, object: &Value) -> Response {
    (code, axum::Json(object.clone())).into_response()
}

/// JSON merge patch (RFC 7386), which is also close enough to what a
/// server-side apply of a full object does to it.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

impl Store {
    fn stamp(&mut self, object: &mut Value) {
        self.version += 1;
        let metadata = &mut object["metadata"];
        metadata["resourceVersion"] = json!(self.version.to_string());
        if metadata.get("uid").is_none_or(Value::is_null) {
            metadata["uid"] = json!(format!("uid-{}", self.version));
            metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            metadata["generation"] = json!(1);
        }
    }

    fn handle(&mut self, method: &Method, target: &Target, body: &[u8]) -> Response {
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(value) => value,
                Err(error) => {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", &error.to_string());
                }
            }
        };
        match (method.as_str(), &target.name) {
            ("GET", None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(path, _)| target.contains(path))
                    .map(|(_, object)| object.clone())
                    .collect();
                let list = json!({
                    "apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": self.version.to_string()},
                    "items": items
                });
                ok(StatusCode::OK, &list)
            }
            ("GET", Some(name)) => match self.objects.get(&target.object_path(name)) {
                Some(object) => ok(StatusCode::OK, object),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            },
            ("POST", None) => {
                let Some(name) = body["metadata"]["name"].as_str().map(str::to_string) else {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "metadata.name missing",
                    );
                };
                let path = target.object_path(&name);
                if self.objects.contains_key(&path) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{name} exists"),
                    );
                }
                let mut object = body;
                if let Some(namespace) = &target.namespace {
                    object["metadata"]["namespace"] = json!(namespace);
                }
                self.stamp(&mut object);
                self.objects.insert(path, object.clone());
                ok(StatusCode::CREATED, &object)
            }
            ("PUT", Some(name)) => {
                let path = target.object_path(name);
                if !self.objects.contains_key(&path) {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{name} not found"),
                    );
                }
                let mut object = body;
                self.stamp(&mut object);
                self.objects.insert(path, object.clone());
                ok(StatusCode::OK, &object)
            }
            ("PATCH", Some(name)) => {
                let path = target.object_path(name);
                let existing = self.objects.get(&path).cloned();
                let mut object = match (existing, &target.subresource) {
                    (Some(object), _) => object,
                    // A status patch needs the object; an apply creates it.
                    (None, Some(_)) => {
                        return status(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            &format!("{name} not found"),
                        );
                    }
                    (None, None) => {
                        let mut object = json!({"metadata": {"name": name}});
                        if let Some(namespace) = &target.namespace {
                            object["metadata"]["namespace"] = json!(namespace);
                        }
                        object
                    }
                };
                match target.subresource.as_deref() {
                    Some("status") => object["status"] = body["status"].clone(),
                    _ => merge(&mut object, &body),
                }
                self.stamp(&mut object);
                self.objects.insert(path, object.clone());
                ok(StatusCode::OK, &object)
            }
            ("DELETE", Some(name)) => match self.objects.remove(&target.object_path(name)) {
                Some(_) => ok(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                ),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            },
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported by the fake",
            ),
        }
    }
}

async fn serve(State(store): State<Arc<Mutex<Store>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or_default().to_string();
    let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    if let Ok(mut store) = store.lock() {
        store.requests.push(Recorded {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
        });
    }
    let Some(target) = Target::parse(&path) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "unknown path");
    };
    let watching = query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    if parts.method == Method::GET && watching {
        // An open watch with no events: nothing changes behind the
        // operator's back here.
        let idle = futures_util::stream::pending::<Result<Bytes, Infallible>>();
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(idle))
            .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR, "Internal", "body"));
    }
    match store.lock() {
        Ok(mut store) => store.handle(&parts.method, &target, &body),
        Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR, "Internal", "poisoned"),
    }
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let store = Arc::new(Mutex::new(Store::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().fallback(serve).with_state(store.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKube { addr, store, task }
    }

    /// Stores an object as if a user had applied it.
    pub fn insert(&self, path: &str, mut object: Value) {
        let mut store = self.store.lock().expect("store");
        store.stamp(&mut object);
        store.objects.insert(path.to_string(), object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.store.lock().expect("store").objects.get(path).cloned()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.store.lock().expect("store").requests.clone()
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster: {{ server: "http://{}" }}
users:
  - name: fake
    user: {{ token: fake-token }}
contexts:
  - name: fake
    context: {{ cluster: fake, user: fake, namespace: default }}
current-context: fake
"#,
            self.addr
        )
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}
