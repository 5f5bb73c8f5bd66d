//! ExternalService and the mesh's egress mode: checked with positions,
//! compiled into every snapshot.

use tandem_config::compile::egress;
use tandem_config::load_str;
use tandem_config::snapshot::{EgressMode, ExternalProtocol};

const GOOD: &str = r#"apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: billing}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  egress: {mode: registry-only}
---
apiVersion: tandem.dev/v1alpha1
kind: ExternalService
metadata: {name: payments-api}
spec:
  hosts: [API.Stripe.com, "*.stripe.net", 10.1.2.3]
  ports: [{port: 443, protocol: tls}, {port: 80, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: payments-api}
spec:
  targetRef: {kind: ExternalService, name: payments-api}
  timeout: 2s
---
apiVersion: tandem.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments-api}
spec:
  targetRef: {kind: ExternalService, name: payments-api}
  rules: [{from: [{services: [web]}]}]
"#;

#[test]
fn external_services_compile_into_the_egress_of_every_snapshot() {
    let set = load_str("mesh.yaml", GOOD).expect("valid");
    let e = egress(&set);
    assert_eq!(e.mode, EgressMode::RegistryOnly);
    let s = &e.services[0];
    assert_eq!(s.hosts, ["api.stripe.com", "*.stripe.net", "10.1.2.3"]);
    assert_eq!(s.ports[0].protocol, ExternalProtocol::Tls);
    assert_eq!(s.policy.as_ref().and_then(|p| p.timeout_ms), Some(2000));
    assert_eq!(s.authz.policies.len(), 1);
}

fn problems(extra: &str) -> Vec<String> {
    let text = format!("{GOOD}---\n{extra}");
    match load_str("mesh.yaml", &text) {
        Ok(_) => Vec::new(),
        Err(d) => d.iter().map(|d| d.to_string()).collect(),
    }
}

#[test]
fn bad_external_services_are_refused_with_positions() {
    let p = problems(
        r#"apiVersion: tandem.dev/v1alpha1
kind: ExternalService
metadata: {name: other}
spec:
  hosts: ["bad host", api.stripe.com]
  ports: [{port: 0, protocol: tcp}]
"#,
    );
    assert!(
        p.iter()
            .any(|d| d.starts_with("mesh.yaml:44:11:") && d.contains("`bad host` is not a host")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|d| d
            .contains("host `api.stripe.com` is already listed by ExternalService `payments-api`")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|d| d.contains("port must be 1-65535")),
        "{p:?}"
    );

    let p = problems(
        r#"apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: payments-api}
spec:
  ports: [{port: 80, protocol: http}]
"#,
    );
    assert!(p.iter().any(|d| d.contains("already a Service")), "{p:?}");

    let bad_mode = GOOD.replace("registry-only", "closed");
    let p = load_str("mesh.yaml", &bad_mode).expect_err("bad mode");
    assert!(
        p[0].to_string().starts_with("mesh.yaml:17:")
            && p[0].to_string().contains("`allow-all` or `registry-only`"),
        "{p:?}"
    );
}

#[test]
fn policies_on_a_tunnelled_external_service_stay_within_what_a_tunnel_shows() {
    let p = problems(
        r#"apiVersion: tandem.dev/v1alpha1
kind: ExternalService
metadata: {name: bank}
spec:
  hosts: [bank.example.com]
  ports: [{port: 443, protocol: tls}]
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: bank}
spec:
  targetRef: {kind: ExternalService, name: bank}
  timeout: 1s
  rateLimit: {requestsPerSecond: 5}
---
apiVersion: tandem.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bank}
spec:
  targetRef: {kind: ExternalService, name: bank}
  rules: [{to: [{paths: [/x]}]}]
"#,
    );
    assert!(p.iter().any(|d| d.contains("has no http port")), "{p:?}");
    assert!(
        p.iter().any(|d| d.contains("rateLimit is enforced")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|d| d.contains("`paths` is an HTTP field")),
        "{p:?}"
    );
    let p = problems(
        r#"apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ghost}
spec:
  targetRef: {kind: ExternalService, name: ghost}
"#,
    );
    assert!(
        p.iter()
            .any(|d| d.contains("ExternalService `default/ghost`, which does not exist")),
        "{p:?}"
    );
}

#[test]
fn explain_tells_egress_from_mesh_calls() {
    use tandem_config::explain::{explain, ExplainRequest};
    use tandem_config::rollout::Splits;
    let set = load_str("mesh.yaml", GOOD).expect("valid");
    let ask = |authority: &str| {
        explain(
            &set,
            &Splits::new(),
            "tandem.local",
            &ExplainRequest {
                source: "web".into(),
                method: "GET".into(),
                authority: authority.into(),
                path: "/".into(),
                headers: Vec::new(),
            },
        )
        .expect("explained")
    };
    let e = ask("files.stripe.net:80");
    assert_eq!(e.destination.as_deref(), Some("default/payments-api"));
    assert_eq!((e.answer, e.timeout_ms), (None, Some(2000)));
    let e = ask("api.stripe.com:8443");
    assert!(
        e.answer
            .as_deref()
            .is_some_and(|a| a.starts_with("403 egress-denied") && a.contains("port 8443")),
        "{e:?}"
    );
    // Its access policy lets only `web` call it.
    let e = explain(
        &set,
        &Splits::new(),
        "tandem.local",
        &ExplainRequest {
            source: "billing".into(),
            method: "GET".into(),
            authority: "api.stripe.com:80".into(),
            path: "/".into(),
            headers: Vec::new(),
        },
    )
    .expect("explained");
    assert!(
        e.answer
            .as_deref()
            .is_some_and(|a| a.starts_with("403 egress-denied") && a.contains("svc/billing")),
        "{e:?}"
    );
    let e = ask("example.com");
    assert!(
        e.answer
            .as_deref()
            .is_some_and(|a| a.contains("registry-only")),
        "{e:?}"
    );
    let e = ask("nosuchservice");
    assert!(
        e.answer
            .as_deref()
            .is_some_and(|a| a.starts_with("404 unknown-service")),
        "{e:?}"
    );
}
