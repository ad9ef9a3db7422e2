//! Comet weighting for `/goim/nodes/weighted`, ported from goim's
//! `internal/logic/balancer.go` with its defects removed:
//! - the client's region is looked up (goim's lookup was a stub), and only a
//!   node with a non-empty matching region gets the region gain;
//! - an update is never refused for shrinking: the comets' own reports are
//!   authoritative, so a fleet scaled down does not keep dead nodes;
//! - a total weight of 0 does not divide by zero;
//! - ties are broken by hostname, so the order is deterministic.

use std::collections::BTreeMap;
use std::time::SystemTime;

const MIN_WEIGHT: i64 = 1;
const MAX_WEIGHT: i64 = 1 << 20;
/// goim hands out at most this many nodes.
pub const MAX_NODES: usize = 5;

/// A comet as the balancer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub hostname: String,
    pub region: String,
    pub addrs: Vec<String>,
    pub weight: i64,
    pub conns: i64,
    /// When the node last reported; an unchanged value keeps local state.
    pub updated: Option<SystemTime>,
}

#[derive(Debug, Clone)]
struct WeightedNode {
    info: NodeInfo,
    current_weight: i64,
    current_conns: i64,
}

impl WeightedNode {
    fn calculate_weight(&mut self, total_weight: i64, total_conns: i64, gain: f64) {
        let fixed_weight = self.info.weight as f64 * gain;
        let total_weight = total_weight + fixed_weight as i64 - self.info.weight;
        if total_conns <= 0 {
            self.current_weight = 0;
            return;
        }
        let weight_ratio = if total_weight > 0 {
            fixed_weight / total_weight as f64
        } else {
            0.0
        };
        let conn_ratio = self.current_conns as f64 / total_conns as f64 * 0.5;
        let diff = weight_ratio - conn_ratio;
        let multiple = diff * total_conns as f64;
        let floor = multiple.floor();
        // goim rounds half down: floor when the fraction is at most .5.
        let rounded = if floor - multiple >= -0.5 {
            floor
        } else {
            multiple.ceil()
        };
        self.current_weight = (fixed_weight + rounded) as i64;
        if diff < 0.0 {
            self.current_weight = self.current_weight.max(MIN_WEIGHT);
        } else {
            self.current_weight = self.current_weight.min(MAX_WEIGHT);
        }
    }
}

/// goim's LoadBalancer: nodes weighted by configured weight and current
/// connections; each answer counts one connection for the chosen node.
#[derive(Debug, Default)]
pub struct LoadBalancer {
    total_conns: i64,
    total_weight: i64,
    nodes: BTreeMap<String, WeightedNode>,
}

impl LoadBalancer {
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Replaces the node set. A node whose report did not change keeps the
    /// connections counted for it since its last report.
    pub fn update(&mut self, infos: Vec<NodeInfo>) {
        let mut nodes = BTreeMap::new();
        let (mut total_conns, mut total_weight) = (0, 0);
        for info in infos {
            let node = match self.nodes.remove(&info.hostname) {
                Some(old) if old.info.updated == info.updated && info.updated.is_some() => old,
                _ => WeightedNode {
                    current_conns: info.conns,
                    current_weight: 0,
                    info,
                },
            };
            total_conns += node.current_conns;
            total_weight += node.info.weight;
            nodes.insert(node.info.hostname.clone(), node);
        }
        self.nodes = nodes;
        self.total_conns = total_conns;
        self.total_weight = total_weight;
    }

