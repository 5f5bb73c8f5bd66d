//! Loading and validation: every problem is reported with its position.

use tandem_config::load_str;

fn errors(yaml: &str) -> Vec<String> {
    match load_str("t.yaml", yaml) {
        Ok(_) => vec![],
        Err(d) => d.iter().map(|d| d.to_string()).collect(),
    }
}

const GOOD: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{name: http, port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata:
  name: catalog-v2
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{kind: Service, name: catalog, port: 8080}]
  rules:
    - matches: [{headers: [{name: x-beta, value: "1"}]}]
      backendRefs: [{name: catalog-v2, port: 8080}]
    - backendRefs:
        - {name: catalog-v1, port: 8080, weight: 90}
        - {name: catalog-v2, port: 8080, weight: 10}
"#;

#[test]
fn good_config_loads() {
    let set = load_str("t.yaml", GOOD).expect("valid");
    assert_eq!(set.services.len(), 3);
    assert_eq!(set.http_routes.len(), 1);
    assert_eq!(set.services[0].namespace, "default");
    assert_eq!(set.http_routes[0].spec.rules.len(), 2);
}

#[test]
fn misspelled_field_is_reported_with_position() {
    let yaml =
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  prots: []\n";
    let e = errors(yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("t.yaml:5:3: "), "{e:?}");
    assert!(e[0].contains("prots"), "{e:?}");
}

#[test]
fn unknown_kind_and_wrong_type_in_separate_documents_are_both_reported() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {}\n---\napiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: b}\nspec:\n  ports: [{port: eighty, protocol: http}]\n";
    let e = errors(yaml);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("t.yaml:2:7: unknown kind `Pod`"), "{e:?}");
    assert!(e[1].starts_with("t.yaml:10:"), "{e:?}");
}

#[test]
fn bad_protocol_is_refused() {
    let yaml = "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80, protocol: udp}]\n";
    let e = errors(yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("t.yaml:5:"), "{e:?}");
}

#[test]
fn dangling_reference_zero_weights_and_duplicates() {
    let yaml = format!(
        "{GOOD}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: catalog}}\nspec:\n  parentRefs: [{{name: nope}}]\n  rules:\n    - backendRefs: [{{name: catalog-v1, weight: 0}}, {{name: ghost}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: zero}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - backendRefs: [{{name: catalog-v1, weight: 0}}]\n"
    );
    let e = errors(&yaml);
    let all = e.join("\n");
    assert!(
        all.contains("duplicate HTTPRoute `default/catalog`"),
        "{all}"
    );
    assert!(
        all.contains("Service `default/nope`, which does not exist"),
        "{all}"
    );
    assert!(
        all.contains("Service `default/ghost`, which does not exist"),
        "{all}"
    );
    assert!(all.contains("weight 0"), "{all}");
    for line in &e {
        let mut parts = line.splitn(4, ':');
        assert_eq!(parts.next(), Some("t.yaml"));
        assert!(
            parts
                .next()
                .and_then(|l| l.parse::<u64>().ok())
                .is_some_and(|l| l > 30),
            "{line}"
        );
    }
}

#[test]
fn tcp_service_cannot_have_http_route() {
    let yaml = "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec:\n  ports: [{port: 5432, protocol: tcp}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: db}\nspec:\n  parentRefs: [{name: db}]\n  rules: [{backendRefs: [{name: db}]}]\n";
    let e = errors(yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("is tcp"), "{e:?}");
}

#[test]
fn bad_names_paths_methods_and_addresses() {
    let yaml = "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: Bad_Name}\nspec:\n  ports: [{port: 80, protocol: http}]\n  endpoints: [{address: 'localhost'}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: Bad_Name}]\n  rules:\n    - matches: [{path: {type: Exact, value: nope}, method: FETCH}]\n      backendRefs: [{name: Bad_Name}]\n";
    let all = errors(yaml).join("\n");
    assert!(all.contains("not a valid name"), "{all}");
    assert!(all.contains("is not an ip:port"), "{all}");
    assert!(all.contains("must start with '/'"), "{all}");
    assert!(all.contains("unknown method `FETCH`"), "{all}");
}

