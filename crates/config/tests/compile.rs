//! Compiling a config set into the snapshot of one proxy.

use std::collections::BTreeSet;

use tandem_config::compile::{compile, resolve_name, Target};
use tandem_config::load_str;
use tandem_config::snapshot::{Endpoint, PathMatchType, Protocol};

const CONFIG: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 9090, protocol: grpc}]
  endpoints: [{address: "10.0.0.9:9090"}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: api-v2}
spec:
  ports: [{port: 9090, protocol: grpc}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: other, namespace: team}
spec:
  ports: [{port: 80, protocol: tcp}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api}
spec:
  parentRefs: [{name: api}]
  rules:
    - backendRefs: [{name: api, weight: 3}, {name: api-v2, weight: 1}]
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: api-v2}]
    - matches: [{path: {type: Exact, value: /v2/health}}, {headers: [{name: X-Beta, value: "1"}]}]
      backendRefs: [{name: api-v2}]
"#;

fn registry(ns: &str, name: &str) -> Vec<Endpoint> {
    match (ns, name) {
        ("default", "api") => vec![Endpoint {
            address: "127.0.0.1:7001".into(),
            instance: "api-1".into(),
            meshed: true,
            cluster: String::new(),
            zone: String::new(),
        }],
        _ => vec![],
    }
}

#[test]
fn snapshot_holds_only_what_the_proxy_needs() {
    let set = load_str("c.yaml", CONFIG).expect("valid");
    let interest: BTreeSet<String> = [
        "api".to_string(),
        "other.team".to_string(),
        "ghost".to_string(),
    ]
    .into();
    let snap = compile(
        &set,
        &Target {
            namespace: "default",
            service: "web",
            interest: &interest,
        },
        &registry,
    );
    assert_eq!(snap.service, "web");
    assert_eq!(
        snap.inbound.as_ref().map(|i| (i.protocol, i.port)),
        Some((Protocol::Http, 8080))
    );
    let names: Vec<&str> = snap.destinations.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, vec!["api", "other"]);
    assert_eq!(snap.unknown, vec!["ghost".to_string()]);

    let api = &snap.destinations[0];
    assert_eq!(api.protocol, Protocol::Grpc);
    // Backend 0 is the service itself: registered and static endpoints.
    assert_eq!(api.backends[0].name, "api");
    let addrs: Vec<&str> = api.backends[0]
        .endpoints
        .iter()
        .map(|e| e.address.as_str())
        .collect();
    assert_eq!(addrs, vec!["10.0.0.9:9090", "127.0.0.1:7001"]);
    assert!(!api.backends[0].endpoints[0].meshed);
    assert_eq!(api.backends[1].name, "api-v2");

    // Precedence: exact path, longest prefix, headers, then the catch-all.
    let order: Vec<(Option<PathMatchType>, String, usize)> = api
        .routes
        .iter()
        .map(|r| {
            (
                r.matcher.path.as_ref().map(|p| p.kind),
                r.matcher
                    .path
                    .as_ref()
                    .map(|p| p.value.clone())
                    .unwrap_or_default(),
                r.matcher.headers.len(),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            (Some(PathMatchType::Exact), "/v2/health".into(), 0),
            (Some(PathMatchType::PathPrefix), "/v2".into(), 0),
            (Some(PathMatchType::PathPrefix), "/".into(), 1),
            (Some(PathMatchType::PathPrefix), "/".into(), 0),
        ]
    );
    // Header names are compared lower-case.
    assert_eq!(api.routes[2].matcher.headers[0].name, "x-beta");
    let weights: Vec<(usize, u32)> = api.routes[3]
        .backends
        .iter()
        .map(|b| (b.backend, b.weight))
        .collect();
    assert_eq!(weights, vec![(0, 3), (1, 1)]);
    // The snapshot survives its wire form.
    let back = tandem_config::snapshot::Snapshot::from_json(&snap.to_json()).expect("json");
    assert_eq!(back, snap);
}

#[test]
fn undeclared_proxy_service_has_no_inbound() {
    let set = load_str("c.yaml", CONFIG).expect("valid");
    let interest = BTreeSet::new();
    let snap = compile(
        &set,
        &Target {
            namespace: "default",
            service: "nobody",
            interest: &interest,
        },
        &registry,
    );
    assert!(snap.inbound.is_none());
    assert!(snap.destinations.is_empty());
}

#[test]
fn names_resolve_against_the_proxy_namespace() {
    assert_eq!(resolve_name("api", "default"), ("default", "api"));
    assert_eq!(resolve_name("api.team", "default"), ("team", "api"));
    assert_eq!(
        resolve_name("api.team.svc.cluster.local", "default"),
        ("team", "api")
    );
}
