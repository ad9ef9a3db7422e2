//! Discovery on Kubernetes: the EndpointSlices of the comet headless Service
//! and of the logic Service (label `kubernetes.io/service-name`), watched
//! in one namespace. Only ready endpoints count (a draining comet turns
//! not-ready first). A comet's id is its pod name (the endpoint's
//! `targetRef`), its address the endpoint address with the port named
//! `discovery.grpc_port_name`.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use pushcluster_api::config::DiscoveryConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::discovery::{CometEndpoint, Discovery};

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("no Kubernetes client configuration (in-cluster or kubeconfig): {0}")]
    Client(#[from] kube::Error),
}

/// The namespace file of an in-cluster service account.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

pub struct KubernetesDiscovery {
    comets: watch::Sender<Vec<CometEndpoint>>,
    logics: watch::Sender<Vec<String>>,
}

/// One usable endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ready {
    /// Pod name, when the endpoint names one.
    pod: Option<String>,
    addr: String,
}

fn host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The ready endpoints of a slice, with the named port.
fn ready_endpoints(slice: &EndpointSlice, port_name: &str) -> Vec<Ready> {
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port_name))
        .and_then(|p| p.port)
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        // An unknown readiness counts as ready, as the API advises.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| {
            let ip = e.addresses.first()?;
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            Some(Ready {
                pod,
                addr: host_port(ip, port),
            })
        })
        .collect()
}

impl KubernetesDiscovery {
    /// Watches with the in-cluster (or kubeconfig) client until `stop`.
    pub async fn start(
        config: &DiscoveryConfig,
        stop: CancellationToken,
    ) -> Result<Self, KubernetesError> {
        let client = Client::try_default().await?;
        Ok(Self::with_client(client, config, stop))
    }

    pub fn with_client(client: Client, config: &DiscoveryConfig, stop: CancellationToken) -> Self {
        let namespace = config
            .namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| {
                std::fs::read_to_string(NAMESPACE_FILE)
                    .ok()
                    .map(|n| n.trim().to_string())
            })
            .unwrap_or_else(|| client.default_namespace().to_string());
        let discovery = KubernetesDiscovery {
            comets: watch::Sender::new(Vec::new()),
            logics: watch::Sender::new(Vec::new()),
        };
        let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
        if !config.comet_service.is_empty() {
            let comets = discovery.comets.clone();
            tokio::spawn(follow(
                api.clone(),
                config.comet_service.clone(),
                config.grpc_port_name.clone(),
                stop.clone(),
                move |slices| {
                    let mut by_id = BTreeMap::new();
                    for ready in slices.values().flatten() {
                        match &ready.pod {
                            Some(pod) => {
                                by_id.insert(pod.clone(), ready.addr.clone());
                            }
                            None => {
                                tracing::warn!(addr = %ready.addr, "comet endpoint without a pod; ignored")
                            }
                        }
                    }
                    let list: Vec<CometEndpoint> = by_id
                        .into_iter()
                        .map(|(id, addr)| CometEndpoint { id, addr })
                        .collect();
                    comets.send_if_modified(|current| {
                        let changed = *current != list;
                        *current = list;
                        changed
                    });
                },
            ));
        }
        if !config.logic_service.is_empty() {
            let logics = discovery.logics.clone();
            tokio::spawn(follow(
                api,
                config.logic_service.clone(),
                config.grpc_port_name.clone(),
                stop,
                move |slices| {
                    let mut list: Vec<String> =
                        slices.values().flatten().map(|r| r.addr.clone()).collect();
                    list.sort();
                    list.dedup();
                    logics.send_if_modified(|current| {
                        let changed = *current != list;
                        *current = list;
                        changed
                    });
                },
            ));
        }
        discovery
    }
}

/// Watches one Service's slices and calls `publish` with the ready
/// endpoints of every slice after each change.
async fn follow(
    api: Api<EndpointSlice>,
    service: String,
    port_name: String,
    stop: CancellationToken,
    publish: impl Fn(&BTreeMap<String, Vec<Ready>>),
) {
    let selector = format!("kubernetes.io/service-name={service}");
    let mut events = watcher::watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut slices: BTreeMap<String, Vec<Ready>> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Vec<Ready>>> = None;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        let name_of = |slice: &EndpointSlice| slice.metadata.name.clone().unwrap_or_default();
        match event {
            None => return,
            Some(Err(error)) => {
                tracing::warn!(%service, %error, "EndpointSlice watch failed; retrying");
                continue;
            }
            Some(Ok(Event::Init)) => listing = Some(BTreeMap::new()),
            Some(Ok(Event::InitApply(slice))) => {
                if let Some(listing) = listing.as_mut() {
                    listing.insert(name_of(&slice), ready_endpoints(&slice, &port_name));
                }
            }
            Some(Ok(Event::InitDone)) => {
                slices = listing.take().unwrap_or_default();
                publish(&slices);
            }
            Some(Ok(Event::Apply(slice))) => {
                slices.insert(name_of(&slice), ready_endpoints(&slice, &port_name));
                publish(&slices);
            }
            Some(Ok(Event::Delete(slice))) => {
                slices.remove(&name_of(&slice));
                publish(&slices);
            }
        }
    }
}

impl Discovery for KubernetesDiscovery {
    fn comets(&self) -> watch::Receiver<Vec<CometEndpoint>> {
        self.comets.subscribe()
    }

    fn logics(&self) -> watch::Receiver<Vec<String>> {
        self.logics.subscribe()
    }
}

#[cfg(test)]
mod tests;
