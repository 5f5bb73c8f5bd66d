//! HTTPRoute filters and FaultInjection: what loads, what it compiles to,
//! and every refusal with its position.

use std::collections::BTreeSet;

use tandem_config::compile::{compile, Target};
use tandem_config::load_str;
use tandem_config::snapshot::{Filters, NameValue, PathModifier, Snapshot};

const SERVICES: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: shop-v2}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: shadow}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: db}
spec:
  ports: [{port: 5432, protocol: tcp}]
"#;

fn errors(extra: &str) -> Vec<String> {
    match load_str("t.yaml", &format!("{SERVICES}---{extra}")) {
        Ok(_) => vec![],
        Err(d) => d.iter().map(|d| d.to_string()).collect(),
    }
}

/// The line `needle` is on in the whole text (services first), 1-based.
fn line_of(extra: &str, needle: &str) -> usize {
    let text = format!("{SERVICES}---{extra}");
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle} not in the config"))
}

fn web_snapshot(extra: &str) -> Snapshot {
    let set = load_str("t.yaml", &format!("{SERVICES}---{extra}")).expect("valid");
    let interest: BTreeSet<String> = ["shop".to_string()].into();
    compile(
        &set,
        &Target {
            namespace: "default",
            service: "web",
            interest: &interest,
        },
        &|_, _| vec![],
    )
}

const ALL_FILTERS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop}
spec:
  parentRefs: [{name: shop}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Env, value: prod}]
            add: [{name: x-trail, value: web}]
            remove: [x-debug]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-served-by, value: shop}]}
        - type: URLRewrite
          urlRewrite: {hostname: shop.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow, port: 8080}, percent: 25}
        - type: ExtensionRef
          extensionRef: {group: tandem.dev, kind: FaultInjection, name: chaos}
      backendRefs:
        - name: shop
          weight: 9
        - name: shop-v2
          weight: 1
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: x-canary, value: "1"}]}
---
apiVersion: tandem.dev/v1alpha1
kind: FaultInjection
metadata: {name: chaos}
spec:
  match: {headers: [{name: x-chaos, value: "on"}]}
  delay: {duration: 200ms, percent: 10}
  abort: {grpcStatus: UNAVAILABLE, percent: 0.5}
"#;

#[test]
fn every_filter_loads_and_compiles() {
    let snap = web_snapshot(ALL_FILTERS);
    let d = &snap.destinations[0];
    let names: Vec<&str> = d.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["shop", "shop-v2", "shadow"]);
    // Longest prefix first: /old, then /api.
    let redirect = d.routes[0].filters.as_deref().expect("redirect filters");
    let rd = redirect.redirect.as_ref().expect("redirect");
    assert_eq!(rd.status, 301);
    assert_eq!(
        rd.path,
        Some(PathModifier::Prefix {
            prefix: "/old".into(),
            with: "/new".into()
        })
    );
    assert!(d.routes[0].backends.is_empty());
    let api = &d.routes[1];
    let f: &Filters = api.filters.as_deref().expect("filters");
    let req = f.request_headers.as_ref().expect("request headers");
    assert_eq!(
        req.set,
        [NameValue {
            name: "x-env".into(),
            value: "prod".into()
        }]
    );
    assert_eq!(req.remove, ["x-debug"]);
    assert_eq!(
        f.response_headers.as_ref().map(|h| h.set[0].name.as_str()),
        Some("x-served-by")
    );
    let rw = f.rewrite.as_ref().expect("rewrite");
    assert_eq!(rw.hostname.as_deref(), Some("shop.internal"));
    assert_eq!(f.mirrors.len(), 1);
    assert_eq!(f.mirrors[0].backend, 2);
    assert_eq!(
        (f.mirrors[0].numerator, f.mirrors[0].denominator),
        (25, 100)
    );
    let fault = f.fault.as_ref().expect("fault");
    assert_eq!(fault.source, "default/chaos");
    assert_eq!(
        fault.delay.as_ref().map(|d| (d.ms, d.percent)),
        Some((200, 10.0))
    );
    assert_eq!(fault.abort.as_ref().and_then(|a| a.grpc_status), Some(14));
    assert_eq!(fault.headers[0].name, "x-chaos");
    // Header filters on the second backendRef only.
    assert!(api.backends[0].filters.is_none());
    let canary = api.backends[1].filters.as_deref().expect("backend filters");
    assert_eq!(
        canary
            .request_headers
            .as_ref()
            .map(|h| h.set[0].value.as_str()),
        Some("1")
    );
    // The snapshot travels as JSON: filters survive the round trip.
    let back = Snapshot::from_json(&snap.to_json()).expect("json");
    assert_eq!(back, snap);
}