    /// The best nodes for a client in `region`: (hostname + `domain`, public
    /// addresses), at most [`MAX_NODES`] nodes.
    pub fn node_addrs(
        &mut self,
        region: Option<&str>,
        domain: &str,
        region_weight: f64,
    ) -> (Vec<String>, Vec<String>) {
        let (total_weight, total_conns) = (self.total_weight, self.total_conns);
        let mut ranked: Vec<&mut WeightedNode> = self.nodes.values_mut().collect();
        for node in ranked.iter_mut() {
            let in_region = region.is_some_and(|r| !r.is_empty() && node.info.region.as_str() == r);
            let gain = if in_region { region_weight } else { 1.0 };
            node.calculate_weight(total_weight, total_conns, gain);
        }
        ranked.sort_by_key(|node| std::cmp::Reverse(node.current_weight));
        if let Some(first) = ranked.first_mut() {
            first.current_conns += 1;
        }
        let mut domains = Vec::new();
        let mut addrs = Vec::new();
        for node in ranked.iter().take(MAX_NODES) {
            domains.push(format!("{}{}", node.info.hostname, domain));
            addrs.extend(node.info.addrs.iter().cloned());
        }
        if !self.nodes.is_empty() {
            self.total_conns += 1;
        }
        (domains, addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(hostname: &str, region: &str, weight: i64, conns: i64) -> NodeInfo {
        NodeInfo {
            hostname: hostname.into(),
            region: region.into(),
            addrs: vec![format!("{hostname}-ip")],
            weight,
            conns,
            updated: Some(SystemTime::UNIX_EPOCH),
        }
    }

    fn check(nodes: &[NodeInfo], region: Option<&str>, expected_weights: &[(&str, i64)]) {
        let mut lb = LoadBalancer::default();
        lb.update(nodes.to_vec());
        let (domains, _) = lb.node_addrs(region, ".goim.io", 1.6);
        let got: Vec<(String, i64)> = domains
            .iter()
            .map(|d| {
                let host = d.trim_end_matches(".goim.io").to_string();
                let weight = lb.nodes[&host].current_weight;
                (host, weight)
            })
            .collect();
        let expected: Vec<(String, i64)> = expected_weights
            .iter()
            .map(|(h, w)| (h.to_string(), *w))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn weight_follows_goim_formula() {
        // totals: weight 20, conns 100.
        // a: ratio .5 - 80/100*.5 = .1 → 10 + 10 = 20
        // b: ratio .5 - 20/100*.5 = .4 → 10 + 40 = 50
        check(
            &[node("a", "", 10, 80), node("b", "", 10, 20)],
            None,
            &[("b", 50), ("a", 20)],
        );
    }

    #[test]
    fn exact_half_rounds_down() {
        // totals: weight 20, conns 4. a: (.5 - 1/4*.5)*4 = 1.5 → 1 → 11;
        // b: (.5 - 3/4*.5)*4 = .5 → 0 → 10.
        check(
            &[node("a", "", 10, 1), node("b", "", 10, 3)],
            None,
            &[("a", 11), ("b", 10)],
        );
    }

    #[test]
    fn overloaded_node_keeps_the_minimum_weight() {
        // a: (1/11 - 1000/1000*.5) * 1000 → far below 0 → clamped to 1;
        // b: (10/11 - 0) * 1000 = 909.09 → 909 → 919.
        check(
            &[node("a", "", 1, 1000), node("b", "", 10, 0)],
            None,
            &[("b", 919), ("a", 1)],
        );
    }

    #[test]
    fn region_gain_applies_only_to_the_clients_region() {
        // Without a region both are equal and hostname breaks the tie.
        check(
            &[node("a", "east", 10, 50), node("b", "west", 10, 50)],
            None,
            &[("a", 35), ("b", 35)],
        );
        // b in the client's region: fixed 16, total 26: (16/26 - .25)*100 = 36.54 → 37 → 53
        check(
            &[node("a", "east", 10, 50), node("b", "west", 10, 50)],
            Some("west"),
            &[("b", 53), ("a", 35)],
        );
    }

    #[test]
    fn no_connections_means_zero_weights() {
        check(
            &[node("a", "", 10, 0), node("b", "", 10, 0)],
            None,
            &[("a", 0), ("b", 0)],
        );
    }

    #[test]
    fn each_answer_counts_a_connection_for_the_first_node() {
        let mut lb = LoadBalancer::default();
        lb.update(vec![node("a", "", 10, 10), node("b", "", 10, 10)]);
        let mut firsts = Vec::new();
        for _ in 0..4 {
            let (domains, _) = lb.node_addrs(None, "", 1.6);
            firsts.push(domains[0].clone());
        }
        // Answers alternate as the chosen node accumulates connections.
        assert!(firsts.contains(&"a".to_string()) && firsts.contains(&"b".to_string()));
        assert_eq!(lb.total_conns, 24);
    }

    #[test]
    fn unchanged_reports_keep_counted_connections_and_shrinking_is_accepted() {
        let mut lb = LoadBalancer::default();
        let nodes = vec![
            node("a", "", 10, 10),
            node("b", "", 10, 10),
            node("c", "", 10, 10),
        ];
        lb.update(nodes.clone());
        lb.node_addrs(None, "", 1.6);
        let chosen_conns: i64 = lb.nodes.values().map(|n| n.current_conns).sum();
        assert_eq!(chosen_conns, 31);
        lb.update(nodes[..1].to_vec());
        assert_eq!(
            lb.len(),
            1,
            "goim refused to shrink below half; we follow reports"
        );
    }

    #[test]
    fn at_most_five_nodes_and_zero_total_weight_is_safe() {
        let nodes: Vec<NodeInfo> = (0..8).map(|i| node(&format!("n{i}"), "", 0, 5)).collect();
        let mut lb = LoadBalancer::default();
        lb.update(nodes);
        let (domains, addrs) = lb.node_addrs(None, ".d", 1.6);
        assert_eq!(domains.len(), MAX_NODES);
        assert_eq!(addrs.len(), MAX_NODES);
    }
}