#[test]
fn mixed_protocols_query_names_and_namespace_positions() {
    let yaml = "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: a, namespace: Bad_NS}\nspec:\n  ports: [{port: 80, protocol: http}, {port: 81, protocol: grpc}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: b}]\n  rules:\n    - matches: [{queryParams: [{name: 'a[b]', value: x}, {name: 'a=b', value: y}]}]\n      backendRefs: [{name: b}]\n---\napiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: b}\nspec:\n  ports: [{port: 80, protocol: http}]\n";
    let e = errors(yaml);
    let all = e.join("\n");
    assert!(
        e.iter()
            .any(|l| l.starts_with("t.yaml:3:") && l.contains("`Bad_NS` is not a valid name")),
        "{all}"
    );
    assert!(
        e.iter()
            .any(|l| l.starts_with("t.yaml:5:") && l.contains("one protocol")),
        "{all}"
    );
    assert!(
        e.iter().any(|l| l.starts_with("t.yaml:13:")
            && l.contains("`a=b` is not a valid query parameter name")),
        "{all}"
    );
    assert!(!all.contains("a[b]"), "{all}");
    assert_eq!(e.len(), 3, "{all}");
}

#[test]
fn traffic_policy_mission_example_loads_and_compiles() {
    // The mission's example, in TrafficPolicy form.
    let yaml = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: user-service}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: user-service}
spec:
  targetRef: {kind: Service, name: user-service}
  timeout: 5s
  retry:
    attempts: 3
    on: [5xx, connect-failure]
    perTryTimeout: 1s
  circuitBreaker: {consecutiveErrors: 5, interval: 30s}
"#;
    let set = load_str("t.yaml", yaml).expect("valid");
    let p = tandem_config::policy::compile_policy(&set, &set.traffic_policies[0], &mut Vec::new());
    assert_eq!(p.timeout_ms, Some(5000));
    let r = p.retry.expect("retry");
    assert_eq!((r.attempts, r.per_try_timeout_ms), (3, Some(1000)));
    assert_eq!((r.budget_percent, r.budget_min_per_second), (20, 10));
    assert_eq!((r.backoff_base_ms, r.backoff_max_ms), (25, 250));
    let cb = p.circuit_breaker.expect("circuit breaker");
    assert_eq!((cb.consecutive_errors, cb.interval_ms), (5, 30_000));
    assert_eq!((cb.base_ejection_ms, cb.max_ejection_percent), (30_000, 50));
}

#[test]
fn traffic_policy_problems_are_reported_with_positions() {
    let yaml = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: db}
spec:
  ports: [{port: 5432, protocol: tcp}]
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api}
spec:
  targetRef: {kind: Service, name: api}
  timeout: 5
  retry:
    attempts: 30
    on: [5xx, sometimes]
    perTryTimeout: 10s
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ghost}
spec:
  targetRef: {kind: Service, name: ghost}
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: db}
spec:
  targetRef: {kind: Service, name: db}
  timeout: 1s
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api-again}
spec:
  targetRef: {kind: Service, name: api}
  mirror: {backend: api}
"#;
    let e = errors(yaml);
    let has = |needle: &str| e.iter().any(|x| x.contains(needle));
    assert!(has("t.yaml:19:12: `5` needs a unit"), "{e:#?}");
    assert!(has("t.yaml:21:15: attempts must be at most 10"), "{e:#?}");
    assert!(
        has("t.yaml:22:15: unknown retry condition `sometimes`"),
        "{e:#?}"
    );
    assert!(
        has("t.yaml:29:36: targetRef names Service `default/ghost`, which does not exist"),
        "{e:#?}"
    );
    assert!(has("t.yaml:35:36: Service `default/db` is tcp"), "{e:#?}");
    assert!(has("t.yaml:43:3: unknown field `mirror`"), "{e:#?}");
}

#[test]
fn load_balancer_settings_are_checked() {
    let yaml = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api}
spec:
  targetRef: {kind: Service, name: api}
  loadBalancer: {type: ring-hash}
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web}
  loadBalancer: {type: random}