#[test]
fn mistakes_in_filters_are_refused_with_positions() {
    let bad = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop}
spec:
  parentRefs: [{name: shop}]
  rules:
    - matches: [{path: {type: Exact, value: /a}}]
      filters:
        - type: Teleport
        - type: RequestHeaderModifier
          responseHeaderModifier: {set: [{name: x, value: "1"}]}
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: Host, value: evil}], add: [{name: tandem-client-id, value: x}], remove: ["bad name"]}
        - type: URLRewrite
          urlRewrite: {hostname: "shop:80", path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}
        - type: RequestMirror
          requestMirror: {backendRef: {name: db}, percent: 101}
        - type: RequestMirror
          requestMirror: {backendRef: {name: ghost}, fraction: {numerator: 1, denominator: 0}}
        - type: ExtensionRef
          extensionRef: {group: example.com, kind: Magic, name: m}
      backendRefs: [{name: shop}]
    - filters:
        - type: RequestRedirect
          requestRedirect: {scheme: ftp, statusCode: 200}
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: "no-slash"}}
      backendRefs:
        - name: shop
          filters:
            - type: RequestMirror
              requestMirror: {backendRef: {name: shadow}}
    - matches: [{path: {value: /f}}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: tandem.dev, kind: FaultInjection, name: missing}
      backendRefs: [{name: shop}]
---
apiVersion: tandem.dev/v1alpha1
kind: FaultInjection
metadata: {name: broken}
spec:
  delay: {duration: soon, percent: 150}
  abort: {httpStatus: 200, grpcStatus: "99"}
"#;
    let e = errors(bad);
    let has = |line_needle: &str, msg: &str| {
        let line = line_of(bad, line_needle);
        let found = e
            .iter()
            .any(|x| x.starts_with(&format!("t.yaml:{line}:")) && x.contains(msg));
        assert!(found, "line {line} ({line_needle}): {msg}\n{e:#?}");
    };
    has("type: Teleport", "unknown filter type `Teleport`");
    has(
        "- type: RequestHeaderModifier",
        "needs its settings in `requestHeaderModifier`",
    );
    has(
        "name: Host",
        "change it with a URLRewrite filter's `hostname`",
    );
    has("name: Host", "reserved for the mesh");
    has("name: Host", "`bad name` is not a valid header name");
    has("hostname: \"shop:80\"", "is not a valid host name");
    has(
        "hostname: \"shop:80\"",
        "ReplacePrefixMatch needs a rule with exactly one match, a PathPrefix path",
    );
    has("name: db}, percent: 101", "percent must be 0-100");
    has("name: ghost", "numerator <= denominator");
    has(
        "group: example.com",
        "the one extension is group `tandem.dev`",
    );
    has("scheme: ftp", "scheme must be `http` or `https`");
    has("scheme: ftp", "statusCode 200 is not a redirect");
    has("replaceFullPath: \"no-slash\"", "must start with '/'");
    has(
        "name: missing",
        "FaultInjection `default/missing` does not exist",
    );
    has("duration: soon", "percent must be 0-100");
    has("abort: {httpStatus: 200", "not both");
    has("abort: {httpStatus: 200", "httpStatus must be 400-599");
    has("abort: {httpStatus: 200", "is not a gRPC error status");
    assert!(
        e.iter()
            .any(|x| x.contains("cannot also have a URLRewrite filter")),
        "{e:#?}"
    );
    assert!(
        e.iter().any(
            |x| x.contains("a RequestRedirect answers requests itself; remove its backendRefs")
        ),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|x| x.contains("a backendRef's filters may only modify headers; put the RequestMirror filter on the rule")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|x| x.contains("is tcp; requests can only be mirrored")),
        "{e:#?}"
    );
}

