//! Where the comets and logic are. Job watches the comet set to know which
//! comets to deliver to: comet id (the server id stored in sessions) → gRPC
//! address. Comets watch the logic set to balance their calls.

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
    /// The current logic gRPC addresses (host:port).
    fn logics(&self) -> watch::Receiver<Vec<String>>;
}

/// Fixed lists (configuration), changeable in-process with [`set`](Self::set).
pub struct StaticDiscovery {
    comets: watch::Sender<Vec<CometEndpoint>>,
    logics: watch::Sender<Vec<String>>,
}

impl StaticDiscovery {
    pub fn new(mut comets: Vec<CometEndpoint>, mut logics: Vec<String>) -> Self {
        comets.sort();
        logics.sort();
        StaticDiscovery {
            comets: watch::Sender::new(comets),
            logics: watch::Sender::new(logics),
        }
    }

    /// Replaces the comet set.
    pub fn set(&self, mut comets: Vec<CometEndpoint>) {
        comets.sort();
        self.comets.send_replace(comets);
    }
}

impl Discovery for StaticDiscovery {
    fn comets(&self) -> watch::Receiver<Vec<CometEndpoint>> {
        self.comets.subscribe()
    }

    fn logics(&self) -> watch::Receiver<Vec<String>> {
        self.logics.subscribe()
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
        let discovery = StaticDiscovery::new(vec![one.clone()], vec!["127.0.0.1:2".into()]);
        assert_eq!(
            *discovery.logics().borrow(),
            vec!["127.0.0.1:2".to_string()]
        );
        let mut rx = discovery.comets();
        assert_eq!(*rx.borrow_and_update(), vec![one]);
        discovery.set(Vec::new());
        rx.changed().await.expect("sender alive");
        assert!(rx.borrow().is_empty());
    }
}