"#;
    let e = errors(yaml);
    let has = |needle: &str| e.iter().any(|x| x.contains(needle));
    assert!(has("t.yaml:19:24: ring-hash needs `hashHeader`"), "{e:#?}");
    assert!(
        has("t.yaml:26:24: unknown load balancer `random`"),
        "{e:#?}"
    );
}

#[test]
fn route_timeouts_and_retry_are_checked() {
    let yaml = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api}
spec:
  parentRefs: [{kind: Service, name: api, port: 8080}]
  rules:
    - timeouts: {request: 1s, backendRequest: 2s}
      retry: {codes: [200], attempts: 3}
      backendRefs: [{name: api, port: 8080}]
"#;
    let e = errors(yaml);
    let has = |needle: &str| e.iter().any(|x| x.contains(needle));
    assert!(has("backendRequest is longer than request"), "{e:#?}");
    assert!(has("retry codes must be 400-599"), "{e:#?}");
}

#[test]
fn circuit_breaker_limits_are_checked() {
    let policy = |cb: &str| {
        format!(
            r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {{name: api}}
spec:
  ports: [{{port: 8080, protocol: http}}]
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: api}}
spec:
  targetRef: {{kind: Service, name: api}}
  circuitBreaker: {cb}
"#
        )
    };
    let e = errors(&policy("{maxConnections: 0}"));
    assert!(
        e.iter()
            .any(|x| x.contains("t.yaml:13:36: maxConnections must be at least 1")),
        "{e:#?}"
    );
    let e = errors(&policy("{maxPendingRequests: 5}"));
    assert!(
        e.iter().any(|x| x.contains(
            "t.yaml:13:40: maxPendingRequests counts requests waiting at maxConnections"
        )),
        "{e:#?}"
    );
    let compile = |cb: &str| {
        let set = load_str("t.yaml", &policy(cb)).expect("valid");
        let mut diags = Vec::new();
        let p = tandem_config::policy::compile_policy(&set, &set.traffic_policies[0], &mut diags);
        assert!(diags.is_empty(), "{diags:?}");
        p.circuit_breaker.expect("circuit breaker")
    };
    // Limits alone eject nothing; the queue defaults to 1024.
    let cb = compile("{maxConnections: 10}");
    assert_eq!(
        (cb.consecutive_errors, cb.consecutive_gateway_errors),
        (0, 0)
    );
    assert_eq!(
        (cb.max_connections, cb.max_pending_requests),
        (Some(10), Some(1024))
    );
    let cb = compile("{maxConnections: 10, maxPendingRequests: 0, maxRequests: 50}");
    assert_eq!(
        (cb.max_connections, cb.max_pending_requests, cb.max_requests),
        (Some(10), Some(0), Some(50))
    );
    // Any outlier field turns outlier detection on, with its defaults.
    let cb = compile("{baseEjectionTime: 5s}");
    assert_eq!((cb.consecutive_errors, cb.base_ejection_ms), (5, 5000));
}

#[test]
fn remote_clusters_and_exports() {
    let good = "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: payments}\nspec:\n  ports: [{port: 8080, protocol: http}]\n  export: true\n---\napiVersion: tandem.dev/v1alpha1\nkind: RemoteCluster\nmetadata: {name: west}\nspec:\n  api: [\"10.1.0.5:7701\", \"cp.west:7701\"]\n  credentialFile: /etc/tandem/west.token\n";
    let set = load_str("t.yaml", good).expect("valid");
    assert!(set.services[0].spec.export);
    assert_eq!(set.remote_clusters[0].spec.api.len(), 2);
    let bad = "apiVersion: tandem.dev/v1alpha1\nkind: RemoteCluster\nmetadata: {name: west}\nspec:\n  api: [\"nowhere\"]\n  credentialFile: \"\"\n---\napiVersion: tandem.dev/v1alpha1\nkind: RemoteCluster\nmetadata: {name: west}\nspec:\n  api: []\n  credentialFile: f\n";
    let e = errors(bad);
    assert!(
        e.iter()
            .any(|m| m.starts_with("t.yaml:5:9: ") && m.contains("`nowhere` is not host:port")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("t.yaml:6:") && m.contains("credentialFile")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("duplicate RemoteCluster `west`")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.contains("at least one `api` address")),
        "{e:?}"
    );
}