#[test]
fn one_filter_of_a_kind_per_rule_except_mirrors() {
    let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop}
spec:
  parentRefs: [{name: shop}]
  rules:
    - filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow}}
        - type: RequestMirror
          requestMirror: {backendRef: {name: shop-v2}, fraction: {numerator: 1, denominator: 1000}}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {remove: [server]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {remove: [x-powered-by]}
      backendRefs: [{name: shop}]
"#;
    let e = errors(yaml);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with(&format!(
            "t.yaml:{}:",
            line_of(yaml, "remove: [x-powered-by]") - 1
        )),
        "{e:#?}"
    );
    assert!(e[0].contains("a rule may have one ResponseHeaderModifier filter"));
}

#[test]
fn grpc_status_may_be_a_number() {
    let yaml = r#"
apiVersion: tandem.dev/v1alpha1
kind: FaultInjection
metadata: {name: f}
spec:
  abort: {grpcStatus: 14}
"#;
    assert_eq!(errors(yaml), Vec::<String>::new());
}

#[test]
fn grpc_routes_compile_to_paths_and_are_checked() {
    let extra = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec:
  ports: [{port: 9090, protocol: grpc}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo}
spec:
  parentRefs: [{name: echo}]
  rules:
    - matches: [{method: {method: Unary}}]
      backendRefs: [{name: echo}]
    - matches: [{method: {service: pkg.Echo}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow}}
      backendRefs: [{name: echo}]
    - matches: [{method: {service: pkg.Echo, method: Stream}, headers: [{name: X-A, value: "1"}]}]
      backendRefs: [{name: echo}]
    - backendRefs: [{name: echo}]
"#;
    let set = load_str("t.yaml", &format!("{SERVICES}---{extra}")).expect("valid");
    let interest: BTreeSet<String> = ["echo".to_string()].into();
    let snap = compile(
        &set,
        &Target {
            namespace: "default",
            service: "web",
            interest: &interest,
        },
        &|_, _| vec![],
    );
    let routes = &snap.destinations[0].routes;
    let shape: Vec<(usize, String, Option<&str>)> = routes
        .iter()
        .map(|r| {
            (
                r.rule,
                r.matcher
                    .path
                    .as_ref()
                    .map(|p| p.value.clone())
                    .unwrap_or_default(),
                r.matcher.grpc_method.as_deref(),
            )
        })
        .collect();
    // Exact method, then the service's prefix, then a method of any
    // service, then the rest.
    assert_eq!(
        shape,
        [
            (2, "/pkg.Echo/Stream".to_string(), None),
            (1, "/pkg.Echo".to_string(), None),
            (0, "/".to_string(), Some("Unary")),
            (3, "/".to_string(), None),
        ]
    );
    assert_eq!(routes[0].matcher.headers[0].name, "x-a");
    assert_eq!(routes[1].filters.as_ref().map(|f| f.mirrors.len()), Some(1));

    let bad = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: bad}
spec:
  parentRefs: [{name: shop}]
  rules:
    - matches: [{method: {type: RegularExpression, service: "pkg/Echo", method: "Do-It"}}, {method: {}}]
      filters:
        - type: URLRewrite
          urlRewrite: {hostname: x}
      backendRefs: [{name: ghost}]
"#;
    let e = errors(bad);
    let has = |msg: &str| assert!(e.iter().any(|x| x.contains(msg)), "{msg}\n{e:#?}");
    has("port 8080 is http; a GRPCRoute needs a grpc port");
    has("method match type `RegularExpression` is not supported");
    has("`pkg/Echo` is not a gRPC service name");
    has("`Do-It` is not a gRPC method name");
    has("a method match needs a `service`, a `method` or both");
    has("a GRPCRoute has no URLRewrite filter");
    has("backendRef names Service `default/ghost`, which does not exist");
}
