//! What the operator may do in the Kubernetes API: the single list its
//! RBAC (the Helm chart, `deploy/operator.yaml`) must grant, exactly. Tests
//! compare both manifests with it and check every request the operator
//! makes against it.

/// One RBAC rule: API group ("" is core), resources (`name/subresource`
/// for a subresource) and verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// Children: watched (`.owns()`) and server-side applied; a first apply is
/// authorized as a create.
const CHILD_VERBS: &[&str] = &["list", "watch", "create", "patch"];

/// Everything the operator does to run fleets (in the namespaces it watches).
pub const FLEET_RULES: &[Rule] = &[
    Rule {
        group: "pushcluster.io",
        resources: &["pushclusters"],
        verbs: &["list", "watch"],
    },
    Rule {
        group: "pushcluster.io",
        resources: &["pushclusters/status"],
        verbs: &["patch"],
    },
    Rule {
        group: "",
        resources: &["configmaps", "serviceaccounts", "services"],
        verbs: CHILD_VERBS,
    },
    // Children; autoscaling also reads a Deployment's live replicas.
    Rule {
        group: "apps",
        resources: &["deployments"],
        verbs: &["get", "list", "watch", "create", "patch"],
    },
    // The push API's generated token: created once, never read back (an
    // existing one answers 409), so no right to read any Secret.
    Rule {
        group: "",
        resources: &["secrets"],
        verbs: &["create"],
    },
    Rule {
        group: "policy",
        resources: &["poddisruptionbudgets"],
        verbs: CHILD_VERBS,
    },
    Rule {
        group: "rbac.authorization.k8s.io",
        resources: &["roles", "rolebindings"],
        verbs: CHILD_VERBS,
    },
    // Never used by the operator itself: the fleet's Role grants it to
    // comets and jobs, and Kubernetes lets only a holder grant it.
    Rule {
        group: "discovery.k8s.io",
        resources: &["endpointslices"],
        verbs: &["get", "list", "watch"],
    },
    // spec.monitoring.serviceMonitor: applied when on, deleted when off.
    Rule {
        group: "monitoring.coreos.com",
        resources: &["servicemonitors"],
        verbs: &["create", "patch", "delete"],
    },
    // Events on PushClusters: kube-runtime's Recorder creates one, then
    // patches it when it repeats.
    Rule {
        group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
    },
    // Autoscaling: the fleet's pods are listed (their /metrics read) and
    // comets get a deletion cost before a scale-down; HPAs targeting a
    // PushCluster are looked for.
    Rule {
        group: "",
        resources: &["pods"],
        verbs: &["list", "patch"],
    },
    Rule {
        group: "autoscaling",
        resources: &["horizontalpodautoscalers"],
        verbs: &["list"],
    },
];

/// Leader election, in the operator's own namespace only.
pub const LEADER_RULES: &[Rule] = &[Rule {
    group: "coordination.k8s.io",
    resources: &["leases"],
    verbs: &["get", "create", "update"],
}];

/// A (group, resource, verb) triple.
pub type Permission = (String, String, String);

/// Every (group, resource, verb) the rules grant.
pub fn permissions(rules: &[Rule]) -> std::collections::BTreeSet<Permission> {
    rules
        .iter()
        .flat_map(|rule| {
            rule.resources.iter().flat_map(move |resource| {
                rule.verbs.iter().map(move |verb| {
                    (
                        rule.group.to_string(),
                        (*resource).to_string(),
                        (*verb).to_string(),
                    )
                })
            })
        })
        .collect()
}

/// The permission an API request needs, from its method, path and query
/// (`GET .../deployments?watch=true` needs `watch apps/deployments`).
/// `None` for paths outside the resource API (`/version`, discovery).
pub fn required(method: &str, path: &str, query: &str) -> Option<Permission> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, subresource] => (*resource, Some(*name), Some(*subresource)),
        _ => return None,
    };
    let watching = query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    let verb = match (method, name) {
        ("GET", _) if watching => "watch",
        ("GET", Some(_)) => "get",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return None,
    };
    let resource = match subresource {
        Some(subresource) => format!("{resource}/{subresource}"),
        None => resource.to_string(),
    };
    Some((group.to_string(), resource, verb.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_the_permission_they_need() {
        let cases = [
            (
                "GET",
                "/apis/apps/v1/deployments",
                "watch=true&resourceVersion=1",
                ("apps", "deployments", "watch"),
            ),
            (
                "GET",
                "/apis/pushcluster.io/v1alpha1/pushclusters",
                "limit=1",
                ("pushcluster.io", "pushclusters", "list"),
            ),
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/ops/leases/op",
                "",
                ("coordination.k8s.io", "leases", "get"),
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/ops/leases/op",
                "",
                ("coordination.k8s.io", "leases", "update"),
            ),
            (
                "PATCH",
                "/api/v1/namespaces/push/services/push-comet",
                "fieldManager=x&force=true",
                ("", "services", "patch"),
            ),
            (
                "PATCH",
                "/apis/pushcluster.io/v1alpha1/namespaces/push/pushclusters/push/status",
                "",
                ("pushcluster.io", "pushclusters/status", "patch"),
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/push/events",
                "",
                ("events.k8s.io", "events", "create"),
            ),
            (
                "DELETE",
                "/apis/monitoring.coreos.com/v1/namespaces/push/servicemonitors/m",
                "",
                ("monitoring.coreos.com", "servicemonitors", "delete"),
            ),
            ("GET", "/api/v1/namespaces", "", ("", "namespaces", "list")),
        ];
        for (method, path, query, (group, resource, verb)) in cases {
            assert_eq!(
                required(method, path, query),
                Some((group.to_string(), resource.to_string(), verb.to_string())),
                "{method} {path}?{query}"
            );
        }
        assert_eq!(required("GET", "/version", ""), None);
    }

    #[test]
    fn rules_expand_to_every_resource_and_verb() {
        let granted = permissions(FLEET_RULES);
        assert!(granted.contains(&("".into(), "services".into(), "create".into())));
        assert!(granted.contains(&("apps".into(), "deployments".into(), "watch".into())));
        assert!(!granted.contains(&("apps".into(), "deployments".into(), "delete".into())));
        assert_eq!(permissions(LEADER_RULES).len(), 3);
    }
}
