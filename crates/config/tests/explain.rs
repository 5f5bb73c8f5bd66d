//! `tandem explain`: what the mesh would do with one request, from the
//! demo's config and a few more resources.

use tandem_config::explain::{explain, ExplainRequest, Explanation};
use tandem_config::load_str;
use tandem_config::rollout::{Split, Splits};

const DEMO: &str = include_str!("../../cli/demo-config/demo.yaml");

const MORE: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: docs}
spec:
  ports: [{name: http, port: 8080, protocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: docs}
spec:
  parentRefs: [{kind: Service, name: docs, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
            statusCode: 301
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-env, value: prod}], remove: [x-debug]}
        - type: RequestMirror
          requestMirror: {backendRef: {name: orders, port: 8080}, percent: 25}
        - type: ExtensionRef
          extensionRef: {group: tandem.dev, kind: FaultInjection, name: slow}
      backendRefs: [{name: docs, port: 8080}]
      timeouts: {request: 300ms}
---
apiVersion: tandem.dev/v1alpha1
kind: FaultInjection
metadata: {name: slow}
spec:
  delay: {duration: 50ms, percent: 10}
  match: {headers: [{name: x-chaos, value: "on"}]}
"#;

fn set() -> tandem_config::ResourceSet {
    load_str("demo.yaml", &format!("{DEMO}\n---{MORE}")).expect("valid config")
}

fn ask(
    source: &str,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Explanation {
    ask_with(&Splits::new(), source, method, authority, path, headers)
}

fn ask_with(
    splits: &Splits,
    source: &str,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Explanation {
    explain(
        &set(),
        splits,
        "tandem.local",
        &ExplainRequest {
            source: source.into(),
            method: method.into(),
            authority: authority.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .expect("explained")
}

#[test]
fn a_split_with_its_weights_and_each_backends_verdict() {
    let e = ask("web", "GET", "catalog:8080", "/items", &[]);
    assert_eq!(e.destination.as_deref(), Some("default/catalog"));
    assert_eq!(e.answer, None);
    assert_eq!(
        e.rule.as_deref(),
        Some("HTTPRoute default/catalog rule 1 (path prefix /)")
    );
    let shares: Vec<(&str, u32, f64)> = e
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.weight, b.percent))
        .collect();
    assert_eq!(
        shares,
        [
            ("default/catalog-v1", 90, 90.0),
            ("default/catalog-v2", 10, 10.0)
        ]
    );
    for b in &e.backends {
        assert_eq!(b.verdict, "allow", "{b:?}");
        assert!(b.decided_by.contains("default/catalog-v"), "{b:?}");
    }
    // The header rule sends to v2 alone.
    let e = ask("web", "GET", "catalog:8080", "/", &[("X-Canary", "1")]);
    assert!(
        e.rule
            .as_deref()
            .is_some_and(|r| r.contains("rule 0 (path prefix /, header x-canary=1)")),
        "{e:?}"
    );
    assert_eq!(e.backends.len(), 1);
    // A rollout's split is in force instead of the written weights.
    let mut splits = Splits::new();
    splits.insert(
        "default/catalog".into(),
        Split {
            stable: "catalog-v1".into(),
            canary: "catalog-v2".into(),
            canary_permille: 250,
        },
    );
    let e = ask_with(&splits, "web", "GET", "catalog:8080", "/", &[]);
    let pct: Vec<f64> = e.backends.iter().map(|b| b.percent).collect();
    assert_eq!(pct, [75.0, 25.0]);
    assert!(
        e.rollout.as_deref().is_some_and(|r| r.contains("25.0%")),
        "{e:?}"
    );
}

#[test]
fn policy_retries_and_the_access_rule_that_decides() {
    let e = ask("orders", "POST", "payments", "/charge", &[]);
    assert_eq!(e.timeout_ms, Some(2000));
    assert_eq!(e.per_try_timeout_ms, Some(500));
    assert!(
        e.retries
            .as_deref()
            .is_some_and(|r| r.starts_with("2 retries on 5xx")),
        "{e:?}"
    );
    assert_eq!(e.policy.as_deref(), Some("default/payments"));
    assert_eq!(e.backends[0].verdict, "allow");
    assert!(e.backends[0].decided_by.contains("rule 0"), "{e:?}");
    // Another caller, another path: denied, and by what.
    let e = ask("web", "POST", "payments:8080", "/charge", &[]);
    assert_eq!(e.backends[0].verdict, "deny", "{e:?}");
    let e = ask("orders", "DELETE", "payments:8080", "/charge", &[]);
    assert_eq!(e.backends[0].verdict, "deny", "{e:?}");
    assert!(e.backends[0].decided_by.contains("none matched"), "{e:?}");
}

#[test]
fn filters_mirrors_faults_and_redirects() {
    let e = ask("web", "GET", "docs:8080", "/old/page?x=1", &[]);
    assert_eq!(
        e.answer.as_deref(),
        Some("301 redirect to http://docs:8080/new/page?x=1")
    );
    assert!(e.backends.is_empty());
    let e = ask("web", "GET", "docs", "/api/v1", &[]);
    assert_eq!(
        e.request_changes,
        ["remove header x-debug", "set header x-env: prod"]
    );
    assert_eq!(e.mirrors, [("default/orders".to_string(), 25.0)]);
    assert_eq!(e.timeout_ms, Some(300));
    let fault = e.fault.clone().expect("fault");
    assert!(
        fault.contains("delay 50 ms to 10% of requests") && fault.contains("not this request"),
        "{fault}"
    );
    let e = ask("web", "GET", "docs", "/api/v1", &[("x-chaos", "on")]);
    assert!(e.fault.is_some_and(|f| !f.contains("not this request")));
}

#[test]
fn what_the_callers_sidecar_answers_itself() {
    let e = ask("web", "GET", "nowhere:8080", "/", &[]);
    assert!(
        e.answer
            .as_deref()
            .is_some_and(|a| a.starts_with("404 unknown-service")),
        "{e:?}"
    );
    let e = ask("web", "GET", "docs", "/elsewhere", &[]);
    assert!(
        e.answer
            .as_deref()
            .is_some_and(|a| a.starts_with("404 no-route")),
        "{e:?}"
    );
    // An unknown source cannot be explained.
    assert!(explain(
        &set(),
        &Splits::new(),
        "tandem.local",
        &ExplainRequest {
            source: "ghost".into(),
            method: "GET".into(),
            authority: "web".into(),
            path: "/".into(),
            headers: vec![],
        }
    )
    .is_err());
}
