//! Where the comets are. Job watches this set to know which comets to
//! deliver to: comet id (the server id stored in sessions) → gRPC address.

use tokio::sync::watch;

/// One comet as job sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CometEndpoint {
    /// The comet's server id (`comet.id`; on Kubernetes, the pod name).
    pub id: String,
    /// Its gRPC address, host:port.
    pub addr: String,
}

pub trait Discovery: Send + Sync + 'static {
    /// The current comet set; the receiver sees every change.
    fn comets(&self) -> watch::Receiver<Vec<CometEndpoint>>;
}

/// A fixed list (configuration), changeable in-process with [`set`](Self::set).
pub struct StaticDiscovery {
    tx: watch::Sender<Vec<CometEndpoint>>,
}

impl StaticDiscovery {
    pub fn new(mut comets: Vec<CometEndpoint>) -> Self {
        comets.sort();
        StaticDiscovery {
            tx: watch::Sender::new(comets),
        }
    }

    /// Replaces the set.
    pub fn set(&self, mut comets: Vec<CometEndpoint>) {
        comets.sort();
        self.tx.send_replace(comets);
    }
}

impl Discovery for StaticDiscovery {
    fn comets(&self) -> watch::Receiver<Vec<CometEndpoint>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_changes() {
        let one = CometEndpoint {
            id: "c1".into(),
            addr: "127.0.0.1:1".into(),
        };
        let discovery = StaticDiscovery::new(vec![one.clone()]);
        let mut rx = discovery.comets();
        assert_eq!(*rx.borrow_and_update(), vec![one]);
        discovery.set(Vec::new());
        rx.changed().await.expect("sender alive");
        assert!(rx.borrow().is_empty());
    }
}
