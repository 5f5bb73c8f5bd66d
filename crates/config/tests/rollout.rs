//! Rollout: what is refused, the plan it compiles to, and the weights a
//! split puts on the rules it drives (and only on those).

use std::collections::BTreeSet;

use tandem_config::compile::{compile_with, Target};
use tandem_config::load_str;
use tandem_config::rollout::{plans, Split, Splits};

const BASE: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{name: catalog}]
  rules:
    - matches: [{headers: [{name: x-canary, value: "1"}]}]
      backendRefs: [{name: catalog-v2}]
    - backendRefs: [{name: catalog-v1, weight: 90}, {name: catalog-v2, weight: 10}]
---
"#;

const ROLLOUT: &str = r#"apiVersion: tandem.dev/v1alpha1
kind: Rollout
metadata: {name: catalog}
spec:
  service: catalog
  stable: catalog-v1
  canary: catalog-v2
  steps: [0.1, 5, 25, 100]
  hold: 10s
  thresholds: {successRate: 99.5, p99: 250ms, minRequests: 40}
"#;

fn errors(extra: &str) -> Vec<String> {
    match load_str("t.yaml", &format!("{BASE}{extra}")) {
        Ok(_) => vec![],
        Err(d) => d.iter().map(|d| d.to_string()).collect(),
    }
}

#[test]
fn a_rollout_compiles_to_its_plan() {
    let set = load_str("t.yaml", &format!("{BASE}{ROLLOUT}")).expect("valid");
    let p = &plans(&set)[0];
    assert_eq!(p.key(), "default/catalog");
    assert_eq!(p.steps, [1, 50, 250, 1000]);
    assert_eq!(p.hold_ms, 10_000);
    assert_eq!(p.min_success, 0.995);
    assert_eq!(p.max_p99_ms, Some(250.0));
    assert_eq!(p.min_requests, 40);
}

#[test]
fn a_split_drives_only_the_rules_of_stable_and_canary() {
    let set = load_str("t.yaml", &format!("{BASE}{ROLLOUT}")).expect("valid");
    let interest: BTreeSet<String> = ["catalog".to_string()].into();
    let target = Target {
        namespace: "default",
        service: "web",
        interest: &interest,
    };
    let weights = |splits: &Splits| {
        let snap = compile_with(&set, &target, &|_, _| vec![], splits);
        let d = &snap.destinations[0];
        d.routes
            .iter()
            .map(|r| {
                r.backends
                    .iter()
                    .map(|b| (d.backends[b.backend].name.clone(), b.weight))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let v = |a: &str, w: u32| (a.to_string(), w);
    // Without a split, the file's weights.
    assert_eq!(
        weights(&Splits::new()),
        [
            vec![v("catalog-v2", 1)],
            vec![v("catalog-v1", 90), v("catalog-v2", 10)]
        ]
    );
    let mut splits = Splits::new();
    splits.insert(
        "default/catalog".into(),
        Split {
            stable: "catalog-v1".into(),
            canary: "catalog-v2".into(),
            canary_permille: 1,
        },
    );
    // 0.1 %: the header rule keeps sending testers to v2.
    assert_eq!(
        weights(&splits),
        [
            vec![v("catalog-v2", 1)],
            vec![v("catalog-v1", 999), v("catalog-v2", 1)]
        ]
    );
}

#[test]
fn mistakes_in_a_rollout_are_refused() {
    let bad = r#"apiVersion: tandem.dev/v1alpha1
kind: Rollout
metadata: {name: catalog}
spec:
  service: catalog
  stable: catalog-v1
  canary: catalog-v1
  steps: [5, 2.55, 50]
  hold: forever
  thresholds: {successRate: 101, minRequests: 0}
"#;
    let e = errors(bad);
    let has = |msg: &str| assert!(e.iter().any(|x| x.contains(msg)), "{msg}\n{e:#?}");
    has("the canary must be another Service than the stable one");
    has("step 2.55 must be a share above 0 and at most 100, in steps of 0.1");
    has("the last step must be 100");
    has("`forever` is not a duration");
    has("successRate must be 0-100");
    has("minRequests must be at least 1");

    let undriven = ROLLOUT.replace("canary: catalog-v2", "canary: web");
    let e = errors(&undriven);
    assert!(
        e.iter()
            .any(|x| x.contains("has exactly `catalog-v1` and `web` as its backendRefs")),
        "{e:#?}"
    );
    let twice = format!(
        "{ROLLOUT}---\n{}",
        ROLLOUT.replace("name: catalog}", "name: again}")
    );
    let e = errors(&twice);
    assert!(
        e.iter()
            .any(|x| x.contains("already has Rollout `catalog`")),
        "{e:#?}"
    );
    let falling = ROLLOUT.replace("[0.1, 5, 25, 100]", "[5, 5, 100]");
    assert!(errors(&falling)
        .iter()
        .any(|x| x.contains("steps must rise")));
}
