//! A component's load, read from its pods' own `/metrics` (admin port
//! 3190): the numbers Prometheus scrapes, so no metrics adapter is needed.
//! One GET per ready pod per autoscaling interval (2 s timeout, all pods at
//! once); at 100 comets every 15 s that is ~7 requests/s of a few tens of KB.

use std::time::Duration;

use futures_util::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The admin port every fleet process serves `/metrics` on.
pub const ADMIN_PORT: u16 = 3190;
const TIMEOUT: Duration = Duration::from_secs(2);

/// What one component is scaled by.
#[derive(Clone, Copy, Debug)]
pub struct Measure {
    /// Summed over its label sets.
    pub metric: &'static str,
    /// Only series whose `route` label starts with this.
    pub route_prefix: Option<&'static str>,
    /// A counter: the load is its rate between two reads.
    pub counter: bool,
    /// The load's unit, for reasons and events.
    pub unit: &'static str,
}

pub const COMET_CONNECTIONS: Measure = Measure {
    metric: "pushcluster_comet_connections",
    route_prefix: None,
    counter: false,
    unit: "connections",
};

/// Published and not yet acked, as each job reports it for its partitions.
pub const JOB_PENDING: Measure = Measure {
    metric: "pushcluster_bus_pending_messages",
    route_prefix: None,
    counter: false,
    unit: "pending messages",
};

pub const LOGIC_PUSH_REQUESTS: Measure = Measure {
    metric: "pushcluster_logic_http_requests_total",
    route_prefix: Some("/goim/push/"),
    counter: true,
    unit: "push requests/s",
};

/// The sum of `measure`'s series in a Prometheus text exposition. A series
/// that is not there counts 0: every fleet process registers these
/// metrics, and a labelled counter shows no series until its first event
/// (a logic pod that has served no push yet).
pub fn sum_metric(text: &str, measure: &Measure) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(measure.metric) else {
            continue;
        };
        let (labels, value) = match rest.chars().next() {
            Some('{') => match rest.split_once('}') {
                Some((labels, value)) => (&labels[1..], value),
                None => continue,
            },
            Some(' ') => ("", rest),
            _ => continue, // another metric with this name as a prefix
        };
        if let Some(prefix) = measure.route_prefix {
            let route = labels
                .split(',')
                .find_map(|pair| pair.trim().strip_prefix("route=\""))
                .map(|value| value.trim_end_matches('"'));
            if !route.is_some_and(|route| route.starts_with(prefix)) {
                continue;
            }
        }
        if let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        {
            total += value;
        }
    }
    total
}

/// Reads `measure` from every pod: (pod name, value or None if its
/// `/metrics` did not answer in time).
pub async fn read(
    http: &reqwest::Client,
    pods: &[&Pod],
    measure: &Measure,
) -> Vec<(String, Option<f64>)> {
    let reads = pods.iter().map(|pod| async move {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        let value = match ip {
            Some(ip) => {
                let url = format!("http://{ip}:{ADMIN_PORT}/metrics");
                match http.get(url).timeout(TIMEOUT).send().await {
                    Ok(response) if response.status().is_success() => response
                        .text()
                        .await
                        .ok()
                        .map(|text| sum_metric(&text, measure)),
                    _ => None,
                }
            }
            None => None,
        };
        (pod.name_any(), value)
    });
    join_all(reads).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP pushcluster_comet_connections Authenticated connections now.
# TYPE pushcluster_comet_connections gauge
pushcluster_comet_connections{transport=\"tcp\"} 7
pushcluster_comet_connections{transport=\"websocket\"} 5
pushcluster_comet_connections_total 99
pushcluster_bus_pending_messages 42
pushcluster_logic_http_requests_total{code=\"0\",route=\"/goim/push/room\",status=\"200\"} 10
pushcluster_logic_http_requests_total{code=\"0\",route=\"/goim/push/mids\",status=\"200\"} 5
pushcluster_logic_http_requests_total{code=\"0\",route=\"/goim/online/top\",status=\"200\"} 100
";

    #[test]
    fn sums_the_series_of_a_metric() {
        assert_eq!(sum_metric(TEXT, &COMET_CONNECTIONS), 12.0);
        assert_eq!(sum_metric(TEXT, &JOB_PENDING), 42.0);
        assert_eq!(sum_metric(TEXT, &LOGIC_PUSH_REQUESTS), 15.0);
        // No series yet (a logic pod that has served no push): zero.
        assert_eq!(sum_metric("# nothing\n", &LOGIC_PUSH_REQUESTS), 0.0);
    }
}
